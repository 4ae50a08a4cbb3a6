"""``qcorda train RECIPE [train.max_steps=50 ...]``"""

from __future__ import annotations

import argparse
import textwrap

from ..methods import training_evidence
from .flags import add_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe(p, "train.max_steps=50 output_dir=runs/x")


def run(args) -> int:
    from ..recipe import load_recipe
    from ..table import fmt, print_table
    from ..train import init_of, train

    recipe = load_recipe(args.recipe, args.overrides)
    r = train(recipe)
    rows = [
        ["steps", r.global_step],
        ["resumed from", r.resumed_from or "-"],
        ["learning rate", r.learning_rate],
        ["loss", f"{fmt(r.first_loss)} -> {fmt(r.last_loss)}"],
        ["eval loss", r.eval_loss],
        ["trainable params", r.trainable_params],
        ["prepared", str(r.prepared)],
        ["adapter", str(r.adapter)],
        ["adapter sha256", r.adapter_sha256[:16]],
        ["seconds", r.seconds],
    ]
    print_table(["", "value"], rows, title=f"trained {args.recipe}")
    print(f"loss: {fmt(r.first_loss)} -> {fmt(r.last_loss)}")
    print(f"adapter sha256: {r.adapter_sha256}")
    print(textwrap.fill("what training showed: " + training_evidence(*init_of(recipe)), 110))
    return 0
