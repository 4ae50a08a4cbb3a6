"""Tiny random models of the architectures people fine-tune, built from transformers' config classes (no hub).

:data:`FAMILIES` names each one; :func:`save` writes one with the tiny tokenizer as an HF
directory (``save_pretrained``: the checkpoint's own on-disk layout, e.g. GPT-NeoX's
``embed_out``, Mixtral's per-expert ``block_sparse_moe.experts.{e}.w1``). :data:`SUBSET`: a
target subset per family (what ``--target-modules q_proj,v_proj`` is for Llama). :data:`REFUSED`:
the families qcorda refuses at prepare, with the pattern of the refusal.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import tiny

_ATT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_MOE = dict(num_experts_per_tok=2)


def _configs() -> dict:
    import transformers as T

    return {
        "llama": lambda: T.LlamaConfig(**_ATT, tie_word_embeddings=True),
        "llama-untied": lambda: T.LlamaConfig(**_ATT, tie_word_embeddings=False),
        "qwen2": lambda: T.Qwen2Config(**_ATT),
        "qwen3": lambda: T.Qwen3Config(**_ATT, head_dim=16),
        "mistral": lambda: T.MistralConfig(**_ATT),
        "phi3": lambda: T.Phi3Config(**_ATT),
        "gemma2": lambda: T.Gemma2Config(**_ATT, head_dim=16),
        "gemma3": lambda: T.Gemma3TextConfig(**_ATT, head_dim=16, sliding_window=16),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256),
        "stablelm": lambda: T.StableLmConfig(**_ATT),
        "olmo2": lambda: T.Olmo2Config(**_ATT),
        "cohere": lambda: T.CohereConfig(**_ATT),
        "gpt-neox": lambda: T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
        "falcon": lambda: T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
        "mixtral": lambda: T.MixtralConfig(**_ATT, num_local_experts=4, **_MOE),
        "qwen3-moe": lambda: T.Qwen3MoeConfig(**_ATT, head_dim=16, moe_intermediate_size=32, num_experts=4, **_MOE),
        "qwen2-moe": lambda: T.Qwen2MoeConfig(**_ATT, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4, **_MOE),
        "gpt-oss": lambda: T.GptOssConfig(**_ATT, head_dim=16, num_local_experts=4, **_MOE),
    }


FAMILIES: tuple[str, ...] = ("llama", "llama-untied", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "gpt2", "stablelm",
                             "olmo2", "cohere", "gpt-neox", "opt", "falcon", "mixtral", "qwen3-moe", "qwen2-moe", "gpt-oss")
DENSE: tuple[str, ...] = FAMILIES[:15]
MOE: tuple[str, ...] = FAMILIES[15:]

#: A target subset per family: the attention's query and value projections.
SUBSET: dict[str, tuple[str, ...]] = {
    **{f: ("q_proj", "v_proj") for f in FAMILIES},
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
    "gpt-neox": ("query_key_value",),
    "falcon": ("query_key_value",),
}

#: Families prepare refuses, and a regex of the refusal: Falcon's FalconLinear is not converted to 4-bit by
#: transformers' bitsandbytes loader.
REFUSED: dict[str, str] = {
    "falcon": r"FalconLinear.*does not convert to 4-bit",
}


def config(family: str):
    """The tiny config of ``family`` (hidden 64, 2 blocks, vocabulary of :data:`qcorda.testing.tiny.VOCAB`)."""
    c = _configs()[family]()
    c.vocab_size, c.pad_token_id, c.bos_token_id, c.eos_token_id = tiny.VOCAB, 0, 1, 2
    return c


def model(family: str, seed: int = 0):
    """A tiny random fp32 model of ``family``, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(family), dtype=torch.float32)
    return m.eval()


def save(directory: str | Path, family: str, seed: int = 0) -> Path:
    """``directory/tiny-FAMILY``: the model (``save_pretrained``) and the tiny tokenizer."""
    path = Path(directory) / f"tiny-{family}"
    model(family, seed).save_pretrained(path)
    tiny.tokenizer().save_pretrained(path)
    return path


def to_mxfp4(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, scales)``: MXFP4 of a stack of expert matrices ``(E, in, out)`` as GPT-OSS's release stores them
    (:data:`qcorda.checkpoint.MXFP4`): per output row, each run of 32 inputs shares a power-of-two scale (uint8,
    exponent + 127) chosen so that the run's largest magnitude fits FP4's 6, and each value is the nearest of FP4's
    16 codes, two codes a byte (the even position in the low nibble)."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    W = stacked.float().transpose(1, 2)  # (E, out, in)
    E, out, inp = W.shape
    runs = W.reshape(E, out, inp // 32, 32)
    exp = torch.ceil(torch.log2(runs.abs().amax(-1).clamp_min(2.0**-100) / 6.0)).clamp(-127, 127)
    codes = (runs / torch.exp2(exp)[..., None])[..., None].sub(torch.tensor(FP4_VALUES)).abs().argmin(-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def save_mxfp4(directory: str | Path, seed: int = 0) -> Path:
    """``directory/tiny-gpt-oss-mxfp4``: the tiny GPT-OSS as its released checkpoints are stored: the experts in
    MXFP4 (:func:`to_mxfp4`) and ``quantization_config`` ``{"quant_method": "mxfp4"}``, the rest as saved."""
    import json

    from safetensors.torch import load_file, save_file

    path = Path(directory) / "tiny-gpt-oss-mxfp4"
    model("gpt-oss", seed).save_pretrained(path)
    tiny.tokenizer().save_pretrained(path)
    tensors = {}
    for k, v in load_file(str(path / "model.safetensors")).items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[k + "_blocks"], tensors[k + "_scales"] = to_mxfp4(v)
        else:
            tensors[k] = v
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def load_invariant(prepared: str | Path, original: torch.nn.Module, seed: int = 0) -> dict:
    """How exactly plain transformers + PEFT load a prepared directory, against the ``original`` fp32 model
    (a mixture of experts is unfused in place, :func:`qcorda.experts.unfuse`).

    Loads ``prepared`` with ``from_pretrained`` and ``PeftModel.from_pretrained`` (``adapter_init``): of
    qcorda only the class, ``AutoModelForCausalLM`` itself or, for a mixture of experts, the unfused one
    (:func:`qcorda.experts.loader_class`), and for every target and base layer of ``qcorda.json`` feeds a
    random x ``(3, in_features)``. Returns ``max_abs_diff``: max |layer(x) − x·W_effᵀ − b| with W_eff =
    deq(codes) + s·B·A (targets) or deq(codes) (base layers), codes and B, A read from the files;
    ``max_err_gap``: max relative gap between ‖W − W_eff‖²_F and the error ``qcorda.json`` records;
    ``base_is_nf4_of_w``: every base layer's codes dequantize to NF4(W) exactly; ``not_4bit``: block
    Linears (routers aside) not loaded as ``Linear4bit``; ``skip_exact``: config.json's
    ``llm_int8_skip_modules`` is exactly the Linear modules not stored in NF4."""
    import json

    from peft import PeftModel
    from transformers import AutoConfig

    from ..checkpoint import Checkpoint
    from ..experts import loader_class, unfuse
    from ..merge import stored_nf4
    from ..quantize import dequantize_nf4, nf4_roundtrip
    from ..targets import in_block, is_linear, is_router, weight_of

    prepared = Path(prepared)
    manifest = json.loads((prepared / "qcorda.json").read_text())
    targets, base = manifest["targets"], manifest["storage"]["base_nf4"]
    s = manifest["config"]["lora_alpha"] / manifest["config"]["rank"]
    unfuse(original)
    cls = loader_class(AutoConfig.from_pretrained(str(prepared)))
    model = PeftModel.from_pretrained(cls.from_pretrained(str(prepared)), str(prepared / "adapter_init")).train()
    inner = model.base_model.model
    codes, init = Checkpoint(prepared), Checkpoint(prepared / "adapter_init", "adapter_model")
    errs = {l["name"]: l["err"] for l in manifest["layers"]}
    g = torch.Generator().manual_seed(seed)
    diff, gap, exact = 0.0, 0.0, True
    for name in targets + base:
        layer = inner.get_submodule(name)
        base_layer = layer.get_base_layer() if name in targets else layer
        W = weight_of(original.get_submodule(name)).detach().float()
        W_eff = dequantize_nf4(stored_nf4(codes, name)).float()
        if name in targets:
            B, A = (init.get(f"base_model.model.{name}.lora_{k}.weight") for k in "BA")
            W_eff = W_eff + s * B @ A
            gap = max(gap, abs((W - W_eff).pow(2).sum().item() - errs[name]) / max(errs[name], 1e-30))
        else:
            exact &= torch.equal(W_eff, nf4_roundtrip(W))
        x = torch.randn(3, W_eff.shape[1], generator=g)
        with torch.no_grad():
            y = layer(x).float()
        ref = x @ W_eff.T + (0 if base_layer.bias is None else base_layer.bias.float())
        diff = max(diff, (y - ref).abs().max().item())
    linears = {n for n, m in original.named_modules() if is_linear(m)}
    loaded = {n: type(m).__name__ for n, m in inner.named_modules()}
    not_4bit = sorted(n for n in linears if in_block(n) and not is_router(n)
                      and loaded.get(n) != "Linear4bit" and loaded.get(f"{n}.base_layer") != "Linear4bit")
    skip = json.loads((prepared / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    return {"max_abs_diff": diff, "max_err_gap": gap, "base_is_nf4_of_w": exact, "not_4bit": not_4bit,
            "skip_exact": set(skip) == linears - set(targets) - set(base), "nf4_fraction": manifest["storage"]["nf4_fraction"]}
