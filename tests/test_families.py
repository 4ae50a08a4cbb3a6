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
from qcorda.experts import fused_layout, is_expert, unfuse
from qcorda.config import CalibConfig, ConfigError, InitConfig, MergeConfig, ToLoraConfig, VerifyConfig
from qcorda.merge import merge
from qcorda.prepare import prepare
from qcorda.recipe import load_recipe
from qcorda.targets import find_targets, storage_plan
from qcorda.testing import families as F
from qcorda.to_lora import to_lora
from qcorda.train import train

METHODS = ("qlora", "qpissa", "qcorda-ipm", "qcorda-cal", "qera")  # subset: one per kind of split, on every family
WORKING = tuple(f for f in F.FAMILIES if f not in F.REFUSED)
#: One family per kind of layout (tied Llama, GPT-2's Conv1D, OPT's 2-D layer inputs, GPT-NeoX's renamed head):
#: every method and the whole chain run on these by default; on the others qcorda-cal and the subset do, the
#: exhaustive grid is marked slow (the fast part takes about 3 minutes on one core).
FAST = ("llama", "gpt2", "opt", "gpt-neox", "mixtral")


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


def check_loaded(prepared: Path, family: str, kept: int = 0) -> dict:
    """The prepared directory as plain transformers + PEFT load it computes with exactly the stored codes,
    the whole base (routers aside) is 4-bit, and config.json skips exactly the rest."""
    got = F.load_invariant(prepared, F.model(family))
    assert got["max_abs_diff"] < 1e-4 and got["max_err_gap"] < 1e-3, got
    assert got["base_is_nf4_of_w"] and got["skip_exact"], got
    assert len(got["not_4bit"]) == kept, got
    storage = json.loads((prepared / "qcorda.json").read_text())["storage"]
    full = [d for d in storage["full_precision"] if not d["reason"].startswith("router")]  # routers stay full precision
    assert (storage["nf4_fraction"] == 1.0) == (kept == 0 and len(full) == len(storage["full_precision"])) and len(full) == kept
    if family in F.MOE and not kept:  # every expert's bytes are NF4
        assert storage["experts"]["nf4_fraction"] == 1.0 and storage["experts"]["bytes"] > 0, storage
    return got


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
    unchanged = [k for k in init.keys() if is_expert(k.split(".lora_")[0].removeprefix("base_model.model."))
                 and torch.equal(init.get(k), trained.get(k))]
    assert not unchanged, f"training left expert adapters unchanged: {unchanged[:3]}"
    verify = VerifyConfig(samples=2, max_length=48)
    merged = merge(prepared, str(prepared) + "-merged", MergeConfig(dtype="float32", verification=verify), adapter=adapter, progress=False)
    (agree,) = merged.agreement
    assert agree.top1 >= 0.99 and agree.max_abs_diff < 1e-3 and agree.nonfinite == 0
    src = _source(workdir, family)
    if family in F.MOE:  # the checkpoint's own on-disk layout: per-expert 2-D tensors, under its names
        ours, theirs = Checkpoint(merged.out), Checkpoint(src)
        assert sorted(ours.keys()) == sorted(theirs.keys())
        assert all(ours.spec(k)[0] == theirs.spec(k)[0] for k in theirs.keys())
    lora = to_lora(prepared, str(src), str(prepared) + "-lora", ToLoraConfig(mode="exact-delta", verify=False),
                   adapter=adapter, progress=False).out
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(src)), str(lora))
    manifest = json.loads((prepared / "qcorda.json").read_text())
    s = manifest["config"]["lora_alpha"] / manifest["config"]["rank"]
    def expected(name):
        B, A = (trained.get(f"base_model.model.{name}.lora_{k}.weight") for k in "BA")
        B0, A0 = (init.get(f"base_model.model.{name}.lora_{k}.weight") for k in "BA")
        return s * B @ A - s * B0 @ A0

    inner = model.base_model.model
    fused = _fused_deltas(inner)  # mixtures of experts: PEFT's target_parameters LoRA of each fused parameter
    for name in manifest["targets"]:
        if is_expert(name):
            continue
        layer = inner.get_submodule(name)
        delta = layer.get_delta_weight("default")
        delta = delta.T if type(layer.get_base_layer()).__name__ == "Conv1D" else delta
        torch.testing.assert_close(delta, expected(name), rtol=1e-4, atol=1e-6)
    experts = [t for t in manifest["targets"] if is_expert(t)]
    if experts:  # ΔW[e] of gate_up_proj is [Δgate_e; Δup_e], of down_proj Δdown_e
        unfused = F.model(family)
        groups = fused_layout_of(unfused)
        assert set(fused) == {p for p, ms in groups.items() if set(ms) & set(experts)}
        for param, members in groups.items():
            per = len(members) // fused[param].shape[0]
            for e in range(fused[param].shape[0]):
                want = torch.cat([expected(m) if m in experts else torch.zeros(unfused.get_submodule(m).weight.shape)
                                  for m in members[e * per:(e + 1) * per]])
                got = fused[param][e]
                got = got.T if got.shape != want.shape else got  # GPT-OSS stores x·W: PEFT's ΔW is (in, out)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        _lora_equals_merged(prepared, adapter, src, merged.out)


def _fused_deltas(inner) -> dict:
    """fused parameter name → PEFT's ΔW ``(E, out, in)`` of its target_parameters LoRA."""
    out = {}
    for name, m in inner.named_modules():
        if getattr(m, "parameter_name", None) and hasattr(m, "lora_A"):
            owner = ".".join(p for p in name.split(".") if p != "base_layer")
            out[f"{owner}.{m.parameter_name}"] = m.get_delta_weight("default")
    return out


def fused_layout_of(model) -> dict:
    unfuse(model)
    return fused_layout(model)


def _lora_equals_merged(prepared: Path, adapter: Path, src: Path, merged: Path) -> None:
    """to-lora at full rank (absorb-quant-error, rank ≥ every min(out, in)) loaded by PEFT on the original base, fused
    experts as target_parameters, computes the merged model: W + D = deq(Q(W_res)) + s·B·A for every target."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = to_lora(prepared, str(src), str(prepared) + "-lora-full", ToLoraConfig(mode="absorb-quant-error", rank=1024, verify=False),
                   adapter=adapter, progress=False, overwrite=True).out
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(src)), str(lora)).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-3 and torch.equal(a.argmax(-1), b.argmax(-1))


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


def test_fused_experts_never_silently_16bit(workdir, tmp_path):
    """Experts qcorda cannot split (here GPT-OSS's fused 3-D experts, as its model holds them) would stay in 16 bits:
    the NF4-fraction check refuses them unless the user names them; a prepared GPT-OSS keeps none (each expert NF4)."""
    model = F.model("gpt-oss")  # not unfused: what storage_plan sees of experts it cannot split
    with pytest.raises(ConfigError, match=r"only \d+\.\d% .*experts\.gate_up_proj .*--keep-full-precision"):
        storage_plan(model, find_targets(model, ("all-linear",)))
    plan = storage_plan(model, find_targets(model, ("all-linear",)), keep=("experts",))
    assert 0 < plan.nf4_fraction < 0.9 and dict(plan.full_precision)["model.layers.0.mlp.experts.gate_up_proj"] == "--keep-full-precision"
    out = tmp_path / "kept"
    prepare(str(_source(workdir, "gpt-oss")), _cfg("qlora", F.SUBSET["gpt-oss"], keep_full_precision=("*.experts.*",)), out,
            progress=False)
    check_loaded(out, "gpt-oss", kept=16)  # 4 experts × 2 layers × 2 blocks, loaded as nn.Linear
    storage = json.loads((out / "qcorda.json").read_text())["storage"]
    kept = {d["name"]: d["reason"] for d in storage["full_precision"]}
    assert kept["model.layers.0.mlp.experts.3.down_proj.weight"] == "--keep-full-precision" and storage["experts"]["nf4_fraction"] == 0
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


def test_kept_layers_load_in_full_precision(workdir, tmp_path):
    """A kept block Linear is written in full precision, named in config.json's skip list, loaded as nn.Linear."""
    out = tmp_path / "kept"
    prepare(str(_source(workdir, "llama")), _cfg("qcorda-cal", ("q_proj", "v_proj"), keep_full_precision=("o_proj",)), out, progress=False)
    check_loaded(out, "llama", kept=2)
    storage = json.loads((out / "qcorda.json").read_text())["storage"]
    assert {d["name"] for d in storage["full_precision"]} == {f"model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)}
    assert 0.8 < storage["nf4_fraction"] < 0.9  # below 90 %, allowed: the user named what to keep


def test_keep_pattern_may_not_select_a_target():
    with pytest.raises(ConfigError, match="--keep-full-precision: selects target .*q_proj"):
        storage_plan(F.model("llama"), ["model.layers.0.self_attn.q_proj"], keep=("q_proj",))


def test_keep_pattern_that_selects_nothing_is_refused():
    """A keep pattern that matches no module (a typo, ``mlp`` for ``*.mlp.*``) was recorded as kept while every layer
    went to NF4: now refused by name, with an example of a module name."""
    with pytest.raises(ConfigError, match=r"--keep-full-precision: 'mlp' selects no Linear layer .* e\.g\. 'model\.layers\.0"):
        storage_plan(F.model("llama"), ["model.layers.0.self_attn.q_proj"], keep=("mlp",))
    storage_plan(F.model("llama"), ["model.layers.0.self_attn.q_proj"], keep=("*.mlp.*",))  # a glob that matches: fine


def _hashes(d: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "timings.json"}


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_in_memory_engine_stores_the_same_4bit_base(workdir, family, tmp_path):
    """The in-memory engine (a model object) writes the streamed engine's directory for a subset, byte for byte."""
    from qcorda.models import load_model

    streamed = _prepared(workdir, family, "qcorda-cal", True)
    model, tok = load_model(str(_source(workdir, family)))
    prepare(model, _cfg("qcorda-cal", F.SUBSET[family]), tmp_path / "m", tokenizer=tok, progress=False)
    hm, hs = _hashes(tmp_path / "m"), _hashes(streamed)
    for f in ("model.safetensors", "config.json", "adapter_init/adapter_model.safetensors"):
        assert hm[f] == hs[f], f
    storage = [json.loads((d / "qcorda.json").read_text())["storage"] for d in (tmp_path / "m", streamed)]
    assert storage[0] == storage[1]


@pytest.mark.parametrize("family", [f for f in F.MOE if f not in F.REFUSED])
def test_expert_adapters_get_gradients(workdir, family):
    """The loaded 4-bit model trains every expert's adapter: each expert the router sends tokens to has
    non-zero gradients on its lora_A and lora_B (and the base stays frozen)."""
    from qcorda.prepared import load_prepared

    model = load_prepared(_prepared(workdir, family, "qcorda-cal", False), device="cpu")
    ids = torch.randint(3, 100, (4, 64), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".experts." in n and p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    zero = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not zero, f"expert adapters without gradient: {zero[:3]}"
