"""The method table (qcorda.methods): every module reads it, every method runs every verb, and no
other list of methods exists in qcorda/ or tests/."""

import ast
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import pytest
import torch
import yaml

from qcorda.cli import main
from qcorda.methods import NAMES, TABLE, names, spec
from qcorda.testing import tiny

REPO = Path(__file__).resolve().parents[1]
RANK = 4


# --------------------------------------------------------------------------- the table is the source


def test_config_options_are_the_table():
    from qcorda.config import METHODS, CompareConfig, ConfigError, InitConfig, Method

    assert get_args(Method) == NAMES == METHODS
    for s in TABLE:
        cfg = InitConfig(method=s.name)
        assert cfg.n_iters == s.default_iters
        assert cfg.needs_covariance == s.covariance and cfg.needs_calibration == (s.calibration != "none")
    with pytest.raises(ConfigError, match="^method must be one of"):
        InitConfig(method="qnope")
    assert CompareConfig().methods == names(baseline=False)


def test_every_decomposition_is_dispatched():
    """A qcorda method names a function of qcorda.decompose, a baseline none; no function is left unused."""
    from qcorda.decompose import DECOMPOSITIONS, DECOMPOSITIONS_OF

    assert set(DECOMPOSITIONS_OF) == set(names(baseline=False))
    assert {spec(m).decomposition for m in names(baseline=False)} == set(DECOMPOSITIONS)


def test_lr_advice_is_the_tables():
    from qcorda.lr import LR_FACTORS, init_key, lr_factor

    for s in TABLE:
        starts = [start for start, _ in s.lr_by_start] or [None]
        for start in starts:
            assert lr_factor(s.name, start) is s.lr_for(start) and init_key(s.name, start) in LR_FACTORS
    assert len(LR_FACTORS) == sum(len(s.lr_by_start) or 1 for s in TABLE)


def test_trained_is_the_study():
    """Every :class:`Trained` figure of the table is the fine-tuning study's own (eval/results/finetune.json), recomputed
    with the study's functions: at each init's recommended lr and at its best, paired by seed with qlora."""
    from eval.study_finetune import best_runs, paired, runs_at, study_recommended_lr

    inits = json.loads((REPO / "eval/results/finetune.json").read_text())["inits"]

    def spread(d):
        return (round(sum(d) / len(d), 3), round((max(d) - min(d)) / 2, 3))

    qlora_best = best_runs(inits["qlora"])[1]
    qlora_auto = runs_at(inits["qlora"], study_recommended_lr("qlora"))
    seen = set()
    for s in TABLE:
        for start in [x for x, _ in s.trained_by_start] or [None]:
            label = s.name + (f":{start}" if start else "")
            t = s.trained_for(start)
            if label not in inits:
                assert t is None, f"{label} is not in the study"
                continue
            seen.add(label)
            auto = paired(runs_at(inits[label], study_recommended_lr(label)), qlora_auto)
            assert len(auto) == 3 and t.auto == spread(auto), label
            assert t.tuned == spread(paired(best_runs(inits[label])[1], qlora_best)), label
    assert seen >= {"qlora", "qera", "qcorda-ipm", "qcorda-cal:zero", "qcorda-cal:ipm"}  # subset: the study must hold these


def test_training_evidence_says_behind_level_or_ahead():
    from qcorda.methods import training_evidence

    assert "0.074 ± 0.005 nats behind plain QLoRA" in training_evidence("qcorda-ipm")
    assert "Plain QLoRA did better there (at auto and tuned)" in training_evidence("qcorda-ipm")
    zero = training_evidence("qcorda-cal", "zero")
    assert "0.087 ± 0.001 nats ahead of plain QLoRA" in zero and "level with plain QLoRA (+0.003" in zero
    assert "did better" not in zero
    assert "qcorda-cal --cal-start ipm" in training_evidence("qcorda-cal") and "qera" in training_evidence("qcorda-ipm")
    assert "not in the fine-tuning study" in training_evidence("qmilora")
    assert "qcorda-cal --cal-start zero" in training_evidence("qlora")


# --------------------------------------------------------------------------- every method, every verb

CALIB = {
    "task": ["--calib-data", "gsm8k-train", "--calib-fields", "question,answer"],
    "knowledge": ["--calib-data", "nq-open", "--calib-fields", "question"],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("methods"), "llama")


def _prepare(base, method, out):
    calib = CALIB.get(spec(method).calibration, [])
    argv = ["prepare", str(base), "--method", method, "--rank", str(RANK), "--out", str(out), *calib]
    if calib:
        argv += ["--calib-samples", "4", "--calib-max-length", "32"]
    if spec(method).iterative:
        argv += ["--iters", "2"]
    assert main(argv) == 0, method
    return out


def _recipe(tmp_path, prepared):
    data = {
        "output_dir": str(tmp_path / "run"), "prepared": str(prepared),
        "data": {"source": "gsm8k-train", "fields": ["question", "answer"], "limit": 8},
        "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 192, "learning_rate": 1e-2,
                  "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 100},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_compare_takes_every_method(tok):
    from qcorda.compare import compare
    from qcorda.config import CalibConfig, CompareConfig, InitConfig

    init = InitConfig(method="loftq", svd="full", iters=2,  # compare applies iters to the iterative methods only
                       calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=4, max_length=32))
    cfg = CompareConfig(methods=NAMES, ranks=(RANK,), init=init, eval_data=("wikitext2",), eval_samples=2, eval_max_length=32, eval_tokens=32)
    totals = {r["method"]: r for r in compare(tiny.model("llama"), tok, cfg, model_id="tiny", progress=False).totals()}
    assert set(totals) == set(NAMES)
    for m, r in totals.items():
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("weight_err_rel", "act_err_rel", "ppl", "kl")), r
        assert (r["weight_err_rel"] == 0.0) == (not spec(m).quantized)  # only a 16-bit base is exact


@pytest.mark.parametrize("method", NAMES)
def test_prepare_train_merge_to_lora(method, base, tok, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from export_helpers import inputs
    from qcorda.prepared import load_prepared
    from qcorda.recipe import load_recipe
    from qcorda.train import train

    from qcorda.methods import training_evidence

    capsys.readouterr()
    prep = _prepare(base, method, tmp_path / "prep")
    said = " ".join(capsys.readouterr().out.split())
    assert "what training showed: " + " ".join(training_evidence(method).split()) in said  # the user is told
    meta = json.loads((prep / "qcorda.json").read_text())
    assert meta["config"]["method"] == method
    assert ("quantization_config" in json.loads((prep / "config.json").read_text())) == spec(method).quantized

    if method == "qcorda-ipm":  # once through the CLI: its summary tells what training showed for the init
        assert main(["train", str(_recipe(tmp_path, prep))]) == 0
        said = " ".join(capsys.readouterr().out.split())
        assert "what training showed: " + " ".join(training_evidence(method).split()) in said
        result = SimpleNamespace(global_step=2, adapter=tmp_path / "run" / "adapter")
    else:
        result = train(load_recipe(_recipe(tmp_path, prep)), progress=False)
    assert result.global_step == 2

    x = inputs(tok)
    with torch.no_grad():
        trained = load_prepared(prep, adapter=result.adapter, is_trainable=False)(**x).logits
    argv = ["merge", str(prep), "--adapter", str(result.adapter), "--out", str(tmp_path / "merged"), "--dtype", "float32", "--no-verify"]
    assert main(argv) == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(**x).logits
    torch.testing.assert_close(merged, trained, atol=2e-4, rtol=1e-4)

    argv = ["to-lora", str(prep), "--adapter", str(result.adapter), "--base", str(base), "--out", str(tmp_path / "lora"), "--no-verify"]
    capsys.readouterr()
    if method == "qdora":  # a magnitude vector has no plain-LoRA form: refused, pointing to merge
        assert main(argv) == 2 and "qcorda merge" in capsys.readouterr().err
        return
    assert main(argv) == 0
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg.get("use_dora")
    if not spec(method).quantized:  # no quantization error: base + exported LoRA is the trained model
        from peft import PeftModel

        from qcorda.models import load_model

        model, _ = load_model(str(base))
        with torch.no_grad():
            y = PeftModel.from_pretrained(model, str(tmp_path / "lora")).eval()(**x).logits
        torch.testing.assert_close(y, trained, atol=2e-4, rtol=1e-4)


# --------------------------------------------------------------------------- no second list

_LIST_OF_NAMES = re.compile(r"^[\w.-]+(?:\s*,\s*[\w.-]+){2,}$")


def stray_method_lists(paths, root: Path = REPO) -> list[str]:
    """``file:line`` of every list, tuple, set or dict literal (or a Literal[...]) holding 3 or more method
    names, and of every comma-separated string of 3 or more of them. A test's deliberate pick of methods
    (not a taxonomy) says so with ``# subset: <why>`` on one of its lines."""
    known = set(NAMES)
    found = []
    for path in paths:
        text = Path(path).read_text()
        lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                items = node.elts
            elif isinstance(node, ast.Dict):
                items = [k for k in node.keys if k is not None]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _LIST_OF_NAMES.match(node.value.strip()):
                items = [ast.Constant(v.strip()) for v in node.value.split(",")]
                if not all(i.value in known for i in items):
                    continue
            else:
                continue
            hits = {i.value for i in items if isinstance(i, ast.Constant) and i.value in known}
            said = any(re.search(r"# subset: \S", line) for line in lines[node.lineno - 1:node.end_lineno])
            if len(hits) >= 3 and not said:
                found.append(f"{Path(path).relative_to(root)}:{node.lineno}: {sorted(hits)}")
    return found


def _sources():
    table = REPO / "qcorda" / "methods.py"
    return [p for d in ("qcorda", "tests") for p in sorted((REPO / d).rglob("*.py")) if p != table]


def test_no_stray_method_lists():
    found = stray_method_lists(_sources())
    assert not found, "methods listed outside qcorda/methods.py (ask the table: qcorda.methods.names(...)):\n" + "\n".join(found)


def test_the_stray_list_check_finds_lists(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('A = ("qlora", "loftq", "qpissa")\nB = {"lora": 1, "qdora": 2, "qeva": 3}\nC = ["qlora", "x"]\n'
                 'D = "qlora,qpissa,qera"\nE = "qlora and qpissa, qera"\n'
                 'F = ("qlora", "qpissa", "qera")  # subset: the ones this test is about\nG = ("qlora", "qpissa", "qera")  # subset:\n')
    assert [line.split(":")[1] for line in stray_method_lists([f], tmp_path)] == ["1", "2", "4", "7"]
