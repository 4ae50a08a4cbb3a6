"""``qcorda merge PREPARED --adapter TRAINED --out DIR --dtype float16|bfloat16``"""

from __future__ import annotations

import argparse

from ..config import MergeConfig
from .flags import add_config, build

#: The verification's flags: verification.data → --verify-data.
VERIFY_PREFIXES = {"verification.": "verify-"}


def add_export_arguments(p: argparse.ArgumentParser, config: type, out_help: str) -> None:
    """What merge and to-lora both take: the prepared directory, the trained adapter, the output, and the
    flags of their config (``--verify-*`` for its held-out text)."""
    p.add_argument("prepared", help="directory written by qcorda prepare")
    p.add_argument("--adapter", default=None, help="trained adapter directory (default PREPARED/adapter_init)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(_flags=add_config(p, config, prefixes=VERIFY_PREFIXES))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_export_arguments(p, MergeConfig, "output directory (written atomically)")


def run(args) -> int:
    from ..merge import merge
    from ..scoring import HEADERS
    from ..table import print_table

    cfg: MergeConfig = build(args, args._flags)
    res = merge(args.prepared, args.out, cfg, adapter=args.adapter, overwrite=args.overwrite)
    worst = max(res.layers, key=lambda l: l.cast_err)
    rows = [["layers merged", len(res.layers)], ["max cast error", worst.cast_err], ["seconds", res.seconds]]
    print_table(["merge", "value"], rows, title=f"merged {args.prepared} + {args.adapter or 'adapter_init'} -> {res.out} ({res.kind})")
    if res.agreement:
        print_table(HEADERS, [a.row() for a in res.agreement], title=f"verification (saved in {res.out}/qcorda_verify.json)")
        if any(a.nonfinite for a in res.agreement):
            print(f"warning: the merged model gives non-finite logits in {res.kind} (activations exceed its range; "
                  "Gemma-3 does this in float16 even unmerged); use --dtype bfloat16")
    return 0
