"""Which modules get an adapter: patterns → module names, and their weights as (out, in).

Patterns: ``all-linear`` (every Linear/Conv1D inside the decoder blocks, lm_head
excluded), exact names, suffixes (``q_proj`` matches ``model.layers.0.self_attn.q_proj``),
globs (``*.mlp.*``) and regexes (``re:.*\\.(q|v)_proj``).
"""

from __future__ import annotations

import fnmatch
import re
import zlib

import torch

from .config import ConfigError

_BLOCK = re.compile(r"\.\d+\.")  # decoder blocks live in a ModuleList: "...layers.3.mlp..."


def is_linear(module: torch.nn.Module) -> bool:
    """nn.Linear (bitsandbytes' Linear4bit included) or GPT-2's Conv1D."""
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """The weight as ``(out_features, in_features)``; Conv1D stores ``(in, out)``."""
    w = module.weight
    return w.T if type(module).__name__ == "Conv1D" else w


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: torch.nn.Module, patterns: tuple[str, ...] | list[str], flag: str = "--target-modules") -> list[str]:
    """Names of the Linear/Conv1D modules that ``patterns`` select, in model order."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [
        (n, m) for n, m in model.named_modules() if is_linear(m) and m is not out_emb and not n.endswith("lm_head")
    ]
    in_blocks = [n for n, _ in linears if _BLOCK.search("." + n + ".")]
    names: list[str] = []
    for p in patterns:
        hits = in_blocks if p == "all-linear" else [n for n, _ in linears if _matches(n, p)]
        if not hits:
            kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
            raise ConfigError(
                f"{flag}: pattern {p!r} matches no Linear layer; available names end in {', '.join(kinds)} "
                "(or use all-linear)"
            )
        names.extend(h for h in hits if h not in names)
    order = {n: i for i, (n, _) in enumerate(linears)}
    return sorted(names, key=order.__getitem__)


def check_rank(model: torch.nn.Module, targets: list[str], rank: int, flag: str = "--rank") -> None:
    """A rank above min(out, in) of any target is an error that names the layer."""
    for name in targets:
        out_f, in_f = weight_of(model.get_submodule(name)).shape
        if rank > min(out_f, in_f):
            raise ConfigError(
                f"{flag} {rank} exceeds min(out, in) = {min(out_f, in_f)} of layer {name} ({out_f}x{in_f}); "
                f"use {flag} {min(out_f, in_f)} or less, or leave that layer out of --target-modules"
            )


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed independent of the order layers are processed in (resume-safe)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
