"""Peak memory of ``qcorda eval``, ``qcorda merge`` (with its verification) and ``qcorda to-lora`` at real size.

A Llama-shaped bf16 checkpoint of ``--params`` parameters (:func:`eval.lib.write_synthetic_llama`, the tiny
tokenizer of :mod:`qcorda.testing.tiny` so that every token id is in its 32k vocabulary) is stream-prepared
once (qlora, r=16, bf16 compute: the prepared directory a GPU user has); then each verb runs as
``qcorda <verb> ...`` in a fresh interpreter, one at a time, and reports its peak RSS (``VmHWM``), the way
the streamed prepare's figure in ``eval/results/bench_prepare.md`` is taken. The figure is the peak
RSS over the checkpoint's bf16 size on disk (target ≤ 1.5).

``--qcorda PATH`` runs the verbs with the qcorda package found under PATH (e.g. an older revision
unpacked by ``git archive REV qcorda | tar -x -C PATH``), recorded under ``--label``::

    OMP_NUM_THREADS=1 python -m eval.memory_verbs --params 1.0e9 --hidden 2048 --label after
    git archive 2783cee qcorda | tar -x -C /tmp/old
    OMP_NUM_THREADS=1 python -m eval.memory_verbs --params 1.0e9 --hidden 2048 --label before --qcorda /tmp/old

Results: ``eval/results/memory_verbs.{json,md}`` (one entry per label and size, kept across runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from eval.lib import Results, child_env, emit, environment, machine, peak_rss_mb, run_child, write_synthetic_llama

VERBS = ("merge", "to-lora", "eval")
#: The verification's held-out text, small enough for two CPU cores (its logits on the CPU are
#: tokens × vocab × 4 B: 256 × 32000 × 4 = 33 MB here, 1024 × 128256 × 4 = 0.5 GB at the default 8×128 on Llama-3).
VERIFY = ["--verify-samples", "4", "--verify-max-length", "64", "--verify-batch-size", "2"]
GB = 1e9


def _args_of(verb: str, work: Path) -> list[str]:
    src, prep = work / "llama", work / "prepared"
    if verb == "merge":
        return ["merge", str(prep), "--out", str(work / "merged"), "--overwrite", "--dtype", "bfloat16", "--device", "cpu", *VERIFY]
    if verb == "to-lora":
        return ["to-lora", str(prep), "--base", str(src), "--out", str(work / "lora"), "--overwrite", "--mode", "exact-delta",
                "--dtype", "bfloat16", "--device", "cpu", *VERIFY]
    if verb == "eval":  # the merged model, as a user evaluates an export
        return ["eval", str(work / "merged"), "--tasks", "ppl", "--ppl-tokens", "512", "--ppl-window", "256",
                "--ppl-stride", "256", "--batch-size", "2", "--device", "cpu"]
    raise ValueError(verb)


# --------------------------------------------------------------------------- children


def child(args) -> dict:
    """One step in this fresh process: ``write``, ``prepare`` or a verb; returns its peak RSS and time."""
    import qcorda

    work = Path(args.workdir)
    t0 = time.perf_counter()
    if args.child == "write":
        from qcorda.testing.tiny import tokenizer

        info = write_synthetic_llama(work / "llama", args.params, args.hidden, tokenizer=tokenizer())
    else:
        from qcorda.cli import main

        argv = (["prepare", str(work / "llama"), "--out", str(work / "prepared"), "--overwrite", "--method", "qlora",
                 "--rank", "16", "--compute-dtype", "bfloat16", "--device", "cpu"]
                if args.child == "prepare" else _args_of(args.child, work))
        rc = main(argv)
        if rc:
            raise SystemExit(f"qcorda {' '.join(argv)} exited {rc}")
        info = {"argv": "qcorda " + " ".join(a.replace(str(work), "WORK") for a in argv)}
    return {**info, "seconds": time.perf_counter() - t0, "rss_mb": peak_rss_mb(), "qcorda": qcorda.__file__}


# --------------------------------------------------------------------------- report


def ratio(run: dict, bf16_gb: float) -> float:
    return run["rss_mb"] * 2**20 / (bf16_gb * GB)


def markdown(doc: dict) -> str:
    lines = ["# Peak memory of every verb at real size", "",
             "Each verb runs as `qcorda <verb>` in its own fresh process on the CPU (`OMP_NUM_THREADS=1`), one at a time; "
             "the figure is that process's peak RSS (`VmHWM`, imports included) over the model's bf16 size on disk, "
             "measured as the streamed prepare's figure is (eval/results/bench_prepare.md). Target: ≤ 1.5× for each verb. "
             "The model: a synthetic Llama-shaped bf16 checkpoint (`eval.lib.write_synthetic_llama`, 32k vocabulary), "
             "stream-prepared with qlora r=16 and bf16 compute; the adapter is its `adapter_init` (the numbers of "
             "the weights do not change the memory). Verification on 4 records × 64 tokens.", "",
             "Command: `OMP_NUM_THREADS=1 python -m eval.memory_verbs --params P --hidden H --label after` "
             "(`--label before --qcorda DIR` with the older package unpacked into DIR).", ""]
    for size, entry in sorted(doc.get("sizes", {}).items()):
        bf16 = entry["bf16_gb"]
        lines += [f"## {float(size) / 1e9:.2f} B parameters ({entry['layers']} layers, hidden {entry['hidden']}; "
                  f"bf16 {bf16:.2f} GB on disk)", ""]
        labels = [l for l in ("before", "after") if l in entry["runs"]] + sorted(set(entry["runs"]) - {"before", "after"})
        head = "| verb | " + " | ".join(f"{l}: peak RSS (GB) | {l}: × bf16 | {l}: s" for l in labels) + " |"
        lines += [head, "|" + "---|" * (1 + 3 * len(labels))]
        for verb in ("prepare", *VERBS):
            cells = []
            for l in labels:
                r = entry["runs"][l].get(verb)
                cells += ([f"{r['rss_mb'] * 2**20 / GB:.2f}", f"{ratio(r, bf16):.2f}", f"{r['seconds']:.0f}"] if r else ["—"] * 3)
            lines.append(f"| {verb} | " + " | ".join(cells) + " |")
        lines.append("")
        for l in labels:
            runs = entry["runs"][l]
            meta = runs.get("_meta", {})
            lines.append(f"- {l}: qcorda from `{meta.get('qcorda', '?')}`, {meta.get('machine', '')}")
        lines.append("")
    lines += eight_b(doc)
    return "\n".join(lines)


#: Llama-3-8B: 8.03 B parameters, 16.06 GB in bf16; its NF4 prepared directory (all 224 block Linears in NF4,
#: embeddings and lm_head in bf16): about 5.7 GB.
LLAMA3_8B_BF16_GB, LLAMA3_8B_PREPARED_GB = 16.06, 5.7
#: What each verb holds on the device at once at 8B (GB of weights), before the fixes and after (arithmetic from
#: the code: the models it loads together, each in the dtype it is loaded in; activations and logits come on top).
ON_DEVICE = {
    "merge": ("merged bf16 16.1 + 4-bit model 5.7 = 21.8", "max(16.1, 5.7) = 16.1"),
    "to-lora": ("fp32 base 32.1 + merged 16.1 + 4-bit 5.7 = 53.9", "16.1 (base in its bf16, or the merged model)"),
    "eval": ("fp32 32.1", "bf16 16.1"),
}


def eight_b(doc: dict) -> list[str]:
    """What the measured ratios mean for Llama-3-8B: host memory = ratio × its bf16 size, and the weights a 24 GB card holds."""
    rows = []
    for size, entry in sorted(doc.get("sizes", {}).items()):
        for verb in VERBS:
            cells = []
            for label in ("before", "after"):
                r = entry["runs"].get(label, {}).get(verb)
                cells.append(f"{ratio(r, entry['bf16_gb']):.2f}× → {ratio(r, entry['bf16_gb']) * LLAMA3_8B_BF16_GB:.0f} GB" if r else "—")
            before, after = ON_DEVICE[verb]
            rows.append(f"| {verb} ({float(size) / 1e9:.2f} B measured) | {cells[0]} | {cells[1]} | {before} | {after} |")
    if not rows:
        return []
    return ["## What the figures mean for an 8B model on a 24 GB card", "",
            f"Host memory on the CPU path: the measured ratio times Llama-3-8B's bf16 size ({LLAMA3_8B_BF16_GB} GB); the "
            "ratio includes about 0.4 GB of interpreter and torch, so it overstates an 8B run slightly. On a GPU "
            "(`--device cuda`) the models load straight onto the device (explicit device map), so the host holds little; "
            "the device holds the weights in the last two columns (arithmetic from what each verb loads together, not "
            "measured here: this machine has no GPU), plus activations, the CUDA context (~0.5 GB) and, for the "
            "verification, one batch of logits (the logits of the whole held-out text are kept on the CPU: "
            "8 × 128 tokens × 128256 × 4 B = 0.5 GB per model at the default --verify settings).", "",
            "| verb | host, before | host, after | 8B weights on the device, before | after |", "|---|---|---|---|---|",
            *rows, "",
            "On a 24 GB card: `eval` of a merged 8B model (32 GB in fp32) and `to-lora` (54 GB) could not run before; "
            "`merge`'s verification needed 21.8 GB of weights beside activations and logits. After, each verb holds one "
            "16 GB bf16 model at a time, which leaves about 7 GB for activations and the CUDA context. An fp16/bf16 "
            "export of a larger model (Llama-3-70B, 141 GB) still needs a card that holds it in 16 bit, or `--device cpu`.", ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=2.0e9)
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--label", default="after")
    p.add_argument("--qcorda", default=None, help="run the verbs with the qcorda package under this directory")
    p.add_argument("--verbs", default=",".join(VERBS))
    p.add_argument("--workdir", default="/tmp/qcorda-memory-verbs")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the prepared directory for the next run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        emit(child(args))
        return 0

    work = Path(args.workdir) / f"{args.params:.2e}-{args.hidden}"
    env = child_env()
    if args.qcorda:
        env["PYTHONPATH"] = f"{Path(args.qcorda).resolve()}:{env['PYTHONPATH']}"
    common = ["--workdir", str(work), "--params", str(args.params), "--hidden", str(args.hidden)]
    store = Results("memory_verbs")
    doc = store.load()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "llama" / "config.json").exists():
        shutil.rmtree(work / "llama", ignore_errors=True)
        shape = run_child("eval.memory_verbs", "--child", "write", *common)
        (work / "shape.json").write_text(json.dumps(shape))
    shape = json.loads((work / "shape.json").read_text())
    entry = doc.setdefault("sizes", {}).setdefault(str(shape["params"]), {
        "layers": shape["layers"], "hidden": shape["hidden"], "vocab": shape["vocab"], "bf16_gb": shape["bf16_gb"], "runs": {}})
    runs = entry["runs"].setdefault(args.label, {})
    runs["_meta"] = {"qcorda": args.qcorda or "this tree", "machine": machine(), "env": environment()}
    steps = ([] if (work / "prepared" / "qcorda.json").exists() else ["prepare"]) + args.verbs.split(",")
    for step in steps:
        print(f"[{time.strftime('%H:%M:%S')}] {args.label}: {step} ...", flush=True)
        # outside the repository: `python -m` puts the working directory first on the path, before --qcorda
        r = run_child("eval.memory_verbs", "--child", step, *common, env=env, cwd=work)
        if args.qcorda and not r["qcorda"].startswith(str(Path(args.qcorda).resolve())):
            raise SystemExit(f"the {step} child imported qcorda from {r['qcorda']}, not from --qcorda {args.qcorda}")
        runs[step] = r
        print(f"    peak RSS {r['rss_mb'] / 1024:.2f} GiB = {ratio(r, shape['bf16_gb']):.2f} x bf16 ({r['seconds']:.0f} s)", flush=True)
        store.save(doc, markdown(doc))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
