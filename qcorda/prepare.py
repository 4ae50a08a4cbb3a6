"""``qcorda prepare``: split each target weight, quantize the residual, attach the adapter.

For every target layer W ``(out_features, in_features)`` (:func:`qcorda.layer.prepare_layer`):

1. the split W = W_res + s·B·A is computed in fp32 from the original weights
   (:mod:`qcorda.decompose`), with the layer's input covariance for CorDA, QERA and qcorda-cal;
2. the residual is quantized by bitsandbytes (NF4, double quantization, blocksize 64): for the
   iterative methods the codes Q_T their last fit was made for, for the others NF4(W − s·B·A);
3. PEFT wraps the model with LoRA (r, alpha, the same targets) holding B and A.

:func:`prepare` is the one front door, with two engines behind it:

- a model given by name or path goes through the streamed, resumable engine (:mod:`qcorda.stream`):
  the original model is never whole in memory; the result is written to ``out``, or without ``out``
  to a temporary directory that is loaded and removed;
- a model object (or a method the streamed engine cannot store, i.e. ``lora``, ``qdora`` and ``qeva``,
  which is said on stderr since the whole model is then loaded in fp32) goes through the in-memory
  engine here, which returns the ``PeftModel``, and saves it to ``out`` when given.

Either way :attr:`Prepared.model` is the ``PeftModel`` (loaded from ``out`` on first use after a
streamed run). Before either engine runs, :func:`prepare` checks once what both need: calibration
data (:meth:`~qcorda.config.InitConfig.require_calibration`), and that a reused covariance file
matches the model, targets and data (:func:`qcorda.calibration.reused_covariances`).

Both produce the same directory byte for byte (tests/test_stream.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .baselines import EVA_RHO, eva_components
from .calibration import collect_covariances, loaded_fingerprint, reused_covariances
from .config import ConfigError, InitConfig
from .covariance import Covariances
from .experts import mark_unfused, unfuse
from .layer import prepare_layer
from .methods import spec
from .models import Placement, load_model
from .prepared import LayerResult, PrepareReport, load_prepared, lora_config, save_prepared, versions
from .quantize import bnb_config, linear4bit, quantize_nf4
from .stream import stream_prepare
from .targets import check_loadable, check_rank, find_targets, storage_plan, weight_of


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` made."""

    report: PrepareReport
    """What was done, per layer (saved as ``qcorda.json``)."""
    out: Path | None = None
    """The prepared directory, when one was written."""
    in_memory: object | None = field(default=None, repr=False)
    """The ``PeftModel`` when the run left one in memory (None after a streamed run into ``out``)."""

    @cached_property
    def model(self):
        """The ``PeftModel`` over the NF4 residual, ready to train: the one in memory, or after a streamed
        run into ``out`` loaded from there on first use (:func:`qcorda.prepared.load_prepared`, on
        ``config.device``)."""
        if self.in_memory is not None:
            return self.in_memory
        return load_prepared(self.out, device=self.report.config.device)


def prepare(
    source,
    config: InitConfig,
    out: str | Path | None = None,
    *,
    calib: Covariances | str | Path | None = None,
    tokenizer=None,
    overwrite: bool = False,
    save_covariance: str | Path | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> Prepared:
    """Split, quantize and wrap ``source`` by ``config``.

    ``source``: a local HF directory, a hub id or ``gemma-3-270m``; or an HF causal LM object, modified
    in place (it must hold the original weights). ``out``: write the prepared directory there
    (atomically; ``overwrite`` replaces it). ``calib``: precomputed :class:`~qcorda.covariance.Covariances`
    or a saved covariance file (default: collected from ``config.calib``); ``save_covariance``: also
    save the collected ones there. Without ``out``, a model given by name is streamed into a temporary
    directory (under ``$TMPDIR``; it needs the prepared model's size on disk) and loaded from it.
    """
    config.require_calibration(covariance=calib is not None)
    where = Placement.of(config)  # device and dtype: resolved here, once, for either engine
    if isinstance(source, (str, Path)) and spec(config.method).streamable:
        if isinstance(calib, Covariances):
            raise ConfigError("the streamed engine takes a covariance file, not Covariances in memory; pass its path")
        if out is not None:
            report = stream_prepare(str(source), config, out, overwrite, calib, save_covariance, trust_remote_code, progress, where=where)
            return Prepared(report, Path(out))
        with tempfile.TemporaryDirectory(prefix="qcorda-prepare-", ignore_cleanup_errors=True) as tmp:
            report = stream_prepare(str(source), config, Path(tmp) / "prepared", False, calib, save_covariance, trust_remote_code, progress,
                                    where=where)
            model = load_prepared(Path(tmp) / "prepared", device=str(where.device))
        return Prepared(report, None, model)
    if isinstance(source, (str, Path)):
        print(f"qcorda prepare: method {config.method} runs in memory (the streamed engine does not store it): "
              f"loading the whole of {source} in fp32, about 4 bytes a parameter", file=sys.stderr)
        model, tok = load_model(str(source), trust_remote_code)
        tokenizer, model_id = tokenizer or tok, str(source)
    else:
        model, model_id = source, getattr(source.config, "_name_or_path", "") or type(source).__name__
    peft_model, report = prepare_model(model, config, model_id, calib, tokenizer, save_covariance, progress, where)
    if out is not None:
        save_prepared(peft_model, out, tokenizer, report, overwrite)
    return Prepared(report, Path(out) if out is not None else None, peft_model)


def prepare_model(model, config: InitConfig, model_id: str = "", calib: Covariances | str | Path | None = None, tokenizer=None,
                  save_covariance: str | Path | None = None, progress: bool = True, where: Placement | None = None):
    """The in-memory engine: ``(peft_model, report)`` from an fp32 ``model``, modified in place, computing
    on ``where`` (default: ``config``'s device and dtype, resolved here once)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise ConfigError("the model is already quantized; pass the original (16/32-bit) model to prepare")
    unfuse(model)  # fused experts as per-expert Linear layers, each an ordinary target (qcorda.experts)
    targets = find_targets(model, config.target_modules)
    check_rank(model, targets, config.rank)
    plan = storage_plan(model, targets, config.keep_full_precision, spec(config.method).quantized)
    check_loadable(model, targets + list(plan.base))
    where = where or Placement.of(config)
    device = where.device
    covs, eva, calibration = _calibration(model, config, model_id, targets, calib, tokenizer, save_covariance, progress, device)
    layers: dict[str, tuple] = {}
    results: list[LayerResult] = []
    bar = tqdm(targets, desc=f"prepare {config.method} r={config.rank}", unit="layer", disable=not progress)
    for name in bar:
        W = weight_of(model.get_submodule(name)).detach().to(device=device, dtype=torch.float32)
        split, q, result = prepare_layer(W, config, name, covs, eva.get(name))
        layers[name] = (split, q)
        results.append(result)
        bar.set_postfix(err=f"{result.rel_err:.3f}")
    base = {n: quantize_nf4(weight_of(model.get_submodule(n)).detach().to(device=device, dtype=torch.float32)) for n in plan.base}
    compute_dtype = where.compute_dtype
    peft_model = assemble(model, config, layers, compute_dtype, device, base, plan.skip_modules)
    report = PrepareReport(
        config=config, model=model_id, targets=tuple(targets), layers=tuple(results), calibration=calibration,
        compute_dtype=where.dtype_name, seconds=time.perf_counter() - t_start, versions=versions(),
        storage=plan.to_json(),
    )
    return peft_model, report


#: EVA runs the fp32 original on the GPU only when it takes at most this share of the GPU's free memory (the rest:
#: activations and PEFT's incremental SVD state).
EVA_GPU_SHARE = 0.6


def eva_device(model, device: torch.device) -> torch.device:
    """Where EVA runs the fp32 original: ``device`` when it is the CPU or the model fits :data:`EVA_GPU_SHARE` of its
    free memory, else the CPU (slower, but an 8B model's 32 GB of fp32 would not fit a 24 GB GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    if size <= EVA_GPU_SHARE * free:
        return device
    print(f"qcorda prepare: EVA runs the fp32 model ({size / 2**30:.1f} GiB) on the CPU: it would not fit "
          f"{EVA_GPU_SHARE:.0%} of the GPU's {free / 2**30:.1f} GiB free", file=sys.stderr)
    return torch.device("cpu")


def _calibration(model, config: InitConfig, model_id: str, targets: list[str], calib, tokenizer, save_covariance, progress, device):
    """``(covariances or None, EVA components by layer, the calibration summary for qcorda.json)``."""
    if not config.needs_calibration:
        if calib is not None:
            warnings.warn(f"method {config.method} uses no calibration data; the given calibration is ignored", stacklevel=3)
        return None, {}, None
    if config.method == "qeva":  # PEFT's EVA reads the activations itself: no covariance
        if calib is not None:
            warnings.warn(f"method {config.method} uses no covariance file; the given one is ignored", stacklevel=3)
        home = next(model.parameters()).device
        model.to(eva_device(model, device))
        eva = eva_components(model, tokenizer, targets, config, progress)
        model.to(home)  # the splits read one weight at a time: the fp32 original need not stay on the GPU
        return None, eva, {"data": config.calib.data, "n_samples": config.calib.samples, "max_length": config.calib.max_length, "eva_rho": EVA_RHO}
    if isinstance(calib, Covariances):
        covs = calib
    elif calib is not None:
        covs = reused_covariances(calib, config, targets, loaded_fingerprint(model), tokenizer)
    else:
        if tokenizer is None:
            raise ConfigError("calibration needs a tokenizer; pass tokenizer= or a model path")
        covs = collect_covariances(model, tokenizer, targets, config, model_id, progress)
        if save_covariance:
            covs.save(save_covariance)
    unknown = [t for t in targets if t not in covs.members]
    if unknown:
        raise ConfigError(f"--covariance has no entry for layers {', '.join(unknown[:3])}; recompute it for these targets")
    return covs, {}, dict(covs.manifest, n_tokens=covs.n_tokens, groups=len(covs.matrices), data=config.calib.data)


def assemble(model, config: InitConfig, layers: dict[str, tuple], compute_dtype: torch.dtype, device: torch.device,
             base: dict | None = None, skip_modules: tuple[str, ...] = ("lm_head",)):
    """The ``PeftModel`` of a prepared model, the model ``from_pretrained`` + PEFT would load from its directory.

    ``layers``: target name → (split, NF4 codes or None). Every target with codes, and every
    non-target of ``base`` (name → NF4(W), no adapter), becomes a
    ``Linear4bit`` holding exactly them (its bias in ``compute_dtype``); ``skip_modules``: the Linear
    modules config.json tells the bitsandbytes loader to leave alone. The one dtype rule for the
    rest: parameters and persistent floating buffers in ``compute_dtype``, non-persistent buffers
    (rotary ``inv_freq``, embedding scales) as the model computed them, since they are not in the
    checkpoint and ``from_pretrained`` leaves them so. Then PEFT wraps the targets and B, A (and
    DoRA's magnitude, from the real B, A) are set."""
    from peft import get_peft_model

    quantized = spec(config.method).quantized
    for name, q in [(n, q) for n, (_, q) in layers.items()] + list((base or {}).items()):
        if q is not None:
            module = model.get_submodule(name)
            bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear4bit(q, bias, compute_dtype))
    for mod in model.modules():
        if type(mod).__name__ == "Linear4bit":
            continue  # holds its codes, and its bias already in compute_dtype
        for p in mod.parameters(recurse=False):
            p.data = p.data.to(compute_dtype)
        for bname, b in mod.named_buffers(recurse=False):
            if b.is_floating_point() and bname not in mod._non_persistent_buffers_set:
                setattr(mod, bname, b.to(compute_dtype))
    model.to(device)
    if quantized:
        mark_quantized(model, compute_dtype, list(skip_modules))
    model.config.use_cache = False
    mark_unfused(model)  # a mixture of experts: PEFT must wrap its per-expert layers as they are
    peft_model = get_peft_model(model, lora_config(config, list(layers)))
    with torch.no_grad():
        for name, (split, _) in layers.items():
            layer = peft_model.base_model.model.get_submodule(name)
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.copy_(split.A)
            B.copy_(split.B)
            if config.method == "qdora":  # PEFT set m from placeholder factors; recompute it (PEFT's DoRA) from the real ones
                layer.lora_magnitude_vector["default"].update_layer(
                    base_layer=layer.get_base_layer(), lora_A=A, lora_B=B, scaling=layer.scaling["default"]
                )
    return peft_model


def mark_quantized(model: torch.nn.Module, compute_dtype: torch.dtype, skip_modules: list[str] | None = None) -> None:
    """Give the model the attributes ``from_pretrained`` gives a bnb 4-bit model, so that
    transformers, PEFT and the Trainer treat the in-memory model like the loaded one."""
    from transformers.quantizers import AutoHfQuantizer

    qcfg = bnb_config(compute_dtype, skip_modules=skip_modules or ["lm_head"])
    model.config.quantization_config = qcfg
    model.hf_quantizer = AutoHfQuantizer.from_config(qcfg, pre_quantized=True)
    model.is_loaded_in_4bit = True
    model.quantization_method = qcfg.quant_method
