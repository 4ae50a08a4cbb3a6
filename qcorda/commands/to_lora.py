"""``qcorda to-lora PREPARED --adapter TRAINED --base ORIGINAL --out DIR --mode ...``"""

from __future__ import annotations

import argparse

from ..config import ToLoraConfig
from .flags import build
from .merge import add_export_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_export_arguments(p, ToLoraConfig, "output adapter directory (written atomically)")
    p.add_argument("--base", required=True, help="the original unquantized model PREPARED was made from (directory, hub id or gemma-3-270m)")
    p.add_argument("--merged", default=None, help="a qcorda merge output to compare with (default: merged to --dtype in a temp dir)")


def run(args) -> int:
    from ..scoring import HEADERS
    from ..table import print_table
    from ..to_lora import to_lora

    cfg: ToLoraConfig = build(args, args._flags)
    res = to_lora(args.prepared, args.base, args.out, cfg, adapter=args.adapter, merged=args.merged, overwrite=args.overwrite)
    energy = [l.energy for l in res.layers]
    gaps = [l.err_to_trained for l in res.layers]
    rows = [
        ["layers", len(res.layers)],
        ["ranks", ", ".join(str(r) for r in sorted({l.rank for l in res.layers}))],
        ["energy kept: min / mean", f"{min(energy):.4f} / {sum(energy) / len(energy):.4f}"],
        ["‖W+ΔW − trained‖/‖trained‖: max / mean", f"{max(gaps):.3e} / {sum(gaps) / len(gaps):.3e}"],
        ["seconds", res.seconds],
    ]
    print_table(["to-lora", "value"], rows, title=f"{res.kind} -> {res.out} (per layer in {res.out}/qcorda_to_lora.json)")
    if res.agreement:
        print_table(HEADERS, [a.row() for a in res.agreement], title="base + LoRA on held-out text")
    return 0
