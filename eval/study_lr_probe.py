"""Does ``learning_rate: probe`` land on each init's best learning rate? Checked against the grid of
``eval/results/finetune.json`` and (preset ``transfer``) on a setup no constant was calibrated on.

Preset ``grid`` (the finetune study's setup: Gemma-3-270M, NF4 + DQ, r 16, 60 steps x 4 GSM8K
sequences; the same prepare, training loop and measurements, imported from ``eval.study_finetune``):

1. ``probe``: for each of the eight inits, every candidate measurement of :mod:`qcorda.probe`
   (``update``, ``sharpness``, ``range``) at seed 0 within the probe budget (5 % of the run's sequence
   passes), and ``update`` at seeds 1 and 2 (the probe's own sampling spread). Cheap: minutes.
2. ``train``: each init trained at the lr ``probe_lr`` (the shipped method and constants) sets, seed 0
   for every init first, then seeds 1 and 2; held-out loss paired by seed with the grid-best runs of
   finetune.json (the seed sets the data order, the same in both studies).

Preset ``transfer`` (picked and written down before any probe result on it was seen; see
:data:`PRESETS`): NQ-open closed-book QA instead of GSM8K, rank 64: a grid of 4 lrs x 3 inits at seed 0,
seed 1 at each init's best, and training at the probe's lr, 2 seeds.

Resumable: every finished unit (one init's probes, one training run) is saved at once in
``eval/results/lr_probe.json`` (:class:`eval.lib.Results`) with the markdown; rerun the same command
to continue. ``--deadline HH:MM`` (UTC) starts no training run that would not end before it.

    OMP_NUM_THREADS=1 python -m eval.study_lr_probe                      # every part, in the default order
    OMP_NUM_THREADS=1 python -m eval.study_lr_probe --parts update       # the shipped probe on the 8 inits only (minutes)
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


def _interp(ft: dict, label: str, lr: float) -> float | None:
    """The seed-0 grid's held-out loss at ``lr``, linear in log lr between the two grid lrs around it
    (None outside the grid)."""
    pts = sorted((float(k), r["gsm8k_loss"]) for k, r in ft["inits"][label]["grid"].items() if not r["diverged"])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= lr <= x1:
            w = math.log(lr / x0) / math.log(x1 / x0)
            return y0 + w * (y1 - y0)
    return None


def _rule_lr(method: str, measured: float, const: float) -> float:
    if method == "direction":
        return measured / const
    return measured / const if method == "range" else const / measured


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
         f"- Candidates (`qcorda/probe.py`): `update` u = ‖s·Δ(B·A)‖/‖W‖ of Adam's first step per unit lr, lr = τ/u (τ = "
         f"{P.UPDATE_TARGET:g}); `sharpness` λ of the Adam-preconditioned Hessian ({P.SHARPNESS_ITERS} power iterations on "
         f"{max(1, P.probe_budget(60, 4) // (P.SHARPNESS_ITERS + 1))} sequences), lr = c/λ (c = {P.SHARPNESS_C:g}); `range` an lr "
         f"range test {P.RANGE_LR[0]:g} → {P.RANGE_LR[1]:g}, lr = lr_min/{P.RANGE_DIVISOR:g}.", ""]
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
        est = [_interp(ft, i, _rule_lr(m, x, anchors[m])) for i, x, _ in pts]
        est_d = [f"{i} {v - _grid_at(ft, i, b):+.3f}" if v is not None else f"{i} n/m (outside the grid)" for (i, _, b), v in zip(pts, est)]
        L.append(f"| {m} | {len(pts)} | {sum(0.5 <= r <= 2 for r in ra)} | {', '.join(f'{r:.2f}' for r in ra)} | "
                 f"{sum(0.5 <= r <= 2 for r in rf)} (const {fitted:.4g}) | {', '.join(f'{r:.2f}' for r in rf)} | {'; '.join(est_d)} |")
    L.append("")
    spread = []
    for i in GRID_INITS:
        u = g.get(i, {}).get("probe", {}).get("update", {})
        vals = [r["learning_rate"] for r in u.values()]
        if len(vals) > 1:
            spread.append(f"{i} {min(vals):.3g}-{max(vals):.3g} ({max(vals) / min(vals):.2f}x)")
    if spread:
        L += ["The probe's own spread (`update`, seeds 0-2, shipped τ): " + "; ".join(spread) + ".", ""]
    costs = [(m, r["passes"], r["seconds"]) for i in GRID_INITS for m, rs in g.get(i, {}).get("probe", {}).items() for r in rs.values()]
    if costs:
        L += ["Probe cost: " + "; ".join(f"{m} {sum(c[1] for c in costs if c[0] == m) // max(1, sum(1 for c in costs if c[0] == m))} passes, "
                                         f"{_pm([c[2] for c in costs if c[0] == m], 0)} s" for m in METHODS) + " per probe.", ""]
    # 2. training at the probe's lr
    L += ["## 2. Held-out loss after training at the probe's lr (shipped method `update`, τ as shipped)", "",
          "Paired by seed with the grid-best runs of finetune.json: Δ = probe-lr run − grid-best run at the same seed (n pairs). "
          "cost = the probe's seconds / the run's training seconds, both in the same process.", "",
          "| init | grid-best lr | probe lr | ratio | n | held-out at probe lr | at grid best (same seeds) | Δ (n) | cost |",
          "|---|---|---|---|---|---|---|---|---|"]
    for i in GRID_INITS:
        runs = g.get(i, {}).get("runs", {})
        if not runs:
            continue
        best, bruns = _grid_best(ft, i)
        by_seed = {r["seed"]: r["gsm8k_loss"] for r in bruns}
        mine = [runs[s] for s in sorted(runs)]
        lrs = sorted({r["lr"] for r in mine})
        paired = [r["gsm8k_loss"] - by_seed[r["seed"]] for r in mine if r["seed"] in by_seed]
        ref = [by_seed[r["seed"]] for r in mine if r["seed"] in by_seed]
        cost = [r["probe"]["seconds"] / r["train_seconds"] for r in mine]
        L.append(f"| {i} | {best:g} | {', '.join(f'{x:.3g}' for x in lrs)} | {lrs[0] / best:.2f} | {len(mine)} | "
                 f"{_pm([r['gsm8k_loss'] for r in mine])} | {_pm(ref)} | {_pm(paired)} ({len(paired)}) | {_pm([100 * c for c in cost], 1)} % |")
    # 3. the second setup
    t = doc.get("transfer", {})
    L += ["", "## 3. Second setup (preset `transfer`)", "",
          "NQ-open closed-book answers (train: the first 320 bundled NQ-open questions -> first gold answer; held-out: answer NLL of "
          "the last 48), rank 64, 60 steps x 4, inits qlora, qera, qcorda-ipm; grid 6e-5, 2e-4, 6e-4, 1.8e-3 at seed 0, seed 1 at "
          "each init's best; training at the probe's lr, seeds 0 and 1. Picked before any probe result on it was seen.", ""]
    if not t.get("inits"):
        L += ["**Not run.** The CPU of this session (2 cores shared by 7 processes) fit only the grid part; "
              "`python -m eval.study_lr_probe --preset transfer` runs it.", ""]
    else:
        L += ["| init | " + " | ".join(f"lr {lr:g}" for lr in PRESETS["transfer"]["lrs"]) + " | probe lr | at probe lr |", "|---|" + "---|" * 6]
        for i, e in t["inits"].items():
            cells = [f"{e['grid'][f'{lr:g}']['heldout_loss']:.3f}" if f"{lr:g}" in e.get("grid", {}) else "" for lr in PRESETS["transfer"]["lrs"]]
            pr = e.get("probe_runs", {})
            L.append(f"| {i} | " + " | ".join(cells) + f" | {e.get('probe', {}).get('learning_rate', float('nan')):.3g} | "
                     f"{_pm([r['heldout_loss'] for r in pr.values()])} |")
        L.append("")
    L += ["## Time", ""]
    L += [f"- {part}: {sec / 60:.1f} min" for part, sec in doc.get("seconds", {}).items()]
    if doc.get("env"):
        L += [f"- machine: {machine(doc['env'])}"]
    L += ["", "## Reading", "", doc.get("reading", "(written when the figures are in)"), ""]
    return "\n".join(L)


# --------------------------------------------------------------------------- the transfer setup


def _nq_examples(records: list[dict]) -> list:
    from qcorda.data import format_record

    return [format_record({"question": r["question"], "answer": r["answer"][0]}, ("question", "answer")) for r in records]


def transfer(doc: dict, store: Results, args, deadline: float | None) -> None:
    """Preset ``transfer``: prepare, grid, seed 1 at each best, probe and training at it (resumable)."""
    from qcorda.models import load_model
    from qcorda.prepare import prepare
    from qcorda.scoring import completion_logprobs

    cfg = PRESETS["transfer"]
    a = ft_args(cfg["rank"], max_length=cfg["max_length"])
    records = load_records("nq-open")
    train = _nq_examples(records[: cfg["train_records"]])
    held = _nq_examples(records[-cfg["heldout_records"]:])
    work = Path(args.work) / f"transfer-r{cfg['rank']}"
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "nq_calib.jsonl"
    calib.write_text("".join(json.dumps({"question": e.prompt, "answer": e.completion}) + "\n" for e in train[:32]))
    T = doc.setdefault("transfer", {"inits": {}})

    def heldout(model, tok):
        lls = completion_logprobs(model, tok, [e.prompt for e in held], [e.completion for e in held], 8, progress=False)
        return -sum(ll for ll, _ in lls) / sum(n for _, n in lls)

    def one(prepared, lr, seed):
        model, tok = load(prepared, "cpu", trainable=True)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        log = train_adapter(model, tok, train, a, lr, seed)
        ts = time.perf_counter() - t0
        return {**log, "heldout_loss": heldout(model, tok), "train_seconds": ts, "lr": lr, "seed": seed}

    prepared = {}
    for label in cfg["inits"]:
        out = work / label
        if not (out / "qcorda.json").exists():
            method, start, _ = INITS[label]
            model, tok = load_model("gemma-3-270m")
            ic = InitConfig(method=method, rank=cfg["rank"], cal_start=start, compute_dtype="float32", seed=0, device="cpu",
                            calib=CalibConfig(data=str(calib), fields=("question", "answer"), samples=32, max_length=64, batch_size=8))
            prepare(model, ic, out, tokenizer=tok, overwrite=True)
        prepared[label] = out
        e = T["inits"].setdefault(label, {"grid": {}, "seeds": {}, "probe_runs": {}})
        if "probe" not in e:
            model, tok = load(out, "cpu", trainable=True)
            e["probe"] = asdict(P.probe_lr(model, tok, train, P.probe_budget(a.steps, a.batch_size), seed=0, max_length=a.max_length,
                                           batch_size=a.batch_size))
            store.save(doc, report(doc, _ft()))
    units = [(lab, lr, 0, "grid") for lr in cfg["lrs"] for lab in cfg["inits"]]
    for kind, seed in (("best", 1), ("probe", 0), ("probe", 1)):
        units += [(lab, None, seed, kind) for lab in cfg["inits"]]
    for label, lr, seed, kind in units:
        e = T["inits"][label]
        if kind == "best":
            grid = {k: {"gsm8k_loss": r["heldout_loss"], "diverged": r["diverged"]} for k, r in e["grid"].items()}
            lr = best_lr(grid)[0]
            slot = e["seeds"].setdefault(f"{lr:g}", {})
        elif kind == "probe":
            lr, slot = e["probe"]["learning_rate"], e["probe_runs"]
        else:
            slot = e["grid"]
        name = f"{lr:g}" if kind == "grid" else str(seed)
        if name in slot or not _time_left(deadline, doc):
            continue
        print(f"== transfer {label} {kind} lr {lr:g} seed {seed}", flush=True)
        t = time.perf_counter()
        slot[name] = one(prepared[label], lr, seed)
        _add(doc, "transfer runs", time.perf_counter() - t)
        store.save(doc, report(doc, _ft()))


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
    runs = [r for e in doc.get("grid", {}).values() for r in e.get("runs", {}).values()]
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
        todo = [(m, sd) for m, sd in todo_spec if str(sd) not in e["probe"].get(m, {})]
        if not todo:
            continue
        t = time.perf_counter()
        model, tok = load(prepared[label], "cpu", trainable=True)
        for m, sd in todo:
            r = P.probe_lr(model, tok, train, budget, method=m, seed=sd, max_length=a.max_length, batch_size=a.batch_size)
            e["probe"].setdefault(m, {})[str(sd)] = asdict(r)
            print(f"== {label} {m} seed {sd}: measured {r.measured:.4g} -> lr {r.learning_rate:.3g} ({r.passes} passes, {r.seconds:.0f} s)",
                  flush=True)
            _add(doc, f"1. probe: {part}", time.perf_counter() - t)
            t = time.perf_counter()
            store.save(doc, report(doc, ft))
        del model


def train_part(doc, store, ft, seeds, inits, prepared, train, a, budget, deadline) -> None:
    """Each init trained at the lr the shipped probe sets (measured again in this process, seed 0), by
    ``eval.study_finetune.run_one``; all inits at one seed before the next seed."""
    for seed in seeds:
        for label in inits:
            e = doc["grid"].setdefault(label, {"probe": {}, "runs": {}})
            if str(seed) in e["runs"] or not _time_left(deadline, doc):
                continue
            t = time.perf_counter()
            model, tok = load(prepared[label], "cpu", trainable=True)
            pr = P.probe_lr(model, tok, train, budget, seed=0, max_length=a.max_length, batch_size=a.batch_size)
            del model
            print(f"== {label}: train at the probe's lr {pr.learning_rate:.3g}, seed {seed}", flush=True)
            run = run_one(prepared[label], pr.learning_rate, seed, train, a)
            run["probe"] = asdict(pr)
            e["runs"][str(seed)] = run
            print({k: run[k] for k in ("gsm8k_loss", "nq_logprob", "ppl", "diverged", "train_seconds")}, flush=True)
            _add(doc, f"2. training at the probe lr, seed {seed}", time.perf_counter() - t)
            store.save(doc, report(doc, ft))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="grid", choices=list(PRESETS))
    p.add_argument("--parts", default="update,train:0,candidates,spread,train:1,train:2",
                   help="grid preset: the parts, in the order they run: update (the shipped probe, seed 0, every init), "
                        "candidates (sharpness and range, seed 0), spread (update at seeds 1 and 2), train (at the probe's lr, --seeds; "
                        "train:0 seed 0 only)")
    p.add_argument("--inits", default=",".join(GRID_INITS))
    p.add_argument("--seeds", default="0,1,2", help="training seeds at the probe's lr, in order (all inits at one seed first)")
    p.add_argument("--deadline", help="HH:MM UTC: start no training run that would not end before it")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "qcorda" / "study_lr_probe"))
    p.add_argument("--out", default="lr_probe", help="results stem under eval/results")
    args = p.parse_args(argv)
    store = Results(args.out, key={"study": "lr_probe", "grid": "finetune.json cpu r16"})
    doc = store.load()
    doc.setdefault("grid", {})
    ft = _ft()
    if args.report_only:
        store.save(doc, report(doc, ft))
        return 0
    deadline = _deadline(args.deadline)
    if args.preset == "transfer":
        transfer(doc, store, args, deadline)
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
    probe_parts = {"update": [("update", 0)], "candidates": [("direction", 0), ("sharpness", 0), ("range", 0)], "spread": [("update", 1), ("update", 2)]}
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
