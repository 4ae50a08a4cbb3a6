"""The real Gemma-3-270M: the bundled GSM8K task through lm-eval predicts what `qcorda eval --tasks gsm8k` does (slow).

Both runs share the model (one `qcorda eval --tasks gsm8k --harness qcorda_gsm8k` call), the prompt
(gsm8k_prompts, 0 shots), greedy decoding and the token budget (48 new tokens here, to keep the test
near two minutes on 2 CPU cores; the default is 256 on both sides). They differ by design in:
- where the text is cut: qcorda stops at the regex GSM8K_STOP as soon as a "#### N" line is complete
  and keeps the stop; lm-eval stops at the literal strings "\\n###" / "\\n\\n\\n" and cuts them off
  (`same_generation` in test_harness.py states the relation);
- which number is the answer: the harness reports lm-eval's own filters (strict-match: the number
  after "#### ", flexible-extract: the last number, "$" and a final "." ignored by its exact_match)
  next to qcorda-extract, which is qcorda's extract_answer; only qcorda-extract must equal qcorda's
  predictions and accuracy.
"""

import json

import pytest

from test_harness import needs_lm_eval, same_generation

pytestmark = [pytest.mark.slow, needs_lm_eval]


def test_harness_gsm8k_predicts_what_builtin_gsm8k_does(gemma_path, tmp_path):
    from qcorda.cli import main

    out = tmp_path / "eval.json"
    rc = main([
        "eval", str(gemma_path), "--tasks", "gsm8k", "--harness", "qcorda_gsm8k", "--limit", "8", "--batch-size", "8",
        "--gsm8k-max-new-tokens", "48", "--gen-kwargs", "max_gen_toks=48", "--out", str(out),
    ])
    assert rc == 0
    doc = json.loads(out.read_text())
    builtin = doc["tasks"]["gsm8k"]["samples"]
    harness = sorted(doc["harness"]["samples"]["qcorda_gsm8k"], key=lambda s: s["doc_id"])
    assert len(builtin) == len(harness) == 8
    for b, h in zip(builtin, harness):
        assert same_generation(b["output"], h["response"]), (b["output"], h["response"])
    preds = [b["pred"] or "[invalid]" for b in builtin]
    assert [h["filtered"]["qcorda-extract"] for h in harness] == preds
    assert sum(p is not None for p in (b["pred"] for b in builtin)) >= 6  # real numbers were compared, not only misses
    scores = doc["harness"]["results"]["results"]["qcorda_gsm8k"]
    assert scores["exact_match,qcorda-extract"] == doc["tasks"]["gsm8k"]["metrics"]["accuracy"]
