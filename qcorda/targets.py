"""Which modules get an adapter: patterns → module names, and their weights as (out, in).

Patterns: ``all-linear`` (every Linear/Conv1D inside the decoder blocks, lm_head and
routers excluded), exact names, suffixes (``q_proj`` matches ``model.layers.0.self_attn.q_proj``),
globs (``*.mlp.*``) and regexes (``re:.*\\.(q|v)_proj``).

:func:`storage_plan` decides how every block weight is stored: the targets and every other
block Linear in NF4 (as QLoRA, the whole base is 4-bit), the rest in full precision, each with
its reason, and the exact list of Linear modules the bitsandbytes loader must leave alone.
"""

from __future__ import annotations

import fnmatch
import re
import zlib
from dataclasses import dataclass

import torch

from .config import ConfigError
from .experts import is_expert

_BLOCK = re.compile(r"\.\d+\.")  # decoder blocks live in a ModuleList: "...layers.3.mlp..."


def is_linear(module: torch.nn.Module) -> bool:
    """nn.Linear (bitsandbytes' Linear4bit included) or GPT-2's Conv1D."""
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


#: Routers and gates pick experts (Mixtral's ``gate``, Qwen2-MoE's 1×hidden ``shared_expert_gate``,
#: GPT-OSS's ``router``): never default targets, never quantized (a small error flips the routing).
_ROUTER = re.compile(r"(^|\.)(gate|router|[a-z_]*_gate)$")
#: Below this fraction of the block weights' bytes in NF4, prepare refuses (unless the user names what to keep).
MIN_NF4_FRACTION = 0.9


def is_router(name: str) -> bool:
    """``name`` is a router or gate module (``...mlp.gate``, ``...shared_expert_gate``), not ``gate_proj``."""
    return _ROUTER.search(name) is not None


def in_block(name: str) -> bool:
    """``name`` lives inside a decoder block (a ModuleList entry: ``...layers.3...``)."""
    return _BLOCK.search("." + name + ".") is not None


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
    in_blocks = [n for n, _ in linears if in_block(n) and not is_router(n)]
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


def matches_any(name: str, patterns) -> bool:
    """``name`` is selected by one of ``patterns`` (the target-pattern syntax)."""
    return any(_matches(name, p) for p in patterns)


def check_loadable(model: torch.nn.Module, names: list[str]) -> None:
    """Refuse modules that transformers' bitsandbytes loader does not convert to 4-bit.

    ``replace_with_bnb_linear`` converts ``type(m) is nn.Linear`` and Conv1D only: a subclass
    such as Falcon's ``FalconLinear`` stays a 16-bit Linear when the prepared directory is loaded,
    and its packed NF4 bytes do not fit it (a size mismatch), so such a directory loads nowhere."""
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear and type(m).__name__ not in ("Linear4bit", "LinearNF4"):
            raise ConfigError(
                f"layer {name} is a {type(m).__name__}, a subclass of nn.Linear that transformers' bitsandbytes loader "
                "does not convert to 4-bit (it converts nn.Linear and Conv1D only), so a prepared directory of this "
                f"model ({type(model).__name__}) would load in no library; qcorda cannot prepare it"
            )


@dataclass(frozen=True)
class StoragePlan:
    """How every block weight of a model is stored (``qcorda.json``'s ``storage``).

    Block weights: the parameters of two or more dimensions inside the decoder blocks (Linear
    weights, fused 3-D expert tensors, routers). Bytes are counted at the model's dtype."""

    targets: tuple[str, ...]
    """Modules with an adapter: residual in NF4 (+ double quantization, blocksize 64)."""
    base: tuple[str, ...]
    """Other block Linear modules: W itself in NF4, no adapter (QLoRA's 4-bit base)."""
    full_precision: tuple[tuple[str, str], ...]
    """``(parameter name, reason)`` of every block weight left in full precision."""
    skip_modules: tuple[str, ...]
    """Every Linear module not stored in NF4 (lm_head included): config.json's ``llm_int8_skip_modules``."""
    nf4_bytes: int
    block_bytes: int
    expert_nf4_bytes: int = 0
    expert_bytes: int = 0
    """The experts' share of ``nf4_bytes`` and ``block_bytes`` (per-expert layers, :func:`qcorda.experts.is_expert`,
    and fused 3-D expert tensors); 0 in a dense model."""

    @property
    def nf4_fraction(self) -> float:
        return self.nf4_bytes / self.block_bytes if self.block_bytes else 1.0

    def to_json(self) -> dict:
        experts = {"experts": {"nf4_fraction": self.expert_nf4_bytes / self.expert_bytes, "nf4_bytes": self.expert_nf4_bytes,
                               "bytes": self.expert_bytes}} if self.expert_bytes else {}
        return {"nf4_fraction": self.nf4_fraction, "nf4_bytes": self.nf4_bytes, "block_bytes": self.block_bytes, **experts,
                "base_nf4": list(self.base), "full_precision": [{"name": n, "reason": r} for n, r in self.full_precision],
                "skip_modules": list(self.skip_modules)}


def storage_plan(model: torch.nn.Module, targets: list[str], keep: tuple[str, ...] = (), quantized: bool = True,
                 flag: str = "--keep-full-precision") -> StoragePlan:
    """The :class:`StoragePlan` of ``model`` with ``targets`` and the keep patterns ``keep``.

    ``quantized`` False (a 16-bit base, the ``lora`` baseline): nothing is NF4. Refuses a plan
    that stores under :data:`MIN_NF4_FRACTION` of the block bytes in NF4 unless every weight left
    in full precision, routers aside, is named by ``keep``; refuses keep patterns that select a target."""
    target_set = set(targets)
    hit = [t for t in targets if matches_any(t, keep)]
    if hit:
        raise ConfigError(f"{flag}: selects target {hit[0]}, whose residual is always NF4; narrow the pattern or leave "
                          "that layer out of --target-modules")
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base, full, skip = [], [], []
    matchable: list[str] = []  # what keep is matched against: every Linear's name, every block weight's module and full name
    weights: list[str] = []  # the block weights' module names, the first one an example in the error below
    nf4 = total = expert_nf4 = expert_total = 0
    for name, m in model.named_modules():
        if is_linear(m):
            matchable.append(name)
            stored = quantized and name not in target_set and in_block(name) and not is_router(name) \
                and not matches_any(name, keep) and m is not out_emb
            if stored:
                base.append(name)
            if name not in target_set and not stored or not quantized:
                skip.append(name)
        if not in_block(name):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() < 2:
                continue
            full_name, size = f"{name}.{pname}", p.numel() * p.element_size()
            matchable += [name, full_name]
            weights.append(name)
            total += size
            expert = is_expert(name) or (p.dim() == 3 and name.rsplit(".", 1)[-1] == "experts")
            expert_total += size if expert else 0
            if quantized and is_linear(m) and pname == "weight" and (name in target_set or name in base):
                nf4 += size
                expert_nf4 += size if expert else 0
                continue
            if not quantized:
                reason = "the method keeps a 16-bit base"
            elif matches_any(name, keep) or matches_any(full_name, keep):
                reason = f"{flag}"
            elif is_router(name):
                reason = "router/gate: picks the experts, kept in full precision"
            elif not is_linear(m):
                reason = (f"{p.dim()}-D parameter of {type(m).__name__}: fused experts are not stored in NF4 by this "
                          "qcorda version" if p.dim() == 3 else f"parameter of {type(m).__name__}, not a Linear layer")
            else:
                reason = "not a weight of a Linear layer"
            full.append((full_name, reason))
    idle = [pat for pat in keep if not any(matches_any(n, (pat,)) for n in matchable)]
    if idle:  # a typo would otherwise be recorded as kept while everything is NF4
        raise ConfigError(f"{flag}: {idle[0]!r} selects no Linear layer or block weight of the model; patterns match "
                          f"as --target-modules does (a layer name's suffix, or a glob such as '*.mlp.*'), e.g. "
                          f"{weights[0] if weights else ''!r}")
    plan = StoragePlan(tuple(targets), tuple(base), tuple(full), tuple(skip), nf4, total, expert_nf4, expert_total)
    unnamed = [(n, r) for n, r in full if r != flag and not r.startswith("router")]
    if quantized and plan.nf4_fraction < MIN_NF4_FRACTION and unnamed:
        raise ConfigError(
            f"only {plan.nf4_fraction:.1%} of the block weights' bytes would be stored in NF4 (below "
            f"{MIN_NF4_FRACTION:.0%}); left in full precision: {unnamed[0][0]} ({unnamed[0][1]})"
            + (f" and {len(unnamed) - 1} more" if len(unnamed) > 1 else "")
            + f". A 4-bit run would need far more GPU memory than planned; pass {flag} PATTERN naming what to keep "
            "in full precision if that is what you want"
        )
    return plan


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
