"""``qcorda compare [MODEL] --methods ... --ranks 16,64 --calib-data ... --eval-data ... --out report/``

With no arguments: the real Gemma-3-270M, the default methods at r = 16 and 64, calibration on
the first 64 bundled GSM8K train records, held-out GSM8K test and wikitext-2, written to report/.
"""

from __future__ import annotations

import argparse

from ..config import CompareConfig
from .common import INIT_PREFIXES, INIT_RENAME
from .flags import add_config, build


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="gemma-3-270m", help="HF model directory, hub id, or gemma-3-270m (default)")
    p.add_argument("--out", default="report", help="output directory, written atomically (default report/)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model repo")
    prefixes = {"init.": "", **{"init." + k: v for k, v in INIT_PREFIXES.items()}}
    rename = {"init." + k: v for k, v in INIT_RENAME.items()}
    p.set_defaults(_flags=add_config(p, CompareConfig, prefixes=prefixes, rename=rename, skip=("init.method", "init.rank")))


def run(args) -> int:
    from ..config import ConfigError
    from ..data import load_records
    from ..decompose import DecompositionError
    from ..io import check_out_dir
    from ..models import load_model
    from ..compare import compare
    from ..render import summary_table, write_report
    from ..table import print_table

    cfg = build(args, args._flags, init={"method": "qcorda-cal"})  # bad flags fail before the model loads
    check_out_dir(args.out, args.overwrite)
    for source in cfg.eval_data:  # a missing eval set fails before the model loads
        load_records(source, "test", "--eval-data")
    model, tok = load_model(args.model, args.trust_remote_code)
    try:
        report = compare(model, tok, cfg, model_id=args.model)
    except DecompositionError as e:
        raise ConfigError(str(e)) from e
    write_report(report, args.out, args.overwrite, plots=not args.no_plots)
    headers, rows = summary_table(report)
    print_table(headers, rows, title=f"qcorda compare {args.model}: error / qlora (lower is better), {report.seconds:.0f} s -> {args.out}")
    return 0
