"""``qcorda probe-lr RECIPE.yaml [train.lr_probe=sharpness ...]``: the learning rate ``learning_rate: probe`` would train at."""

from __future__ import annotations

import argparse

from .flags import add_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe(p, "train.lr_probe=range train.seed=1")


def run(args) -> int:
    from ..probe import MEASURED, probe_budget
    from ..recipe import load_recipe
    from ..table import fmt, print_table
    from ..train import apply_quant_storage, init_of, prepared_model, probe_learning_rate

    recipe = load_recipe(args.recipe, args.overrides)
    model, tok, prepared = prepared_model(recipe)
    apply_quant_storage(recipe, model)
    r = probe_learning_rate(recipe, model, tok)
    t = recipe.train
    method, cal_start = init_of(recipe)
    what = MEASURED[r.method]
    run_passes = t.max_steps * t.batch_size * t.grad_accum
    print(f"learning rate: {r.learning_rate:.4g} ({r.rule}; measured {fmt(r.measured)}: {what})")
    print(f"took {r.seconds:.1f} s: {r.passes} sequence passes, {100 * r.passes / run_passes:.1f} % of the run's {run_passes}")
    rows = [
        ["init", method + (f" (cal_start {cal_start})" if method == "qcorda-cal" else "")],
        ["probe", r.method],
        ["measured", r.measured],
        ["rule", r.rule],
        ["learning rate", r.learning_rate],
        ["sequences", r.sequences],
        ["passes / budget", f"{r.passes} / {probe_budget(t.max_steps, t.batch_size, t.grad_accum)}"],
        ["seed", r.seed],
        ["seconds", r.seconds],
        ["prepared", str(prepared)],
    ]
    print_table(["", "value"], rows, title=f"probe-lr {args.recipe}")
    return 0
