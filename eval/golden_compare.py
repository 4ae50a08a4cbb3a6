"""Golden figures of issues 3 and 14 from qcorda's own compare code.

Setup (issue 3): Gemma-3-270M, r = 64, α = r, all 126 decoder Linear layers, calibration on
the first 64 GSM8K train records (question + answer, alpaca template, ≤ 256 tokens), ridge
0.01·mean(diag C), full SVD. Squared errors summed over layers, relative to qlora: weight,
activation on held-out GSM8K test and on wikitext-2 (first 64 records each, ≤ 256 tokens).
qcorda-kpm is also measured with NQ-open calibration (CorDA's knowledge-preserving data), to
say which calibration reproduces the issue's 0.97.

    python -m eval.golden_compare   # writes eval/results/compare_golden.{json,md}
"""

from __future__ import annotations

import time

from qcorda.compare import compare
from qcorda.config import CalibConfig, CompareConfig, InitConfig

from .lib import Results

#: The issue's figures: (weight, activation GSM8K test, activation wikitext-2), r = 64.
REFERENCE = {
    "qpissa": (0.63, 0.43, 0.42),
    "loftq": (0.52, 0.39, 0.39),
    "qcorda-ipm": (0.76, 0.55, 0.55),
    "qcorda-kpm": (0.97, 0.94, 0.94),
    "qcorda-cal": (0.52, 0.055, 0.12),
}
METRICS = ("weight_err_rel", "act_err_rel", "act_err_rel_wikitext2")
#: Methods without an issue figure, checked against this run's values. (Issue 14 removed the override of
#: qcorda-cal's activation figures: the stored codes are now the ones its last fit was made for, and the
#: stored model reaches the issue's 0.055 / 0.12.)
EXPECTED_FROM_MEASURED = {"qera": METRICS}
EXPECTED_REASON = "qera was added by issue 14 (the QERA-exact closed form); no issue gives a figure for it"


def golden_config(methods, calib_data: str = "gsm8k-train", svd: str = "full") -> CompareConfig:
    init = InitConfig(svd=svd, calib=CalibConfig(data=calib_data, fields=("question", "answer"), samples=64, max_length=256))
    return CompareConfig(methods=tuple(methods), ranks=(64,), init=init, eval_data=("gsm8k-test", "wikitext2"),
                         eval_samples=64, eval_max_length=256, eval_tokens=0)


def measure(model, tok, methods, calib_data: str = "gsm8k-train", cache: dict | None = None, progress: bool = True) -> dict:
    """method → {weight_err_rel, act_err_rel, act_err_rel_wikitext2, nuclear_err_rel} (totals, r = 64)."""
    report = compare(model, tok, golden_config(methods, calib_data), "gemma-3-270m", progress, cache)
    return {r["method"]: {k: r[k] for k in METRICS + ("nuclear_err_rel",)} for r in report.totals()}


def main() -> None:
    from qcorda.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model("gemma-3-270m")
    cache: dict = {}
    measured = measure(model, tok, list(REFERENCE) + list(EXPECTED_FROM_MEASURED), cache=cache)
    kpm_nq = measure(model, tok, ["qcorda-kpm"], calib_data="nq-open", cache=cache)["qcorda-kpm"]
    doc = {
        "setup": "Gemma-3-270M, r=64, alpha=r, 126 decoder Linear layers, calibration first 64 GSM8K train "
                 "(question+answer, alpaca, <=256 tokens), ridge 0.01, full SVD; eval C from the first 64 records "
                 "(<=256 tokens) of gsm8k-test and wikitext2; squared errors summed over layers / qlora",
        "metrics": list(METRICS),
        "reference": {m: dict(zip(METRICS, v)) for m, v in REFERENCE.items()},
        "measured": measured,
        "kpm_nq_open": kpm_nq,
        "expected": {m: {k: measured[m][k] for k in keys} for m, keys in EXPECTED_FROM_MEASURED.items()},
        "expected_reason": EXPECTED_REASON,
        "seconds": time.perf_counter() - t0,
    }
    lines = [
        "# Golden compare figures (issues 3 and 14), Gemma-3-270M, r = 64",
        "",
        "`python -m eval.golden_compare`: " + doc["setup"] + ".",
        "",
        "| method | weight (issue) | weight | act GSM8K test (issue) | act GSM8K test | act wikitext-2 (issue) | act wikitext-2 | nuclear |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(m, REFERENCE[m], measured[m]) for m in REFERENCE] + [("qcorda-kpm (NQ-open calib)", REFERENCE["qcorda-kpm"], kpm_nq)]
    rows += [(m, None, measured[m]) for m in EXPECTED_FROM_MEASURED]
    for m, ref, got in rows:
        cells = []
        for i, k in enumerate(METRICS):
            r = None if ref is None else ref[i]
            cells += ["-" if r is None else f"{r:g}", f"{got[k]:.3f}" + ("" if r is None or abs(got[k] - r) <= 0.03 else " (!)")]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {got['nuclear_err_rel']:.3f} |")
    lines += ["", "(!) = outside ±0.03 of the issue's figure.", f"Time: {doc['seconds']:.0f} s.", "",
              "The regression test (tests/test_real_compare.py) checks the issue's figures within ±0.03, and "
              + EXPECTED_REASON + ": its figures are checked against this run's values."]
    Results("compare_golden").save(doc, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
