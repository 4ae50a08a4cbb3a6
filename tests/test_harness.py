"""qcorda eval --harness: lm-evaluation-harness over the model qcorda loads, the bundled offline task YAMLs."""

import json
import subprocess
import sys

import pytest
import torch

from qcorda.testing import tiny
from qcorda.config import ConfigError
from qcorda.data import load_records
from qcorda.evaluate import GSM8K_STOP, extract_answer, gsm8k, gsm8k_prompts, load_for_eval, nq_prompts

from qcorda.harness import BUNDLED_TASKS, load_tasks, run_harness

try:  # the test extra installs lm_eval; only the missing-extra and import tests run without it
    import lm_eval
except ImportError:
    lm_eval = None
needs_lm_eval = pytest.mark.skipif(lm_eval is None, reason='lm_eval not installed: pip install -e ".[test]"')

FILTERS = ("strict-match", "flexible-extract", "qcorda-extract")


def same_generation(builtin: str, harness: str) -> bool:
    """Whether qcorda's and lm-eval's texts of one greedy generation agree, given how each cuts it.

    qcorda stops at the regex GSM8K_STOP and keeps the stop (``#### 18\\n``, ``\\n###``); lm-eval
    stops at the literal strings ``\\n###`` / ``\\n\\n\\n`` and cuts them off, so after a complete
    ``#### N`` line its text may run on."""
    m = __import__("re").search(GSM8K_STOP, builtin)
    if m is None:
        return builtin == harness  # neither stopped early: the same tokens to the token limit
    if m.group().startswith("####"):
        return harness.startswith(builtin)
    return builtin[: m.start()] == harness


# --------------------------------------------------------------------------- the bundled YAMLs, scored by an oracle


def oracle(answers: dict):
    """An lm-eval model that answers each prompt with a fixed text: KeyError on any prompt that
    is not exactly one qcorda builds."""
    from lm_eval.api.model import LM

    class Oracle(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return [answers[r.args[0]] for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Oracle()


def _oracle_scores(task: str, answers: dict, limit: int, num_fewshot=None) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    loaded = load_tasks([task])
    out = simple_evaluate(oracle(answers), tasks=list(loaded["tasks"].values()), limit=limit, num_fewshot=num_fewshot,
                          task_manager=TaskManager(include_defaults=False), bootstrap_iters=0)
    return out["results"][loaded["tasks"].popitem()[0]]


@needs_lm_eval
def test_bundled_gsm8k_yaml_prompts_and_scoring():
    records = load_records("gsm8k-test")[:6]
    golds = [r["answer"] for r in records]
    for shots in (0, 2):  # --num-fewshot K: the first K bundled train solutions, as qcorda's --shots K
        prompts = [p for p, _ in gsm8k_prompts(records, shots)]
        right = _oracle_scores("qcorda_gsm8k", dict(zip(prompts, golds)), 6, num_fewshot=shots or None)
        assert all(right[f"exact_match,{f}"] == 1.0 for f in FILTERS), right
    prompts = [p for p, _ in gsm8k_prompts(records)]
    off_by_one = [g.rsplit("####", 1)[0] + f"#### {int(extract_answer(g)) + 1}" for g in golds]
    wrong = _oracle_scores("qcorda_gsm8k", dict(zip(prompts, off_by_one)), 6)
    assert all(wrong[f"exact_match,{f}"] == 0.0 for f in FILTERS), wrong
    # answer extraction differs by design: "#### $18.00" is 18 for qcorda, no match for lm-eval's filters
    dollars = [g.rsplit("####", 1)[0] + f"#### ${extract_answer(g)}.00" for g in golds]
    d = _oracle_scores("qcorda_gsm8k", dict(zip(prompts, dollars)), 6)
    assert (d["exact_match,strict-match"], d["exact_match,flexible-extract"], d["exact_match,qcorda-extract"]) == (0.0, 0.0, 1.0)


@needs_lm_eval
def test_bundled_nq_yaml_prompts_and_any_accepted_answer():
    records = load_records("nq-open")[:5]
    prompts = nq_prompts(records)
    last = {p: r["answer"][-1] for p, r in zip(prompts, records)}  # the last accepted answer also counts
    assert _oracle_scores("qcorda_nq_open", last, 5)["exact_match,remove_whitespace"] == 1.0
    assert _oracle_scores("qcorda_nq_open", {p: "Paris" for p in prompts}, 5)["exact_match,remove_whitespace"] == 0.0


@needs_lm_eval
def test_a_task_yaml_over_local_files(tmp_path):
    """A user's YAML (dataset_path: json over a local file) runs offline, by its path."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"{a} plus {a}?", "a": str(2 * a)}) + "\n" for a in range(5)))
    yaml = tmp_path / "my_task.yaml"
    yaml.write_text(
        "task: my_sums\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_target: "{{a}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    answers = {f"Q: {a} plus {a}?\nA:": str(2 * a) if a < 3 else "7" for a in range(5)}
    assert _oracle_scores(str(yaml), answers, 5)["exact_match,none"] == pytest.approx(3 / 5)


# --------------------------------------------------------------------------- a tiny model through the CLI


@needs_lm_eval
def test_cli_harness_on_tiny_model_with_bundled_yaml(tmp_path, capsys):
    """The bundled GSM8K YAML by path, --limit 4, with the built-in gsm8k in the same run and JSON."""
    from qcorda.cli import main

    path = tiny.save(tmp_path, "llama")
    out = tmp_path / "res.json"
    rc = main([
        "eval", str(path), "--tasks", "gsm8k", "--harness", str(BUNDLED_TASKS["qcorda_gsm8k"]), "--limit", "4",
        "--batch-size", "4", "--gsm8k-max-new-tokens", "12", "--gen-kwargs", "max_gen_toks=12", "--out", str(out),
    ])
    assert rc == 0
    doc = json.loads(out.read_text())
    h = doc["harness"]
    assert h["lm_eval_version"] == lm_eval.__version__ and h["settings"]["limit"] == 4
    scores = h["results"]["results"]["qcorda_gsm8k"]
    assert {f"exact_match,{f}" for f in FILTERS} <= set(scores) and all(0 <= scores[f"exact_match,{f}"] <= 1 for f in FILTERS)
    assert h["results"]["n-samples"]["qcorda_gsm8k"]["effective"] == 4
    cfg = h["results"]["configs"]["qcorda_gsm8k"]
    assert cfg["generation_kwargs"]["max_gen_toks"] == 12 and cfg["generation_kwargs"]["do_sample"] is False
    assert h["headline"]["qcorda_gsm8k"]["metric"] == "exact_match,strict-match"
    assert doc["summary"]["harness"].startswith(f"harness (lm_eval {lm_eval.__version__}): qcorda_gsm8k exact_match,strict-match=")
    # same model, same prompts, greedy: lm-eval generated what qcorda generated
    builtin = doc["tasks"]["gsm8k"]["samples"]
    samples = sorted(h["samples"]["qcorda_gsm8k"], key=lambda s: s["doc_id"])
    assert [s["prompt"] for s in samples] == [p for p, _ in gsm8k_prompts(load_records("gsm8k-test")[:4])]
    for b, s in zip(builtin, samples):
        assert same_generation(b["output"], s["response"]), (b["output"], s["response"])
        assert s["filtered"]["qcorda-extract"] == (b["pred"] or "[invalid]")
    text = capsys.readouterr().out
    assert "| harness:qcorda_gsm8k | exact_match,strict-match" in text and "gsm8k: accuracy=" in text


@needs_lm_eval
def test_harness_evaluates_the_loaded_prepared_model(tok, tmp_path):
    """A prepared 4-bit model with an adapter goes into lm-eval as the object qcorda loaded: the
    harness's generations equal qcorda's own on it, and the residual alone generates otherwise."""
    from qcorda.config import InitConfig
    from qcorda.prepare import prepare

    cfg = InitConfig(method="qpissa", rank=8, compute_dtype="float32")
    prepared = prepare(tiny.model("llama"), cfg, tmp_path / "prep", tokenizer=tok, progress=False).out
    model, ptok, kind = load_for_eval(prepared)
    assert kind == "prepared"
    res = run_harness(model, ptok, "qcorda_gsm8k", limit=3, batch_size=3, gen_kwargs={"max_gen_toks": 10})
    ours = gsm8k(model, ptok, limit=3, max_new_tokens=10, batch_size=3, progress=False)
    theirs = sorted(res.samples["qcorda_gsm8k"], key=lambda s: s["doc_id"])
    assert all(same_generation(o["output"], t["response"]) for o, t in zip(ours.samples, theirs))
    import bitsandbytes as bnb

    bits = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert bits and all(m.support_avx512bf16_for_cpu is False for m in bits)  # still the dequantize path
    with torch.no_grad():  # without its adapter the model generates other text: the check above can fail
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    bare = gsm8k(model, ptok, limit=3, max_new_tokens=10, batch_size=3, progress=False)
    assert [s["output"] for s in bare.samples] != [t["response"] for t in theirs]


# --------------------------------------------------------------------------- errors


def test_missing_extra_names_it(monkeypatch, capsys, tmp_path):
    from qcorda.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert main(["eval", str(tmp_path / "no-model"), "--harness", "qcorda_gsm8k"]) == 2
    err = capsys.readouterr().err
    assert '.[harness]' in err and "--harness" in err and "no-model" not in err  # before the model loads


@needs_lm_eval
def test_hub_dataset_offline_and_bad_names(tmp_path):
    yaml = tmp_path / "hub_task.yaml"
    yaml.write_text("task: hub_task\ndataset_path: qcorda-tests/no-such-dataset\ntest_split: test\n"
                    'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\noutput_type: generate_until\n')
    with pytest.raises(ConfigError, match="could not be fetched.*qcorda_gsm8k"):
        load_tasks([str(yaml)])
    from qcorda.cli import main

    assert main(["eval", "x", "--harness", str(tmp_path / "missing.yaml")]) == 2
    assert main(["eval", "x", "--tasks", "ppl", "--num-fewshot", "2"]) == 2


def test_help_and_import_stay_light():
    code = ("import sys, argparse, qcorda.harness\nfrom qcorda.commands import evaluate\n"
            "evaluate.add_arguments(argparse.ArgumentParser())\n"
            "print(sorted(m for m in ('torch', 'lm_eval', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
