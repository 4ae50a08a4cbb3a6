"""``qcorda <verb>``: one CLI over plain importable functions.

Each verb lives in ``qcorda/commands/<verb>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; heavy libraries are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .config import ConfigError
from .io import OutputExistsError

#: verb → (module under qcorda.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "prepare": ("prepare", "split weights, quantize the residual to NF4, write a ready-to-train directory"),
    "compare": ("compare", "quantization-error report for qlora / loftq / qpissa / qmilora / qcorda"),
    "train": ("train", "fine-tune the adapter of a prepared model from a YAML recipe"),
    "probe-lr": ("probe_lr", "measure the learning rate `learning_rate: probe` trains a recipe at"),
    "plan": ("plan", "estimate the peak GPU memory of a recipe"),
    "recipes": ("recipes", "list the recipes shipped with qcorda, or copy one out to edit"),
    "merge": ("merge", "dequantize and export a merged fp16/bf16 model"),
    "to-lora": ("to_lora", "convert a trained adapter into a plain LoRA for the original base"),
    "eval": ("evaluate", "GSM8K accuracy, NQ-open retention and perplexity, or lm-evaluation-harness tasks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcorda", description="Quantization-aware adapter initialization and fine-tuning.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_) in VERBS.items():
        try:
            mod = importlib.import_module(f"qcorda.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"qcorda.commands.{module}":
                raise
            continue
        p = sub.add_parser(verb, help=help_, description=help_)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ConfigError, OutputExistsError) as e:
        print(f"qcorda {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qcorda {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qcorda recipes | head`: the reader left; say nothing more (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the broken pipe


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
