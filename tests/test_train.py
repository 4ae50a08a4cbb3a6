"""qcorda train on tiny saved models: loss is logged, only LoRA changes, resume continues."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from qcorda.testing import tiny
from qcorda.config import CalibConfig, ConfigError, InitConfig
from qcorda.prepare import prepare
from qcorda.prepared import load_prepared
from qcorda.recipe import load_recipe
from qcorda.train import build_trainer, datasets_of, prepared_model, read_train_manifest, train


def _prepared(tmp_path, tok, method="qpissa"):
    cfg = InitConfig(method=method, rank=4, calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=8, max_length=48))
    return prepare(tiny.model("llama"), cfg, tmp_path / "prep", tokenizer=tok, progress=False).out


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


# --------------------------------------------------------------------------- learning rates and the guard (issue 15)


@pytest.mark.parametrize("method,cal_start,factor", [
    ("qlora", "ipm", 1.0), ("loftq", "ipm", 1.0), ("qpissa", "ipm", 0.1), ("qcorda-ipm", "ipm", 0.1),
    ("qcorda-cal", "ipm", 0.1), ("qcorda-cal", "zero", 1.0), ("qera", "ipm", 1.0), ("qcorda-kpm", "ipm", 1.0),
])
def test_learning_rate_auto_resolves_per_method(tmp_path, method, cal_start, factor):
    from qcorda.lr import LR_FACTORS, init_key
    from qcorda.train import learning_rate

    init = {"method": method, "rank": 4, "cal_start": cal_start, "calib": {"data": "gsm8k-train"}}
    data = {"output_dir": str(tmp_path / "o"), "model": "m", "init": init, "train": {"learning_rate": "auto", "base_learning_rate": 3e-4}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert learning_rate(load_recipe(tmp_path / "r.yaml")) == pytest.approx(factor * 3e-4)
    assert LR_FACTORS[init_key(method, cal_start)].source  # every figure says where it comes from


def test_an_explicit_learning_rate_far_above_the_recommended_one_warns(tmp_path, prepared):
    import warnings

    from qcorda.train import learning_rate

    path = _recipe(tmp_path, prepared)  # qpissa: recommended 0.1 x 2e-4 = 2e-5
    with pytest.warns(UserWarning, match=r"train.learning_rate 0.0001 is 5x the recommended 2e-05 for qpissa"):
        learning_rate(load_recipe(path, ["train.learning_rate=1e-4"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert learning_rate(load_recipe(path, ["train.learning_rate=6e-5"])) == 6e-5  # 3x: no warning
        assert learning_rate(load_recipe(path, ["train.learning_rate=auto"])) == pytest.approx(2e-5)
    with pytest.raises(ConfigError, match="train.learning_rate must be a positive number, auto or probe"):
        load_recipe(path, ["train.learning_rate=fast"])


def test_guard_rules():
    from qcorda.guard import DivergenceGuard

    g = DivergenceGuard(margin=0.25, patience=3, smoothing=0.0, start_window=3)
    assert [g.update(s, x) for s, x in enumerate([1.6, 2.4, 2.0, 2.4, 1.9, 2.2], 1)] == [None] * 6  # noise within the margin
    assert g.start == pytest.approx(2.0)
    assert g.last_good == 6
    assert g.update(7, 3.0) is None and g.update(8, 3.5) is None
    assert "stayed above 2.500" in g.update(9, 4.0) and g.last_good == 6
    assert "nan" in DivergenceGuard().update(1, float("nan"))


def test_guard_catches_a_blow_up_among_the_first_logged_losses():
    """Defect: ``start`` was the mean of the first 3 logged losses, so a run that blew up at its
    second log (Gemma-3-270M, qcorda-ipm at 100x its recommended lr: these losses, logged every
    2 steps) raised its own reference to 10.4 and trained on. ``qcorda train``'s guard now starts
    from the first logged loss."""
    from qcorda.guard import DivergenceGuard

    g = DivergenceGuard()  # qcorda train's defaults: margin 0.25, patience 3
    said = [g.update(s, x) for s, x in zip(range(2, 20, 2), [2.073, 21.94, 7.343, 6.273, 8.127, 5.162])]
    assert said[:3] == [None] * 3 and "stayed above 2.591" in said[3] and g.last_good == 2


def test_guard_stops_a_blowing_up_run_and_keeps_the_last_good_adapter(tmp_path, prepared):
    """Adam moves every weight by ~lr per step: at lr 1e30 the logits overflow and the loss turns NaN."""
    from qcorda.train import TrainingDiverged

    recipe = load_recipe(_recipe(tmp_path, prepared, "blowup", learning_rate=1e30, max_steps=40, save_steps=1,
                                 optim="adamw_torch", logging_steps=2))
    with pytest.warns(UserWarning, match="recommended"), pytest.raises(TrainingDiverged) as e:
        train(recipe, progress=False)
    msg = str(e.value)
    assert "training diverged: the training loss is nan" in msg and "qpissa" in msg and "recommended 2e-05" in msg
    meta = read_train_manifest(tmp_path / "blowup" / "adapter")
    kept = meta["diverged"]["kept_step"]
    log = [json.loads(l) for l in (tmp_path / "blowup" / "log.jsonl").read_text().splitlines()]
    assert max(h["step"] for h in log) < 10  # stopped within a few logging steps
    ckpts = sorted(int(c.name.split("-")[1]) for c in (tmp_path / "blowup" / "checkpoints").glob("checkpoint-*"))
    assert ckpts == list(range(1, kept + 1))  # only the checkpoints up to the kept adapter remain
    # the kept adapter loads, is finite, and is the one of checkpoint `kept` (or the init when kept is 0)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "blowup" / "adapter" / "adapter_model.safetensors")
    ref = tmp_path / "blowup" / "checkpoints" / f"checkpoint-{kept}" if kept else Path(prepared) / "adapter_init"
    expect = load_file(ref / "adapter_model.safetensors")
    assert adapter.keys() == expect.keys() and all(torch.equal(adapter[k], expect[k]) for k in adapter)
    assert all(torch.isfinite(t).all() for t in adapter.values())
    load_prepared(prepared, adapter=tmp_path / "blowup" / "adapter")


def test_a_trained_adapter_merged_against_another_prepared_directory_is_refused(tmp_path, tok, prepared):
    """Defect: the trainer wrote its owner under one key and merge read another, so merge never checked
    an adapter made by qcorda train. Both now use qcorda.prepared.OWNER_KEY."""
    from qcorda.config import MergeConfig, ToLoraConfig
    from qcorda.merge import merge
    from qcorda.to_lora import to_lora

    r = train(load_recipe(_recipe(tmp_path, prepared, max_steps=2)), progress=False)
    other = prepare(tiny.model("llama"), InitConfig(method="qpissa", rank=4, seed=3), tmp_path / "other", tokenizer=tok, progress=False).out
    with pytest.raises(ConfigError, match="was trained from another prepared directory"):
        merge(other, tmp_path / "m", MergeConfig(verify=False), adapter=r.adapter, progress=False)
    with pytest.raises(ConfigError, match="was trained from another prepared directory"):
        to_lora(other, str(tmp_path / "base"), tmp_path / "l", ToLoraConfig(verify=False), adapter=r.adapter, progress=False)
    assert not (tmp_path / "m").exists() and not (tmp_path / "l").exists()
    merge(prepared, tmp_path / "ok", MergeConfig(verify=False), adapter=r.adapter, progress=False)  # its own prepared directory is fine


def test_init_recipe_prepares_through_the_streamed_engine(tmp_path, monkeypatch):
    """Defect: `qcorda train` with `init:` loaded the whole model in fp32 (280 GB of host RAM for the
    Llama-3-70B recipe); it now prepares with the streamed engine and trains what it wrote."""
    import qcorda.models
    import qcorda.prepare

    path = tiny.save(tmp_path, "llama")
    streamed = []
    real = qcorda.prepare.stream_prepare
    monkeypatch.setattr(qcorda.prepare, "stream_prepare", lambda *a, **k: (streamed.append(a[0]), real(*a, **k))[1])

    def whole_model(*a, **k):
        raise AssertionError("the whole model was loaded to prepare it")

    monkeypatch.setattr(qcorda.prepare, "load_model", whole_model)
    data = {
        "output_dir": str(tmp_path / "run"), "model": str(path),
        "init": {"method": "qcorda-cal", "rank": 4, "calib": {"data": "gsm8k-train", "fields": ["question", "answer"], "samples": 8, "max_length": 48}},
        "data": {"source": "gsm8k-train", "fields": ["question", "answer"], "limit": 16},
        "train": {"max_steps": 1, "batch_size": 2, "grad_accum": 1, "max_length": 192, "logging_steps": 1, "save_steps": 5},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    r = train(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert streamed == [str(path)] and r.global_step == 1
    assert (tmp_path / "run" / "prepared" / "timings.json").exists()  # written by the streamed engine alone
