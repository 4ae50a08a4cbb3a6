"""Side-by-side benchmark of ``qcorda prepare`` against PEFT's documented CorDA workflow (issue 7).

One run measures, with the same samples, rank and targets:

1. **end to end** on Gemma-3-270M: qcorda's streamed ``prepare --method qcorda-ipm`` against
   PEFT's ``preprocess_corda`` + ``get_peft_model(init_lora_weights="corda")`` + ``unload`` +
   ``save_pretrained`` + reload in 4-bit: wall time and peak RSS, each side in its own
   subprocess (clean RSS);
2. **covariance throughput** (tokens/s) inside the same two subprocesses: qcorda's phase from the
   prepared directory's ``timings.json``; PEFT's as the time of the forwards its hooks run in;
3. **per-layer decomposition** for Llama-7B shapes (:func:`eval.lib.bench_decompose`): qcorda's
   CorDA-IPM and PiSSA splits (full and randomized SVD) against PEFT's CorDA eigen step and its PiSSA
   inits, with the relative difference of the rank-r error;
4. **streamed prepare of a synthetic Llama-shaped checkpoint** (``--synthetic-params``, default
   2.0e9, :func:`eval.lib.write_synthetic_llama`): peak RSS against the size of the fp32 model.

Resumable: each finished part is kept in ``eval/results/bench_prepare.json`` (with the arguments that
change its numbers) and skipped by a rerun of the same command; ``--fresh`` measures the parts it runs again.

Usage::

    OMP_NUM_THREADS=1 python -m eval.bench_prepare            # everything; writes eval/results/bench_prepare.{md,json}
    python -m eval.bench_prepare --skip synthetic --shapes 4096x4096
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .lib import (Results, bench_decompose, decompose_table, emit, environment, machine, peak_rss_mb, run_child,
                  write_synthetic_llama)

MODULE = "eval.bench_prepare"
PARTS = ("e2e", "decompose", "synthetic")
#: The arguments each part's numbers depend on: a saved part is reused only when they match.
PART_ARGS = {
    "e2e": ("model", "samples", "max_length", "batch_size", "rank", "svd"),
    "decompose": ("decompose_rank", "shapes"),
    "synthetic": ("synthetic_params", "synthetic_hidden", "rank", "samples", "max_length", "batch_size", "skip_synthetic_prepare"),
}
NOTES = "## Notes (hand-written; kept when the tables are regenerated)"


# --------------------------------------------------------------------------- children


def _cfg(args):
    """The qcorda-ipm config of the end-to-end runs (PEFT's side takes its calibration texts; the first ``--svd``)."""
    from qcorda.config import CalibConfig, InitConfig

    return InitConfig(method="qcorda-ipm", rank=args.rank, svd=args.svd.split(",")[0], calib=CalibConfig(
        data="gsm8k-train", fields=("question", "answer"), samples=args.samples, max_length=args.max_length, batch_size=args.batch_size))


def child_qcorda(args) -> dict:
    """``stream_prepare`` + ``load_prepared``: from nothing loaded to a 4-bit model ready to train, as PEFT's
    side goes from nothing loaded to its reloaded 4-bit model. The phases are the engine's own (``timings.json``)."""
    from qcorda.prepared import load_prepared
    from qcorda.stream import stream_prepare

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        out = Path(d) / "out"
        report = stream_prepare(args.model, _cfg(args), out, progress=False)
        prepare_rss, prepare_s = peak_rss_mb(), time.perf_counter() - t0
        phases = json.loads((out / "timings.json").read_text())["phases"]
        load_prepared(out, device="cpu")
        wall = time.perf_counter() - t0
    return {"wall": wall, "rss_mb": peak_rss_mb(), "targets": len(report.targets), "load_seconds": wall - prepare_s,
            "prepare_seconds": prepare_s, "prepare_peak_rss_mb": prepare_rss, "cov_seconds": phases["covariance"],
            "cov_tokens": report.calibration["n_tokens"], "decomp_seconds": phases["layers"], "output_seconds": phases["output"]}


def child_peft(args) -> dict:
    """PEFT's CorDA workflow as its documentation gives it. Its covariance phase is the time of the forwards
    (``run_model``, where its hooks accumulate); its eigen phase the rest of ``preprocess_corda``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qcorda.calibration import calibration_texts
    from qcorda.models import resolve_model_path
    from qcorda.targets import find_targets

    path = resolve_model_path(args.model)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    texts = calibration_texts(_cfg(args), tok)
    targets = find_targets(model, ("all-linear",))
    n_tokens, forward_s = 0, 0.0

    @torch.no_grad()
    def run_model():  # PEFT's hook squeezes the batch dim: one sample per forward, as in its examples
        nonlocal n_tokens, forward_s
        t = time.perf_counter()
        for text in texts:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=args.max_length)
            n_tokens += int(ids["input_ids"].numel())
            model(**ids)
        forward_s += time.perf_counter() - t

    lcfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets, init_lora_weights="corda",
                      corda_config=CordaConfig(corda_method="ipm"), lora_dropout=0.0, task_type="CAUSAL_LM")
    t = time.perf_counter()
    preprocess_corda(model, lcfg, run_model=run_model)
    preprocess_s = time.perf_counter() - t
    peft_model = get_peft_model(model, lcfg)
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        peft_model.save_pretrained(Path(d) / "adapter")
        base = peft_model.unload()
        base.save_pretrained(Path(d) / "residual")
        tok.save_pretrained(Path(d) / "residual")
        del base, peft_model, model
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        AutoModelForCausalLM.from_pretrained(Path(d) / "residual", quantization_config=q, dtype=torch.float32)
    wall = time.perf_counter() - t0
    return {"wall": wall, "rss_mb": peak_rss_mb(), "targets": len(targets), "cov_tokens": n_tokens, "cov_seconds": forward_s,
            "decomp_seconds": preprocess_s - forward_s}


def child_synthetic(args) -> dict:
    """Write a Llama-shaped bf16 checkpoint of ``--synthetic-params`` parameters, then measure its streamed
    prepare and its covariance walk, each in a fresh process (this one's RSS is the writer's)."""
    root = Path(tempfile.mkdtemp(dir=args.workdir, prefix="synthetic-"))
    try:
        t0 = time.perf_counter()
        shape = write_synthetic_llama(root / "llama", args.synthetic_params, args.synthetic_hidden)
        res = {**shape, "write_seconds": time.perf_counter() - t0, "writer_rss_mb": peak_rss_mb(),
               "fp32_gb": shape["params"] * 4 / 1e9}
        common = ("--workdir", root, "--rank", args.rank, "--samples", args.samples, "--max-length", args.max_length,
                  "--batch-size", args.batch_size)
        if not args.skip_synthetic_prepare:
            res.update(run_child(MODULE, "--child", "synthetic-prepare", *common))
        res.update(run_child(MODULE, "--child", "synthetic-cov", *common))
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


def child_synthetic_prepare(args) -> dict:
    from qcorda.config import InitConfig
    from qcorda.stream import stream_prepare

    root = Path(args.workdir)
    cfg = InitConfig(method="qpissa", rank=args.rank, svd="randomized", compute_dtype="bfloat16")
    t0 = time.perf_counter()
    rep = stream_prepare(str(root / "llama"), cfg, root / "prepared", progress=False)
    wall = time.perf_counter() - t0
    out_gb = sum(f.stat().st_size for f in (root / "prepared").rglob("*") if f.is_file()) / 1e9
    shutil.rmtree(root / "prepared", ignore_errors=True)
    return {"prepare_seconds": wall, "prepare_rss_mb": peak_rss_mb(), "targets": len(rep.targets), "out_gb": out_gb}


def child_synthetic_cov(args) -> dict:
    """Block-by-block covariance walk over the synthetic checkpoint (random token ids: its vocabulary is
    not a real tokenizer's), all-linear targets, spilled per block as ``stream_prepare`` spills them."""
    import torch

    from qcorda.blockwise import collect_blockwise
    from qcorda.checkpoint import Checkpoint
    from qcorda.models import skeleton
    from qcorda.targets import find_targets

    path = Path(args.workdir) / "llama"
    t0 = time.perf_counter()
    config, skel = skeleton(path, trust_remote_code=False)
    ckpt = Checkpoint(path)
    targets = find_targets(skel, ("all-linear",))
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(0, args.samples, args.batch_size):
        n = min(args.batch_size, args.samples - i)
        batches.append({"input_ids": torch.randint(3, config.vocab_size, (n, args.max_length), generator=g),
                        "attention_mask": torch.ones(n, args.max_length, dtype=torch.long)})
    spill = Path(tempfile.mkdtemp(dir=args.workdir, prefix="spill-"))
    covs = collect_blockwise(skel, ckpt.get, batches, targets, progress=False, get_rows=ckpt.rows, spill=spill)
    walk_rss, walk_s = peak_rss_mb(), time.perf_counter() - t0
    cov_gb = sum(f.stat().st_size for f in spill.iterdir()) / 1e9
    covs.save(Path(args.workdir) / "covariance.safetensors")  # gathered into one file, one matrix at a time
    trace = sum(float(covs.matrices[k].diagonal().sum()) for k in covs.matrices)  # read back one at a time
    return {"cov_seconds": walk_s, "cov_rss_mb": walk_rss, "cov_tokens": covs.n_tokens, "cov_groups": len(covs.matrices),
            "cov_gb": cov_gb, "cov_all_rss_mb": peak_rss_mb(), "cov_trace": trace}


CHILDREN = {"qcorda": child_qcorda, "peft": child_peft, "synthetic": child_synthetic,
            "synthetic-prepare": child_synthetic_prepare, "synthetic-cov": child_synthetic_cov}


# --------------------------------------------------------------------------- parts (run in this process)


def _child_args(args) -> list:
    return ["--model", args.model, "--samples", args.samples, "--max-length", args.max_length, "--batch-size", args.batch_size,
            "--rank", args.rank, "--svd", args.svd, "--workdir", args.workdir, "--synthetic-params", args.synthetic_params,
            "--synthetic-hidden", args.synthetic_hidden] + (["--skip-synthetic-prepare"] if args.skip_synthetic_prepare else [])


def _run(kind: str, args) -> dict:
    t = time.perf_counter()
    res = run_child(MODULE, "--child", kind, *_child_args(args))
    print(f"[{kind}] {time.perf_counter() - t:.0f}s {res}", file=sys.stderr, flush=True)
    return res


def part_e2e(args) -> dict:
    solvers, qs = args.svd.split(","), {}
    for solver in solvers:
        qs[solver] = _run("qcorda", argparse.Namespace(**{**vars(args), "svd": solver}))
    return {"qcorda": qs, "peft": _run("peft", args)}


def part_decompose(args) -> dict:
    return {"rows": bench_decompose(args.decompose_rank, args.shapes)}


def part_synthetic(args) -> dict:
    return _run("synthetic", args)


# --------------------------------------------------------------------------- report


def e2e_table(r: dict, args) -> tuple[str, list[str], list[list]]:
    qs, pf = r["qcorda"], r["peft"]
    for x in (*qs.values(), pf):
        x["tps"] = x["cov_tokens"] / x["cov_seconds"]

    def row(label, key, target=""):  # qcorda per solver, PEFT (where it has the figure), ratios
        vals = [q[key] for q in qs.values()]
        ref = pf.get(key)
        return [label, *vals, "" if ref is None else ref, *["" if ref is None else v / ref for v in vals], target]

    rows = [
        row("end-to-end wall time (s), to a loaded 4-bit model", "wall", "≤ 0.5"),
        row("end-to-end peak RSS (MB)", "rss_mb", "≤ 0.5"),
        row("covariance throughput (tokens/s)", "tps", "≥ 2"),
        row("covariance phase (s)", "cov_seconds"),
        row("decomposition + quantization, all targets (s)", "decomp_seconds"),
        row("prepare alone (s)", "prepare_seconds"),
        row("of which writing the prepared directory (s)", "output_seconds"),
        row("reload of the prepared directory (s)", "load_seconds"),
        row("peak RSS to the end of prepare, before reload (MB)", "prepare_peak_rss_mb"),
    ]
    head = ["figure", *[f"qcorda --svd {x}" for x in qs], "PEFT", *[f"ratio ({x})" for x in qs], "target"]
    q0 = next(iter(qs.values()))
    title = (f"Gemma-3-270M, qcorda-ipm vs PEFT CorDA-IPM, r={args.rank}, {q0['targets']} targets (all-linear), "
             f"{args.samples} gsm8k-train samples ≤ {args.max_length} tokens ({q0['cov_tokens']} tokens)")
    return title, head, rows


def summary_rows(doc: dict) -> list[list[str]]:
    """The targets of issue 7 against what this run measured."""
    parts, rows = doc["parts"], []
    if "e2e" in parts:
        qs, pf = parts["e2e"]["result"]["qcorda"], parts["e2e"]["result"]["peft"]
        wall = "; ".join(f"{q['wall'] / pf['wall']:.3f} with `--svd {s}`" for s, q in qs.items())
        rss = "; ".join(f"{q['rss_mb']:.0f} MB vs {pf['rss_mb']:.0f} MB = {q['rss_mb'] / pf['rss_mb']:.3f}" for q in qs.values())
        tps = ", ".join(f"{(q['cov_tokens'] / q['cov_seconds']) / (pf['cov_tokens'] / pf['cov_seconds']):.2f}×" for q in qs.values())
        rows += [["end-to-end wall time ≤ 0.5× PEFT", wall, ", ".join(f"{s}: {'yes' if q['wall'] / pf['wall'] <= 0.5 else 'no'}" for s, q in qs.items())],
                 ["end-to-end peak RSS ≤ 0.5× PEFT", rss, "yes" if all(q["rss_mb"] / pf["rss_mb"] <= 0.5 for q in qs.values()) else "no"],
                 ["covariance throughput ≥ 2×", tps, "yes" if all(q["cov_tokens"] / q["cov_seconds"] >= 2 * pf["cov_tokens"] / pf["cov_seconds"] for q in qs.values()) else "no"]]
    if "decompose" in parts:
        _, t = decompose_table(parts["decompose"]["result"]["rows"])
        for step, label in (("collect_eigens_for_layer", "vs PEFT's CorDA eigen step"), ("pissa (full SVD)", "vs PEFT's PiSSA init `pissa` (full SVD)"),
                            ("pissa_niter_4", "vs PEFT's `pissa_niter_4` (itself a randomized SVD)")):
            sel = [x for x in t if x[2] == step]
            if sel:
                sp, err = [x[7] for x in sel], [x[8] for x in sel]
                ok = all(s >= 3 for s in sp) and all(abs(e) <= 1 or e < 0 for e in err)
                rows.append([f"decomposition ≥ 3× faster at ≤ 1 % error, {label}",
                             f"{min(sp):.2f}–{max(sp):.2f}× (randomized, {min(err):+.2f} to {max(err):+.2f} %)", "yes" if ok else "no"])
    if "synthetic" in parts:
        s = parts["synthetic"]["result"]
        prep = f"{s['prepare_rss_mb'] / 1024:.2f} GiB whole run, " if "prepare_rss_mb" in s else ""
        rows.append([f"streamed prepare of a {s['params'] / 1e9:.2f} B checkpoint, peak memory",
                     f"{prep}covariance walk {s['cov_rss_mb'] / 1024:.2f} GiB, for a {s['fp32_gb'] / 1.074:.2f} GiB fp32 model", "—"])
    return rows


def render(doc: dict, old_md: str) -> str:
    from qcorda.table import markdown_table

    lines = ["# qcorda prepare vs PEFT CorDA: benchmark", "",
             "Reproduce: `OMP_NUM_THREADS=1 python -m eval.bench_prepare`. Each part below says when it ran, by which "
             "command and on what; a rerun of the same command reuses finished parts (`eval/results/bench_prepare.json`). "
             "Nothing extrapolated; no CUDA here.", ""]
    if summary_rows(doc):
        lines += ["## Summary against the targets of issue 7", "", markdown_table(["target", "measured", "met?"], summary_rows(doc)), ""]
    parts = doc["parts"]
    for name in PARTS:
        if name not in parts:
            continue
        p, args = parts[name], argparse.Namespace(**parts[name]["args"])
        when = (f"Run {p['env']['utc']} ({p['seconds'] / 60:.1f} min) by `{p.get('command', doc['command'])}` on {machine(p['env'])}; "
                f"OMP_NUM_THREADS={p['env']['omp_num_threads']}.")
        if name == "e2e":
            title, head, rows = e2e_table(p["result"], args)
            lines += [f"## End to end: {title}", "", when, "",
                      "qcorda: streamed `prepare` (covariance walked one decoder block at a time from the safetensors "
                      f"file on the stored hidden states, batch {args.batch_size}; then layer by layer; the output written "
                      "tensor by tensor) and `load_prepared` of the result; its phases are the ones the engine writes to "
                      "`timings.json`. PEFT: `preprocess_corda` (its hooks, one sample per forward as its hook requires) + "
                      "`get_peft_model(init_lora_weights='corda')` + save adapter + `unload` + `save_pretrained` + reload "
                      "with `BitsAndBytesConfig` (NF4, double quant); its covariance phase is the time of the forwards its "
                      "hooks run in, its decomposition the rest of `preprocess_corda` (the eigen step and cropping). Both "
                      "sides are timed from nothing loaded (tokenizer and model loads included) to a 4-bit model in memory. "
                      "Each run is its own subprocess; peak RSS is that process's `VmHWM`. `--svd randomized` (qcorda's default) is "
                      "its randomized SVD for the top-r split (oversample 16, 4 power iterations); `--svd full` is the exact "
                      "SVD.", "", markdown_table(head, rows), ""]
        elif name == "decompose":
            head, rows = decompose_table(p["result"]["rows"])
            lines += [f"## Per-layer decomposition, Llama-7B shapes, r={args.decompose_rank}, CPU fp32 (one repeat)", "", when, "",
                      "Synthetic weights with a decaying spectrum plus noise, anisotropic covariance from 1024 random "
                      "activations (`eval.lib.synthetic`). CorDA error = ‖(W − s·B·A)·C‖_F, PiSSA error = ‖W − s·B·A‖_F; "
                      "'err diff' is qcorda's error relative to PEFT's for the same rank (negative = qcorda better). "
                      "qcorda's randomized SVD: oversample 16, 4 power iterations. qcorda's CorDA timing includes damping + "
                      "Cholesky; PEFT's includes its damping loop with `linalg.inv`. 'speedup' = PEFT s / qcorda s.", "",
                      markdown_table(head, rows), ""]
        else:
            s, not_run = p["result"], "not measured (--skip-synthetic-prepare)"
            gib = lambda mb: f"{mb / 1024:.2f} GiB"  # noqa: E731
            fp32_gib = s["fp32_gb"] / 1.074
            rows = [["parameters", f"{s['params'] / 1e9:.2f} B"],
                    ["layers × hidden × intermediate", f"{s['layers']} × {s['hidden']} × {s['intermediate']}"],
                    ["checkpoint on disk (bf16 shards)", f"{s['bf16_gb']:.2f} GB"], ["the same model in fp32", f"{s['fp32_gb']:.2f} GB"],
                    ["streamed prepare peak RSS", gib(s["prepare_rss_mb"]) if "prepare_rss_mb" in s else not_run],
                    ["peak RSS / fp32 model", f"{s['prepare_rss_mb'] / 1024 / fp32_gib:.3f}" if "prepare_rss_mb" in s else not_run],
                    ["prepared output on disk", f"{s['out_gb']:.2f} GB" if "out_gb" in s else not_run],
                    ["prepare wall time", f"{s['prepare_seconds']:.0f} s ({s['targets']} targets)" if "prepare_seconds" in s else not_run],
                    ["block-by-block covariance walk peak RSS (covariances spilled per block)",
                     f"{gib(s['cov_rss_mb'])} ({s['cov_tokens']} tokens, {s['cov_groups']} groups, {s['cov_seconds']:.0f} s)"],
                    ["covariance walk peak RSS / fp32 model", f"{s['cov_rss_mb'] / 1024 / fp32_gib:.3f}"],
                    ["the covariances on disk (fp32)", f"{s['cov_gb']:.2f} GB"],
                    ["peak RSS after gathering them into one file and reading each back", gib(s["cov_all_rss_mb"])]]
            lines += ["## Streamed prepare of a synthetic Llama-shaped checkpoint (qpissa, randomized SVD, bf16 compute)", "", when, "",
                      f"Written by `eval.lib.write_synthetic_llama` (`--synthetic-params {args.synthetic_params:g} --synthetic-hidden "
                      f"{args.synthetic_hidden}`), one safetensors shard per decoder block, then prepared in a fresh process, "
                      f"and its covariances walked in another ({args.samples} random-token samples × {args.max_length}). Peak RSS "
                      "is that process's `VmHWM`.", "", markdown_table(["figure", "value"], rows), ""]
    notes = old_md.split(NOTES, 1)[1].strip() if NOTES in old_md else "(none yet)"
    lines += [NOTES, "", notes, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.bench_prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--samples", type=int, default=16, help="calibration samples (gsm8k-train), both sides")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="qcorda's calibration batch (PEFT's hook needs batch 1)")
    p.add_argument("--rank", type=int, default=16, help="rank of the end-to-end and synthetic runs")
    p.add_argument("--svd", default="randomized,full", help="qcorda's --svd for the end-to-end runs, comma separated")
    p.add_argument("--decompose-rank", type=int, default=64, help="rank of the per-layer decomposition part")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="out x in, comma separated")
    p.add_argument("--synthetic-params", type=float, default=2.0e9, help="size of the synthetic Llama checkpoint")
    p.add_argument("--synthetic-hidden", type=int, default=2560)
    p.add_argument("--skip-synthetic-prepare", action="store_true", help="measure only the synthetic covariance walk")
    p.add_argument("--skip", default="", help=f"comma list of parts not to run: {', '.join(PARTS)}")
    p.add_argument("--fresh", action="store_true", help="measure the parts this run runs again, even where saved results match "
                   "(the saved results of the --skip parts are kept)")
    p.add_argument("--workdir", default=None, help="where temporary checkpoints go (default: system temp)")
    p.add_argument("--out", default="bench_prepare", help="results stem (a bare name lies under eval/results/)")
    p.add_argument("--child", default=None, choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.workdir = str(args.workdir or tempfile.gettempdir())
    if args.child:
        emit(CHILDREN[args.child](args))
        return 0
    from qcorda.table import print_table

    skip = set(filter(None, args.skip.split(",")))
    unknown = skip - set(PARTS)
    if unknown:
        raise SystemExit(f"--skip: unknown part {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    store = Results(args.out)
    doc = {"parts": {}, **store.load()}
    doc["command"] = "OMP_NUM_THREADS=1 python -m eval.bench_prepare" + "".join(f" {a}" for a in argv)
    old_md = store.md_path.read_text() if store.md_path.exists() else ""
    fns = {"e2e": part_e2e, "decompose": part_decompose, "synthetic": part_synthetic}
    for name in PARTS:
        if name in skip:
            continue
        part_args = {k: getattr(args, k) for k in PART_ARGS[name]}
        saved = doc["parts"].get(name)
        if saved and saved["args"] == part_args and not args.fresh:
            print(f"[{name}] kept from {saved['env']['utc']} (same arguments; --fresh to measure again)", file=sys.stderr)
            continue
        env, t = environment(), time.perf_counter()
        doc["parts"][name] = {"args": part_args, "env": env, "result": fns[name](args), "seconds": time.perf_counter() - t,
                              "command": doc["command"]}
        store.save(doc, render(doc, old_md))
    store.save(doc, render(doc, old_md))
    if summary_rows(doc):
        print_table(["target", "measured", "met?"], summary_rows(doc), title="bench_prepare: issue 7's targets")
    print(f"wrote {store.md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
