"""Does a qcorda init give a better fine-tuned 4-bit model than QLoRA, once each init trains at its own learning rate?

Gemma-3-270M, NF4 + double quantization (blocksize 64), rank 16 (alpha = r) on every linear layer of
the 18 decoder blocks. Every init is prepared once by ``qcorda.prepare`` and trained on GSM8K train
records (loss on the answer + EOS only) with the same data order per seed:

1. an lr grid per init (seed 0), lr-major so that a run cut short still compares every init at the
   same learning rates;
2. each init's best learning rate (lowest final held-out GSM8K answer loss among the runs that did not
   diverge) with more seeds (the data order changes; the init itself is seed 0).

Measured at init and after training: held-out GSM8K answer loss (the task: NLL per token of the gold
solutions of the first ``--gsm8k-limit`` test questions, teacher-forced), NQ-open gold-answer
log-likelihood (knowledge retention; the first ``--nq-limit`` questions; qcorda-kpm is calibrated on
the LAST ``--calib-samples`` questions, none of them evaluated) and wikitext-2 perplexity. The held-out
loss is also taken every ``--eval-every`` steps for the loss curves.

The loop (:func:`train_adapter`) is plain torch: AdamW (fp32 states), cosine schedule with 3 % warmup
(the GPU recipes' schedule), gradient clipping 0.3 (QLoRA's), over a base whose NF4 layers run as fp32
``Linear`` layers holding exactly deq(Q) (:func:`dequantize_base`; tests/test_evaluate.py checks the
logits and LoRA gradients against ``Linear4bit``). The divergence guard of ``qcorda train``
(:class:`qcorda.guard.DivergenceGuard`, one logged loss per step here) stops a diverging run; the
adapter of its last good step is then measured, and the run is marked diverged.

Resumable: every finished (init, lr, seed) is kept in the JSON; rerun the same command to continue.
Results: ``eval/results/finetune{,_cuda}.{md,json}``, ``finetune_lr{,_cuda}.png`` (held-out loss
against lr) and ``finetune_curves{,_cuda}.png`` (losses at each init's best lr, seed spread).

    python -m eval.study_finetune                     # CPU: hours; run it in the background
    python -m eval.study_finetune --device cuda       # the GPU preset (longer runs, larger eval sets): not minutes, see below
    python -m eval.study_finetune --device cuda --preset cuda-5min --inits qlora,qpissa,qcorda-cal:zero --seeds 0

What the GPU presets cost (not yet measured on a GPU): ``cuda`` is 8 inits x 6 lrs at seed 0 plus 2 more seeds at
each init's best, 64 runs of 300 steps at batch 8 (19,200 steps) with 6 held-out evaluations of 200 questions per
run: about an hour even at 10 steps/s, hours below that. ``cuda-5min`` with the three inits above (lr factors 1, 1/6
and 1: qlora, qpissa, qcorda-cal from zero) is 6 runs of 100 steps at 2 lrs, smaller eval sets: it fits 5 minutes of
one GPU at about 5 steps/s with its evaluations; it shows whether the inits' order at 2e-4 vs 6e-4 holds on a GPU,
not a tuned grid (eval/gpu_check.py's precision part asks the narrower question: does bf16 autocast change the steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from qcorda.config import CalibConfig, InitConfig
from qcorda.guard import DivergenceGuard
from qcorda.lr import LR_FACTORS, QLORA_LR, recommended_lr

from qcorda.io import write_text_atomic

from .lib import RESULTS, Results

#: Every init of the study, by :func:`qcorda.lr.init_key`: (method, cal_start, calibration data).
INITS: dict[str, tuple[str, str, str | None]] = {
    "qlora": ("qlora", "ipm", None),
    "loftq": ("loftq", "ipm", None),
    "qpissa": ("qpissa", "ipm", None),
    "qcorda-ipm": ("qcorda-ipm", "ipm", "gsm8k"),
    "qcorda-kpm": ("qcorda-kpm", "ipm", "nq"),
    "qcorda-cal:ipm": ("qcorda-cal", "ipm", "gsm8k"),
    "qcorda-cal:zero": ("qcorda-cal", "zero", "gsm8k"),
    "qera": ("qera", "ipm", "gsm8k"),
}
#: Inits whose runs the saved results hold but this script no longer makes: reported, marked, never rerun.
RETIRED = {
    "qcorda-ipm:unbalanced": "qcorda-ipm with its factors as before balancing, B = U√S/√s and A = √S·(VᵀC⁻¹)/√s (the same "
                             "s·B·A and codes); run on 2026-11-29 with the code of commit ff0a645, which switched the package's "
                             "private factor builder from this script. The ablation answered its question (balancing is more "
                             "stable) and was removed when eval/ moved to the public API only (issue 23)",
}
#: Per-device defaults (a flag given on the command line wins).
PRESETS = {
    "cpu": dict(steps=60, batch_size=4, lrs="2e-4,2e-5,6e-5,6e-4,1.2e-3", gsm8k_limit=32, nq_limit=48, ppl_tokens=1024, eval_every=20),
    "cuda": dict(steps=300, batch_size=8, lrs="2e-4,2e-5,6e-5,6e-4,1e-5,1e-3", gsm8k_limit=200, nq_limit=300, ppl_tokens=16384, eval_every=50),
    "cuda-5min": dict(steps=100, batch_size=8, lrs="2e-4,6e-4", gsm8k_limit=64, nq_limit=64, ppl_tokens=4096, eval_every=50),
}
#: Arguments that change the numbers: stored results are reused only when all of them match.
RESULT_KEYS = ("device", "rank", "steps", "batch_size", "max_length", "max_grad_norm", "warmup_ratio", "train_limit", "calib_samples",
               "gsm8k_limit", "nq_limit", "ppl_tokens", "eval_every", "margin", "patience")


# --------------------------------------------------------------------------- model


def dequantize_base(model):
    """Replace every frozen ``Linear4bit`` base layer by an fp32 ``Linear`` holding its dequantized
    weight, in place. With fp32 compute, bitsandbytes dequantizes the NF4 weight on every call and
    multiplies by it, so forward and backward use the same numbers; this only avoids redoing the
    dequantization at every step (~10x faster on the CPU)."""
    import bitsandbytes.functional as F

    for _, mod in model.named_modules():
        base = getattr(mod, "base_layer", None)
        if type(base).__name__ != "Linear4bit":
            continue
        W = F.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=base.bias is not None, device=W.device)
        lin.weight = torch.nn.Parameter(W, requires_grad=False)
        if base.bias is not None:
            lin.bias = torch.nn.Parameter(base.bias.detach().float(), requires_grad=False)
        mod.base_layer = lin
    return model


def prepare_init(label: str, args, work: Path) -> tuple[Path, float]:
    """Prepare ``label`` once (cached under ``work``); returns the directory and the seconds it took."""
    from qcorda.data import load_records
    from qcorda.prepare import prepare
    from qcorda.models import load_model

    out = work / label.replace(":", "-")
    if (out / "qcorda.json").exists():
        return out, json.loads((out / "study_prepare.json").read_text())["seconds"]
    method, start, calib = INITS[label]
    kw = {}
    if calib == "gsm8k":
        kw = dict(data="gsm8k-train", fields=("question", "answer"))
    elif calib == "nq":  # questions that are never evaluated
        records = load_records("nq-open")
        path = work / "nq_calib.jsonl"
        path.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in records[-args.calib_samples :]))
        kw = dict(data=str(path), fields=("question",))
    cfg = InitConfig(method=method, rank=args.rank, cal_start=start, compute_dtype="float32", seed=0, device=args.device,
                     calib=CalibConfig(samples=args.calib_samples, max_length=128, batch_size=8, **kw))
    t = time.perf_counter()
    model, tok = load_model("gemma-3-270m")
    model.to(args.device)  # the in-memory engine calibrates where the model is: on the GPU for --device cuda
    prepare(model, cfg, out, tokenizer=tok, overwrite=True)
    seconds = time.perf_counter() - t
    (out / "study_prepare.json").write_text(json.dumps({"seconds": seconds}))
    return out, seconds


def load(prepared: Path, device: str, adapter: Path | None = None, trainable: bool = False):
    from transformers import AutoTokenizer

    from qcorda.prepared import load_prepared

    model = load_prepared(prepared, adapter=adapter, is_trainable=trainable, device=device)
    return dequantize_base(model), AutoTokenizer.from_pretrained(str(prepared))


# --------------------------------------------------------------------------- measuring


def heldout_loss(model, tok, args) -> float:
    """NLL per token of the gold solutions of the first ``gsm8k_limit`` GSM8K test questions
    (:func:`qcorda.evaluate.gsm8k`'s ``answer_nll``, without decoding)."""
    from qcorda.evaluate import gsm8k

    return gsm8k(model, tok, limit=args.gsm8k_limit, batch_size=args.eval_batch_size, progress=False,
                 generate_answers=False).metrics["answer_nll"]


def measure(model, tok, args) -> dict:
    from qcorda.evaluate import nq, perplexity

    model.eval()
    t = time.perf_counter()
    out = {"gsm8k_loss": heldout_loss(model, tok, args)}
    out["nq_logprob"] = nq(model, tok, limit=args.nq_limit, batch_size=args.eval_batch_size, generate_answers=False,
                           progress=False).metrics["gold_logprob"]
    out["ppl"] = perplexity(model, tok, max_tokens=args.ppl_tokens, batch_size=max(1, args.eval_batch_size // 4),
                            progress=False).metrics["ppl"]
    out["eval_seconds"] = time.perf_counter() - t
    return out


# --------------------------------------------------------------------------- training


def train_adapter(model, tok, examples, args, lr: float, seed: int, on_eval=None) -> dict:
    """AdamW on the LoRA parameters, cosine schedule with ``warmup_ratio`` warmup, clipping
    ``max_grad_norm``; loss = mean NLL over the completion tokens of the batch (EOS appended), the
    objective TRL's SFTTrainer optimizes in ``qcorda train``. The data order is a permutation drawn
    from ``seed`` alone, so every init sees the same batches. ``on_eval(step)`` runs every
    ``eval_every`` steps. The divergence guard stops a diverging run and the last good adapter is
    put back. Returns the per-step losses and what the guard said."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from qcorda.scoring import encode_pairs, masked_nll

    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < args.steps * args.batch_size:
        order += torch.randperm(len(examples), generator=g).tolist()
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(args.warmup_ratio * args.steps), args.steps)
    guard = DivergenceGuard(margin=args.margin, patience=args.patience, start_window=args.patience)
    eos = tok.eos_token or ""
    losses, reason, kept = [], None, None
    good = {n: p.detach().clone() for n, p in params.items()}  # the adapter whose loss was last good
    bar = tqdm(range(args.steps), desc=f"train lr={lr:g}", disable=not args.progress, mininterval=30)
    for step in bar:
        model.train()
        before = {n: p.detach().clone() for n, p in params.items()}
        batch = [examples[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]]
        ids, att, lab = encode_pairs(tok, [e.prompt for e in batch], [e.completion + eos for e in batch], args.max_length)
        sums, counts = masked_nll(model, ids, att, lab)
        loss = sums.sum() / counts.sum().clamp(min=1)
        losses.append(loss.item())
        reason = guard.update(step + 1, losses[-1])
        if reason is not None:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(good[n])
            kept = guard.last_good - 1 if guard.last_good else 0  # updates applied to the kept adapter
            break
        if guard.last_good == step + 1:
            good = before  # the parameters that produced this step's loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_eval is not None and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            on_eval(step + 1)
    model.eval()
    return {"train_loss": losses, "diverged": reason, "kept_step": kept}


# --------------------------------------------------------------------------- the study


def best_lr(runs: dict[str, dict]) -> tuple[float | None, bool]:
    """The lr with the lowest final held-out loss among the runs that did not diverge (all of them
    when every run diverged); returns (lr, whether every run diverged)."""
    ok = {float(lr): r for lr, r in runs.items() if not r["diverged"]}
    pool = ok or {float(lr): r for lr, r in runs.items()}
    if not pool:
        return None, False
    return min(pool, key=lambda lr: pool[lr]["gsm8k_loss"]), not ok


def run_one(prepared, lr, seed, train, args) -> dict:
    """Train one (init, lr, seed) and measure it; ``curve``: (step, held-out loss) along the way."""
    model, tok = load(prepared, args.device, trainable=True)
    curve, curve_s = [], [0.0]

    def on_eval(step):
        t = time.perf_counter()
        curve.append((step, heldout_loss(model, tok, args)))
        model.train()
        curve_s[0] += time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(seed)
    log = train_adapter(model, tok, train, args, lr, seed, on_eval=on_eval)
    train_s = time.perf_counter() - t - curve_s[0]
    m = measure(model, tok, args)
    curve.append((len(log["train_loss"]) if log["diverged"] else args.steps, m["gsm8k_loss"]))
    return {**m, **log, "curve": curve, "train_seconds": train_s, "curve_seconds": curve_s[0], "lr": lr, "seed": seed}


# --------------------------------------------------------------------------- report


def _pm(values: list[float], digits: int = 3) -> str:
    """mean ± half the range (the seed spread)."""
    if not values:
        return "n/m"
    m = sum(values) / len(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def runs_at(entry: dict, lr: float) -> list[dict]:
    """Every run of an init at ``lr``: the grid's seed and the extra seeds."""
    return [r for r in [entry["grid"].get(f"{lr:g}")] if r] + list(entry["seeds"].get(f"{lr:g}", {}).values())


def study_recommended_lr(label: str) -> float | None:
    """The lr ``learning_rate: auto`` gives an init label (``method`` or ``qcorda-cal:<start>``) at base QLoRA's
    2e-4; None for a study-only init."""
    method, _, start = label.partition(":")
    return recommended_lr(method, QLORA_LR, start or None) if label in LR_FACTORS else None


def best_runs(entry: dict) -> tuple[float | None, list[dict]]:
    """Each init's best lr and every run at it."""
    lr, _ = best_lr(entry["grid"])
    return (None, []) if lr is None else (lr, runs_at(entry, lr))


def paired(runs: list[dict], ref: list[dict]) -> list[float]:
    """Held-out loss of ``runs`` minus that of ``ref`` for every seed both have: the seed sets the data
    order, the same for every init, so the difference of two inits at one seed is paired."""
    by_seed = {r["seed"]: r["gsm8k_loss"] for r in ref}
    return [r["gsm8k_loss"] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]


def _falls(runs: list[dict]) -> str:
    """yes when, in every run, the mean of the last 5 training losses is below that of the first 5."""
    return "yes" if all(sum(r["train_loss"][-5:]) / 5 < sum(r["train_loss"][:5]) / 5 for r in runs) else "NO"


def _below_init(runs: list[dict], init: dict) -> str:
    """yes when every run ends with a held-out loss below the init's."""
    return "yes" if all(r["gsm8k_loss"] < init["gsm8k_loss"] for r in runs) else "NO"


def _grid_lrs(res: dict, inits: list[str]) -> list[float]:
    """Every lr the seed-0 grid holds for ``inits``, ascending."""
    return sorted({float(lr) for i in inits for lr in res["inits"][i]["grid"]})


def _recommended_section(res: dict, inits: list[str]) -> list[str]:
    """Each init at the learning rate ``learning_rate: auto`` gives it (:mod:`qcorda.lr`, base QLoRA's 2e-4)."""
    lines = ["", f"## Each init at its recommended learning rate (`qcorda/lr.py`, base {QLORA_LR:g})", "",
             "| init | factor | lr | n | held-out loss | train loss falls | held-out below init | diverged |", "|---|---|---|---|---|---|---|---|"]
    for i in (i for i in inits if i in LR_FACTORS):
        e = res["inits"][i]
        lr = study_recommended_lr(i)
        runs = runs_at(e, lr)
        if not runs:
            lines.append(f"| {i} | {LR_FACTORS[i].factor:g} | {lr:g} | 0 | not run | | | |")
            continue
        lines.append(f"| {i} | {LR_FACTORS[i].factor:g} | {lr:g} | {len(runs)} | {_pm([r['gsm8k_loss'] for r in runs])} | "
                     f"{_falls(runs)} | {_below_init(runs, e['init'])} | {sum(bool(r['diverged']) for r in runs)} |")
    return lines


def write_report(out: Path, res: dict, args) -> None:
    """``out``.md with the tables, and the two plots (written atomically: a cut run leaves the last whole report)."""
    inits = [i for i in [*args.inits, *RETIRED] if i in res["inits"]]
    lines = [f"# Fine-tuning study ({args.device}): Gemma-3-270M, NF4 + rank-{args.rank} adapters trained on GSM8K", ""]
    device = "" if args.device == "cpu" else f" --device {args.device}"
    lines += ["Reproduce (resumable: finished (init, lr, seed) runs are kept in the JSON; rerun to continue; `--inits`, `--lrs` "
              "and `--seeds` choose what runs next, and runs of a narrower command count for the full one):", "", "```",
              f"python -m eval.study_finetune{device}", "```", ""]
    lines += [
        "## Setup", "",
        f"- Inits: {', '.join(inits)}; rank {args.rank}, alpha = r, every linear layer of the 18 blocks, NF4 + double quant "
        f"(blocksize 64), prepared once by `qcorda.prepare` (seed 0). Calibration: the first {args.calib_samples} GSM8K-train "
        f"question+answer texts (≤ 128 tokens); qcorda-kpm: the last {args.calib_samples} NQ-open questions (never evaluated). "
        "qcorda-cal: 5 iterations from the IPM split (`:ipm`) or from zero (`:zero`); loftq 5 iterations.",
        *[f"- {i} (an earlier code version): {why}." for i, why in RETIRED.items() if i in inits],
        f"- Training: {args.steps} steps x {args.batch_size} sequences (≤ {args.max_length} tokens, alpaca prompt, loss on the "
        f"answer + EOS) from the first {args.train_limit} GSM8K-train records, AdamW (fp32 states, no weight decay), cosine "
        f"schedule with {args.warmup_ratio:.0%} warmup, clipping {args.max_grad_norm}. The seed sets the data order, the same for every init.",
        f"- Divergence guard (`qcorda.guard`, as in `qcorda train`): a NaN loss, or the smoothed loss (EMA 0.5) more than "
        f"{args.margin:.0%} above the mean of the first {args.patience} losses for {args.patience} steps, stops the run; its last "
        "good adapter is measured, marked † (the number of updates it had).",
        f"- Measured at init and after training: held-out GSM8K answer loss (NLL per token of the gold solutions of the first "
        f"{args.gsm8k_limit} test questions; also every {args.eval_every} steps for the curves), NQ-open gold-answer log-likelihood "
        f"(first {args.nq_limit} questions, mean per-token log-prob of the best accepted answer) and wikitext-2 perplexity "
        f"(first {args.ppl_tokens} tokens).",
        "",
    ]
    lrs = _grid_lrs(res, inits)
    lines += ["## Held-out GSM8K loss over the learning-rate grid (seed " + str(args.seeds[0]) + ")", "",
              "| init | at init | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    for i in inits:
        e = res["inits"][i]
        cells = []
        for lr in lrs:
            r = e["grid"].get(f"{lr:g}")
            cells.append("" if r is None else f"{r['gsm8k_loss']:.3f}" + (f" † ({r['kept_step']})" if r["diverged"] else ""))
        lines.append(f"| {i} | {e['init']['gsm8k_loss']:.3f} | " + " | ".join(cells) + " |")
    q_lr, q_runs = best_runs(res["inits"]["qlora"]) if "qlora" in res["inits"] else (None, [])
    lines += ["", "## Each init at its best learning rate", "",
              "Mean ± half the range over the seeds run so far (n). Δ = trained − init; a lower NQ log-lik or a higher "
              "perplexity is forgetting. vs qlora: held-out loss minus qlora's at its best lr, paired by seed (n pairs).", "",
              "| init | best lr | / qlora's | n | held-out loss | vs qlora (n) | Δ loss | NQ gold log-lik | Δ NQ | wikitext-2 ppl | Δ ppl | train loss falls | held-out below init |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in inits:
        e = res["inits"][i]
        lr, runs = best_runs(e)
        if lr is None:
            continue
        b = e["init"]
        get = lambda k: [r[k] for r in runs]  # noqa: E731
        d = lambda k: [r[k] - b[k] for r in runs]  # noqa: E731
        vs_q = paired(runs, q_runs)
        ratio = f"{lr / q_lr:.2g}" if q_lr else "n/m"
        lines.append(f"| {i} | {lr:g}{' (all diverged)' if best_lr(e['grid'])[1] else ''} | {ratio} | {len(runs)} | "
                     f"{_pm(get('gsm8k_loss'))} | {_pm(vs_q)} ({len(vs_q)}) | {_pm(d('gsm8k_loss'))} | {_pm(get('nq_logprob'))} | {_pm(d('nq_logprob'))} | "
                     f"{_pm(get('ppl'), 2)} | {_pm(d('ppl'), 2)} | {_falls(runs)} | {_below_init(runs, b)} |")
    lines += _recommended_section(res, inits)
    lines += ["", "## Time", ""]
    lines += [f"- {part}: {sec / 60:.0f} min" for part, sec in res.get("seconds", {}).items()]
    per = [r for i in inits for r in list(res["inits"][i]["grid"].values())]
    if per:
        lines.append(f"- one run (the part times add up every process that ran): {_pm([r['train_seconds'] / 60 for r in per], 1)} min training, "
                     f"{_pm([(r['eval_seconds'] + r['curve_seconds']) / 60 for r in per], 1)} min measuring "
                     f"({len(per)} grid runs; machine: {res['runs'][-1].get('threads')} threads, load average "
                     f"{', '.join(f'{x:.1f}' for x in res['runs'][-1].get('load', []))} at the last save)")
    lines += ["", "Plots: " + out.name + "_lr.png (held-out loss against lr), " + out.name + "_curves.png (best lr, seed spread).",
              "", "## Reading", "", "READING_PLACEHOLDER", ""]
    path = out.with_suffix(".md")
    old = path.read_text() if path.exists() else ""
    if "## Reading" in old and "READING_PLACEHOLDER" not in old.split("## Reading", 1)[1]:  # keep a hand-written reading
        lines[-2] = old.split("## Reading", 1)[1].strip()
    write_text_atomic(path, "\n".join(lines))
    _plots(out, res, inits)


def _plots(out: Path, res: dict, inits: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i in inits:
        grid = res["inits"][i]["grid"]
        pts = sorted((float(lr), r["gsm8k_loss"], r["diverged"]) for lr, r in grid.items())
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=i)
            bad = [p for p in pts if p[2]]
            ax.scatter([p[0] for p in bad], [p[1] for p in bad], marker="x", s=80, color=line.get_color())
        ax.axhline(res["inits"][i]["init"]["gsm8k_loss"], color="gray", lw=0.3)
    ax.set_xscale("log")
    lrs = _grid_lrs(res, inits)
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], fontsize=7)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the log axis would label 3e-5, 4e-5, ... over each other
    ax.set_xlabel("learning rate (x: stopped by the guard; gray lines: loss at init)")
    ax.set_ylabel("held-out GSM8K answer loss")
    ax.set_title("held-out loss after training, by learning rate", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_lr.png", dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i in inits:
        lr, runs = best_runs(res["inits"][i])
        if not runs:
            continue
        n = min(len(r["train_loss"]) for r in runs)
        w = 5  # moving average over steps: batches of 4 are noisy
        smooth = [[sum(r["train_loss"][max(0, s - w + 1): s + 1]) / len(r["train_loss"][max(0, s - w + 1): s + 1]) for s in range(n)] for r in runs]
        mean = [sum(c[s] for c in smooth) / len(smooth) for s in range(n)]
        line, = axes[0].plot(range(1, n + 1), mean, label=f"{i} (lr {lr:g})")
        axes[0].fill_between(range(1, n + 1), [min(c[s] for c in smooth) for s in range(n)], [max(c[s] for c in smooth) for s in range(n)],
                             color=line.get_color(), alpha=0.15)
        steps = sorted({st for r in runs for st, _ in r["curve"]})
        pts = [(0, [res["inits"][i]["init"]["gsm8k_loss"]])] + [(st, [v for r in runs for s2, v in r["curve"] if s2 == st]) for st in steps]
        axes[1].errorbar([p[0] for p in pts], [sum(v) / len(v) for _, v in pts],
                         yerr=[[sum(v) / len(v) - min(v) for _, v in pts], [max(v) - sum(v) / len(v) for _, v in pts]],
                         marker="o", capsize=3, color=line.get_color(), label=i)
    axes[0].set_title("training loss at the best lr (5-step moving average; band: seeds)", fontsize=9)
    axes[1].set_title("held-out GSM8K loss at the best lr (bars: seed range)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_curves.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", choices=sorted(PRESETS), help="the defaults of the flags below (default: the device's)")
    p.add_argument("--inits", default=",".join(INITS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lrs", help="learning rates of the grid, in the order they run")
    p.add_argument("--seeds", default="0,1,2", help="the first runs the grid, all of them run each init's best lr")
    p.add_argument("--seeds-at", default="best", choices=["best", "recommended"],
                   help="the lr the seeds after the first run at: each init's best in the grid, or its recommended lr "
                        "(qcorda/lr.py; the grid must hold that lr for the first seed)")
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--max-grad-norm", type=float, default=0.3)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--train-limit", type=int, default=512, help="training pool: the first N GSM8K-train records")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--gsm8k-limit", type=int)
    p.add_argument("--nq-limit", type=int)
    p.add_argument("--ppl-tokens", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--margin", type=float, default=0.25, help="divergence guard: allowed rise of the smoothed loss (fraction)")
    p.add_argument("--patience", type=int, default=5, help="divergence guard: steps above the margin before stopping")
    p.add_argument("--report-only", action="store_true", help="rebuild the markdown and plots from the saved JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "qcorda" / "study_finetune"))
    p.add_argument("--out", help="results stem (default eval/results/finetune, _cuda on a GPU)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset or args.device].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.lrs = [float(x) for x in str(args.lrs).split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.inits = [s.strip() for s in args.inits.split(",") if s.strip()]
    unknown = [i for i in args.inits if i not in INITS]
    if unknown:
        raise SystemExit(f"--inits: unknown {', '.join(unknown)}; choose from {', '.join(INITS)}")
    out = Path(args.out) if args.out else RESULTS / ("finetune" if args.device == "cpu" else
                                                     "finetune_cuda5" if args.preset == "cuda-5min" else "finetune_cuda")
    store = Results(out, key={k: getattr(args, k) for k in RESULT_KEYS})
    res = {"inits": {}, "runs": [], "seconds": {}, **store.load()}
    res["argv"] = argv
    if args.report_only:
        write_report(out, res, args)
        return 0
    res["runs"].append({"start": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads()})
    t0 = time.perf_counter()

    def save(part: str, seconds: float) -> None:
        res["seconds"][part] = res["seconds"].get(part, 0.0) + seconds
        res["runs"][-1]["load"] = os.getloadavg()
        res["runs"][-1]["seconds"] = time.perf_counter() - t0
        store.save(res)
        write_report(out, res, args)

    from qcorda.data import load_examples

    work = Path(args.work) / f"{args.device}-r{args.rank}-c{args.calib_samples}"
    work.mkdir(parents=True, exist_ok=True)
    train = load_examples("gsm8k-train", ("question", "answer"), "alpaca", args.train_limit)
    prepared = {}
    for label in args.inits:  # 1. inits, and their figures before training
        t = time.perf_counter()
        prepared[label], prep_s = prepare_init(label, args, work)
        entry = res["inits"].setdefault(label, {"init": None, "grid": {}, "seeds": {}, "prepare_seconds": prep_s})
        if entry["init"] is None:
            print(f"== {label} init", flush=True)
            model, tok = load(prepared[label], args.device)
            entry["init"] = measure(model, tok, args)
            del model
            save("prepare and init", time.perf_counter() - t)
    for lr in args.lrs:  # 2. the grid at the first seed, lr-major
        for label in args.inits:
            grid = res["inits"][label]["grid"]
            if f"{lr:g}" in grid:
                continue
            print(f"== {label} lr {lr:g} seed {args.seeds[0]}", flush=True)
            t = time.perf_counter()
            grid[f"{lr:g}"] = run_one(prepared[label], lr, args.seeds[0], train, args)
            print({k: grid[f"{lr:g}"][k] for k in ("gsm8k_loss", "nq_logprob", "ppl", "diverged")}, flush=True)
            save("lr grid", time.perf_counter() - t)
    for seed in args.seeds[1:]:  # 3. each init's best (or recommended) lr, more seeds
        for label in args.inits:
            entry = res["inits"][label]
            lr = best_lr(entry["grid"])[0] if args.seeds_at == "best" else study_recommended_lr(label)
            if lr is None:
                print(f"== {label}: no {args.seeds_at} lr (a study-only init, or no grid run), skipped", flush=True)
                continue
            done = entry["seeds"].setdefault(f"{lr:g}", {})
            if str(seed) in done:
                continue
            print(f"== {label} {args.seeds_at} lr {lr:g} seed {seed}", flush=True)
            t = time.perf_counter()
            done[str(seed)] = run_one(prepared[label], lr, seed, train, args)
            save(f"{args.seeds_at} lr, more seeds", time.perf_counter() - t)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
