"""``qcorda prepare``: split each target weight, quantize the residual, attach the adapter.

For every target layer W ``(out_features, in_features)``:

1. the split W = W_res + s·B·A is computed in fp32 from the original weights
   (:mod:`qcorda.decompose`), with the layer's input covariance for CorDA, QERA and qcorda-cal;
2. W_res is quantized by bitsandbytes (NF4, double quantization, blocksize 64) and the layer
   becomes a ``Linear4bit`` holding exactly those bits: for the iterative methods the codes
   Q_T their last fit was made for, for the others NF4(W − s·B·A);
3. PEFT wraps the model with LoRA (r, alpha, the same targets) and B, A are copied in.

The result is a ``PeftModel`` ready to train in memory. :func:`save_prepared` writes
an HF directory with the 4-bit residual (``from_pretrained`` loads it into ``Linear4bit``),
``adapter_init/`` (a PEFT adapter), the tokenizer and ``qcorda.json``;
:func:`load_prepared` reads it back bit-identically.
"""

from __future__ import annotations

import json
import time
import weakref
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .config import BASELINES, COVARIANCE, ConfigError, InitConfig
from .covariance import Covariances
from .decompose import DampedCovariance, DecompositionError, Split, damp, decompose, low_rank_term, residual
from .models import load_model, resolve_compute_dtype, resolve_device
from .quantize import NF4Weight, bnb_config, dequantize_nf4, keep_dequantize_path, linear4bit, nf4_roundtrip, quantize_nf4
from .targets import check_rank, find_targets, weight_of

#: Version 2: the iterative methods store the codes their adapter was fitted to (Q_T), not
#: NF4(W − s·B_T·A_T). Version-1 directories are still valid models and are read as they are.
FORMAT = "qcorda.prepared/2"
READABLE_FORMATS = ("qcorda.prepared/1", FORMAT)


@dataclass(frozen=True)
class LayerResult:
    """One target after preparation (what the report and the summary table show)."""

    name: str
    shape: tuple[int, int]
    """``(out_features, in_features)``."""
    err: float
    """‖W − (deq(Q(W_res)) + s·B·A)‖²_F: the error the initialized 4-bit layer carries."""
    qlora_err: float
    """‖W − deq(Q(W))‖²_F: plain NF4's error on the same layer."""
    damping: float | None
    """Final ridge λ of the layer's covariance (data-driven methods)."""
    seconds: float
    iters: int | None = None
    """Iterative methods: the alternations T of the stored iterate (chosen per layer with ``--iters auto``)."""

    @property
    def rel_err(self) -> float:
        return self.err / self.qlora_err if self.qlora_err > 0 else float("nan")


@dataclass(frozen=True)
class PrepareReport:
    """What ``prepare`` did; saved as ``qcorda.json``."""

    config: InitConfig
    model: str
    targets: tuple[str, ...]
    layers: tuple[LayerResult, ...]
    calibration: dict | None
    compute_dtype: str
    seconds: float
    versions: dict = field(default_factory=dict)

    @property
    def err(self) -> float:
        return sum(l.err for l in self.layers)

    @property
    def qlora_err(self) -> float:
        return sum(l.qlora_err for l in self.layers)

    def to_json(self) -> dict:
        d = asdict(self)
        d["format"] = FORMAT
        d["config"] = _config_json(self.config)
        d["totals"] = {"err": self.err, "qlora_err": self.qlora_err, "rel_err": self.err / self.qlora_err if self.qlora_err else None}
        return d


def _config_json(cfg: InitConfig) -> dict:
    d = asdict(cfg)
    d["target_modules"] = list(cfg.target_modules)
    d["calib"]["fields"] = list(cfg.calib.fields)
    d["lora_alpha"] = cfg.lora_alpha
    d["iters"] = cfg.iters if cfg.iters == "auto" else cfg.n_iters
    return d


# The report of a model prepared in this process, found again by save_prepared.
_REPORTS: "weakref.WeakKeyDictionary[torch.nn.Module, PrepareReport]" = weakref.WeakKeyDictionary()


def report_of(model: torch.nn.Module) -> PrepareReport | None:
    """The :class:`PrepareReport` of a model returned by :func:`prepare` (None otherwise)."""
    return _REPORTS.get(model)


# --------------------------------------------------------------------------- layers


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed independent of the order layers are processed in (resume-safe)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def split_layer(weight: torch.Tensor, cfg: InitConfig, name: str, covs: Covariances | None) -> Split:
    """The fp32 split of one layer's weight ``(out_features, in_features)`` by ``cfg.method``.

    ``covs``: the calibration covariances (methods with ``cfg.needs_covariance``). With
    ``iters="auto"`` the split is fitted on C_fit and its iterate chosen on C_h, the held-out records.
    """
    from .quantize import NF4

    damped: DampedCovariance | None = None
    heldout = None
    if cfg.needs_covariance:
        if covs is None:
            raise ConfigError(f"method {cfg.method} needs calibration data for layer {name}; pass --calib-data")
        if cfg.heldout_every:
            C, heldout = covs.fit_of(name), covs.heldout_of(name).to(weight.device)
        else:
            C = covs.of(name)
        if cfg.method in COVARIANCE:
            damped = damp(C.to(weight.device), cfg.ridge, cfg.max_damping_steps, name)
    try:
        return decompose(
            cfg.method,
            weight,
            cfg.rank,
            cfg.scaling,
            cov=damped,
            iters=cfg.n_iters,
            quantizer=NF4,
            heldout=heldout,
            start=cfg.cal_start,
            seed=layer_seed(cfg.seed, name),
            solver=cfg.svd,
            oversample=cfg.svd_oversample,
            power_iters=cfg.svd_power_iters,
        )
    except DecompositionError as e:
        raise DecompositionError(f"{name}: {e}") if not str(e).startswith(name) else e


def prepare_layer(weight: torch.Tensor, cfg: InitConfig, name: str, covs: Covariances | None) -> tuple[Split, NF4Weight, LayerResult]:
    """Split, quantize, and measure the error against plain NF4.

    The stored codes are the split's own (iterative methods: Q_T, which B_T·A_T was fitted to)
    or NF4(W − s·B·A)."""
    t0 = time.perf_counter()
    W = weight.float()
    split = split_layer(W, cfg, name, covs)
    q = split.codes if split.codes is not None else quantize_nf4(residual(W, split, cfg.scaling))
    split = replace(split, codes=None)  # the codes travel as q; the split keeps only B and A
    err = (W - dequantize_nf4(q) - low_rank_term(split, cfg.scaling)).pow(2).sum().item()
    qlora_err = (W - nf4_roundtrip(W)).pow(2).sum().item()
    result = LayerResult(name, tuple(W.shape), err, qlora_err, split.damping, time.perf_counter() - t0, split.iters)
    return split, q, result


# --------------------------------------------------------------------------- model


def calibration_texts(cfg: InitConfig, tokenizer) -> list[str]:
    from .data import load_examples

    if cfg.calib.data is None:
        raise ConfigError(f"method {cfg.method} needs calibration data; pass --calib-data (e.g. --calib-data gsm8k-train)")
    examples = load_examples(cfg.calib.data, cfg.calib.fields, cfg.calib.template, cfg.calib.samples, tokenizer, cfg.calib.split)
    return [e.text for e in examples]


#: Config keys that do not change the activations (the dtype a checkpoint was saved in is
#: upcast to fp32 for calibration; the cache flag and quantization do not touch C).
_NOT_FINGERPRINTED = frozenset({"quantization_config", "dtype", "torch_dtype", "use_cache"})


def model_fingerprint(config, first_rows, keys: list[str]) -> str:
    """What identifies a model for a covariance cache: its architecture (config without dtype,
    cache and quantization keys) and the values of the first row of its first three float
    tensors (``first_rows(key)`` → ``tensor[:1]``), so that two checkpoints of one
    architecture differ. Cheap: a streamed source reads those rows alone."""
    import hashlib

    arch = config.to_dict()
    h = hashlib.sha256(
        json.dumps({k: arch.get(k) for k in sorted(arch) if not k.startswith("_") and k not in _NOT_FINGERPRINTED}, default=str, sort_keys=True).encode()
    )
    for key in keys[:3]:
        row = first_rows(key).detach().float().cpu().contiguous()
        h.update(key.encode())
        h.update(row.numpy().tobytes())
    return h.hexdigest()[:16]


def _model_fingerprint(model: torch.nn.Module) -> str:
    sd = model.state_dict()
    seen, keys = set(), []
    for k, v in sd.items():
        if v.is_floating_point() and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            keys.append(k)
    return model_fingerprint(model.config, lambda k: sd[k][:1] if sd[k].dim() else sd[k], keys)


def covariance_manifest(model_id: str, model: torch.nn.Module | None, targets: list[str], cfg: InitConfig, texts: list[str],
                        fingerprint: str | None = None) -> dict:
    """What a covariance depends on: checked when a cached one is reused."""
    import hashlib

    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return {
        "model": fingerprint or _model_fingerprint(model),
        "targets": list(targets),
        "data_hash": h.hexdigest(),
        "n_samples": len(texts),
        "max_length": cfg.calib.max_length,
        "dtype": cfg.cov_dtype,
        "heldout_every": cfg.heldout_every,
    }


def covariance_expectations(cfg: InitConfig, manifest: dict) -> dict:
    """The keys of ``manifest`` that a reused covariance file must match for ``cfg``: the
    held-out split only matters when ``cfg`` uses it (a file with one serves every method)."""
    keys = ["model", "targets", "data_hash", "n_samples", "max_length"] + (["heldout_every"] if cfg.heldout_every else [])
    return {k: manifest[k] for k in keys if k in manifest}


def collect_covariances(model, tokenizer, targets: list[str], cfg: InitConfig, model_id: str = "", progress: bool = True) -> Covariances:
    """C = XᵀX/n for every target group on ``cfg.calib``."""
    from . import covariance
    from .data import calibration_batches

    texts = calibration_texts(cfg, tokenizer)
    manifest = covariance_manifest(model_id, model, targets, cfg, texts)
    batches, n_batches = calibration_batches(tokenizer, texts, cfg.calib.max_length, cfg.calib.batch_size, cfg.heldout_every)
    dtype = getattr(torch, cfg.cov_dtype)
    return covariance.collect(model, batches, targets, dtype, progress=progress, total=n_batches, manifest=manifest)


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def mark_quantized(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Give the model the attributes ``from_pretrained`` gives a bnb 4-bit model, so that
    transformers, PEFT and the Trainer treat the in-memory model like the loaded one."""
    from transformers.quantizers import AutoHfQuantizer

    qcfg = bnb_config(compute_dtype, skip_modules=["lm_head"])
    model.config.quantization_config = qcfg
    model.hf_quantizer = AutoHfQuantizer.from_config(qcfg, pre_quantized=True)
    model.is_loaded_in_4bit = True
    model.quantization_method = qcfg.quant_method


def lora_config(cfg: InitConfig, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # qcorda sets A and B itself; PEFT must not re-init on load
    )


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("qcorda", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def prepare(
    model_or_path,
    config: InitConfig,
    calib: Covariances | str | Path | None = None,
    tokenizer=None,
    progress: bool = True,
    trust_remote_code: bool = False,
):
    """Split, quantize and wrap: returns a ``PeftModel`` over the NF4 residual, ready to train.

    ``model_or_path``: an HF causal LM (it is modified in place and must hold the
    original weights), a local directory, a hub id, or ``gemma-3-270m``.
    ``calib``: precomputed :class:`Covariances` or a path to a saved covariance file;
    default: computed from ``config.calib``. The report is available via :func:`report_of`.
    """
    from peft import get_peft_model
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if isinstance(model_or_path, (str, Path)):
        model_id = str(model_or_path)
        model, tok = load_model(model_id, trust_remote_code)
        tokenizer = tokenizer or tok
    else:
        model, model_id = model_or_path, getattr(model_or_path.config, "_name_or_path", "") or type(model_or_path).__name__
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise ConfigError("the model is already quantized; pass the original (16/32-bit) model to prepare")
    if config.method in BASELINES:  # PEFT-initialized baselines (lora, qdora, qeva, qolora)
        from .baselines import prepare_baseline

        if calib is not None and not isinstance(calib, Covariances):
            import warnings

            warnings.warn(f"method {config.method} uses no covariance file; the given one is ignored", stacklevel=2)
        return prepare_baseline(model, config, model_id, tokenizer, progress, t_start)
    targets = find_targets(model, config.target_modules)
    check_rank(model, targets, config.rank)
    device = resolve_device(config.device)
    compute_dtype = resolve_compute_dtype(config.compute_dtype)

    covs: Covariances | None = None
    if config.needs_covariance:
        if isinstance(calib, Covariances):
            covs = calib
        elif calib is not None:
            expect = {"targets": list(targets), **({"heldout_every": config.heldout_every} if config.heldout_every else {})}
            covs = Covariances.load(calib, expect=expect)
        else:
            if tokenizer is None:
                raise ConfigError("calibration needs a tokenizer; pass tokenizer= or a model path")
            covs = collect_covariances(model, tokenizer, targets, config, model_id, progress)
        unknown = [t for t in targets if t not in covs.members]
        if unknown:
            raise ConfigError(f"--covariance has no entry for layers {', '.join(unknown[:3])}; recompute it for these targets")
    elif calib is not None:
        import warnings

        warnings.warn(f"method {config.method} uses no calibration data; the given calibration is ignored", stacklevel=2)

    splits: dict[str, Split] = {}
    results: list[LayerResult] = []
    bar = tqdm(targets, desc=f"prepare {config.method} r={config.rank}", unit="layer", disable=not progress)
    for name in bar:
        module = model.get_submodule(name)
        W = weight_of(module).detach().to(device=device, dtype=torch.float32)
        split, q, result = prepare_layer(W, config, name, covs)
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        _set_module(model, name, linear4bit(q, bias, compute_dtype))
        splits[name] = split
        results.append(result)
        bar.set_postfix(err=f"{result.rel_err:.3f}")

    target_set = set(targets)
    for mname, mod in model.named_modules():
        if mname in target_set:
            continue
        for p in mod.parameters(recurse=False):
            p.data = p.data.to(compute_dtype)
        for bname, b in mod.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(mod, bname, b.to(compute_dtype))
    model.to(device)
    mark_quantized(model, compute_dtype)
    model.config.use_cache = False

    peft_model = get_peft_model(model, lora_config(config, targets))
    with torch.no_grad():
        for name, split in splits.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(split.A)
            layer.lora_B["default"].weight.copy_(split.B)

    calibration = None
    if covs is not None:
        calibration = dict(covs.manifest, n_tokens=covs.n_tokens, groups=len(covs.matrices), data=config.calib.data)
    return attach_report(peft_model, config, model_id, targets, results, calibration, compute_dtype, t_start)


def attach_report(peft_model, config: InitConfig, model_id: str, targets, results, calibration: dict | None,
                  compute_dtype: torch.dtype, t_start: float):
    """Record the :class:`PrepareReport` of ``peft_model`` (read back by :func:`report_of`) and return the model.

    The report lives in a weak side table, not on the module, so nothing temporary is stored on it.
    """
    _REPORTS[peft_model] = PrepareReport(
        config=config,
        model=model_id,
        targets=tuple(targets),
        layers=tuple(results),
        calibration=calibration,
        compute_dtype=str(compute_dtype).removeprefix("torch."),
        seconds=time.perf_counter() - t_start,
        versions=_versions(),
    )
    return peft_model


# --------------------------------------------------------------------------- save / load


def base_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The 4-bit base's state dict without the LoRA layers, under the original module names."""
    base = peft_model.get_base_model()
    return {
        k.replace(".base_layer.", "."): v
        for k, v in base.state_dict().items()
        if ".lora_" not in k and "lora_magnitude" not in k
    }


def save_prepared(peft_model, out: str | Path, tokenizer=None, overwrite: bool = False, report: PrepareReport | None = None) -> Path:
    """Write the prepared directory atomically (see the module docstring for its layout)."""
    from .checkpoint import dedupe_tied, write_shards
    from .io import atomic_dir

    report = report or report_of(peft_model)
    if report is None:
        raise ValueError("save_prepared needs a model returned by qcorda.prepare (or report=)")
    with atomic_dir(out, overwrite) as tmp:
        base = peft_model.get_base_model()
        sd = dedupe_tied(base_state_dict(peft_model))
        write_shards(tmp, sd, sd.__getitem__, base.config, getattr(base, "generation_config", None))
        peft_model.save_pretrained(tmp / "adapter_init")
        stable_adapter_config(tmp / "adapter_init")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        (tmp / "qcorda.json").write_text(json.dumps(report.to_json(), indent=2, default=str))
    return Path(out)


def stable_adapter_config(adapter_dir: str | Path) -> None:
    """Sort ``target_modules`` in a saved ``adapter_config.json``: PEFT keeps them in a set,
    whose order changes with Python's string hashing, so the file would differ between runs."""
    path = Path(adapter_dir) / "adapter_config.json"
    data = json.loads(path.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True))  # PEFT's own layout


def read_manifest(prepared: str | Path, flag: str = "PREPARED") -> dict:
    path = Path(prepared) / "qcorda.json"
    if not path.exists():
        raise ConfigError(f"{flag} {prepared}: not a qcorda prepared directory (no qcorda.json); run qcorda prepare first")
    data = json.loads(path.read_text())
    if data.get("format") not in READABLE_FORMATS:
        raise ConfigError(
            f"{flag} {prepared}: qcorda.json has format {data.get('format')!r}, this qcorda reads "
            f"{', '.join(READABLE_FORMATS)}; prepare the model again with this version"
        )
    return data


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``tokenizer.save_pretrained`` without the truncation and padding of its last call: a fast
    tokenizer keeps them in its backend and would write them into ``tokenizer.json`` (calibration's
    max_length baked into the saved tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # transformers sets both again on every call, so clearing them changes no encoding
        backend.no_truncation()
        backend.no_padding()
    tokenizer.save_pretrained(str(directory))


def load_prepared(prepared: str | Path, adapter: str | Path | None = None, is_trainable: bool = True, device: str | None = None):
    """The prepared 4-bit model with ``adapter`` (default ``adapter_init``) attached, as a ``PeftModel``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(prepared)
    dtype = getattr(torch, manifest["compute_dtype"])
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(str(prepared), dtype=dtype, device_map={"": str(dev)} if dev.type == "cuda" else None)
    keep_dequantize_path(model)
    model.config.use_cache = False
    adapter = Path(adapter) if adapter is not None else Path(prepared) / "adapter_init"
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)
