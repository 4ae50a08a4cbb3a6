"""``qcorda merge``: the trained 4-bit model as one plain 16-bit HF model, never re-quantized.

For every target layer ``(out_features, in_features)``:

    W_merged = cast_dtype( deq(Q(W_res)) + s·B·A )        all of it in fp32, cast once

where deq(Q(W_res)) is bitsandbytes' dequantization of the packed NF4 residual saved by
``qcorda prepare`` and B, A, s come from the trained adapter (s = α/r, or α/√r under
rsLoRA; ``rank_pattern`` / ``alpha_pattern`` resolved as PEFT does; :mod:`qcorda.adapters`).
A DoRA adapter (``qdora``) merges as m ⊙ (deq(Q(W_res)) + s·B·A) / ‖·‖ row by row. Every other tensor
(embeddings, norms, lm_head, biases) is copied from the prepared directory, cast to the
output dtype. Tensors are read one at a time (safetensors memory maps), so the peak
memory is the output plus one layer.

A mixture of experts (prepared with one layer per expert, :mod:`qcorda.experts`) is written as its
checkpoints are on disk: one 2-D tensor per expert under the architecture's own names (Mixtral's
``block_sparse_moe.experts.{e}.w1.weight``), which plain transformers loads, fusing them as usual.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .adapters import AdapterSpec, check_adapter, read_adapter
from .checkpoint import Checkpoint, disk_names, write_shards
from .config import ConfigError, MergeConfig, VerifyConfig
from .decompose import matmul_precision
from .experts import UnfusedExperts, stack_stored, unfuse
from .io import atomic_dir, check_out_dir
from .prepared import ADAPTER_INIT, device_map, load_prepared, manifest_sha256, read_manifest
from .quantize import NF4Weight, dequantize_nf4, nf4_from_state_dict
from .scoring import held_out_batches, logit_agreement

VERIFY_FILE = "qcorda_verify.json"
MERGE_FILE = "qcorda_merge.json"
PREPARED_HINT = "it is corrupted: run qcorda prepare again"
#: The key suffix bitsandbytes saves beside every 4-bit NF4 weight (``<module>.weight`` + this).
NF4_STATE = ".weight.quant_state.bitsandbytes__nf4"


# --------------------------------------------------------------------------- layers


def stored_nf4(reader: Checkpoint, name: str) -> NF4Weight | None:
    """The NF4 residual of target ``name`` as saved in a prepared checkpoint (packed bytes + quant
    state), or None when the target is stored unquantized (the ``lora`` baseline's 16-bit base)."""
    prefix = f"{name}.weight."
    state = {k[len(prefix):]: reader.get(k) for k in reader.keys() if k.startswith(prefix)}
    return nf4_from_state_dict(reader.get(f"{name}.weight"), state) if state else None


def dequantized(reader: Checkpoint, name: str) -> torch.Tensor:
    """The base weight target ``name`` computes with, fp32 ``(out, in)``: deq(Q(W_res)) as the
    Linear4bit has it, or the stored 16-bit weight."""
    q = stored_nf4(reader, name)
    return dequantize_nf4(q).float() if q is not None else reader.get(f"{name}.weight").float()


def plain_config(prepared: str | Path, dtype: torch.dtype):
    """The prepared model's config without ``quantization_config``: a plain HF model of ``dtype``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(prepared))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    config.use_cache = True  # prepare turned the cache off for training; a served model wants it
    return config


def plain_skeleton(config):
    """A weightless plain model of ``config``, its experts unfused: one 2-D tensor each, as the checkpoint stores
    them on disk (transformers fuses them when it loads)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    unfuse(skeleton)
    return skeleton


def plain_layout(skeleton) -> tuple[set[str], set[str]]:
    """(names of GPT-2-style ``Conv1D`` modules, weight stored ``(in, out)``; state-dict keys the
    plain model needs, tied ones left out, per-expert ones as the checkpoint stores them) from the weightless
    :func:`plain_skeleton` of the plain model."""
    config = skeleton.config
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
    """‖W_merged − deq(Q(W_res))‖_F: what the trained adapter adds (‖s·B·A‖_F for a LoRA)."""
    cast_err: float
    """max |W_merged(fp32) − W_merged(dtype)|: the only rounding merge introduces."""


def merged_tensors(prepared: str | Path, adapter: AdapterSpec, skeleton, targets: list[str],
                   on_layer: Callable[[], object] = lambda: None):
    """The plain model's tensors in its ``skeleton``'s dtype (:func:`plain_skeleton`), produced one at a time:
    ``(specs, produce, layers)``.

    ``specs`` maps each key to a ``meta`` tensor of its final shape and ``dtype``, in the
    prepared checkpoint's order; ``produce(key)`` reads (and for a target, dequantizes and
    merges) that one tensor, appends the target's :class:`MergedLayer` to ``layers`` and calls
    ``on_layer()``. A writer that calls it key by key (:func:`qcorda.checkpoint.write_shards`) holds one
    layer at a time, never the merged model.
    """
    reader = Checkpoint(prepared, "model", "PREPARED", PREPARED_HINT)
    dtype = skeleton.config.dtype
    conv1d, needed = plain_layout(skeleton)
    target_set = set(targets)
    # every Linear4bit of the prepared base: the targets' residuals and the other block Linears' NF4(W)
    nf4 = {k.removesuffix(NF4_STATE) for k in reader.keys() if k.endswith(NF4_STATE)}
    quant_suffix = tuple(f"{t}.weight." for t in target_set | nf4)
    specs: dict[str, torch.Tensor] = {}
    for key in reader.keys():
        if key.startswith(quant_suffix):
            continue
        name = key.removesuffix(".weight")
        q = stored_nf4(reader, name) if name in target_set or name in nf4 else None
        if q is not None:
            out_f, in_f = q.quant_state.shape
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
        if name in nf4 and name not in target_set:  # a 4-bit base layer without adapter: deq(Q(W)), in fp32, cast once
            W = dequantized(reader, name).to(dtype)
            return (W.T if name in conv1d else W).contiguous()
        if name not in target_set:
            t = reader.get(key)
            return t.to(dtype) if t.is_floating_point() else t
        base = dequantized(reader, name)
        if name in conv1d and stored_nf4(reader, name) is None:
            base = base.T  # a 16-bit Conv1D keeps its (in, out) layout; Linear4bit holds (out, in)
        W = adapter.dense(name, base)  # deq(Q(W_res)) + s·B·A, or DoRA's m ⊙ (·)/‖·‖
        out = W.to(dtype)
        layers.append(MergedLayer(name, tuple(W.shape), adapter.scaling(name), (W - base).norm().item(), (W - out.float()).abs().max().item()))
        on_layer()
        return (out.T if name in conv1d else out).contiguous()

    return specs, produce, layers


def on_disk(skeleton, specs: dict, produce: Callable):
    """``(specs, produce)`` keyed as the architecture's checkpoints are on disk, for a mixture of experts
    (:func:`qcorda.checkpoint.disk_names`: Mixtral's experts as ``block_sparse_moe.experts.{e}.w1``, what
    ``save_pretrained`` writes; GPT-OSS's stacked back into 3-D tensors, :func:`qcorda.experts.stack_stored`);
    a dense model's keys are left as they are. ``skeleton``: the :func:`plain_skeleton` of the plain model."""
    if not any(isinstance(m, UnfusedExperts) for m in skeleton.modules()):
        return specs, produce
    specs, produce = stack_stored(skeleton, specs, produce)  # GPT-OSS stores its experts fused
    names = disk_names(skeleton, specs)
    model_key = {names[k]: k for k in specs}
    return {names[k]: v for k, v in specs.items()}, lambda key: produce(model_key[key])


# --------------------------------------------------------------------------- command


@dataclass(frozen=True)
class ExportResult:
    """What an export (``merge``, ``to-lora``) wrote, per layer, and how it agrees with the trained model."""

    out: Path
    kind: str
    """The merged dtype (merge) or the conversion mode (to-lora)."""
    layers: tuple
    """:class:`MergedLayer` or :class:`qcorda.to_lora.ConvertedLayer` per target."""
    agreement: tuple = ()
    """:class:`qcorda.scoring.Agreement` of each verified pair."""
    seconds: float = 0.0


def verification(cfg) -> VerifyConfig | None:
    """The held-out text of ``cfg`` (a :class:`MergeConfig` / :class:`ToLoraConfig`), or None when
    ``cfg.verify`` is off. The default fields belong to the default data: other data reads its own
    (text, or the only field)."""
    if not cfg.verify:
        return None
    v = cfg.verification
    if v.data != VerifyConfig.data and v.fields == VerifyConfig.fields:
        return replace(v, fields=())
    return v


def load_plain(directory: str | Path, dtype: torch.dtype | str = "auto", device: str | torch.device | None = None):
    """A merged (or any plain HF) directory loaded by plain transformers (no qcorda, no bitsandbytes
    involved), straight onto ``device`` (default CUDA when present) in ``dtype`` (default: as stored)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, device_map=device_map(device))


def merge(prepared: str | Path, out: str | Path, cfg: MergeConfig = MergeConfig(), *, adapter: str | Path | None = None,
          overwrite: bool = False, progress: bool = True) -> ExportResult:
    """Write the merged plain HF model of ``prepared`` + ``adapter`` (default ``adapter_init``) to ``out``
    (atomically) in ``cfg.dtype`` and, when ``cfg.verify``, compare it with the trained 4-bit + adapter
    model on ``cfg.verification``'s held-out text (saved as ``qcorda_verify.json``)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    torch_dtype = getattr(torch, cfg.dtype)
    check_out_dir(out, overwrite)
    manifest = read_manifest(prepared)
    prepared = Path(prepared)
    adapter_path = Path(adapter) if adapter is not None else prepared / ADAPTER_INIT
    spec = read_adapter(adapter_path)
    check_adapter(prepared, manifest, spec, read_adapter(prepared / ADAPTER_INIT, "PREPARED/adapter_init"))
    targets = list(manifest["targets"])
    verify = verification(cfg)
    with atomic_dir(out, overwrite) as tmp:
        with tqdm(total=len(targets), desc=f"merge -> {cfg.dtype}", unit="layer", disable=not progress) as bar:
            config = plain_config(prepared, torch_dtype)
            skeleton = plain_skeleton(config)  # built once: the layout the merge checks and the names it writes
            specs, produce, layers = merged_tensors(prepared, spec, skeleton, targets, bar.update)
            specs, produce = on_disk(skeleton, specs, produce)
            write_shards(tmp, specs, produce, config, _generation_config(prepared))
        _copy_tokenizer(prepared, tmp)
        info = {
            "format": "qcorda.merge/1",
            "prepared": str(prepared),
            "prepared_sha256": manifest_sha256(prepared),
            "adapter": str(adapter_path),
            "dtype": cfg.dtype,
            "method": manifest["config"]["method"],
            "layers": [asdict(l) for l in layers],
        }
        (tmp / MERGE_FILE).write_text(json.dumps(info, indent=2))
        agreement = ()
        if verify is not None:
            agreement = tuple(verify_merged(prepared, adapter_path, tmp, torch_dtype, verify, cfg.device, progress))
            (tmp / VERIFY_FILE).write_text(json.dumps({"config": asdict(verify), "float32_matmul_precision": matmul_precision(),
                                                      "results": [asdict(a) for a in agreement]}, indent=2))
    return ExportResult(Path(out), cfg.dtype, tuple(layers), agreement, time.perf_counter() - t0)


def verify_merged(prepared, adapter, merged_dir, dtype, verify: VerifyConfig, device=None, progress: bool = True):
    """Merged (plain transformers, ``dtype``) against the trained 4-bit + adapter model, loaded one
    after the other onto ``device`` (:func:`qcorda.scoring.logit_agreement`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(prepared))
    batches, n = held_out_batches(tok, verify.data, verify.fields, verify.samples, verify.max_length, verify.batch_size, verify.template)
    name = f"merged {str(dtype).removeprefix('torch.')}"
    models = {"trained 4-bit+adapter": lambda: load_prepared(prepared, adapter, is_trainable=False, device=device),
              name: lambda: load_plain(merged_dir, dtype, device)}
    return logit_agreement(models, [("trained 4-bit+adapter", name)], batches, progress, n)


def _generation_config(prepared: Path):
    from transformers import GenerationConfig

    if (prepared / "generation_config.json").exists():
        return GenerationConfig.from_pretrained(str(prepared))
    return None


def _copy_tokenizer(prepared: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    if any(prepared.glob("tokenizer*")):
        AutoTokenizer.from_pretrained(str(prepared)).save_pretrained(str(out))
