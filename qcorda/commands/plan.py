"""``qcorda plan RECIPE [key=value ...] [--device cuda|cpu]``"""

from __future__ import annotations

import argparse

from .flags import add_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe(p, "train.batch_size=8 init.rank=128")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="plan for a CUDA GPU (default: bf16 compute, CUDA context) or for the CPU (fp32, no context)")
    p.add_argument("--no-check", action="store_true", help="do not compare arch: with the model's config.json")


def run(args) -> int:
    from ..plan import GB, GPU_SIZES_GB, plan_recipe, plan_rows
    from ..recipe import load_recipe
    from ..table import print_table

    recipe = load_recipe(args.recipe, args.overrides)
    res = plan_recipe(recipe, args.device, check=not args.no_check)
    p, i = res.plan, res.input
    title = (f"plan {args.recipe}: r={i.rank}, batch {i.batch_size} x {i.seq_len} tokens, {i.optim}, "
             f"{i.compute_bytes * 8}-bit compute, {args.device}")
    print_table(["term", "GB"], plan_rows(p), title=title)
    checked = res.checked_against or "not readable offline (arch: taken as given)"
    print(f"arch checked against: {checked}")
    print(f"trainable params: {p.trainable_params:,}  quantized params: {p.quantized_params:,}")
    for gb in GPU_SIZES_GB:
        verdict = "fits" if p.fits(gb) else "does NOT fit"
        print(f"{gb} GB GPU: {verdict} ({p.total / GB:.2f} GB planned, {gb - p.total / GB:+.2f} GB headroom)")
    return 0
