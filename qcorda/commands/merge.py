"""``qcorda merge PREPARED --adapter TRAINED --out DIR --dtype float16|bfloat16``"""

from __future__ import annotations

import argparse

from .common import csv


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    """Held-out text for the logit comparison (shared by merge and to-lora)."""
    from ..merge import VerifyConfig

    d = VerifyConfig()
    g = p.add_argument_group("verification (on held-out text)")
    g.add_argument("--no-verify", action="store_true", help="skip the logit comparison")
    g.add_argument("--verify-data", default=d.data, help=f"held-out text: bundled alias, file or dataset (default {d.data})")
    g.add_argument("--verify-fields", type=csv, default=d.fields, help=f"record fields (default {','.join(d.fields)})")
    g.add_argument("--verify-template", default=d.template, help="alpaca, plain or chat")
    g.add_argument("--verify-samples", type=int, default=d.samples)
    g.add_argument("--verify-max-length", type=int, default=d.max_length)
    g.add_argument("--verify-batch-size", type=int, default=d.batch_size)
    p.add_argument("--device", default=None, help="cuda or cpu for the comparison (default cuda when present)")


def verify_config(args):
    from ..merge import VerifyConfig

    if args.no_verify:
        return None
    fields = tuple(args.verify_fields)
    if args.verify_data != VerifyConfig.data and args.verify_fields == VerifyConfig.fields:
        fields = ()  # the default fields belong to the default data
    return VerifyConfig(args.verify_data, fields, args.verify_samples, args.verify_max_length, args.verify_batch_size, args.verify_template)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prepared", help="directory written by qcorda prepare")
    p.add_argument("--adapter", default=None, help="trained adapter directory (default PREPARED/adapter_init)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="float16", help="float16, bfloat16 (or float32) for the merged weights")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_verify_arguments(p)


def run(args) -> int:
    from ..scoring import HEADERS
    from ..merge import merge
    from ..table import print_table

    res = merge(args.prepared, args.out, args.adapter, args.dtype, verify_config(args), args.overwrite, args.device)
    worst = max(res.layers, key=lambda l: l.cast_err)
    rows = [["layers merged", len(res.layers)], ["max cast error", worst.cast_err], ["seconds", res.seconds]]
    print_table(["merge", "value"], rows, title=f"merged {args.prepared} + {args.adapter or 'adapter_init'} -> {res.out} ({res.dtype})")
    if res.agreement:
        print_table(HEADERS, [a.row() for a in res.agreement], title=f"verification (saved in {res.out}/qcorda_verify.json)")
        if any(a.nonfinite for a in res.agreement):
            print(f"warning: the merged model gives non-finite logits in {res.dtype} (activations exceed its range; "
                  "Gemma-3 does this in float16 even unmerged); use --dtype bfloat16")
    return 0
