"""Does ``learning_rate: probe`` land on each init's best learning rate? Checked against the grid of
``eval/results/finetune.json`` and (preset ``transfer``) on a setup no constant was calibrated on.

Preset ``grid`` (the finetune study's setup: Gemma-3-270M, NF4 + DQ, r 16, 60 steps x 4 GSM8K
sequences; the same prepare, training loop and measurements, imported from ``eval.study_finetune``):

1. ``probe``: for each of the eight inits, every candidate measurement of :mod:`qcorda.probe`
   (``update``, ``sharpness``, ``direction``, ``range``) at seed 0 within the probe budget (5 % of the
   run's sequence passes), and at seeds 1 and 2 (the probe's own sampling spread). Cheap: minutes.
2. ``train``: each init trained at the lr ``probe_lr`` sets with the shipped method and constants
   (``TrainConfig().lr_probe``; the runs are kept per method), seed 0 for every init first, then seeds
   1 and 2; held-out loss paired by seed with the grid-best runs of finetune.json (the seed sets the
   data order, the same in both studies).

Preset ``transfer`` (picked and written down before any probe result on it was seen; see
:data:`PRESETS`): NQ-open closed-book QA instead of GSM8K, rank 64: a grid of 4 lrs x 3 inits at seed 0,
seed 1 at each init's best, and training at the shipped probe's lr, 2 seeds; every candidate's lr there
uses the constant anchored on the grid preset (never refitted on transfer data). Its results go to
``eval/results/lr_probe_transfer.{json,md}``.

Resumable: every finished unit (one init's probes, one training run) is saved at once in
``eval/results/lr_probe.json`` (:class:`eval.lib.Results`) with the markdown; rerun the same command
to continue. ``--deadline HH:MM`` (UTC) starts no training run that would not end before it.

    OMP_NUM_THREADS=1 python -m eval.study_lr_probe                      # every part, in the default order
    OMP_NUM_THREADS=1 python -m eval.study_lr_probe --parts candidates   # every candidate on the 8 inits, seed 0 (minutes)
    OMP_NUM_THREADS=1 python -m eval.study_lr_probe --preset transfer    # the second setup (hours)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from eval.lib import Results, environment, machine
from eval.study_finetune import INITS, PRESETS as FT_PRESETS, best_lr, load, prepare_init, run_one, runs_at, train_adapter
from qcorda import probe as P
from qcorda.config import CalibConfig, InitConfig
from qcorda.data import load_examples, load_records

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "eval" / "results" / "finetune.json"
GRID_INITS = [i for i in INITS if i != "qcorda-ipm:unbalanced"]
METHODS = ("update", "sharpness", "direction", "range")

#: The setups. ``transfer`` was chosen at 18:50 UTC on 2026-12-03, before the probe had been run on it
#: (nor on anything but the grid's eight inits): another task (NQ-open short answers instead of GSM8K
#: solutions: ~20-token sequences, a different loss scale), another rank (64 instead of 16), its own
#: lr grid (4 lrs spanning 30x), 3 inits (qlora; qera, whose adapter starts small; qcorda-ipm, a
#: principal-component init). Nothing of it was run in the session that wrote it (see the report).
PRESETS = {
    "grid": dict(task="gsm8k", rank=16, inits=GRID_INITS, seeds=(0, 1, 2)),
    "transfer": dict(task="nq", rank=64, inits=["qlora", "qera", "qcorda-ipm"], seeds=(0, 1),
                     lrs=(6e-5, 2e-4, 6e-4, 1.8e-3), train_records=320, heldout_records=48, max_length=64),
}


def ft_args(rank: int, **kw) -> argparse.Namespace:
    """The finetune study's arguments for its CPU preset (what its functions read)."""
    a = dict(device="cpu", rank=rank, max_length=160, max_grad_norm=0.3, warmup_ratio=0.03, train_limit=512, calib_samples=32,
             eval_batch_size=8, margin=0.25, patience=5, progress=False, **{k: v for k, v in FT_PRESETS["cpu"].items() if k != "lrs"})
    a["eval_every"] = a["steps"]  # no loss curves: only the final figures are compared
    a.update(kw)
    return argparse.Namespace(**a)


# --------------------------------------------------------------------------- report


def _grid_best(ft: dict, label: str) -> tuple[float | None, list[dict]]:
    e = ft["inits"].get(label)
    if not e:
        return None, []
    lr, _ = best_lr(e["grid"])
    return lr, runs_at(e, lr)


def _pm(v: list[float], d: int = 3) -> str:
    if not v:
        return "n/m"
    m = sum(v) / len(v)
    return f"{m:.{d}f}" if len(v) == 1 else f"{m:.{d}f} ± {(max(v) - min(v)) / 2:.{d}f}"


def _anchor(doc: dict, ft: dict, method: str) -> float | None:
    """The constant that puts ``method``'s lr on qlora's grid-best lr: τ = lr·u for update, c = lr·λ for
    sharpness, the divisor lr_min/lr for range."""
    q = doc["grid"].get("qlora", {}).get("probe", {}).get(method, {}).get("0")
    lr, _ = _grid_best(ft, "qlora")
    if not q or lr is None:
        return None
    return q["measured"] / lr if method in ("range", "direction") else q["measured"] * lr


def _grid_at(ft: dict, label: str, lr: float) -> float:
    return ft["inits"][label]["grid"][f"{lr:g}"]["gsm8k_loss"]


def _interp(grid: dict, key: str, lr: float) -> float | None:
    """A seed-0 grid's (``{lr: run}``) figure ``key`` at ``lr``, linear in log lr between the two grid lrs
    around it (None outside the grid; diverged runs left out)."""
    pts = sorted((float(k), r[key]) for k, r in grid.items() if not r["diverged"])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= lr <= x1:
            w = math.log(lr / x0) / math.log(x1 / x0)
            return y0 + w * (y1 - y0)
    return None


def _rule_lr(method: str, measured: float, const: float) -> float:
    return measured / const if method in ("range", "direction") else const / measured  # as qcorda.probe's rules


def report(doc: dict, ft: dict) -> str:
    g = doc["grid"]
    L = ["# The learning rate from a measurement (`learning_rate: probe`): validation", "",
         "Reproduce (resumable; every finished unit is kept in lr_probe.json):", "", "```",
         "OMP_NUM_THREADS=1 python -m eval.study_lr_probe", "```", "",
         "## Setup", "",
         "- Preset `grid`: the setup of `eval/results/finetune.md` (Gemma-3-270M, NF4 + DQ, r 16, alpha = r, 60 steps x 4 GSM8K "
         "sequences, AdamW, cosine with 3 % warmup, clipping 0.3; held-out loss on the first 32 GSM8K test solutions), the inits "
         "prepared again by the same `prepare_init` (seed 0) and trained by the same `run_one`, imported from `eval.study_finetune`.",
         f"- Probe budget: {P.BUDGET_FRACTION:.0%} of the run's 60 x 4 = 240 sequence passes = "
         f"{P.probe_budget(60, 4)} passes (one forward + backward of one training sequence each).",
         f"- Candidates (`qcorda/probe.py`): `update` u = ‖s·Δ(B·A)‖/‖W‖ of Adam's first step per unit lr, lr = τ/u; "
         f"`sharpness` λ of the Adam-preconditioned Hessian ({P.SHARPNESS_ITERS} power iterations on "
         f"{max(1, P.probe_budget(60, 4) // (P.SHARPNESS_ITERS + 1))} sequences), lr = c/λ; `direction` lr* = the minimum of the "
         f"quadratic model along Adam's first step, lr = lr*/c; `range` an lr range test {P.RANGE_LR[0]:g} → {P.RANGE_LR[1]:g}, "
         f"lr = lr_min/c. Section 1 uses each constant anchored on qlora (below). Shipped in qcorda/probe.py since 2026-12-06: "
         f"τ = {P.UPDATE_TARGET:g}, c = {P.SHARPNESS_C:g}, {P.DIRECTION_DIVISOR:g}, {P.RANGE_DIVISOR:g}, the anchored values (before: "
         f"c = 1, 1 and 10, uncalibrated); `learning_rate: probe` takes `{shipped_method()}` unless `train.lr_probe` says otherwise "
         f"(before: `update`).", ""]
    # 1. the probe against the grid
    L += ["## 1. Probe lr against the grid's best (seed 0)", "",
          "Each candidate's lr with its constant fitted to qlora alone (the `anchored` columns: the constant that puts qlora "
          "on its grid-best 1.2e-3; the other seven inits are then predictions). ratio = probe lr / grid-best lr; within 2x: "
          "0.5-2.", ""]
    anchors = {m: _anchor(doc, ft, m) for m in METHODS}
    L += ["| init | grid-best lr | " + " | ".join(f"{m}: measured | {m}: lr (ratio)" for m in METHODS) + " |",
          "|---|---|" + "---|---|" * len(METHODS)]
    for i in GRID_INITS:
        e = g.get(i, {}).get("probe")
        if not e:
            continue
        best, _ = _grid_best(ft, i)
        cells = []
        for m in METHODS:
            r = e.get(m, {}).get("0")
            if not r or anchors[m] is None:
                cells += ["", ""]
                continue
            lr = _rule_lr(m, r["measured"], anchors[m])
            cells += [f"{r['measured']:.4g}", f"{lr:.3g} ({lr / best:.2f})"]
        L.append(f"| {i} | {best:g} | " + " | ".join(cells) + " |")
    consts = ", ".join(f"{m} {a:.4g}" for m, a in anchors.items() if a is not None)
    L += ["", f"Anchored constants: {consts} (τ = lr·u, c = lr·λ, divisor = lr_min/lr at qlora's 1.2e-3).", ""]
    L += ["Summary per candidate: the anchored rule, and the best a one-constant rule of that measurement can do on these "
          "inits (the constant fitted to all of them: the geometric mean of best-lr x measured; in-sample, so a lower bound "
          "on the miss). Held-out loss at the probe lr, seed 0, *estimated* by interpolating the seed-0 grid of finetune.json "
          "linearly in log lr (an estimate, not a run; measured runs are in section 2).", "",
          "| candidate | inits | within 2x (anchored) | ratios (anchored) | within 2x (fitted) | ratios (fitted) | est. loss − grid best, seed 0 (anchored) |",
          "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        pts = [(i, g[i]["probe"][m]["0"]["measured"], _grid_best(ft, i)[0]) for i in GRID_INITS
               if g.get(i, {}).get("probe", {}).get(m, {}).get("0")]
        if not pts or anchors[m] is None:
            continue
        sign = -1 if m in ("range", "direction") else 1  # range, direction: lr = measured / const
        fitted = math.exp(sum(math.log(b) * 1 + sign * math.log(x) * 1 for _, x, b in pts) / len(pts)) if sign == 1 else \
            math.exp(sum(math.log(x) - math.log(b) for _, x, b in pts) / len(pts))
        ra = [_rule_lr(m, x, anchors[m]) / b for _, x, b in pts]
        rf = [_rule_lr(m, x, fitted) / b for _, x, b in pts]
        est = [_interp(ft["inits"][i]["grid"], "gsm8k_loss", _rule_lr(m, x, anchors[m])) for i, x, _ in pts]
        est_d = [f"{i} {v - _grid_at(ft, i, b):+.3f}" if v is not None else f"{i} n/m (outside the grid)" for (i, _, b), v in zip(pts, est)]
        L.append(f"| {m} | {len(pts)} | {sum(0.5 <= r <= 2 for r in ra)} | {', '.join(f'{r:.2f}' for r in ra)} | "
                 f"{sum(0.5 <= r <= 2 for r in rf)} (const {fitted:.4g}) | {', '.join(f'{r:.2f}' for r in rf)} | {'; '.join(est_d)} |")
    L.append("")
    for m in METHODS:
        spread = []
        for i in GRID_INITS:
            vals = [_rule_lr(m, r["measured"], anchors[m]) for r in g.get(i, {}).get("probe", {}).get(m, {}).values() if "measured" in r]
            if len(vals) > 1 and anchors[m] is not None:
                spread.append(f"{i} {min(vals):.3g}-{max(vals):.3g} ({max(vals) / min(vals):.2f}x)")
        if spread:
            L += [f"The probe's own spread (`{m}`, probe seeds 0-2, anchored constant): " + "; ".join(spread) + ".", ""]
    costs = [(m, r["passes"], r["seconds"]) for i in GRID_INITS for m, rs in g.get(i, {}).get("probe", {}).items() for r in rs.values()
             if "passes" in r]
    if costs:
        L += ["Probe cost: " + "; ".join(f"{m} {sum(c[1] for c in costs if c[0] == m) // max(1, sum(1 for c in costs if c[0] == m))} passes, "
                                         f"{_pm([c[2] for c in costs if c[0] == m], 0)} s" for m in METHODS) + " per probe.", ""]
    # 2. training at the probe's lr
    L += ["## 2. Held-out loss after training at the probe's lr", "",
          "Each run at the lr the method's shipped constant gave when it ran (the `update` runs: 2026-12-03, τ = 2.855e-3, "
          "`update` then shipped). Paired by seed with the grid-best runs of finetune.json: Δ = probe-lr run − grid-best run at "
          "the same seed (n pairs). cost = the probe's seconds / the run's training seconds, both in the same process.", "",
          "| method | init | grid-best lr | probe lr | ratio | n | held-out at probe lr | at grid best (same seeds) | Δ (n) | cost |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for m, i in ((m, i) for m in METHODS for i in GRID_INITS):
        runs = g.get(i, {}).get("runs", {}).get(m, {})
        if not runs:
            continue
        best, bruns = _grid_best(ft, i)
        by_seed = {r["seed"]: r["gsm8k_loss"] for r in bruns}
        mine = [runs[s] for s in sorted(runs)]
        lrs = sorted({r["lr"] for r in mine})
        paired = [r["gsm8k_loss"] - by_seed[r["seed"]] for r in mine if r["seed"] in by_seed]
        ref = [by_seed[r["seed"]] for r in mine if r["seed"] in by_seed]
        cost = [r["probe"]["seconds"] / r["train_seconds"] for r in mine]
        L.append(f"| {m} | {i} | {best:g} | {', '.join(f'{x:.3g}' for x in lrs)} | {lrs[0] / best:.2f} | {len(mine)} | "
                 f"{_pm([r['gsm8k_loss'] for r in mine])} | {_pm(ref)} | {_pm(paired)} ({len(paired)}) | {_pm([100 * c for c in cost], 1)} % |")
    # 3. the second setup
    L += ["", "## 3. Second setup (preset `transfer`)", "",
          "NQ-open closed-book answers, rank 64, inits qlora, qera, qcorda-ipm, picked before any probe result on it was seen: "
          "in [lr_probe_transfer.md](lr_probe_transfer.md) (`python -m eval.study_lr_probe --preset transfer`).", ""]
    L += ["## Time", ""]
    L += [f"- {part}: {sec / 60:.1f} min" for part, sec in doc.get("seconds", {}).items()]
    if doc.get("env"):
        L += [f"- machine: {machine(doc['env'])}"]
    L += ["", "## Reading", "", doc.get("reading", "(written when the figures are in)"), ""]
    return "\n".join(L)


# --------------------------------------------------------------------------- the transfer setup

#: The probe's seeds on the transfer setup: every candidate at each (seed 0 first), for the probe's own spread.
TRANSFER_PROBE_SEEDS = (0, 1, 2)
#: Where an init's seed-0 best is the grid's lowest (highest) lr, one more lr 3x below (above) it is run
#: before the seed-1 run at the best. Added on 2026-12-06 after the 4-lr grid and the probe's lrs on this
#: setup had been seen (qera and qcorda-ipm were best at 6e-5, the grid's edge): it moves no constant,
#: it only locates the grid's best.
TRANSFER_EDGE_FACTOR = 3.0


def shipped_method() -> str:
    """The measurement ``learning_rate: probe`` takes in a recipe that does not name one."""
    from qcorda.recipe import TrainConfig

    return TrainConfig().lr_probe


def transfer_store(out: str | None) -> Results:
    cfg = {k: v for k, v in PRESETS["transfer"].items() if k != "seeds"}
    return Results(out or "lr_probe_transfer", key=json.loads(json.dumps({"study": "lr_probe", "preset": "transfer", **cfg})))


def _nq_records(cfg: dict) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records): the first ``train_records`` and the last ``heldout_records``
    bundled NQ-open questions, each with its first gold answer."""
    records = [{"question": r["question"], "answer": r["answer"][0]} for r in load_records("nq-open")]
    return records[: cfg["train_records"]], records[-cfg["heldout_records"]:]


def _nq_examples(records: list[dict]) -> list:
    from qcorda.data import format_record

    return [format_record(r, ("question", "answer")) for r in records]


def _t_best(e: dict) -> float | None:
    grid = {k: {"gsm8k_loss": r["heldout_loss"], "diverged": r["diverged"]} for k, r in e.get("grid", {}).items()}
    return best_lr(grid)[0]


def transfer_report(doc: dict, gdoc: dict, ft: dict) -> str:
    """lr_probe_transfer.md: every candidate's lr (constants anchored on the *grid* preset's qlora, never
    refitted here) against this setup's own small grid, and training at the shipped candidate's lr."""
    cfg = PRESETS["transfer"]
    T = doc.get("inits", {})
    lrs = cfg["lrs"]
    anchors = {m: _anchor(gdoc, ft, m) for m in METHODS}
    shipped = doc.get("shipped", {}).get("method", shipped_method())
    L = ["# `learning_rate: probe` on a setup no constant was calibrated on (preset `transfer`)", "",
         "Reproduce / resume (every finished unit is kept in lr_probe_transfer.json; `--deadline` starts no run that would not end before it):",
         "", "```", "OMP_NUM_THREADS=1 python -m eval.study_lr_probe --preset transfer --deadline HH:MM", "```", "",
         "## Setup", "",
         f"- Picked on 2026-12-03, before any probe result on it was seen (the `PRESETS` comment in eval/study_lr_probe.py), first run "
         f"2026-12-06: NQ-open closed-book answers instead of GSM8K solutions (train: the first {cfg['train_records']} bundled NQ-open "
         f"questions -> their first gold answer, alpaca template, max_length {cfg['max_length']}; held-out: answer NLL per token of the last "
         f"{cfg['heldout_records']}), rank {cfg['rank']} instead of 16, Gemma-3-270M NF4 + DQ, 60 steps x 4, the grid preset's optimizer "
         f"and schedule (`eval.study_finetune.train_adapter`). Inits: {', '.join(cfg['inits'])} (qera calibrated on the first 32 training "
         "records).",
         f"- Grid: {', '.join(f'{x:g}' for x in lrs)} at seed 0 (3x apart: the grid's best is the true best only to within about 1.7x), "
         "seed 1 at each init's grid best. Where the best was at the grid's edge, one more lr 3x beyond it (added after the 4-lr grid "
         "and the probe lrs here had been seen; see `TRANSFER_EDGE_FACTOR`).",
         f"- Probe: every candidate, seeds {', '.join(map(str, TRANSFER_PROBE_SEEDS))}, budget {P.probe_budget(60, 4)} sequence passes "
         "(5 % of the run's 240). Each candidate's constant is the one **anchored on qlora in the grid preset** (eval/results/lr_probe.md, "
         "section 1: " + ", ".join(f"{m} {a:.4g}" for m, a in anchors.items() if a is not None) + "); nothing is refitted on this setup.",
         f"- Trained at the probe's lr: the shipped candidate (`{shipped}`, {doc.get('shipped', {}).get('rule', '')}), its seed-0 lr, "
         "training seeds 0 and 1 (the seed sets the data order, the same for every lr, so runs are paired by seed).", ""]
    # the probe against the grid
    L += ["## 1. Each candidate's lr against this setup's grid best (probe seed 0; spread over probe seeds)", "",
          "ratio = probe lr / grid-best lr (seed 0); within 2x: 0.5-2. `partial`: not every grid lr has run for that init yet. "
          "est. Δ: the seed-0 grid's held-out loss interpolated linearly in log lr at the probe lr, minus the grid best (an estimate, "
          "not a run; n/m outside the grid).", "",
          "| init | grid-best lr | " + " | ".join(f"{m}: lr (ratio) | {m}: probe-seed spread | {m}: est. Δ" for m in METHODS) + " |",
          "|---|---|" + "---|---|---|" * len(METHODS)]
    within = {m: [] for m in METHODS}
    for i in cfg["inits"]:
        e = T.get(i)
        if not e or not e.get("probe"):
            continue
        best = _t_best(e)
        done = all(f"{x:g}" in e.get("grid", {}) for x in lrs)
        cells = []
        for m in METHODS:
            rs = {k: r for k, r in e["probe"].get(m, {}).items() if "failed" not in r}
            failed = len(e["probe"].get(m, {})) - len(rs)
            if "0" not in rs or anchors[m] is None:
                cells += [f"failed ({failed} of {failed + len(rs)} seeds)" if failed else "", "", ""]
                continue
            lr = _rule_lr(m, rs["0"]["measured"], anchors[m])
            all_lr = [_rule_lr(m, r["measured"], anchors[m]) for r in rs.values()]
            spread = f"{min(all_lr):.3g}-{max(all_lr):.3g} ({max(all_lr) / min(all_lr):.2f}x, n {len(all_lr)}{f', {failed} failed' if failed else ''})"
            if best is None:
                cells += [f"{lr:.3g}", spread, ""]
                continue
            within[m].append((i, lr / best, done))
            est = _interp(e.get("grid", {}), "heldout_loss", lr)
            ref = e["grid"][f"{best:g}"]["heldout_loss"]
            cells += [f"{lr:.3g} ({lr / best:.2f})", spread, "n/m" if est is None else f"{est - ref:+.3f}"]
        L.append(f"| {i} | {'' if best is None else f'{best:g}'}{'' if done else ' (partial)'} | " + " | ".join(cells) + " |")
    L += ["", "| candidate | inits with a grid | within 2x | ratios |", "|---|---|---|---|"]
    for m in METHODS:
        w = within[m]
        if w:
            L.append(f"| {m}{' (shipped)' if m == shipped else ''} | {len(w)}{'' if all(d for *_, d in w) else ' (partial grids)'} | "
                     f"{sum(0.5 <= r <= 2 for _, r, _ in w)} | {', '.join(f'{i} {r:.2f}' for i, r, _ in w)} |")
    costs = {m: [r for e in T.values() for r in e.get("probe", {}).get(m, {}).values() if "failed" not in r] for m in METHODS}
    train_s = [r["train_seconds"] for e in T.values() for r in [*e.get("grid", {}).values(), *e.get("probe_runs", {}).values()]]
    if any(costs.values()):
        mean_t = sum(train_s) / len(train_s) if train_s else None
        L += ["", "Probe cost per probe (mean over inits and seeds; seconds include the probe's own overhead, on a shared CPU): " + "; ".join(
            f"{m} {rs[0]['passes']} passes, {sum(r['seconds'] for r in rs) / len(rs):.0f} s"
            + (f" = {100 * sum(r['seconds'] for r in rs) / len(rs) / mean_t:.1f} % of a training run's {mean_t:.0f} s" if mean_t else "")
            for m, rs in costs.items() if rs) + "."]
    # the grid and the runs at the probe's lr
    cols = sorted({float(k) for e in T.values() for k in e.get("grid", {})} | set(lrs))
    L += ["", "## 2. The grid (held-out answer NLL per token, seed 0) and seed 1 at each init's best", "",
          "| init | " + " | ".join(f"lr {x:g}" for x in cols) + " | best | at best, seeds 0, 1 |", "|---|" + "---|" * (len(cols) + 2)]
    for i in cfg["inits"]:
        e = T.get(i)
        if not e:
            continue
        cells = []
        for x in cols:
            r = e.get("grid", {}).get(f"{x:g}")
            cells.append("" if r is None else f"{r['heldout_loss']:.3f}{' (diverged)' if r['diverged'] else ''}")
        best = _t_best(e)
        at = [] if best is None else [e["grid"][f"{best:g}"], *e.get("seeds", {}).get(f"{best:g}", {}).values()]
        L.append(f"| {i} | " + " | ".join(cells) + f" | {'' if best is None else f'{best:g}'} | {_pm([r['heldout_loss'] for r in at])} |")
    L += ["", f"## 3. Trained at the shipped probe's lr (`{shipped}`), paired by seed with the grid best", "",
          "Δ = run at the probe lr − run at the grid-best lr, same seed; n pairs.", "",
          "| init | probe lr | grid-best lr | ratio | held-out at probe lr (seeds) | at grid best, same seeds | Δ (n) |", "|---|---|---|---|---|---|---|"]
    for i in cfg["inits"]:
        e = T.get(i, {})
        pr = e.get("probe_runs", {})
        best = _t_best(e) if e else None
        if not pr or best is None:
            continue
        ref = {r["seed"]: r["heldout_loss"] for r in [e["grid"][f"{best:g}"], *e.get("seeds", {}).get(f"{best:g}", {}).values()]}
        mine = [pr[s] for s in sorted(pr)]
        d = [r["heldout_loss"] - ref[r["seed"]] for r in mine if r["seed"] in ref]
        per_seed = ", ".join(f"seed {r['seed']} {r['heldout_loss'] - ref[r['seed']]:+.3f}" for r in mine if r["seed"] in ref)
        lr = mine[0]["lr"]
        L.append(f"| {i} | {lr:.3g} | {best:g} | {lr / best:.2f} | {_pm([r['heldout_loss'] for r in mine])} ({', '.join(str(r['seed']) for r in mine)}) | "
                 f"{_pm([ref[r['seed']] for r in mine if r['seed'] in ref])} | {_pm(d)} ({len(d)}; {per_seed}) |")
    todo = doc.get("todo", [])
    L += ["", "## Time and what is not run", ""]
    L += [f"- {part}: {sec / 60:.1f} min" for part, sec in doc.get("seconds", {}).items()]
    runs = [r for e in T.values() for r in [*e.get("grid", {}).values(), *e.get("probe_runs", {}).values(),
                                            *(x for s in e.get("seeds", {}).values() for x in s.values())]]
    if runs:
        L.append(f"- per training run: {sum(r['train_seconds'] for r in runs) / len(runs) / 60:.1f} min training + "
                 f"{sum(r['eval_seconds'] for r in runs) / len(runs) / 60:.1f} min held-out evaluation (n {len(runs)})")
    if doc.get("env"):
        L.append(f"- machine: {machine(doc['env'])}")
    L.append("- not run yet: " + ("; ".join(todo) if todo else "nothing") + ".")
    L += ["", "## Reading", "", doc.get("reading", "(written when the figures are in)"), ""]
    return "\n".join(L)


def _t_time_left(deadline: float | None, doc: dict) -> bool:
    """True when a training run (the mean of this setup's so far, else 15 min) would end before ``deadline``."""
    if deadline is None:
        return True
    runs = [r for e in doc.get("inits", {}).values() for r in [*e.get("grid", {}).values(), *e.get("probe_runs", {}).values()]]
    est = sum(r["train_seconds"] + r["eval_seconds"] for r in runs) / len(runs) if runs else 900.0
    return time.time() + est < deadline


def transfer(args, deadline: float | None) -> None:
    """Preset ``transfer``, resumable, in the order of what each figure is worth for its cost: prepare the
    inits; every candidate's probe at every probe seed; the grid at seed 0; training at the shipped probe's
    lr, seed 0; seed 1 at each init's grid best; training at the probe's lr, seed 1."""
    from qcorda.models import load_model
    from qcorda.prepare import prepare
    from qcorda.scoring import completion_logprobs

    cfg = PRESETS["transfer"]
    store = transfer_store(args.out)
    doc = store.load()
    gdoc, ft = Results("lr_probe").load(), _ft()
    shipped = shipped_method()
    if doc.setdefault("shipped", {"method": shipped}).get("method") != shipped:
        raise SystemExit(f"this study's runs at the probe's lr used {doc['shipped']['method']}, the shipped probe is now {shipped}: "
                         "start a fresh --out")
    a = ft_args(cfg["rank"], max_length=cfg["max_length"])
    train_rec, held_rec = _nq_records(cfg)
    train, held = _nq_examples(train_rec), _nq_examples(held_rec)
    work = Path(args.work) / f"transfer-r{cfg['rank']}"
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "nq_calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in train_rec[:32]))
    T = doc.setdefault("inits", {})
    save = lambda: store.save(doc, transfer_report(doc, gdoc, ft))  # noqa: E731

    def heldout(model, tok):
        lls = completion_logprobs(model, tok, [e.prompt for e in held], [e.completion for e in held], 8, progress=False)
        return -sum(ll for ll, _ in lls) / sum(n for _, n in lls)

    def one(prepared, lr, seed):
        model, tok = load(prepared, "cpu", trainable=True)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        log = train_adapter(model, tok, train, a, lr, seed)
        t1 = time.perf_counter()
        loss = heldout(model, tok)
        return {**log, "heldout_loss": loss, "train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1, "lr": lr, "seed": seed}

    budget = P.probe_budget(a.steps, a.batch_size)
    prepared = {}
    for label in cfg["inits"]:
        out = work / label
        if not (out / "qcorda.json").exists():
            t = time.perf_counter()
            method, start, _ = INITS[label]
            model, tok = load_model("gemma-3-270m")
            ic = InitConfig(method=method, rank=cfg["rank"], cal_start=start, compute_dtype="float32", seed=0, device="cpu",
                            calib=CalibConfig(data=str(calib), fields=("question", "answer"), samples=32, max_length=64, batch_size=8))
            prepare(model, ic, out, tokenizer=tok, overwrite=True)
            del model
            _add(doc, "0. prepare the inits", time.perf_counter() - t)
        prepared[label] = out
        T.setdefault(label, {"probe": {}, "grid": {}, "seeds": {}, "probe_runs": {}})
    for label in cfg["inits"]:
        todo = [(m, s) for s in TRANSFER_PROBE_SEEDS for m in METHODS]
        probe_init(T[label], f"transfer {label}", prepared[label], todo, train, a, budget,
                   lambda dt: (_add(doc, "1. probes (every candidate, seeds 0-2)", dt), save()))
    doc["shipped"]["rule"] = T[cfg["inits"][0]]["probe"][shipped]["0"].get("rule", "")
    units = [(lab, lr, 0, "grid") for lr in cfg["lrs"] for lab in cfg["inits"]]
    units += [(lab, None, 0, "edge") for lab in cfg["inits"]]
    units += [(lab, None, 0, "probe") for lab in cfg["inits"]]
    units += [(lab, None, 1, "best") for lab in cfg["inits"]]
    units += [(lab, None, 1, "probe") for lab in cfg["inits"]]
    parts = {"grid": "2. grid, seed 0", "edge": "2. grid, seed 0", "probe": "3. at the probe's lr", "best": "4. seed 1 at the grid best"}

    def slot_of(label, lr, seed, kind):
        e = T[label]
        if kind == "edge":
            if any(f"{x:g}" not in e["grid"] for x in cfg["lrs"]):
                return None, None, None
            best = _t_best(e)
            lr = best / TRANSFER_EDGE_FACTOR if best == min(cfg["lrs"]) else best * TRANSFER_EDGE_FACTOR if best == max(cfg["lrs"]) else None
            return (None, None, None) if lr is None else (lr, e["grid"], f"{lr:g}")
        if kind == "best":
            if any(f"{x:g}" not in e["grid"] for x in cfg["lrs"]):
                return None, None, None
            lr = _t_best(e)
            return lr, e["seeds"].setdefault(f"{lr:g}", {}), str(seed)
        if kind == "probe":
            r = e["probe"][shipped]["0"]
            if "failed" in r:
                return None, None, None
            return r["learning_rate"], e["probe_runs"], str(seed)
        return lr, e["grid"], f"{lr:g}"

    def todo() -> list[str]:
        out = []
        for lab, x, sd, k in units:
            lr, slot, name = slot_of(lab, x, sd, k)
            if k == "edge" and slot is None and all(f"{v:g}" in T[lab]["grid"] for v in cfg["lrs"]):
                continue  # the best is inside the grid: no edge run
            if slot is None or name not in slot:
                out.append(f"{lab} {k} seed {sd}" + (f" lr {lr:g}" if lr else " (if the grid's best is at its edge)" if k == "edge" else ""))
        return out

    for label, lr0, seed, kind in units:
        lr, slot, name = slot_of(label, lr0, seed, kind)
        if slot is None or name in slot or not _t_time_left(deadline, doc):
            continue
        print(f"== transfer {label} {kind} lr {lr:g} seed {seed}", flush=True)
        t = time.perf_counter()
        slot[name] = one(prepared[label], lr, seed)
        print(f"   held-out {slot[name]['heldout_loss']:.4f}, train {slot[name]['train_seconds']:.0f} s", flush=True)
        _add(doc, parts[kind], time.perf_counter() - t)
        doc["todo"] = todo()
        save()
    doc["todo"] = todo()
    save()
    print(store.md_path.read_text())


# --------------------------------------------------------------------------- main


def _ft() -> dict:
    return json.loads(FINETUNE.read_text())


def _add(doc: dict, part: str, seconds: float) -> None:
    sec = doc.setdefault("seconds", {})
    sec[part] = sec.get(part, 0.0) + seconds
    doc["env"] = environment()


def _time_left(deadline: float | None, doc: dict) -> bool:
    """True when a run (the mean of those so far, else 20 min) would end before ``deadline``."""
    if deadline is None:
        return True
    runs = [r for e in doc.get("grid", {}).values() for rs in e.get("runs", {}).values() for r in rs.values()]
    est = sum(r["train_seconds"] + r["eval_seconds"] for r in runs) / len(runs) if runs else 1200.0
    return time.time() + est < deadline


def _deadline(text: str | None) -> float | None:
    """``HH:MM`` (UTC, today) as a POSIX time."""
    if not text:
        return None
    import calendar

    h, m = (int(x) for x in text.split(":"))
    now = time.gmtime()
    return float(calendar.timegm((now.tm_year, now.tm_mon, now.tm_mday, h, m, 0)))


def probe_part(doc, store, ft, part, todo_spec, inits, prepared, train, a, budget) -> None:
    """Every (method, seed) of ``todo_spec`` on every init not yet probed so; each result saved at once."""
    for label in inits:
        e = doc["grid"].setdefault(label, {"probe": {}, "runs": {}})
        probe_init(e, label, prepared[label], todo_spec, train, a, budget,
                   lambda dt: (_add(doc, f"1. probe: {part}", dt), store.save(doc, report(doc, ft))))


def probe_init(entry: dict, label: str, prepared: Path, todo: list[tuple[str, int]], train, a, budget: int, done) -> None:
    """Every (method, seed) of ``todo`` not yet in ``entry["probe"]``, on the init prepared in ``prepared``;
    each result (or its failure, recorded: a candidate that fails is a finding) is stored at once and
    ``done(seconds it took)`` called."""
    todo = [(m, sd) for m, sd in todo if str(sd) not in entry["probe"].get(m, {})]
    if not todo:
        return
    t = time.perf_counter()
    model, tok = load(prepared, "cpu", trainable=True)
    for m, sd in todo:
        try:
            r = asdict(P.probe_lr(model, tok, train, budget, method=m, seed=sd, max_length=a.max_length, batch_size=a.batch_size))
        except P.ProbeFailed as err:
            r = {"method": m, "failed": str(err), "seed": sd}
        entry["probe"].setdefault(m, {})[str(sd)] = r
        print(f"== {label} {m} seed {sd}: " + (r["failed"] if "failed" in r else
              f"measured {r['measured']:.4g} -> lr {r['learning_rate']:.3g} ({r['passes']} passes, {r['seconds']:.0f} s)"), flush=True)
        done(time.perf_counter() - t)
        t = time.perf_counter()
    del model


def train_part(doc, store, ft, seeds, inits, prepared, train, a, budget, deadline) -> None:
    """Each init trained at the lr the shipped probe (``TrainConfig().lr_probe``) sets (measured again in
    this process, seed 0), by ``eval.study_finetune.run_one``; all inits at one seed before the next
    seed. Runs are kept per method: a run at another method's lr is never taken for this one's."""
    method = shipped_method()
    for seed in seeds:
        for label in inits:
            e = doc["grid"].setdefault(label, {"probe": {}, "runs": {}})
            slot = e["runs"].setdefault(method, {})
            if str(seed) in slot or not _time_left(deadline, doc):
                continue
            t = time.perf_counter()
            model, tok = load(prepared[label], "cpu", trainable=True)
            pr = P.probe_lr(model, tok, train, budget, method=method, seed=0, max_length=a.max_length, batch_size=a.batch_size)
            del model
            print(f"== {label}: train at the probe's lr {pr.learning_rate:.3g}, seed {seed}", flush=True)
            run = run_one(prepared[label], pr.learning_rate, seed, train, a)
            run["probe"] = asdict(pr)
            slot[str(seed)] = run
            print({k: run[k] for k in ("gsm8k_loss", "nq_logprob", "ppl", "diverged", "train_seconds")}, flush=True)
            _add(doc, f"2. training at the probe lr ({method}), seed {seed}", time.perf_counter() - t)
            store.save(doc, report(doc, ft))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="grid", choices=list(PRESETS))
    p.add_argument("--parts", default="update,candidates,train:0,spread,train:1,train:2",
                   help="grid preset: the parts, in the order they run: update (update, seed 0, every init), candidates (direction, "
                        "sharpness and range, seed 0), spread (every candidate at seeds 1 and 2), train (at the shipped probe's lr, "
                        "--seeds; train:0 seed 0 only)")
    p.add_argument("--inits", default=",".join(GRID_INITS))
    p.add_argument("--seeds", default="0,1,2", help="training seeds at the probe's lr, in order (all inits at one seed first)")
    p.add_argument("--deadline", help="HH:MM UTC: start no training run that would not end before it")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "qcorda" / "study_lr_probe"))
    p.add_argument("--out", help="results stem under eval/results (default: lr_probe for the grid preset, lr_probe_transfer "
                                 "for transfer, whose report reads the grid's anchored constants from lr_probe.json)")
    args = p.parse_args(argv)
    deadline = _deadline(args.deadline)
    if args.preset == "transfer":
        if args.report_only:
            store = transfer_store(args.out)
            store.save(store.load(), transfer_report(store.load(), Results("lr_probe").load(), _ft()))
        else:
            transfer(args, deadline)
        return 0
    store = Results(args.out or "lr_probe", key={"study": "lr_probe", "grid": "finetune.json cpu r16"})
    doc = store.load()
    doc.setdefault("grid", {})
    ft = _ft()
    if args.report_only:
        store.save(doc, report(doc, ft))
        return 0
    a = ft_args(16)
    same = [k for k in ft["key"] if k != "eval_every"]  # the loss curves' spacing changes no final figure
    if {k: getattr(a, k) for k in same} != {k: ft["key"][k] for k in same}:
        raise SystemExit("the finetune study's settings differ from this study's: the grid is not comparable")
    work = Path(args.work) / "cpu-r16-c32"
    work.mkdir(parents=True, exist_ok=True)
    train = load_examples("gsm8k-train", ("question", "answer"), "alpaca", a.train_limit)
    inits = [s for s in args.inits.split(",") if s]
    parts = [x for x in args.parts.split(",") if x]
    prepared = {label: prepare_init(label, a, work)[0] for label in inits}
    budget = P.probe_budget(a.steps, a.batch_size)
    #: probe parts, in the order they run: (part, method, seed); each (init, method, seed) is saved at once
    probe_parts = {"update": [("update", 0)], "candidates": [("direction", 0), ("sharpness", 0), ("range", 0)], "spread": [(m, s) for s in (1, 2) for m in METHODS]}
    for part in parts:
        if part in probe_parts:
            probe_part(doc, store, ft, part, probe_parts[part], inits, prepared, train, a, budget)
        elif part.partition(":")[0] == "train":
            seeds = [int(x) for x in (part.partition(":")[2] or args.seeds).split(",")]
            train_part(doc, store, ft, seeds, inits, prepared, train, a, budget, deadline)
        else:
            raise SystemExit(f"--parts: unknown part {part!r}; choose from {', '.join(probe_parts)}, train, train:SEEDS")
    print(store.md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
