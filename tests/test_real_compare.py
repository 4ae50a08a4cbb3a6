"""Issue 3's reference figures on the real Gemma-3-270M (slow): r = 64, errors relative to qlora.

The expected values live in eval/results/compare_golden.json (written by eval/golden_compare.py):
``expected`` for the methods no issue gives a figure for (qera), else the issue's
``reference``. Only r = 64 and no perplexity are computed (the figures the issue fixes): about 6–7 minutes
on 2 idle CPU cores (covariances ≈ 3 min, full-SVD decompositions of 5 methods ≈ 3 min; estimate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export_helpers import eval_script

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "eval" / "results" / "compare_golden.json"


@pytest.fixture(scope="module")
def measured(gemma_path):
    from qcorda.models import load_model

    golden = eval_script("golden_compare")
    model, tok = load_model(str(gemma_path))
    return golden.measure(model, tok, list(golden.REFERENCE) + list(golden.EXPECTED_FROM_MEASURED), progress=False)


def test_reference_figures_within_0_03(measured):
    assert GOLDEN.exists(), f"{GOLDEN} is missing; run `python -m eval.golden_compare` (about 8 min idle)"
    doc = json.loads(GOLDEN.read_text())
    expected = {m: dict(doc["reference"].get(m, {}), **doc.get("expected", {}).get(m, {}))
                for m in list(doc["reference"]) + list(doc.get("expected", {}))}
    bad = []
    for method, figures in expected.items():
        for key, want in figures.items():
            got = measured[method][key]
            if abs(got - want) > 0.03:
                bad.append(f"{method} {key}: {got:.3f} vs {want:.3f}")
    assert not bad, "; ".join(bad)


def test_ordering_of_the_methods(measured):
    # what the figures say regardless of their exact values: calibrated alternation wins on
    # held-out activations, KPM (keeps the top of W·C in the residual) is close to plain NF4
    cal, kpm = measured["qcorda-cal"], measured["qcorda-kpm"]
    assert cal["act_err_rel"] < min(m["act_err_rel"] for k, m in measured.items() if k != "qcorda-cal")
    assert kpm["weight_err_rel"] > max(m["weight_err_rel"] for k, m in measured.items() if k != "qcorda-kpm")
    assert all(m["weight_err_rel"] < 1 for m in measured.values())
