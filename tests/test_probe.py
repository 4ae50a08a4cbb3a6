"""The learning-rate probe (qcorda.probe, ``learning_rate: probe``) on tiny models."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from qcorda import probe as P
from qcorda.cli import main as cli_main
from qcorda.config import CalibConfig, ConfigError, InitConfig
from qcorda.data import load_examples
from qcorda.prepare import prepare
from qcorda.prepared import load_prepared
from qcorda.recipe import TrainConfig, load_recipe
from qcorda.testing import tiny
from qcorda.train import probe_learning_rate, read_train_manifest, train


@pytest.fixture(scope="module")
def examples():
    return load_examples("gsm8k-train", ("question", "answer"), "alpaca", 64)


def _lora(k: float = 1.0, seed: int = 0, b_std: float = 0.05):
    """A tiny fp32 Llama with random rank-4 LoRA factors (B ≠ 0). With ``k`` ≠ 1, both factors are
    scaled by k and the base weight absorbs the change, W' = W − s(k² − 1)·B·A, so the effective weight
    W + s·B·A, the loss and its gradient w.r.t. that weight are the same as at k = 1. ``b_std`` 0: B = 0, as QLoRA."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tiny.model("llama", seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                       init_lora_weights=False, lora_dropout=0.0))
    with torch.no_grad():
        for _, A, B, s, base in P.lora_layers(model):
            B.normal_(0, b_std) if b_std else B.zero_()
            base.weight -= s * (k * k - 1) * (B @ A)
            A.mul_(k)
            B.mul_(k)
    return model


def _same(a: P.ProbeResult, b: P.ProbeResult) -> bool:
    return (a.learning_rate, a.measured, a.trace, a.passes, a.sequences) == (b.learning_rate, b.measured, b.trace, b.passes, b.sequences)


@pytest.mark.parametrize("method", ["update", "sharpness", "direction", "range"])
def test_probe_is_deterministic_for_a_seed_and_leaves_the_adapter(method, tok, examples):
    # direction: a random tiny model is not convex along Adam's first step unless B starts at 0 (test below)
    model = _lora(b_std=0.0 if method == "direction" else 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    a = P.probe_lr(model, tok, examples, 12, method, seed=1, max_length=256, batch_size=4)
    b = P.probe_lr(model, tok, examples, 12, method, seed=1, max_length=256, batch_size=4)
    assert _same(a, b) and a.learning_rate > 0 and a.passes <= a.budget == 12
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the probe put every parameter back
    assert all(p.grad is None for p in model.parameters())
    c = P.probe_lr(model, tok, examples, 12, method, seed=0, max_length=256, batch_size=4)
    assert (c.measured, c.trace) != (a.measured, a.trace)  # the seed draws the probe's sequences


def test_factors_scaled_by_k_get_1_over_k_the_lr(tok, examples):
    """update: with s·B·A (and so ∂L/∂W) fixed, g_B and g_A scale by k, their signs do not, and
    s·(sign(g_B)·(kA) + (kB)·sign(g_A)) is k times the update: u scales by k and lr = τ/u by exactly 1/k."""
    k = 4.0
    base = P.probe_lr(_lora(1.0), tok, examples, 8, "update", seed=0, max_length=256)
    big = P.probe_lr(_lora(k), tok, examples, 8, "update", seed=0, max_length=256)
    assert big.learning_rate < base.learning_rate
    assert big.measured / base.measured == pytest.approx(k, rel=1e-3)
    assert big.learning_rate / base.learning_rate == pytest.approx(1 / k, rel=1e-3)


@pytest.mark.parametrize("k", [2.0, 4.0])
def test_sharpness_qlora_start_with_a_scaled_by_k_gets_1_over_k_the_lr(k, tok, examples):
    """sharpness (the shipped probe) at QLoRA's start, B = 0, with A scaled by k: g_A = 0 (next to B = 0), so
    only B is measured; g_B = s·(∂L/∂W)·Aᵀ scales by k, the B-block Hessian (s·A)ᵀ(∂²L/∂W²)(s·A) by k²
    and Adam's preconditioner |g_B| by k, so P^-1/2·H·P^-1/2, its λ and lr = c/λ scale by exactly k
    and 1/k (up to the finite difference)."""
    base = P.probe_lr(_lora(1.0, b_std=0.0), tok, examples, 12, "sharpness", seed=0, max_length=256)
    big = P.probe_lr(_lora(k, b_std=0.0), tok, examples, 12, "sharpness", seed=0, max_length=256)
    assert big.learning_rate < base.learning_rate
    assert big.measured / base.measured == pytest.approx(k, rel=1e-2)
    assert big.learning_rate / base.learning_rate == pytest.approx(1 / k, rel=1e-2)


@pytest.mark.parametrize("k", [2.0, 4.0])
def test_sharpness_both_factors_scaled_by_k_get_a_lower_lr_by_less_than_k(k, tok, examples):
    """sharpness with B ≠ 0, both factors scaled by k and the effective weight kept: the Gauss–Newton part
    of the preconditioned Hessian scales by k (as above) but the part from the product's own curvature,
    ∂L/∂W through ∂²(B·A), by 1/k (it is linear in the factors' scale, the preconditioner divides by k),
    so λ grows by more than 1 and less than k: the lr falls by a factor between 1 and k (measured here:
    1.36 at k = 2, 2.54 at k = 4)."""
    base = P.probe_lr(_lora(1.0), tok, examples, 12, "sharpness", seed=0, max_length=256)
    big = P.probe_lr(_lora(k), tok, examples, 12, "sharpness", seed=0, max_length=256)
    assert 1 / k < big.learning_rate / base.learning_rate < 1


def test_update_size_is_the_first_order_weight_change(tok, examples):
    """u per unit lr against the weight change of one real Adam step at a small lr (first step: sign(g))."""
    model = _lora()
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    batches = P.probe_batches(tok, examples, 4, 0, 256, 4)
    _, grads = P._loss_and_grads(model, params, batches)
    u = P.update_size(model, grads)
    eff = lambda: [(base.weight + s * B @ A).detach().clone() for _, A, B, s, base in P.lora_layers(model)]  # noqa: E731
    w0 = eff()
    lr = 1e-6
    opt = torch.optim.Adam(list(params.values()), lr=lr, eps=1e-30)
    for n, p in params.items():
        p.grad = grads[n].clone()
    opt.step()
    w1 = eff()
    moved = sum(float((b - a).pow(2).sum()) for a, b in zip(w0, w1)) ** 0.5 / sum(float(a.pow(2).sum()) for a in w0) ** 0.5
    assert moved / lr == pytest.approx(u, rel=1e-2)


def _prepared(tmp_path, tok, method="qpissa"):
    cfg = InitConfig(method=method, rank=4, calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=8, max_length=48))
    return prepare(tiny.model("llama"), cfg, tmp_path / "prep", tokenizer=tok, progress=False).out


def _recipe(tmp_path, prepared, name="run", **train_):
    data = {
        "output_dir": str(tmp_path / name), "prepared": str(prepared),
        "data": {"source": "gsm8k-train", "fields": ["question", "answer"], "limit": 64},
        "train": {"max_steps": 40, "batch_size": 2, "grad_accum": 1, "max_length": 192, "learning_rate": "probe",
                  "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 5, "save_steps": 20, "optim": "adamw_torch",
                  **train_},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_learning_rate_probe_trains_at_it_and_records_it(tmp_path, tok):
    prepared = _prepared(tmp_path, tok)
    recipe = load_recipe(_recipe(tmp_path, prepared))
    r = train(recipe, progress=False)
    meta = read_train_manifest(r.adapter)
    probe = meta["lr_probe"]
    # the shipped probe, sharpness; a budget of 4 passes (under SHARPNESS_ITERS + 1) takes 1 sequence and 3 power iterations
    assert probe["method"] == TrainConfig().lr_probe == "sharpness" and probe["budget"] == P.probe_budget(40, 2) == 4
    assert probe["passes"] == 4 and len(probe["trace"]) == 3
    assert r.learning_rate == meta["learning_rate"] == probe["learning_rate"] == pytest.approx(P.SHARPNESS_C / probe["measured"])
    log = [json.loads(line) for line in (Path(recipe.output_dir) / "log.jsonl").read_text().splitlines()]
    logged = [float(h["learning_rate"]) for h in log if "learning_rate" in h]
    assert logged and all(x == pytest.approx(probe["learning_rate"], rel=1e-6) for x in logged)  # constant schedule
    # a rerun (a fresh load of the same init) measures the same lr
    again = probe_learning_rate(recipe, load_prepared(prepared, is_trainable=True), tok)
    assert again.learning_rate == probe["learning_rate"]


def test_probe_lr_verb_prints_the_lr_and_a_table(tmp_path, tok, capsys):
    prepared = _prepared(tmp_path, tok)
    assert cli_main(["probe-lr", str(_recipe(tmp_path, prepared)), "train.lr_probe=range"]) == 0
    out = capsys.readouterr().out
    expected = probe_learning_rate(load_recipe(_recipe(tmp_path, prepared), ["train.lr_probe=range"]),
                                   load_prepared(prepared, is_trainable=True), tok)
    assert f"learning rate: {expected.learning_rate:.4g}" in out and "sequence passes" in out and "| probe" in out


def test_a_nan_in_the_ramp_stops_with_the_recipe_key(tmp_path, tok, monkeypatch):
    prepared = _prepared(tmp_path, tok)
    monkeypatch.setattr(P, "RANGE_LR", (1e-3, 1e30))  # a ramp far past any sane lr: the adapter overflows, the loss is NaN/inf
    recipe = load_recipe(_recipe(tmp_path, prepared, lr_probe="range"))
    with pytest.raises(P.ProbeFailed, match=r"train\.learning_rate") as e:
        train(recipe, progress=False)
    assert "ramp step" in str(e.value)
    assert not (Path(recipe.output_dir) / "adapter").exists()  # it stopped before training
    assert cli_main(["train", str(_recipe(tmp_path, prepared, lr_probe="range"))]) == 2  # the CLI reports it as a bad setting


def test_recipe_rejects_an_unknown_probe(tmp_path, tok):
    from qcorda.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.lr_probe"):
        load_recipe(_recipe(tmp_path, "unused", lr_probe="hessian"))
    with pytest.raises(ConfigError, match=r"train\.learning_rate.*probe"):
        load_recipe(_recipe(tmp_path, "unused", learning_rate="probing"))


def test_direction_refuses_a_loss_that_is_not_convex_along_the_step(tok, examples):
    """On the tiny random model with B ≠ 0 and these sequences (seed 4) the curvature along sign(g) is negative: no minimum, no lr."""
    with pytest.raises(P.ProbeFailed, match=r"not convex.*set train\.learning_rate"):
        P.probe_lr(_lora(), tok, examples, 12, "direction", seed=4, max_length=256)


def test_every_probe_method_says_what_it_measures():
    """``qcorda probe-lr`` prints MEASURED[method]: every method the recipe accepts has its words
    (``direction`` had none, a KeyError after the probe had run)."""
    from typing import get_args

    from qcorda.recipe import LrProbe

    assert set(P.MEASURED) == set(get_args(LrProbe))


def test_a_run_too_short_for_the_probe_is_refused_not_overspent(tok, examples):
    """A 4-step run of batch 2 allows 5 % of 8 passes, i.e. 1 (at least): sharpness needs 2, and spent 2 of a budget of
    1 (``qcorda probe-lr`` printed ``passes / budget | 2 / 1``). Now refused, naming train.max_steps; a probe that needs
    no more than the budget still runs."""
    budget = P.probe_budget(4, 2)
    assert budget == 1
    for method, need in P.MIN_PASSES.items():
        if need > budget:
            with pytest.raises(ConfigError, match=rf"the {method} learning-rate probe needs at least {need} .* is 1: raise "
                                                  r"train\.max_steps"):
                P.probe_lr(_lora(), tok, examples, budget, method, max_length=256)
    assert P.probe_lr(_lora(), tok, examples, budget, "update", max_length=256).passes == 1
