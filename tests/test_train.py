"""qcorda train on tiny saved models: loss is logged, only LoRA changes, resume continues."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import tiny
from qcorda.config import CalibConfig, ConfigError, InitConfig
from qcorda.prepare import load_prepared, prepare, save_prepared
from qcorda.recipe import load_recipe
from qcorda.train import build_trainer, datasets_of, prepared_model, read_train_manifest, train


def _prepared(tmp_path, tok, method="qpissa"):
    cfg = InitConfig(method=method, rank=4, calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=8, max_length=48))
    model = prepare(tiny.model("llama"), cfg, tokenizer=tok, progress=False)
    return save_prepared(model, tmp_path / "prep", tok)


def _recipe(tmp_path, prepared, name="run", **train):
    data = {
        "output_dir": str(tmp_path / name),
        "prepared": str(prepared),
        "data": {"source": "gsm8k-train", "fields": ["question", "answer"], "limit": 64},
        "train": {"max_steps": 6, "batch_size": 2, "grad_accum": 1, "max_length": 192, "learning_rate": 1e-2,
                  "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 3,
                  "optim": "paged_adamw_8bit", **train},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def prepared(tmp_path, tok):
    return _prepared(tmp_path, tok)


def test_train_logs_loss_and_changes_only_lora(tmp_path, prepared):
    recipe = load_recipe(_recipe(tmp_path, prepared))
    before = {k: v.clone() for k, v in load_prepared(prepared).state_dict().items()}
    r = train(recipe, progress=False)
    assert r.global_step == 6 and r.first_loss is not None and r.last_loss is not None
    log = [json.loads(l) for l in (Path(recipe.output_dir) / "log.jsonl").read_text().splitlines()]
    assert sum("loss" in h for h in log) == 6
    after = load_prepared(prepared, adapter=r.adapter).state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    meta = read_train_manifest(r.adapter)
    assert Path(meta["prepared"]) == Path(prepared).resolve() and len(meta["prepared_qcorda_json_sha256"]) == 64


def test_trainer_keeps_the_exact_init(tmp_path, prepared, tok):
    recipe = load_recipe(_recipe(tmp_path, prepared))
    model, tok, _ = prepared_model(recipe)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    train_ds, _ = datasets_of(recipe, tok)
    trainer = build_trainer(recipe, model, tok, train_ds)
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable.keys() == init.keys()
    for n, p in trainable.items():
        assert p.dtype == init[n].dtype and torch.equal(p, init[n])
    # completion-only loss: the prompt tokens carry no label
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()


def test_resume_continues_from_checkpoint(tmp_path, prepared):
    full = train(load_recipe(_recipe(tmp_path, prepared, "full")), progress=False)
    first = train(load_recipe(_recipe(tmp_path, prepared, "resumed"), ["train.max_steps=3"]), progress=False)
    assert first.global_step == 3 and first.resumed_from is None
    second = train(load_recipe(_recipe(tmp_path, prepared, "resumed")), progress=False)
    assert second.resumed_from.endswith("checkpoint-3") and second.global_step == 6
    log = [json.loads(l) for l in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log if "loss" in h] == list(range(1, 7))
    # the resumed run reproduces the uninterrupted one (optimizer state, data order, RNG restored)
    a = load_prepared(prepared, adapter=full.adapter).state_dict()
    b = load_prepared(prepared, adapter=second.adapter).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_init_recipe_prepares_once_and_reuses(tmp_path, tok):
    path = tiny.save(tmp_path, "llama")
    data = {
        "output_dir": str(tmp_path / "run"), "model": str(path),
        "init": {"method": "qcorda-ipm", "rank": 4, "calib": {"data": "gsm8k-train", "fields": ["question", "answer"], "samples": 8, "max_length": 48}},
        "data": {"source": "gsm8k-train", "fields": ["question", "answer"], "limit": 16, "eval_limit": 4},
        "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 192, "logging_steps": 1, "save_steps": 2, "eval_steps": 2},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    r = train(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert (tmp_path / "run" / "prepared" / "qcorda.json").exists() and r.eval_loss is not None
    with pytest.raises(ConfigError, match="other init settings.*rank"):
        train(load_recipe(tmp_path / "r.yaml", ["init.rank=2"]), progress=False)


def test_recipe_errors(tmp_path, prepared):
    path = _recipe(tmp_path, prepared)
    with pytest.raises(ConfigError, match="train.nope is unknown"):
        load_recipe(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="train.max_steps must be a positive"):
        load_recipe(path, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match="exactly one of"):
        load_recipe(path, ["model=x", "init.rank=4"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_recipe(path, ["train.max_steps"])
    assert load_recipe(path, ["train.optim=paged_adamw_32bit"]).train.optim == "paged_adamw_32bit"
