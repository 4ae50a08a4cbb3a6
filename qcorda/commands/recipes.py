"""``qcorda recipes`` (list the shipped recipes) and ``qcorda recipes copy NAME DIR [--force]``"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="list the shipped recipes (the default)")
    c = sub.add_parser("copy", help="copy a shipped recipe (or accelerate config) out to edit",
                       description="copy a shipped recipe (or accelerate config) out to edit")
    c.add_argument("name", help="a shipped recipe's name, e.g. llama3-8b/qcorda-ipm-metamath (see `qcorda recipes`)")
    c.add_argument("dest", metavar="DIR", help="directory to copy into (created if missing), or a .yaml file path")
    c.add_argument("--force", action="store_true", help="replace the file if it exists")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="plan the memory for a CUDA GPU (default) or the CPU")


def run(args) -> int:
    if getattr(args, "action", None) == "copy":
        return copy(args)
    return list_recipes(args)


def list_recipes(args) -> int:
    from ..config import ConfigError
    from ..plan import GB, plan_recipe
    from ..recipe import load_recipe, shipped
    from ..table import print_table

    rows = []
    for name, path in shipped().items():
        r = load_recipe(path)
        try:
            plan = plan_recipe(r, args.device, check=False).plan
            planned = f"{plan.total / GB:.2f} GB" + ("" if r.gpu_memory_gb is None else f" ({'fits' if plan.fits(r.gpu_memory_gb) else 'does NOT fit'})")
        except ConfigError:  # no arch: section, nothing to plan
            planned = "-"
        method = r.init.method if r.init is not None else "(prepared)"
        gpu = f"{r.gpu_memory_gb:g} GB" if r.gpu_memory_gb is not None else "-"
        rows.append([name, r.model or "-", method, r.rank if r.rank is not None else "-", gpu, planned])
    print_table(["recipe", "model", "method", "r", "GPU", f"planned ({args.device})"], rows, title="shipped recipes")
    configs = [n for n in shipped(configs=True) if n not in shipped()]
    if configs:
        print(f"accelerate configs: {', '.join(configs)} (qcorda recipes copy NAME DIR, then accelerate launch --config_file)")
    print("train one: qcorda train NAME [key=value ...]; plan it: qcorda plan NAME; edit it: qcorda recipes copy NAME DIR")
    return 0


def copy(args) -> int:
    from ..io import OutputExistsError, write_text_atomic
    from ..recipe import RECIPES_DIR, shipped, shipped_recipe

    src = shipped_recipe(args.name, configs=True)  # a shipped name only: an unknown one lists the closest
    key = src.relative_to(RECIPES_DIR).with_suffix("").as_posix()
    dest = Path(args.dest)
    target = dest if dest.suffix in (".yaml", ".yml") else dest / src.name
    if target.exists() and not args.force:
        raise OutputExistsError(f"{target} exists; pass --force to replace it with the shipped {key}")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, src.read_text())
    print(f"copied {key} -> {target}")
    if key in shipped():
        print(f"edit it, then: qcorda train {target}")
    return 0
