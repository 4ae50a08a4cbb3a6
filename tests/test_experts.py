"""Fused mixture-of-experts layers as per-expert Linear layers (qcorda.experts): the same forward, the covariance
of exactly the tokens each expert's router sends it, the damping rule for an expert that gets none."""

import pytest
import torch

from qcorda.config import CalibConfig, InitConfig
from qcorda.covariance import collect
from qcorda.experts import UnfusedExperts, is_expert, layout_of, unfuse
from qcorda.layer import prepare_layer
from qcorda.targets import find_targets
from qcorda.testing import families as F

MOE = ("mixtral", "qwen3-moe", "qwen2-moe", "gpt-oss")


@pytest.mark.parametrize("family", MOE)
def test_unfused_forward_is_the_fused_one(family):
    model = F.model(family)
    ids = torch.randint(3, 100, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    fused = dict(model.named_parameters())
    names = unfuse(model)
    assert names and all(isinstance(model.get_submodule(n), UnfusedExperts) for n in names)
    layout = layout_of(F.model(family))
    e = model.get_submodule(f"{names[0]}.2")
    gate_up = torch.cat([getattr(e, leaf).weight for leaf in layout.gate_up])
    down = getattr(e, layout.down).weight
    if layout.stored:  # GPT-OSS computes x·W + b: each Linear holds W[e]ᵀ and b[e]
        gate_up, down = gate_up.T, down.T
        assert torch.equal(e.gate_up_proj.bias, fused[f"{names[0]}.gate_up_proj_bias"][2])
    assert torch.equal(gate_up, fused[f"{names[0]}.gate_up_proj"][2])
    assert torch.equal(down, fused[f"{names[0]}.down_proj"][2])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_expert_covariance_holds_exactly_its_routed_tokens():
    """C_e = X_eᵀX_e / n over the non-padding tokens the router sent to expert e (n: every non-padding token)."""
    model = unfuse_model("mixtral")
    block = model.model.layers[1].mlp
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # padding: its tokens are routed too, and must not count
    seen = {}
    h = block.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].reshape(-1, a[0].shape[-1]).clone()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    h.remove()
    x = seen["x"]
    with torch.no_grad():
        _, _, top = block.gate(x)
    targets = [t for t in find_targets(model, ("all-linear",)) if is_expert(t)]
    covs = collect(model, [{"input_ids": ids, "attention_mask": mask}], targets, progress=False)
    keep = mask.reshape(-1).bool()
    for e in range(4):
        rows = (top == e).any(-1) & keep
        ref = x[rows].T @ x[rows] / int(keep.sum())
        name = f"model.layers.1.mlp.experts.{e}.w1"
        torch.testing.assert_close(covs.of(name), ref, rtol=1e-5, atol=1e-6)
        assert covs.tokens_of(name) == int(rows.sum())


def unfuse_model(family):
    model = F.model(family)
    unfuse(model)
    return model


def test_expert_without_tokens_takes_the_damping_limit():
    """An expert its router never chose: C = I (the damping rule's limit), and the report says how many tokens it got."""
    model = unfuse_model("mixtral")
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(3))
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight.zero_()  # equal logits: top-2 picks the same two experts for every token, two get none
    targets = [t for t in find_targets(model, ("all-linear",)) if ".layers.0.mlp.experts." in t]
    covs = collect(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], targets, progress=False)
    tokens = [covs.tokens_of(f"model.layers.0.mlp.experts.{e}.w1") for e in range(4)]
    assert sorted(tokens) == [0, 0, 8, 8]
    none, all_ = tokens.index(0), tokens.index(8)
    cfg = InitConfig(method="qcorda-ipm", rank=4, svd="full", calib=CalibConfig(data="gsm8k-train"))
    W = model.get_submodule(f"model.layers.0.mlp.experts.{none}.w1").weight.detach()
    split, _, idle = prepare_layer(W, cfg, f"model.layers.0.mlp.experts.{none}.w1", covs)
    assert idle.tokens == 0 and idle.few_tokens and torch.isfinite(split.B).all()
    # C = I: CorDA's split is then the top-r SVD of W (the data-free split)
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(cfg.scaling * split.B @ split.A, (U[:, :4] * S[:4]) @ Vh[:4], rtol=1e-3, atol=1e-4)
    _, _, busy = prepare_layer(W, cfg, f"model.layers.0.mlp.experts.{all_}.w1", covs)
    assert busy.tokens is None and not busy.few_tokens  # every token reached it: no routed count to report


def _arch_of(config) -> "ArchConfig":
    """The recipe ``arch:`` of a tiny MoE config, read from its config.json keys the way a user copies them."""
    from qcorda.plan import config_biases
    from qcorda.recipe import ArchConfig

    c = config.to_dict()
    return ArchConfig(layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                      heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"], head_dim=16, vocab=c["vocab_size"],
                      tied_embeddings=c["tie_word_embeddings"], experts=4, experts_per_token=2,
                      expert_intermediate=c.get("moe_intermediate_size"),
                      shared_expert_intermediate=c.get("shared_expert_intermediate_size") or 0, biases=config_biases(c))


@pytest.mark.parametrize("family", ["qwen3-moe", "qwen2-moe"])
def test_plan_counts_every_expert_and_the_active_ones(family):
    """qcorda plan on a tiny MoE's numbers: its NF4 weights are every block Linear of the prepared model (E experts
    per block, and Qwen2-MoE's shared expert), its trainable parameters every target's r·(in + out), its bias
    values those of the model; a dense twin plans fewer; and arch.experts / shared_expert_intermediate are checked
    against config.json."""
    from qcorda.config import ConfigError
    from qcorda.plan import PlanInput, check_arch, plan_memory
    from qcorda.recipe import ArchConfig
    from qcorda.targets import in_block, is_linear, is_router

    config = F.config(family)
    arch = _arch_of(config)
    check_arch(arch, config.to_dict())
    model = unfuse_model(family)
    linears = {n: m for n, m in model.named_modules() if is_linear(m) and in_block(n) and not is_router(n)}
    inp = PlanInput(arch, 4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 2, 64, "adamw_torch", 4)
    plan = plan_memory(inp)
    assert plan.quantized_params == sum(m.weight.numel() for m in linears.values())
    assert plan.trainable_params == sum(4 * sum(m.weight.shape) for m in linears.values())
    unbiased = plan_memory(PlanInput(ArchConfig(**{**arch.__dict__, "biases": ()}), *list(inp.__dict__.values())[1:]))
    assert (plan.unquantized - unbiased.unquantized) // 4 == sum(m.bias.numel() for m in linears.values() if m.bias is not None)
    dense = plan_memory(PlanInput(ArchConfig(**{**arch.__dict__, "experts": 0, "experts_per_token": 0,
                                                "shared_expert_intermediate": 0}), *list(inp.__dict__.values())[1:]))
    assert dense.layer_working_set < plan.layer_working_set and dense.quantized_params < plan.quantized_params
    with pytest.raises(ConfigError, match=r"arch.experts = 8 but .* num_(local_)?experts = 4"):
        check_arch(ArchConfig(**{**arch.__dict__, "experts": 8}), config.to_dict())
    with pytest.raises(ConfigError, match=r"mixes dense and mixture-of-experts blocks \(mlp_only_layers = \[1\]"):
        check_arch(arch, {**config.to_dict(), "mlp_only_layers": [1]})
    if arch.shared_expert_intermediate:
        with pytest.raises(ConfigError, match=r"arch.shared_expert_intermediate = 0 but .*shared_expert_intermediate_size = 64"):
            check_arch(ArchConfig(**{**arch.__dict__, "shared_expert_intermediate": 0}), config.to_dict())


@pytest.mark.parametrize("family", ["qwen2", "qwen2-moe", "gpt-oss", "llama"])
def test_plan_biases_are_the_models(family):
    """arch.biases as config.json implies them (Qwen2's q/k/v, GPT-OSS's every projection, none for Llama) are the
    projections whose modules carry a bias in the unfused model; a recipe that leaves them out is refused by name."""
    from qcorda.config import ConfigError
    from qcorda.plan import PROJECTIONS, check_arch, config_biases
    from qcorda.recipe import ArchConfig
    from qcorda.targets import in_block, is_linear, is_router

    config = F.config(family).to_dict()
    model = F.model(family)
    unfuse(model)
    have = {n.split(".")[-1] for n, m in model.named_modules()
            if is_linear(m) and in_block(n) and not is_router(n) and m.bias is not None}
    have = {p for p in PROJECTIONS if p in have or (p in ("gate_proj", "up_proj") and "gate_up_proj" in have)}
    assert set(config_biases(config)) == have
    if have:
        arch = ArchConfig(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=config["vocab_size"],
                          tied_embeddings=config["tie_word_embeddings"], **({"experts": 4, "experts_per_token": 2,
                          "expert_intermediate": config.get("moe_intermediate_size"),
                          "shared_expert_intermediate": config.get("shared_expert_intermediate_size") or 0}
                          if family != "qwen2" else {}))
        with pytest.raises(ConfigError, match=r"arch.biases = \[\] but .* set arch.biases: \["):
            check_arch(arch, config)
    with pytest.raises(ConfigError, match="biases names no projection"):
        ArchConfig(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=99, tied_embeddings=True, biases=("qkv",))


def test_compare_rolls_experts_up_per_layer_type():
    """qcorda compare's rows: every expert of every block under one *.experts.<leaf> row, apart from dense layers of
    the same leaf name (Qwen2-MoE's shared_expert.gate_proj)."""
    from qcorda.compare import LayerErrors, aggregate

    names = [f"model.layers.{b}.mlp.experts.{e}.gate_proj" for b in range(2) for e in range(4)] + \
        ["model.layers.0.mlp.shared_expert.gate_proj"]
    errs = {n: LayerErrors(1.0, 1.0, (1.0,)) for n in names}
    ref = {n: LayerErrors(2.0 if "experts" in n else 4.0, 1.0, (1.0,)) for n in names}
    rows = {r["layer"]: r for r in aggregate("m", 4, names, errs, ref, ["gsm8k"])}
    assert rows["*.experts.gate_proj"]["weight_err_rel"] == 0.5 and rows["*.gate_proj"]["weight_err_rel"] == 0.25
    assert rows["total"]["weight_err_rel"] == 9 / 20


@pytest.fixture(scope="module")
def mxfp4_and_dequantized(tmp_path_factory):
    """GPT-OSS as released (experts in MXFP4, the rest fp32), and the same weights as transformers dequantizes them
    (bf16 values, held in fp32 with the rest) and saves them."""
    import json

    from transformers import AutoModelForCausalLM, Mxfp4Config

    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("mxfp4")
    mx = F.save_mxfp4(root)
    ref = AutoModelForCausalLM.from_pretrained(mx, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32)
    params = dict(ref.named_parameters())
    deq = shutil.copytree(mx, root / "dequantized")
    # written by hand: transformers 5.17's save_pretrained of a dequantized MXFP4 model drops the experts' weights
    tensors = {(k[: -len("_blocks")] if k.endswith("_blocks") else k): v for k, v in load_file(str(mx / "model.safetensors")).items()
               if not k.endswith("_scales")}
    tensors.update({k: params[k].detach().contiguous() for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))})
    save_file(tensors, str(deq / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((deq / "config.json").read_text())
    del cfg["quantization_config"]
    (deq / "config.json").write_text(json.dumps(cfg))
    return mx, deq, ref


def test_an_mxfp4_checkpoint_reads_as_transformers_dequantizes_it(mxfp4_and_dequantized):
    """GPT-OSS's releases store the experts as MXFP4 pairs (X_blocks, X_scales); the streamed engine stopped with
    'the checkpoint has no tensor ...experts.0.gate_up_proj.weight'. The reader now reads X itself, and each expert's
    slice under its unfused name, equal to what transformers' own dequantization loads."""
    from qcorda.checkpoint import Checkpoint
    from qcorda.models import skeleton

    mx, _, ref = mxfp4_and_dequantized
    params = dict(ref.named_parameters())
    ck = Checkpoint(mx)
    assert not any(k.endswith(("_blocks", "_scales")) for k in ck.keys())
    for leaf in ("gate_up_proj", "down_proj"):
        key = f"model.layers.1.mlp.experts.{leaf}"
        assert ck.spec(key) == (tuple(params[key].shape), torch.bfloat16)
        assert torch.equal(ck.get(key).float(), params[key])
    _, skel = skeleton(mx, False)
    unfuse(skel)
    view = ck.model_view(skel)
    for e in range(4):
        assert torch.equal(view.get(f"model.layers.0.mlp.experts.{e}.down_proj.weight").float(),
                           params["model.layers.0.mlp.experts.down_proj"][e].T)


@pytest.mark.parametrize("method", ["qcorda-cal", "qolora"])  # subset: the streamed engine, and the in-memory one
def test_mxfp4_gpt_oss_prepares_as_its_dequantized_copy(mxfp4_and_dequantized, method, tmp_path):
    """Prepared from the MXFP4 release, GPT-OSS gives the very files its dequantized bf16 copy gives: the streamed
    engine reads the pairs, the in-memory one loads them dequantized (on a GPU with Triton, transformers would keep
    MXFP4 kernels and no Linear to split)."""
    import hashlib

    from qcorda.prepare import prepare

    mx, deq, _ = mxfp4_and_dequantized
    cfg = InitConfig(method=method, rank=4, calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=8,
                                                             max_length=64))
    prepare(str(mx), cfg, tmp_path / "mx", progress=False)
    prepare(str(deq), cfg, tmp_path / "deq", progress=False)
    for f in ("model.safetensors", "adapter_init/adapter_model.safetensors"):
        assert hashlib.sha256((tmp_path / "mx" / f).read_bytes()).digest() == hashlib.sha256((tmp_path / "deq" / f).read_bytes()).digest(), f


def test_another_stored_quantization_is_refused_by_name(tmp_path):
    """A checkpoint stored in another quantized format (FP8 here) would be split as if its codes were weights, or
    fail deep inside loading: refused before any work, naming the fix."""
    import json

    from qcorda.config import ConfigError
    from qcorda.prepare import prepare

    src = F.save(tmp_path, "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(cfg))
    for method in ("qlora", "qolora"):  # subset: the streamed engine, and the in-memory one
        with pytest.raises(ConfigError, match=r"stored quantized \(quant_method fp8\).*pass the unquantized model"):
            prepare(str(src), InitConfig(method=method, rank=4), tmp_path / method, progress=False)


@pytest.mark.parametrize("family", MOE)
def test_a_loaded_unfused_model_records_its_router_logits(family, tmp_path):
    """The load-balancing loss needs the router logits that transformers records by the model's class name; the
    unfused loader class registered its outputs under the module object in transformers 5.17 (a plain dict there), so
    no logits were recorded, the aux loss was the int 0 and TRL's SFTTrainer failed on it for every MoE family
    (seen in the simulated device venv, transformers 5.17.0)."""
    from qcorda.experts import loader_class

    src = F.save(tmp_path, family)
    config = F.config(family)
    model = loader_class(config).from_pretrained(src, dtype=torch.float32)
    assert any(isinstance(m, UnfusedExperts) for m in model.modules())
    out = model(input_ids=torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0)), output_router_logits=True)
    assert out.router_logits and len(out.router_logits) == config.num_hidden_layers
    assert torch.is_tensor(out.aux_loss) and out.aux_loss > 0
