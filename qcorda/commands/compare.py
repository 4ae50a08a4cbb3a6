"""``qcorda compare [MODEL] --methods ... --ranks 16,64 --calib-data ... --eval-data ... --out report/``

With no arguments: the real Gemma-3-270M, the issue's methods at r = 16 and 64, calibration on
the first 64 bundled GSM8K train records, held-out GSM8K test and wikitext-2, written to report/.
"""

from __future__ import annotations

import argparse

from .common import add_init_arguments, csv, init_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..report import DEFAULT_EVAL, DEFAULT_METHODS, DEFAULT_RANKS, CompareConfig, default_init

    d = CompareConfig.__dataclass_fields__
    p.add_argument("model", nargs="?", default="gemma-3-270m", help="HF model directory, hub id, or gemma-3-270m (default)")
    p.add_argument("--methods", type=csv, default=DEFAULT_METHODS, help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)}; "
                   "also lora, qolora, qdora, qeva)")
    p.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)), help="comma-separated LoRA ranks (default 16,64)")
    p.add_argument("--out", default="report", help="output directory, written atomically (default report/)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e = p.add_argument_group("held-out evaluation")
    e.add_argument("--eval-data", type=csv, default=DEFAULT_EVAL, help="comma-separated held-out sets (default gsm8k-test,wikitext2)")
    e.add_argument("--eval-samples", type=int, default=d["eval_samples"].default, help="records per set for C_eval (default 32)")
    e.add_argument("--eval-max-length", type=int, default=d["eval_max_length"].default, help="tokens per record (default 256)")
    e.add_argument("--eval-tokens", type=int, default=d["eval_tokens"].default,
                   help="scored tokens per set for perplexity and KL; 0 skips them (default 512)")
    e.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"].default)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_init_arguments(p, method=False, rank=False)
    i = default_init()  # the reference setup
    p.set_defaults(calib_data=i.calib.data, calib_fields=i.calib.fields, calib_samples=i.calib.samples,
                   calib_max_length=i.calib.max_length, svd=i.svd)


def parse_ranks(value: str) -> tuple[int, ...]:
    from ..config import ConfigError

    try:
        return tuple(int(v) for v in csv(value))
    except ValueError:
        raise ConfigError(f"--ranks must be comma-separated positive integers such as 16,64, got {value!r}") from None


def config_from_args(args):
    from ..report import CompareConfig

    ranks = parse_ranks(args.ranks)
    init = init_config(args, method="qcorda-cal", rank=max([r for r in ranks if r > 0] or [1]))
    return CompareConfig(
        methods=tuple(args.methods), ranks=ranks, init=init, eval_data=tuple(args.eval_data),
        eval_samples=args.eval_samples, eval_max_length=args.eval_max_length,
        eval_tokens=args.eval_tokens, eval_batch_size=args.eval_batch_size,
    )


def run(args) -> int:
    from ..config import ConfigError
    from ..decompose import DecompositionError
    from ..data import load_records
    from ..io import check_out_dir
    from ..models import load_model
    from ..report import compare, summary_table, write_report
    from ..table import print_table

    cfg = config_from_args(args)  # bad flags fail before the model loads
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
