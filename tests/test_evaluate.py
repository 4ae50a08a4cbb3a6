"""qcorda eval: answer extraction, NQ normalization, streamed log-likelihoods, and each task."""

import json
import math
from dataclasses import replace

import pytest
import torch

from qcorda.testing import tiny
from qcorda.config import ConfigError, EvalConfig, InitConfig
from qcorda.data import load_records
from qcorda.evaluate import (
    evaluate, exact_match, extract_answer, generate, gsm8k, load_for_eval, normalize_answer, nq, nq_prompts, perplexity, write_results,
)
from qcorda.scoring import encode_pairs, sequence_nll


# --------------------------------------------------------------------------- answers on the bundled data


def test_gold_answers_of_every_bundled_gsm8k_record():
    for source in ("gsm8k-test", "gsm8k-train"):
        for r in load_records(source):
            final = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
            got = extract_answer(r["answer"])
            assert got is not None and float(got) == float(final), r["answer"]


def test_extraction_on_real_solutions_rewritten():
    rows = load_records("gsm8k-test")
    janet, house = rows[0]["answer"], rows[2]["answer"]  # "#### 18", "#### 70000"
    assert extract_answer(janet) == "18"
    # a generation without the marker: the last number counts, commas and $ removed
    body = house.split("####")[0]
    assert "200,000-130,000" in body and extract_answer(body) == "70000"
    assert extract_answer(janet.replace("#### 18", "#### $18.00")) == "18"
    assert extract_answer(janet.replace("#### 18", "#### 1,018.")) == "1018"
    assert extract_answer("She makes 9 * 2 = $18 every day.\n#### -3.5 dollars") == "-3.5"
    assert extract_answer("no digits here") is None


def test_nq_normalization_on_bundled_answers():
    rows = {r["question"]: r["answer"] for r in load_records("nq-open")}
    moon = rows["when was the last time anyone was on the moon"]
    assert moon == ["14 December 1972 UTC", "December 1972"]
    assert exact_match("december, 1972.", moon) and not exact_match("1972", moon)
    assert exact_match("One Season", rows["how many seasons of the bastard executioner are there"])
    assert normalize_answer("The  Bobby Scott!") == "bobby scott"
    assert exact_match("Bob Russell", rows["who wrote he ain't heavy he's my brother lyrics"])
    # articles only as words: "theatre" keeps its "the"
    assert normalize_answer("An Theatre of the Absurd") == "theatre of absurd"
    for answers in rows.values():
        for a in answers:
            assert exact_match(a, answers)
            assert normalize_answer(normalize_answer(a)) == normalize_answer(a)


# --------------------------------------------------------------------------- streamed log-likelihood


def test_sequence_nll_equals_full_logits_cross_entropy(tok):
    model = tiny.model("gemma")
    ids, att, lab = encode_pairs(tok, ["Question: two plus two?", "Hi"], [" four, said she", " there"])
    sums, counts = sequence_nll(model, ids, att, lab)
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    mask = (lab[:, 1:] * att[:, 1:]).float()
    torch.testing.assert_close(sums, (nll * mask).sum(1).detach(), atol=1e-4, rtol=1e-5)
    assert counts.tolist() == mask.sum(1).long().tolist()
    assert counts[1] == len(tok(" there", add_special_tokens=False)["input_ids"])


def test_batched_left_padded_generation_matches_single(tok):
    model = tiny.model("llama")
    prompts = ["Natalia sold clips to 48 of her friends", "How many", "Janet's ducks lay 16 eggs per day. She eats three"]
    batched = generate(model, tok, prompts, 8, batch_size=3, progress=False)
    single = [generate(model, tok, [p], 8, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored


def test_perplexity_stride_scores_every_token_once(tok):
    model = tiny.model("llama")
    full = perplexity(model, tok, max_tokens=300, window=300, stride=300, progress=False)
    strided = perplexity(model, tok, max_tokens=300, window=128, stride=64, batch_size=2, progress=False)
    assert full.n == strided.n
    # more context never needed here to be close: a random model barely uses it
    assert strided.metrics["ppl"] == pytest.approx(full.metrics["ppl"], rel=0.05)
    assert math.isclose(full.metrics["ppl"], math.exp(full.metrics["nll"]))
    with pytest.raises(ConfigError, match="--ppl-stride"):
        perplexity(model, tok, stride=600, window=512)


# --------------------------------------------------------------------------- tasks on a tiny model


def _answer_logprob(model, tok, prompt: str, answer: str) -> tuple[float, float]:
    """(mean, sum) over the answer's tokens of log p(token | prompt, earlier answer tokens)."""
    p, a = tok(prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([p + a])).logits[0].float().log_softmax(-1)
    total = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
    return total / len(a), total


def test_each_task_smoke(tok, tmp_path):
    model = tiny.model("llama")
    g = gsm8k(model, tok, limit=3, max_new_tokens=12, batch_size=2, progress=False)
    assert g.n == 3 and 0 <= g.metrics["accuracy"] <= 1 and g.metrics["answer_nll"] > 0
    assert [s["gold"] for s in g.samples] == ["18", "3", "70000"]
    q = nq(model, tok, limit=4, max_new_tokens=6, batch_size=3, progress=False)
    assert q.n == 4 and q.metrics["gold_logprob"] < 0 and q.metrics["gold_logprob_sum"] <= q.metrics["gold_logprob"]
    # each question's gold log-probs, by hand: one unpadded forward per accepted answer, the best answer's
    for s, prompt in zip(q.samples, nq_prompts(load_records("nq-open", "test")[:4])):
        means, sums = zip(*(_answer_logprob(model, tok, prompt, a) for a in s["answers"]))
        assert s["gold_logprob"] == pytest.approx(max(means), rel=1e-4, abs=1e-5)
        assert s["gold_logprob_sum"] == pytest.approx(max(sums), rel=1e-4, abs=1e-5)
    assert q.metrics["gold_logprob"] == pytest.approx(sum(s["gold_logprob"] for s in q.samples) / 4)
    p = perplexity(model, tok, max_tokens=200, window=64, stride=32, progress=False)
    assert p.n == 199 and p.metrics["ppl"] > 1  # no BOS in the tiny tokenizer: the first token is not scored
    results = {"gsm8k": g, "nq": q, "ppl": p}
    out = write_results(tmp_path / "r.json", results, {"model": "tiny"})
    doc = json.loads(out.read_text())
    assert set(doc["tasks"]) == {"gsm8k", "nq", "ppl"} and doc["summary"]["ppl"].startswith("ppl: ppl=")
    with pytest.raises(ConfigError, match="^tasks has unknown task mmlu"):
        EvalConfig(tasks=("gsm8k", "mmlu"))


def test_cli_on_hf_dir(tmp_path, capsys):
    from qcorda.cli import main

    path = tiny.save(tmp_path, "qwen2")
    out = tmp_path / "res.json"
    rc = main([
        "eval", str(path), "--tasks", "nq,ppl", "--limit", "3", "--nq-max-new-tokens", "4",
        "--ppl-tokens", "150", "--ppl-window", "64", "--ppl-stride", "32", "--out", str(out),
    ])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["kind"] == "hf" and doc["tasks"]["nq"]["n"] == 3
    text = capsys.readouterr().out
    assert "| nq " in text and "gold_logprob" in text and "nq: exact_match=" in text
    assert main(["eval", str(path), "--tasks", "bogus"]) == 2
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "ppl"]) == 2


# --------------------------------------------------------------------------- prepared == merged


def _merged_fp32(prepared_model, arch):
    """The in-test merge: deq(Q(W_res)) in fp32 + s·B·A, loaded into the fp32 original architecture."""
    import bitsandbytes.functional as F

    merged = tiny.model(arch)
    state = merged.state_dict()
    inner = prepared_model.base_model.model
    for name, mod in inner.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            w = mod.base_layer.weight
            W = F.dequantize_4bit(w.data, w.quant_state).float()
            W = W + mod.scaling["default"] * mod.lora_B["default"].weight.float() @ mod.lora_A["default"].weight.float()
            state[name + ".weight"] = W
    for k, v in inner.state_dict().items():  # non-target parameters (norms, embeddings) as prepared
        if ".lora_" in k or ".base_layer." in k or k not in state or state[k].shape != v.shape:
            continue
        state[k] = v.float()
    merged.load_state_dict(state)
    return merged


EVAL_CFG = EvalConfig(tasks=("gsm8k", "nq", "ppl"), limit=4, batch_size=2, gsm8k_max_new_tokens=10, nq_max_new_tokens=5,
                      ppl_tokens=200, ppl_window=64, ppl_stride=32)
PPL_CFG = replace(EVAL_CFG, tasks=("ppl",))


def _same_evaluation(model, tok, merged, mtok):
    """Every task on both models; the fp16 rounding of the export is the only difference allowed."""
    a = evaluate(model, tok, EVAL_CFG, progress=False)
    b = evaluate(merged, mtok, EVAL_CFG, progress=False)
    assert a["ppl"].metrics["ppl"] == pytest.approx(b["ppl"].metrics["ppl"], rel=2e-3)
    assert a["nq"].metrics["gold_logprob"] == pytest.approx(b["nq"].metrics["gold_logprob"], rel=2e-3)
    assert a["gsm8k"].metrics["answer_nll"] == pytest.approx(b["gsm8k"].metrics["answer_nll"], rel=2e-3)
    return a, b


@pytest.mark.parametrize("method", ["qpissa", "qcorda-kpm"])
def test_prepared_with_adapter_init_equals_merged_export(method, tok, tmp_path):
    from qcorda.config import CalibConfig
    from qcorda.prepare import prepare

    calib = CalibConfig(data="nq-open", fields=("question",), samples=16, max_length=32, batch_size=8)
    cfg = InitConfig(method=method, rank=4, calib=calib, compute_dtype="float32")
    prepared = prepare(tiny.model("llama"), cfg, tmp_path / "prep", tokenizer=tok, progress=False).out

    model, ptok, kind = load_for_eval(prepared)
    assert kind == "prepared" and type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    merged_dir = tmp_path / "merged"
    _merged_fp32(model, "llama").to(torch.float16).save_pretrained(merged_dir)  # the fp16 export
    tok.save_pretrained(merged_dir)
    merged, mtok, mkind = load_for_eval(merged_dir, dtype="float32")  # the export's rounding, fp32 compute
    assert mkind == "hf"

    a, b = _same_evaluation(model, ptok, merged, mtok)
    assert a["gsm8k"].metrics["accuracy"] == b["gsm8k"].metrics["accuracy"]
    # and against the in-memory fp32 merge, tighter
    c = evaluate(_merged_fp32(model, "llama"), ptok, PPL_CFG, progress=False)
    assert a["ppl"].metrics["ppl"] == pytest.approx(c["ppl"].metrics["ppl"], rel=1e-5)
    # the adapter matters: zeroing B moves the perplexity
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    d = evaluate(model, ptok, PPL_CFG, progress=False)
    assert abs(d["ppl"].metrics["ppl"] - a["ppl"].metrics["ppl"]) > 1e-4 * a["ppl"].metrics["ppl"]


def test_prepared_equals_qcorda_merge_fp16_export(tok, tmp_path):
    """The same check against the project's own export: ``qcorda merge`` of ``adapter_init`` to fp16."""
    from qcorda.config import CalibConfig
    from qcorda.config import MergeConfig
    from qcorda.merge import merge
    from qcorda.prepare import prepare

    calib = CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=16, max_length=32, batch_size=8)
    cfg = InitConfig(method="qcorda-ipm", rank=4, calib=calib, compute_dtype="float32")
    prepared = prepare(tiny.model("llama"), cfg, tmp_path / "prep", tokenizer=tok, progress=False).out
    out = merge(prepared, tmp_path / "merged", MergeConfig(dtype="float16", verify=False), progress=False).out
    model, ptok, _ = load_for_eval(prepared)
    merged, mtok, kind = load_for_eval(out, dtype="float32")  # the export's rounding, fp32 compute
    assert kind == "hf"
    _same_evaluation(model, ptok, merged, mtok)


def test_study_dequantized_base_computes_what_linear4bit_computes(tok, tmp_path):
    """eval/study_finetune.py trains over fp32 Linear layers holding deq(Q(W_res)): same logits and
    same LoRA gradients as the NF4 Linear4bit base with fp32 compute."""
    from export_helpers import eval_script
    from qcorda.prepare import prepare
    from qcorda.prepared import load_prepared

    study = eval_script("study_finetune")
    prepared = prepare(tiny.model("llama"), InitConfig(method="qpissa", rank=4, compute_dtype="float32"), tmp_path / "p", tokenizer=tok, progress=False).out
    ids, att, lab = encode_pairs(tok, ["Question: two plus two?", "Hi"], [" four, said she", " there"])
    outs = []
    for deq in (False, True):
        torch.manual_seed(0)
        model = load_prepared(prepared, is_trainable=True)
        if deq:
            study.dequantize_base(model)
            bases = [type(m.base_layer).__name__ for m in model.modules() if hasattr(m, "lora_A")]
            assert bases and set(bases) == {"Linear"}
        from qcorda.scoring import masked_nll

        sums, counts = masked_nll(model, ids, att, lab)
        (sums.sum() / counts.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
        outs.append((sums.detach(), grads))
    # fp32 summation order differs between bitsandbytes' CPU path and a plain matmul: ~1e-5 relative
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-4)
    assert outs[0][1].keys() == outs[1][1].keys() and outs[0][1]
    # the summation-order differences grow through backward in a random model: a few 1e-3 relative;
    # a wrong base weight (not deq(Q(W_res)), transposed, or the original W) is off by O(1)
    rel = {n: ((outs[0][1][n] - outs[1][1][n]).norm() / outs[0][1][n].norm()).item() for n in outs[0][1]}
    assert max(rel.values()) < 2e-2, max(rel.items(), key=lambda kv: kv[1])


def test_study_report_best_lr_skips_diverged_runs_and_keeps_the_reading(tmp_path):
    """The study's choice of each init's best lr ignores runs the guard stopped (unless all were), the
    table of recommended lrs reads qcorda/lr.py, the difference to qlora is paired by seed, and rewriting the report keeps a hand-written reading."""
    import argparse

    from export_helpers import eval_script

    study = eval_script("study_finetune")

    def run(loss, diverged=None, seed=0):
        return {"seed": seed, "gsm8k_loss": loss, "nq_logprob": -5.0, "ppl": 50.0, "diverged": diverged, "kept_step": 3,
                "train_loss": [2.0] * 5 + [1.0] * 5, "curve": [(10, loss)], "train_seconds": 60.0, "eval_seconds": 6.0,
                "curve_seconds": 1.0}

    init = {"gsm8k_loss": 1.8, "nq_logprob": -5.2, "ppl": 45.0}
    res = {"inits": {"qlora": {"init": init, "grid": {"0.0002": run(1.0), "0.0006": run(0.5, "nan at step 4")}, "seeds": {}},
                     "qpissa": {"init": init, "grid": {"2e-05": run(1.1), "0.0002": run(0.9)},
                                "seeds": {"0.0002": {"1": run(0.95, seed=1)}}}},
           "runs": [{"threads": 1, "load": [1.0, 1.0, 1.0]}], "seconds": {"lr grid": 300.0}}
    assert study.best_lr(res["inits"]["qlora"]["grid"]) == (2e-4, False)
    assert study.best_lr({"0.0006": run(0.5, "nan")}) == (6e-4, True)
    args = argparse.Namespace(device="cpu", inits=["qlora", "qpissa"], rank=16, calib_samples=32, steps=60, batch_size=4,
                              max_length=160, train_limit=512, warmup_ratio=0.03, max_grad_norm=0.3, margin=0.25, patience=5,
                              gsm8k_limit=32, eval_every=20, nq_limit=48, ppl_tokens=1024, seeds=[0, 1])
    out = tmp_path / "finetune"
    study.write_report(out, res, args)
    text = out.with_suffix(".md").read_text()
    assert "| qlora | 0.0002 | 1 | 1 | 1.000 |" in text  # the 0.5 of the diverged 6e-4 run is not its best
    assert "0.500 † (3)" in text
    # seed 0 of the grid and seed 1; against qlora only where qlora has the same seed (0): 0.9 - 1.0
    assert "| qpissa | 0.0002 | 1 | 2 | 0.925 ± 0.025 | -0.100 (1) |" in text
    assert "| qpissa | 0.1 | 2e-05 | 1 | 1.100 | yes | yes | 0 |" in text  # at its recommended lr (qcorda/lr.py)
    assert (tmp_path / "finetune_lr.png").exists() and (tmp_path / "finetune_curves.png").exists()
    out.with_suffix(".md").write_text(text.replace("READING_PLACEHOLDER", "Hand-written."))
    study.write_report(out, res, args)
    assert "Hand-written." in out.with_suffix(".md").read_text()


def test_gsm8k_answer_loss_without_generation(tok, monkeypatch):
    """``generate_answers=False``: the same held-out answer loss, no decoding, no accuracy."""
    import qcorda.evaluate as ev

    model = tiny.model("llama")
    full = gsm8k(model, tok, limit=3, max_new_tokens=4, batch_size=2, progress=False)

    def refuse(*a, **k):
        raise AssertionError("generate() called")

    monkeypatch.setattr(ev, "generate", refuse)
    fast = gsm8k(model, tok, limit=3, batch_size=2, progress=False, generate_answers=False)
    assert fast.metrics["accuracy"] is None and fast.metrics["answer_nll"] == pytest.approx(full.metrics["answer_nll"], rel=1e-6)
    assert "answer_nll" in fast.summary()
