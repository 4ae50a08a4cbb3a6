"""Issue 14's measurements: kept codes, QERA, where qcorda-cal starts, and iterations chosen on held-out data.

Gemma-3-270M, the default ``qcorda compare`` setup (calibration: first 64 GSM8K train records ≤ 256
tokens, ridge 0.01, randomized top-r SVD; held-out C_eval from 32 records of gsm8k-test and of
wikitext-2; perplexity and KL on 512 scored tokens of each), errors relative to plain NF4. Variants:

- ``qlora``, ``loftq`` (5), ``qera``, ``qcorda-cal`` with ``--cal-start ipm`` and ``zero`` (5 iterations
  each), and both with ``--iters auto`` (fitted on 7/8 of the calibration records, the iterate chosen per
  layer on the other 1/8, up to 8);
- ``auto, refit``: T chosen as above, then the split refitted with T iterations on the covariance of all
  records (does the held-out eighth help the final fit?): activation errors only.

Each variant's time is the wall time of its layers (split + quantization + error figures) and of
its hidden states; the held-out split costs one more covariance collection (its own cache key).

    python -m eval.fidelity [--ranks 64] [--out eval/results/fidelity]   # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from qcorda.compare import aggregate, compare, compare_covariances, eval_texts, layer_errors, set_key
from qcorda.config import CompareConfig, compare_init

from .lib import Results

#: (label, method, InitConfig changes)
VARIANTS = [
    ("qlora", "qlora", {}),
    ("loftq", "loftq", {}),
    ("qera", "qera", {}),
    ("cal ipm (5)", "qcorda-cal", {"cal_start": "ipm"}),
    ("cal zero (5)", "qcorda-cal", {"cal_start": "zero"}),
    ("cal ipm auto", "qcorda-cal", {"cal_start": "ipm", "iters": "auto"}),
    ("cal zero auto", "qcorda-cal", {"cal_start": "zero", "iters": "auto"}),
]
KEYS = ("weight_err_rel", "nuclear_err_rel", "act_err_rel", "act_err_rel_wikitext2", "ppl", "ppl_wikitext2", "kl", "kl_wikitext2")


def refit_variant(model, tok, rank: int, start: str, cache: dict) -> dict:
    """``auto, refit``: per layer, T from ``--iters auto``, then T iterations fitted on all records."""
    from qcorda.decompose import low_rank_term
    from qcorda.layer import prepare_layer, split_layer
    from qcorda.quantize import dequantize_nf4, nf4_roundtrip
    from qcorda.targets import find_targets, weight_of

    auto = replace(CompareConfig().init, method="qcorda-cal", rank=rank, cal_start=start, iters="auto")
    base = CompareConfig(methods=("qcorda-cal",), ranks=(rank,), init=auto)
    targets = find_targets(model, auto.target_modules)
    texts = {s: eval_texts(s, base.eval_samples, tok) for s in base.eval_data}
    covs, evals, _ = compare_covariances(model, tok, base, targets, texts, "gemma-3-270m", False, cache)  # compare's, shared
    errs, ref, iters = {}, {}, []
    for n in targets:
        W = weight_of(model.get_submodule(n)).detach().float()
        T = split_layer(W, auto, n, covs).iters
        iters.append(T)
        split, q, _ = prepare_layer(W, replace(auto, iters=T), n, covs)  # iters=T: fitted on C of all records
        W_eff = dequantize_nf4(q) + low_rank_term(split, auto.scaling)
        errs[n] = layer_errors(W, W_eff, [c.of(n) for c in evals])
        ref[n] = layer_errors(W, nf4_roundtrip(W), [c.of(n) for c in evals])
    total = aggregate("qcorda-cal", rank, targets, errs, ref, [set_key(s) for s in base.eval_data])[-1]
    return dict(total, iters_mean=sum(iters) / len(iters), iters_hist={t: iters.count(t) for t in sorted(set(iters))})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="64")
    ap.add_argument("--out", default="fidelity", help="results stem (a bare name lies under eval/results/)")
    ap.add_argument("--variants", default=None, help="comma-separated labels of VARIANTS (default all, and the refits)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="scored tokens per eval set (default compare's, 512)")
    args = ap.parse_args()
    import torch

    from qcorda.models import load_model

    torch.manual_seed(0)
    ranks = tuple(int(r) for r in args.ranks.split(","))
    model, tok = load_model("gemma-3-270m")
    cache: dict = {}
    out = Results(args.out)
    t0 = time.perf_counter()
    saved = out.load()
    rows = [r for r in saved.get("rows", []) if r["rank"] in ranks]  # resume: finished variants are kept
    original = saved.get("original")
    chosen = args.variants.split(",") if args.variants else [v[0] for v in VARIANTS]
    tokens = {} if args.eval_tokens is None else {"eval_tokens": args.eval_tokens}
    for label, method, change in VARIANTS:
        if label not in chosen or {(label, r) for r in ranks} <= {(x["variant"], x["rank"]) for x in rows}:
            continue
        cfg = CompareConfig(methods=(method,), ranks=ranks, init=replace(compare_init(), method=method, **change), **tokens)
        t = time.perf_counter()
        report = compare(model, tok, cfg, "gemma-3-270m", progress=True, cache=cache)
        for r in report.totals():
            rows.append({"variant": label, "rank": r["rank"], **{k: r.get(k) for k in KEYS},
                         "seconds": time.perf_counter() - t, "timings": report.timings})
        original = report.original
        print(label, [(r["rank"], round(r["act_err_rel"], 4)) for r in report.totals()], f"{time.perf_counter() - t:.0f} s", flush=True)
        _write(out, rows, original, time.perf_counter() - t0)
    for start in ("ipm", "zero") if args.variants is None else ():
        for rank in ranks:
            if any(x["variant"] == f"cal {start} auto, refit" and x["rank"] == rank for x in rows):
                continue
            t = time.perf_counter()
            total = refit_variant(model, tok, rank, start, cache)
            rows.append({"variant": f"cal {start} auto, refit", "rank": rank, **{k: total.get(k) for k in KEYS},
                         "iters_mean": total["iters_mean"], "iters_hist": total["iters_hist"], "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
            _write(out, rows, original, time.perf_counter() - t0)


def _write(out: Results, rows: list[dict], original: dict, seconds: float) -> None:
    out.save({"rows": rows, "original": original, "seconds": seconds})


if __name__ == "__main__":
    main()
