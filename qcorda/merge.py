"""``qcorda merge``: the trained 4-bit model as one plain 16-bit HF model, never re-quantized.

For every target layer ``(out_features, in_features)``:

    W_merged = cast_dtype( deq(Q(W_res)) + s·B·A )        all of it in fp32, cast once

where deq(Q(W_res)) is bitsandbytes' dequantization of the packed NF4 residual saved by
``qcorda prepare`` and B, A, s come from the trained adapter (s = α/r, or α/√r under
rsLoRA; ``rank_pattern`` / ``alpha_pattern`` resolved as PEFT does). Every other tensor
(embeddings, norms, lm_head, biases) is copied from the prepared directory, cast to the
output dtype. Tensors are read one at a time (safetensors memory maps), so the peak
memory is the output plus one layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import Checkpoint, write_shards
from .config import ConfigError

ADAPTER_PREFIX = "base_model.model."
#: Written by the trainer next to a trained adapter: ``{"prepared_sha256": sha256(qcorda.json bytes)}``.
TRAIN_MARKER = "qcorda_train.json"
VERIFY_FILE = "qcorda_verify.json"
MERGE_FILE = "qcorda_merge.json"
DTYPES = ("float16", "bfloat16", "float32")
ADAPTER_HINT = "it is corrupted: train or copy the adapter again"
PREPARED_HINT = "it is corrupted: run qcorda prepare again"


# --------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class AdapterSpec:
    """What a saved PEFT LoRA adapter computes: per layer, s·B·A with B ``(out, r)``, A ``(r, in)``."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
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

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B ``(out, r)``, A ``(r, in)``) of layer ``name`` in fp32."""
        reader = Checkpoint(self.path, "adapter_model", "--adapter", ADAPTER_HINT)
        key = f"{ADAPTER_PREFIX}{name}"
        return reader.get(f"{key}.lora_B.weight").float(), reader.get(f"{key}.lora_A.weight").float()


def read_adapter(path: str | Path, flag: str = "--adapter") -> AdapterSpec:
    """The LoRA config of a saved adapter; anything merge cannot represent exactly is refused."""
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        raise ConfigError(f"{flag} {path}: not a PEFT adapter directory (no adapter_config.json)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{flag} {path}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    unsupported = {
        "use_dora": "DoRA",
        "modules_to_save": "modules_to_save",
        "lora_bias": "lora_bias",
        "trainable_token_indices": "trainable_token_indices",
        "layer_replication": "layer_replication",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise ConfigError(f"{flag} {path}: adapters with {what} are not supported by merge/to-lora; train a plain LoRA adapter")
    reader = Checkpoint(path, "adapter_model", flag, ADAPTER_HINT)
    layers = []
    for k in reader.keys():
        if k.endswith(".lora_A.weight"):
            layers.append(k.removeprefix(ADAPTER_PREFIX).removesuffix(".lora_A.weight"))
        elif not k.endswith(".lora_B.weight"):
            raise ConfigError(f"{flag} {path}: unexpected tensor {k} in the adapter; only lora_A / lora_B can be merged")
    return AdapterSpec(
        path=path,
        r=int(cfg["r"]),
        lora_alpha=float(cfg["lora_alpha"]),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        layers=tuple(layers),
    )


def manifest_sha256(prepared: str | Path) -> str:
    """sha256 of the prepared directory's ``qcorda.json`` bytes: what an adapter records as its owner."""
    return hashlib.sha256((Path(prepared) / "qcorda.json").read_bytes()).hexdigest()


def check_adapter(prepared: str | Path, manifest: dict, adapter: AdapterSpec, init: AdapterSpec, flag: str = "--adapter") -> None:
    """Refuse an adapter that was not trained from ``prepared``.

    Checks the ownership marker (``qcorda_train.json``: ``prepared_sha256``) when the adapter has
    one, then that it adapts exactly the prepared targets at the ranks of ``adapter_init``.
    """
    marker = adapter.path / TRAIN_MARKER
    if marker.exists():
        owner = json.loads(marker.read_text()).get("prepared_sha256")
        if owner is not None and owner != manifest_sha256(prepared):
            raise ConfigError(
                f"{flag} {adapter.path} was trained from another prepared directory (its {TRAIN_MARKER} names "
                f"qcorda.json sha256 {owner[:12]}…, {prepared} has {manifest_sha256(prepared)[:12]}…); "
                "pass the PREPARED directory the adapter was trained from"
            )
    targets = set(manifest["targets"])
    have = set(adapter.layers)
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


# --------------------------------------------------------------------------- layers


def merged_weight(w_res: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: float) -> torch.Tensor:
    """deq(Q(W_res)) + s·B·A in fp32, ``(out_features, in_features)``."""
    return w_res.float() + s * (B.float() @ A.float())


def quantized_keys(reader, name: str) -> dict[str, torch.Tensor]:
    """The packed weight and bitsandbytes quant-state tensors of target ``name``, keyed without the prefix."""
    prefix = f"{name}.weight."
    return {k[len(prefix):]: reader.get(k) for k in reader.keys() if k.startswith(prefix)}


def quantized_shape(reader, name: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of target ``name``, from its quant state alone."""
    import bitsandbytes.functional as bnbF

    return tuple(bnbF.QuantState.from_dict(quantized_keys(reader, name), device="cpu").shape)


def dequantized(reader, name: str) -> torch.Tensor:
    """deq(Q(W_res)) of target ``name`` as the Linear4bit computes with it, fp32 ``(out, in)``."""
    import bitsandbytes.functional as bnbF

    packed = reader.get(f"{name}.weight")
    state = bnbF.QuantState.from_dict(quantized_keys(reader, name), device=packed.device)
    return bnbF.dequantize_4bit(packed, state).float()


def plain_config(prepared: str | Path, dtype: torch.dtype):
    """The prepared model's config without ``quantization_config``: a plain HF model of ``dtype``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(prepared))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    config.use_cache = True  # prepare turned the cache off for training; a served model wants it
    return config


def plain_layout(config) -> tuple[set[str], set[str]]:
    """(names of GPT-2-style ``Conv1D`` modules, weight stored ``(in, out)``; state-dict keys the
    plain model needs, tied ones left out) from a weightless skeleton of the plain model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    conv1d = {n for n, m in skeleton.named_modules() if type(m).__name__ == "Conv1D"}
    out_emb = skeleton.get_output_embeddings()
    tied = getattr(config, "tie_word_embeddings", False) and out_emb is not None
    skip = {n + ".weight" for n, m in skeleton.named_modules() if tied and m is out_emb}
    return conv1d, {k for k in skeleton.state_dict() if k not in skip}


@dataclass(frozen=True)
class MergedLayer:
    name: str
    shape: tuple[int, int]
    scaling: float
    delta_norm: float
    """‖s·B·A‖_F of the trained adapter."""
    cast_err: float
    """max |W_merged(fp32) − W_merged(dtype)|: the only rounding merge introduces."""


def merged_tensors(prepared: str | Path, adapter: AdapterSpec, dtype: torch.dtype, targets: list[str],
                   on_layer: Callable[[], object] = lambda: None):
    """The plain model's tensors, produced one at a time: ``(specs, produce, layers)``.

    ``specs`` maps each key to a ``meta`` tensor of its final shape and ``dtype``, in the
    prepared checkpoint's order; ``produce(key)`` reads (and for a target, dequantizes and
    merges) that one tensor, appends the target's :class:`MergedLayer` to ``layers`` and calls
    ``on_layer()``. A writer that calls it key by key (:func:`qcorda.checkpoint.write_shards`) holds one
    layer at a time, never the merged model.
    """
    reader = Checkpoint(prepared, "model", "PREPARED", PREPARED_HINT)
    conv1d, needed = plain_layout(plain_config(prepared, dtype))
    target_set = set(targets)
    quant_suffix = tuple(f"{t}.weight." for t in targets)
    specs: dict[str, torch.Tensor] = {}
    for key in reader.keys():
        if key.startswith(quant_suffix):
            continue
        name = key.removesuffix(".weight")
        if name in target_set:
            out_f, in_f = quantized_shape(reader, name)
            shape = (in_f, out_f) if name in conv1d else (out_f, in_f)
            specs[key] = torch.empty(shape, dtype=dtype, device="meta")
        else:
            shape, st_dtype = reader.spec(key)
            specs[key] = torch.empty(shape, dtype=dtype if st_dtype.is_floating_point else st_dtype, device="meta")
    missing = sorted(needed - set(specs))
    if missing:
        raise ConfigError(f"PREPARED {prepared}: the checkpoint lacks {', '.join(missing[:3])}; re-run qcorda prepare")
    layers: list[MergedLayer] = []

    def produce(key: str) -> torch.Tensor:
        name = key.removesuffix(".weight")
        if name not in target_set:
            t = reader.get(key)
            return t.to(dtype) if t.is_floating_point() else t
        B, A = adapter.factors(name)
        s = adapter.scaling(name)
        W = merged_weight(dequantized(reader, name), B, A, s)
        out = W.to(dtype)
        layers.append(MergedLayer(name, tuple(W.shape), s, (s * B @ A).norm().item(), (W - out.float()).abs().max().item()))
        on_layer()
        return (out.T if name in conv1d else out).contiguous()

    return specs, produce, layers


# --------------------------------------------------------------------------- command


@dataclass(frozen=True)
class VerifyConfig:
    """Held-out text on which merged and trained logits are compared."""

    data: str = "gsm8k-test"
    """Bundled alias, file or dataset name. CLI: ``--verify-data``."""
    fields: tuple[str, ...] = ("question", "answer")
    """Record fields joined by the alpaca template (empty: ``text``). CLI: ``--verify-fields``."""
    samples: int = 8
    """Records used. CLI: ``--verify-samples``."""
    max_length: int = 128
    """Tokens per record. CLI: ``--verify-max-length``."""
    batch_size: int = 2
    """Records per forward pass (Gemma's 262k vocabulary costs ~1 MB per token). CLI: ``--verify-batch-size``."""
    template: str = "alpaca"
    """Prompt template. CLI: ``--verify-template``."""

    def __post_init__(self) -> None:
        for flag, v in (("--verify-samples", self.samples), ("--verify-batch-size", self.batch_size)):
            if v <= 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        if self.max_length < 2:
            raise ConfigError(f"--verify-max-length must be at least 2, got {self.max_length}")


@dataclass(frozen=True)
class MergeResult:
    out: Path
    dtype: str
    layers: tuple[MergedLayer, ...]
    agreement: tuple = ()
    seconds: float = 0.0


def resolve_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{flag} must be one of {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, name)


def load_plain(directory: str | Path, dtype: torch.dtype, device: torch.device | None = None):
    """A merged directory loaded by plain transformers (no qcorda, no bitsandbytes involved)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    return model.to(device) if device is not None else model


def merge(
    prepared: str | Path,
    out: str | Path,
    adapter: str | Path | None = None,
    dtype: str = "float16",
    verify: VerifyConfig | None = VerifyConfig(),
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> MergeResult:
    """Write the merged plain HF model to ``out`` (atomically) and, unless ``verify`` is None,
    compare it with the trained 4-bit + adapter model (saved as ``qcorda_verify.json``)."""
    from tqdm.auto import tqdm

    from .io import atomic_dir, check_out_dir
    from .prepare import read_manifest
    from .models import resolve_device

    t0 = time.perf_counter()
    torch_dtype = resolve_dtype(dtype)
    check_out_dir(out, overwrite)
    manifest = read_manifest(prepared)
    prepared = Path(prepared)
    adapter_path = Path(adapter) if adapter is not None else prepared / "adapter_init"
    spec = read_adapter(adapter_path)
    check_adapter(prepared, manifest, spec, read_adapter(prepared / "adapter_init", "PREPARED/adapter_init"))
    targets = list(manifest["targets"])
    with atomic_dir(out, overwrite) as tmp:
        with tqdm(total=len(targets), desc=f"merge -> {dtype}", unit="layer", disable=not progress) as bar:
            specs, produce, layers = merged_tensors(prepared, spec, torch_dtype, targets, bar.update)
            write_shards(tmp, specs, produce, plain_config(prepared, torch_dtype), _generation_config(prepared))
        _copy_tokenizer(prepared, tmp)
        info = {
            "format": "qcorda.merge/1",
            "prepared": str(prepared),
            "prepared_sha256": manifest_sha256(prepared),
            "adapter": str(adapter_path),
            "dtype": dtype,
            "method": manifest["config"]["method"],
            "layers": [asdict(l) for l in layers],
        }
        (tmp / MERGE_FILE).write_text(json.dumps(info, indent=2))
        agreement = ()
        if verify is not None:
            agreement = tuple(verify_merged(prepared, adapter_path, tmp, torch_dtype, verify, resolve_device(device), progress))
            (tmp / VERIFY_FILE).write_text(json.dumps({"config": asdict(verify), "results": [asdict(a) for a in agreement]}, indent=2))
    return MergeResult(Path(out), dtype, tuple(layers), agreement, time.perf_counter() - t0)


def verify_merged(prepared, adapter, merged_dir, dtype, verify: VerifyConfig, device, progress: bool = True):
    """Merged (plain transformers, ``dtype``) against the trained 4-bit + adapter model."""
    from transformers import AutoTokenizer

    from .scoring import held_out_batches, logit_agreement
    from .prepare import load_prepared

    trained = load_prepared(prepared, adapter, is_trainable=False, device=str(device))
    merged = load_plain(merged_dir, dtype, device)
    tok = AutoTokenizer.from_pretrained(str(prepared))
    batches, n = held_out_batches(tok, verify.data, verify.fields, verify.samples, verify.max_length, verify.batch_size, verify.template)
    return logit_agreement({"trained 4-bit+adapter": trained, f"merged {str(dtype).removeprefix('torch.')}": merged},
                   [("trained 4-bit+adapter", f"merged {str(dtype).removeprefix('torch.')}")], batches, progress, n)


def _generation_config(prepared: Path):
    from transformers import GenerationConfig

    if (prepared / "generation_config.json").exists():
        return GenerationConfig.from_pretrained(str(prepared))
    return None


def _copy_tokenizer(prepared: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    if any(prepared.glob("tokenizer*")):
        AutoTokenizer.from_pretrained(str(prepared)).save_pretrained(str(out))
