"""PEFT LoRA adapters on disk: reading one, checking it belongs to a prepared model, writing one.

A saved adapter computes, per target layer ``(out_features, in_features)``, s·B·A with
B ``(out, r)``, A ``(r, in)`` and s = α/r (α/√r under rsLoRA; ``rank_pattern`` / ``alpha_pattern``
resolved as PEFT does). A DoRA adapter also holds a magnitude m ``(out,)``, and its layer computes
W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ row by row (:func:`dense_weight`), a full-rank change no plain
LoRA expresses (:func:`plain_lora_refusal`). ``merge`` merges both kinds; ``to-lora`` converts LoRA only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import ADAPTER_PREFIX, Checkpoint
from .config import ConfigError
from .prepared import OWNER_KEY, TRAIN_MARKER, manifest_sha256

ADAPTER_HINT = "it is corrupted: train or copy the adapter again"
_UNSUPPORTED = {
    "modules_to_save": "modules_to_save",
    "lora_bias": "lora_bias",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
}


@dataclass(frozen=True)
class AdapterSpec:
    """What a saved PEFT LoRA (or DoRA) adapter computes, read lazily layer by layer."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    """Module names that carry lora_A / lora_B in the adapter's weights."""

    def rank(self, name: str) -> int:
        from peft.utils.other import get_pattern_key

        return int(self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), name), self.r))

    def alpha(self, name: str) -> float:
        from peft.utils.other import get_pattern_key

        return float(self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), name), self.lora_alpha))

    def scaling(self, name: str) -> float:
        """s = α/r, or α/√r with rsLoRA, exactly as PEFT's ``LoraLayer.update_layer``."""
        r = self.rank(name)
        return self.alpha(name) / (math.sqrt(r) if self.use_rslora else r)

    def _reader(self) -> Checkpoint:
        return Checkpoint(self.path, "adapter_model", "--adapter", ADAPTER_HINT)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B ``(out, r)``, A ``(r, in)``) of layer ``name`` in fp32."""
        reader, key = self._reader(), f"{ADAPTER_PREFIX}{name}"
        return reader.get(f"{key}.lora_B.weight").float(), reader.get(f"{key}.lora_A.weight").float()

    def magnitude(self, name: str) -> torch.Tensor | None:
        """DoRA's magnitude m ``(out_features,)`` of layer ``name`` in fp32, or None for a plain LoRA."""
        return self._reader().get(f"{ADAPTER_PREFIX}{name}.lora_magnitude_vector").float() if self.use_dora else None

    def dense(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The weight layer ``name`` computes with over ``base`` ``(out, in)`` (the dequantized residual), fp32."""
        B, A = self.factors(name)
        return dense_weight(base, A, B, self.scaling(name), self.magnitude(name))


def dense_weight(base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight ``(out_features, in_features)`` of a LoRA or DoRA layer, in fp32.

    LoRA: W' = W + s·B·A. DoRA (``magnitude`` m ``(out_features,)``), PEFT's formula:
    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm over ``in_features`` for each output row
    (PEFT's ``get_weight_norm``; the DoRA paper's column norm of Wᵀ).
    """
    W = base.float() + scaling * (B.float() @ A.float())
    if magnitude is None:
        return W
    return (magnitude.float() / torch.linalg.norm(W, dim=1)).unsqueeze(1) * W


def plain_lora_refusal(adapter) -> str | None:
    """Why ``adapter`` cannot be written as a plain LoRA on the same base (DoRA), or None.

    ``adapter``: a PEFT ``LoraConfig``, an ``adapter_config.json`` dict, or an adapter directory."""
    if isinstance(adapter, (str, Path)):
        path = Path(adapter)
        adapter = json.loads((path / "adapter_config.json" if path.is_dir() else path).read_text())
    get = adapter.get if isinstance(adapter, dict) else lambda k, d=None: getattr(adapter, k, d)
    if get("use_dora", False):
        return (
            "the adapter is DoRA (use_dora): its magnitude vector rescales every output row of W, "
            "a full-rank change that no plain LoRA B·A can express; use `qcorda merge` to get a dense model instead"
        )
    if get("peft_type", "LORA") not in ("LORA", None):
        return f"the adapter is {get('peft_type')}, not LoRA"
    return None


def read_adapter(path: str | Path, flag: str = "--adapter") -> AdapterSpec:
    """The config and layers of a saved adapter; anything qcorda cannot represent exactly is refused."""
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        raise ConfigError(f"{flag} {path}: not a PEFT adapter directory (no adapter_config.json)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{flag} {path}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ConfigError(f"{flag} {path}: adapters with {what} are not supported by merge/to-lora; train a plain LoRA adapter")
    reader = Checkpoint(path, "adapter_model", flag, ADAPTER_HINT)
    dora = bool(cfg.get("use_dora", False))
    layers = []
    for k in reader.keys():
        if k.endswith(".lora_A.weight"):
            layers.append(k.removeprefix(ADAPTER_PREFIX).removesuffix(".lora_A.weight"))
        elif not (k.endswith(".lora_B.weight") or (dora and k.endswith(".lora_magnitude_vector"))):
            raise ConfigError(f"{flag} {path}: unexpected tensor {k} in the adapter; only lora_A / lora_B (and DoRA's magnitude) can be merged")
    return AdapterSpec(
        path=path, r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]), use_rslora=bool(cfg.get("use_rslora", False)),
        use_dora=dora, rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        layers=tuple(layers),
    )


def check_adapter(prepared: str | Path, manifest: dict, adapter: AdapterSpec, init: AdapterSpec, flag: str = "--adapter") -> None:
    """Refuse an adapter that was not trained from ``prepared``.

    Checks the ownership marker written by ``qcorda train`` when the adapter has one, then that
    the adapter adapts exactly the prepared targets at the ranks of ``adapter_init``.
    """
    marker = adapter.path / TRAIN_MARKER
    if marker.exists():
        owner = json.loads(marker.read_text()).get(OWNER_KEY)
        if owner is not None and owner != manifest_sha256(prepared):
            raise ConfigError(
                f"{flag} {adapter.path} was trained from another prepared directory (its {TRAIN_MARKER} names "
                f"qcorda.json sha256 {owner[:12]}…, {prepared} has {manifest_sha256(prepared)[:12]}…); "
                "pass the PREPARED directory the adapter was trained from"
            )
    targets, have = set(manifest["targets"]), set(adapter.layers)
    if have != targets:
        extra, missing = sorted(have - targets), sorted(targets - have)
        raise ConfigError(
            f"{flag} {adapter.path} does not match {prepared}: its target modules differ "
            f"(not prepared: {', '.join(extra[:3]) or '-'}; missing: {', '.join(missing[:3]) or '-'}); "
            "pass the adapter trained from this PREPARED directory"
        )
    for name in sorted(targets):
        r, r0 = adapter.rank(name), init.rank(name)
        B, A = adapter.factors(name)
        if r != r0 or B.shape[1] != r or A.shape[0] != r:
            raise ConfigError(
                f"{flag} {adapter.path} does not match {prepared}: layer {name} has rank {B.shape[1]} "
                f"(config r={r}), the prepared adapter_init has r={r0}; pass the adapter trained from this PREPARED directory"
            )
