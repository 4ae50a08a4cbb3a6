"""Synthetic checkpoints and layers: Llama-shaped bf16 checkpoints of any size written shard by shard,
and single weights / covariances with an LLM-like spectrum."""

from __future__ import annotations

import json
from pathlib import Path


def llama_shape(params: float, hidden: int, vocab: int = 32000) -> dict:
    """The Llama shape of about ``params`` parameters at ``hidden``: ``{"params", "layers", "hidden",
    "intermediate", "vocab"}`` (intermediate = 2.7·hidden rounded down to 256, untied embeddings)."""
    inter = int(hidden * 2.7) // 256 * 256
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return {"params": layers * per_layer + 2 * vocab * hidden + hidden, "layers": layers, "hidden": hidden,
            "intermediate": inter, "vocab": vocab}


def write_synthetic_llama(out: str | Path, params: float, hidden: int, tokenizer=None, seed: int = 0) -> dict:
    """Write a Llama-shaped bf16 checkpoint of about ``params`` parameters into the new directory ``out``,
    one safetensors shard per decoder block (the writer never holds the model either), weights
    N(0, 0.02²) from ``seed``, norms 1. ``tokenizer``: an object with ``save_pretrained`` whose files go
    beside it (default: Gemma-3-270M's files, which needs that model cached). Returns :func:`llama_shape`
    plus ``bf16_gb``, the shards' size on disk."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    shape = llama_shape(params, hidden)
    h, inter, vocab, layers = shape["hidden"], shape["intermediate"], shape["vocab"], shape["layers"]
    out = Path(out)
    out.mkdir(parents=True)
    LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=h // 128,
                num_key_value_heads=h // 128, vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16").save_pretrained(out)
    if tokenizer is None:
        from qcorda.models import resolve_model_path

        gemma = Path(resolve_model_path("gemma-3-270m"))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(gemma / f, out / f)
    else:
        tokenizer.save_pretrained(out)
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    def ones():
        return torch.ones(h, dtype=torch.bfloat16)

    def block(i: int) -> dict:
        if i < 0:
            return {"model.embed_tokens.weight": rnd(vocab, h), "lm_head.weight": rnd(vocab, h), "model.norm.weight": ones()}
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(h, h),
                p + "self_attn.v_proj.weight": rnd(h, h), p + "self_attn.o_proj.weight": rnd(h, h),
                p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
                p + "mlp.down_proj.weight": rnd(h, inter),
                p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones()}

    weight_map = {}
    for j, i in enumerate(range(-1, layers)):
        sd = block(i)
        name = f"model-{j + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(sd, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sd, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {**shape, "bf16_gb": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9}


def synthetic_weight(out_f: int, in_f: int, seed: int):
    """A ``(out_f, in_f)`` fp32 weight with a decaying spectrum (σ_k ∝ k^-0.7 over 256 directions, as in
    trained LLM layers) plus a noise floor."""
    import torch

    g = torch.Generator().manual_seed(seed)
    k = 256
    decay = torch.arange(1, k + 1, dtype=torch.float32).pow(-0.7)
    W = (torch.randn(out_f, k, generator=g) * decay) @ torch.randn(k, in_f, generator=g) / k**0.5
    return W + 0.02 * torch.randn(out_f, in_f, generator=g) / in_f**0.5


def synthetic_cov(in_f: int, seed: int):
    """An ``(in_f, in_f)`` covariance XᵀX/n of 1024 anisotropic random activations (scales 0.2 … 3.0)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(1024, in_f, generator=g) * torch.linspace(0.2, 3.0, in_f)
    return X.T @ X / 1024
