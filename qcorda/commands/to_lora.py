"""``qcorda to-lora PREPARED --adapter TRAINED --base ORIGINAL --out DIR --mode ...``"""

from __future__ import annotations

import argparse

from .merge import add_verify_arguments, verify_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..to_lora import MODES

    p.add_argument("prepared", help="directory written by qcorda prepare")
    p.add_argument("--adapter", default=None, help="trained adapter directory (default PREPARED/adapter_init)")
    p.add_argument("--base", required=True, help="the original unquantized model PREPARED was made from (directory, hub id or gemma-3-270m)")
    p.add_argument("--out", required=True, help="output adapter directory (written atomically)")
    p.add_argument("--mode", default="exact-delta", choices=MODES,
                   help="exact-delta: rank 2r, exact without quantization; compress: ΔW truncated to --rank; "
                        "absorb-quant-error: best rank-k fit of the trained 4-bit model")
    p.add_argument("--rank", type=int, default=None, help="rank k for compress / absorb-quant-error (default r of each layer)")
    p.add_argument("--merged", default=None, help="a qcorda merge output to compare with (default: merged to --dtype in a temp dir)")
    p.add_argument("--dtype", default="float16", help="dtype of the merged model the LoRA is verified against: float16, bfloat16 "
                   "(Gemma-3 overflows float16) or float32")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_verify_arguments(p)


def run(args) -> int:
    from ..scoring import HEADERS
    from ..table import print_table
    from ..to_lora import to_lora

    res = to_lora(args.prepared, args.base, args.out, args.mode, args.adapter, args.rank, verify_config(args),
                  args.merged, args.overwrite, args.device, dtype=args.dtype)
    energy = [l.energy for l in res.layers]
    gaps = [l.err_to_trained for l in res.layers]
    rows = [
        ["layers", len(res.layers)],
        ["ranks", ", ".join(str(r) for r in sorted({l.rank for l in res.layers}))],
        ["energy kept: min / mean", f"{min(energy):.4f} / {sum(energy) / len(energy):.4f}"],
        ["‖W+ΔW − trained‖/‖trained‖: max / mean", f"{max(gaps):.3e} / {sum(gaps) / len(gaps):.3e}"],
        ["seconds", res.seconds],
    ]
    print_table(["to-lora", "value"], rows, title=f"{res.mode} -> {res.out} (per layer in {res.out}/qcorda_to_lora.json)")
    if res.agreement:
        print_table(HEADERS, [a.row() for a in res.agreement], title="base + LoRA on held-out text")
    return 0
