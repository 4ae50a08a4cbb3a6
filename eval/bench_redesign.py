"""Issue 16's two benchmarks: how light the CLI is, and what ``qcorda train`` with ``init:`` costs in memory.

1. ``qcorda --help``: wall time of ``python -m qcorda --help`` in a fresh process, ``--repeats`` times
   (median and worst), and which heavy modules the parser imports (none is the target: torch alone takes
   seconds to import).
2. The prepare phase of ``qcorda train`` with an ``init:`` section on a synthetic bf16 Llama checkpoint
   (:func:`eval.lib.write_synthetic_llama`, ``--params``, default 2B): peak RSS (``VmHWM``) of a fresh process
   that runs what :func:`qcorda.train.prepared_model` runs before training, ``prepare(recipe.model,
   recipe.init, out=output_dir/prepared)``, with the load of the prepared 4-bit model left out, as
   ``eval.bench_prepare``'s streamed-prepare figure is taken. For comparison, the same split through the
   in-memory engine (the whole model loaded in fp32, which is what ``qcorda train`` did before issue 16) in
   another fresh process.

    OMP_NUM_THREADS=1 python -m eval.bench_redesign      # ~15 min on 2 cores; writes eval/results/bench_redesign.{md,json}
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .lib import Results, child_env, emit, peak_rss_mb, run_child, write_synthetic_llama

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "trl", "lm_eval")


def bench_help(repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qcorda", "--help"], check=True, capture_output=True, env=child_env())
        times.append(time.perf_counter() - t)
    code = f"import sys; from qcorda.cli import build_parser; build_parser(); print([m for m in {HEAVY!r} if m in sys.modules])"
    heavy = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=child_env()).stdout.strip()
    return {"median_s": statistics.median(times), "max_s": max(times), "repeats": repeats, "heavy_modules": heavy}


def child(kind: str, root: Path, rank: int) -> dict:
    """``train``: the prepare phase of ``qcorda train`` (init: recipe); ``in-memory``: the whole model in fp32."""
    from qcorda.config import InitConfig
    from qcorda.prepare import prepare

    cfg = InitConfig(method="qpissa", rank=rank, compute_dtype="bfloat16")
    t0 = time.perf_counter()
    if kind == "train":
        from transformers import AutoTokenizer

        from qcorda.recipe import Recipe

        recipe = Recipe(output_dir=str(root / "run"), model=str(root / "llama"), init=cfg)
        prepared = Path(recipe.output_dir) / "prepared"
        prepare(recipe.model, recipe.init, out=prepared, progress=False)  # what qcorda.train.prepared_model runs first
        at_end = {"seconds": time.perf_counter() - t0, "rss_mb": peak_rss_mb()}
        assert (prepared / "timings.json").exists(), "not the streamed engine"
        # then train loads the tokenizer (Gemma's 262k-entry one here: ~0.3 GB) and the prepared model
        AutoTokenizer.from_pretrained(str(prepared))
        return {**at_end, "rss_with_tokenizer_mb": peak_rss_mb()}
    prepare(str(root / "llama"), cfg, progress=False)
    return {"seconds": time.perf_counter() - t0, "rss_mb": peak_rss_mb()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=2.0e9)
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip-in-memory", action="store_true", help="skip the whole-model comparison (needs ~4x the fp32 model in RAM)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="bench_redesign", help="results stem (a bare name lies under eval/results/)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        emit(child(args.child, Path(args.workdir), args.rank))
        return 0
    import shutil

    res = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_at_start": os.getloadavg(),
           "threads": os.environ.get("OMP_NUM_THREADS"), "help": bench_help(args.repeats)}
    print(res["help"], flush=True)
    root = Path(tempfile.mkdtemp(dir=args.workdir, prefix="redesign-"))
    try:
        t = time.perf_counter()
        res["synthetic"] = write_synthetic_llama(root / "llama", args.params, args.hidden)
        res["synthetic"]["write_seconds"] = time.perf_counter() - t
        for kind in ("train",) + (() if args.skip_in_memory else ("in-memory",)):  # each in a fresh process
            res[kind] = run_child("eval.bench_redesign", "--child", kind, "--workdir", root, "--rank", args.rank)
            print(kind, res[kind], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    s, h = res["synthetic"], res["help"]
    lines = [
        "# Issue 16 benchmarks: a light CLI, and `qcorda train` with `init:` in a few GB", "",
        f"`OMP_NUM_THREADS={res['threads']} python -m eval.bench_redesign {' '.join(argv or sys.argv[1:])}`, "
        f"{res['started']}, 2 CPU cores, load average {res['load_at_start'][0]:.1f} at the start "
        "(the fine-tuning study ran on one core throughout: wall times are not idle figures; peak RSS is unaffected).", "",
        "| figure | measured | target |", "|---|---|---|",
        f"| `qcorda --help` wall time, median / worst of {h['repeats']} | {h['median_s']:.3f} s / {h['max_s']:.3f} s | ≤ 0.5 s |",
        f"| heavy modules imported by building the parser | {h['heavy_modules']} | none |",
        f"| `qcorda train` (init: qpissa r={args.rank}, bf16 compute) on the synthetic {s['params'] / 1e9:.2f} B Llama "
        f"({s['layers']} layers, hidden {s['hidden']}; {s['bf16_gb']:.2f} GB of bf16 shards): peak RSS of the prepare phase | "
        f"{res['train']['rss_mb'] / 1e3:.2f} GB ({res['train']['seconds'] / 60:.1f} min) | ≤ 1.5 GB |",
        f"| ... and with the tokenizer load that follows it (before the 4-bit model is loaded for training) | "
        f"{res['train']['rss_with_tokenizer_mb'] / 1e3:.2f} GB | — |",
    ]
    if "in-memory" in res:
        lines.append(f"| the same split by the in-memory engine (whole model in fp32: `qcorda train` before issue 16) | "
                     f"{res['in-memory']['rss_mb'] / 1e3:.2f} GB ({res['in-memory']['seconds'] / 60:.1f} min) | — |")
    Results(args.out).save(res, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
