"""Every model family end to end on tiny random models built from transformers' config classes (no hub).

Per family, with the default targets and with a target subset: prepare (streamed, from the saved
checkpoint) for qlora, qpissa, qcorda-ipm, qcorda-cal and qera; the prepared directory loaded by plain
transformers + PEFT computes with deq(codes) + s·B·A on every target and with deq(codes) = NF4(W) on every
other block Linear (the whole base is 4-bit, config.json skips exactly the rest); 2 training steps;
merge (plain transformers loads it, it agrees with the trained 4-bit model); to-lora (PEFT loads it on
the original base, its update is s·B·A − s₀·B₀·A₀). The families qcorda refuses are refused with a
message that says why; none is prepared with weights silently left in 16 bits.
"""

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import yaml

from qcorda.checkpoint import Checkpoint
from qcorda.config import CalibConfig, ConfigError, InitConfig, MergeConfig, ToLoraConfig, VerifyConfig
from qcorda.merge import merge, stored_nf4
from qcorda.prepare import prepare
from qcorda.quantize import dequantize_nf4, nf4_roundtrip
from qcorda.recipe import load_recipe
from qcorda.targets import find_targets, in_block, is_linear, is_router, storage_plan, weight_of
from qcorda.testing import families as F
from qcorda.to_lora import to_lora
from qcorda.train import train

METHODS = ("qlora", "qpissa", "qcorda-ipm", "qcorda-cal", "qera")
WORKING = tuple(f for f in F.FAMILIES if f not in F.REFUSED)
#: One family per kind of layout (tied Llama, GPT-2's Conv1D, OPT's 2-D layer inputs, GPT-NeoX's renamed head):
#: every method and the whole chain run on these by default; on the others qcorda-cal and the subset do, the
#: exhaustive grid is marked slow (the fast part takes about 3 minutes on one core).
FAST = ("llama", "gpt2", "opt", "gpt-neox")


def _fast_if(cond: bool, *values):
    return pytest.param(*values, marks=() if cond else pytest.mark.slow)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@lru_cache(maxsize=None)
def _source(root: Path, family: str) -> Path:
    return F.save(root, family)


def _cfg(method: str, targets: tuple[str, ...] = ("all-linear",), **kw) -> InitConfig:
    return InitConfig(method=method, rank=4, target_modules=targets,
                      calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=6, max_length=48), **kw)


@lru_cache(maxsize=None)
def _prepared(root: Path, family: str, method: str, subset: bool) -> Path:
    targets = F.SUBSET[family] if subset else ("all-linear",)
    out = root / f"{family}-{method}-{'subset' if subset else 'all'}"
    prepare(str(_source(root, family)), _cfg(method, targets), out, progress=False)
    return out


def check_loaded(prepared: Path, family: str) -> None:
    """The prepared directory as plain transformers + PEFT load it computes with exactly the stored codes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifest = json.loads((prepared / "qcorda.json").read_text())
    targets, base_nf4 = manifest["targets"], manifest["storage"]["base_nf4"]
    s = manifest["config"]["lora_alpha"] / manifest["config"]["rank"]
    original = F.model(family)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(prepared)), str(prepared / "adapter_init")).train()
    inner = model.base_model.model
    codes, init = Checkpoint(prepared), Checkpoint(prepared / "adapter_init", "adapter_model")
    errs = {l["name"]: l["err"] for l in manifest["layers"]}
    torch.manual_seed(0)
    for name in targets + base_nf4:
        layer = inner.get_submodule(name)
        base_layer = layer.get_base_layer() if name in targets else layer
        assert type(base_layer).__name__ == "Linear4bit", name
        deq = dequantize_nf4(stored_nf4(codes, name)).float()
        W_eff = deq
        if name in targets:
            B, A = (init.get(f"base_model.model.{name}.lora_{k}.weight") for k in "BA")
            W_eff = deq + s * B @ A
            W = weight_of(original.get_submodule(name)).detach()
            assert (W - W_eff).pow(2).sum().item() == pytest.approx(errs[name], rel=1e-4, abs=1e-9), name
        else:  # a base layer without adapter: its codes are NF4(W) itself
            torch.testing.assert_close(deq, nf4_roundtrip(weight_of(original.get_submodule(name)).detach().float()), rtol=0, atol=0)
        x = torch.randn(3, W_eff.shape[1])
        bias = base_layer.bias
        with torch.no_grad():
            y = layer(x)
        torch.testing.assert_close(y, x @ W_eff.T + (0 if bias is None else bias), rtol=1e-4, atol=1e-5)
    # the whole base is 4-bit: every block Linear but the routers, and config.json skips exactly the rest
    block = [n for n, m in original.named_modules() if is_linear(m) and in_block(n)]
    assert set(block) - {n for n in block if is_router(n)} <= set(targets) | set(base_nf4)
    skip = json.loads((prepared / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    linears = {n for n, m in original.named_modules() if is_linear(m)}
    assert set(skip) == linears - set(targets) - set(base_nf4)
    assert manifest["storage"]["nf4_fraction"] == 1.0 and manifest["storage"]["full_precision"] == []


@pytest.mark.parametrize("family,method", [_fast_if(f in FAST or m == "qcorda-cal", f, m) for f in WORKING for m in METHODS])
def test_prepare_and_load(workdir, family, method):
    check_loaded(_prepared(workdir, family, method, False), family)


@pytest.mark.parametrize("family", WORKING)
def test_subset_is_a_4bit_base(workdir, family):
    prepared = _prepared(workdir, family, "qcorda-cal", True)
    manifest = json.loads((prepared / "qcorda.json").read_text())
    assert manifest["storage"]["base_nf4"], "a subset leaves other block Linears, stored as NF4(W)"
    check_loaded(prepared, family)


def _train(workdir: Path, prepared: Path) -> Path:
    data = {"output_dir": str(prepared) + "-run", "prepared": str(prepared),
            "data": {"source": "gsm8k-train", "fields": ["question", "answer"], "limit": 8},
            "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 192, "learning_rate": 1e-2,
                      "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 2}}
    path = Path(str(prepared) + "-recipe.yaml")
    path.write_text(yaml.safe_dump(data))
    return Path(train(load_recipe(path), progress=False).adapter)


def _chain(workdir: Path, family: str, subset: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prepared = _prepared(workdir, family, "qcorda-cal", subset)
    adapter = _train(workdir, prepared)
    init, trained = Checkpoint(prepared / "adapter_init", "adapter_model"), Checkpoint(adapter, "adapter_model")
    assert any(not torch.equal(init.get(k), trained.get(k)) for k in init.keys()), "training changed no adapter"
    verify = VerifyConfig(samples=2, max_length=48)
    merged = merge(prepared, str(prepared) + "-merged", MergeConfig(dtype="float32", verification=verify), adapter=adapter, progress=False)
    (agree,) = merged.agreement
    assert agree.top1 >= 0.99 and agree.max_abs_diff < 1e-3 and agree.nonfinite == 0
    src = _source(workdir, family)
    lora = to_lora(prepared, str(src), str(prepared) + "-lora", ToLoraConfig(mode="exact-delta", verify=False),
                   adapter=adapter, progress=False).out
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(src)), str(lora))
    manifest = json.loads((prepared / "qcorda.json").read_text())
    s = manifest["config"]["lora_alpha"] / manifest["config"]["rank"]
    for name in manifest["targets"]:
        layer = model.base_model.model.get_submodule(name)
        B, A = (trained.get(f"base_model.model.{name}.lora_{k}.weight") for k in "BA")
        B0, A0 = (init.get(f"base_model.model.{name}.lora_{k}.weight") for k in "BA")
        delta = layer.get_delta_weight("default")
        delta = delta.T if type(layer.get_base_layer()).__name__ == "Conv1D" else delta
        torch.testing.assert_close(delta, s * B @ A - s * B0 @ A0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", [_fast_if(f == "llama", f) for f in WORKING])
def test_train_merge_to_lora(workdir, family):
    _chain(workdir, family, False)


@pytest.mark.parametrize("family", [_fast_if(f in FAST, f) for f in WORKING])
def test_subset_trains_merges_converts(workdir, family):
    _chain(workdir, family, True)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", WORKING)
def test_subset_every_method(workdir, family, method):
    check_loaded(_prepared(workdir, family, method, True), family)


@pytest.mark.parametrize("family", sorted(F.REFUSED))
def test_refused_clearly(workdir, family, tmp_path):
    with pytest.raises(ConfigError, match=F.REFUSED[family]):
        prepare(str(_source(workdir, family)), _cfg("qcorda-cal"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_gpt_oss_experts_never_silently_16bit(workdir, tmp_path):
    """Its fused 3-D experts cannot be NF4 yet: refused, unless the user names them; then recorded."""
    with pytest.raises(ConfigError, match=r"only \d+\.\d% .*experts\.gate_up_proj .*--keep-full-precision"):
        prepare(str(_source(workdir, "gpt-oss")), _cfg("qlora"), tmp_path / "refused", progress=False)
    out = tmp_path / "kept"
    prepare(str(_source(workdir, "gpt-oss")), _cfg("qlora", keep_full_precision=("experts",)), out, progress=False)
    storage = json.loads((out / "qcorda.json").read_text())["storage"]
    assert 0 < storage["nf4_fraction"] < 0.9
    kept = {d["name"]: d["reason"] for d in storage["full_precision"]}
    assert kept["model.layers.0.mlp.experts.gate_up_proj"] == "--keep-full-precision"
    assert kept["model.layers.1.mlp.router.weight"].startswith("router")


def test_routers_are_never_targets():
    model = F.model("qwen2-moe")
    targets = find_targets(model, ("all-linear",))
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in targets)
    assert any(n.endswith("shared_expert.gate_proj") for n in targets)
    plan = storage_plan(model, targets, keep=("experts",))
    reasons = dict(plan.full_precision)
    assert reasons["model.layers.0.mlp.shared_expert_gate.weight"].startswith("router")
    assert "model.layers.0.mlp.shared_expert_gate" in plan.skip_modules


def test_keep_pattern_may_not_select_a_target():
    with pytest.raises(ConfigError, match="--keep-full-precision: selects target .*q_proj"):
        storage_plan(F.model("llama"), ["model.layers.0.self_attn.q_proj"], keep=("q_proj",))
