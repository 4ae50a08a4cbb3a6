"""The prepared directory: what ``qcorda prepare`` writes and ``train``, ``merge``, ``to-lora`` and ``eval`` read.

::

    PREPARED/
        config.json, model*.safetensors   the HF model: NF4 residual of every target (``quantization_config``)
        adapter_init/                     a PEFT LoRA adapter: the init B, A (DoRA: its magnitude too)
        tokenizer files
        qcorda.json                       the :class:`PrepareReport`: format, settings, per-layer errors, calibration
        timings.json                      streamed runs only: wall clock, the one file that differs between runs

Both engines write it through :func:`write_prepared` (the in-memory one by :func:`save_prepared`), which
keeps the wall clock out of ``qcorda.json`` (its ``seconds`` are 0), so a streamed directory equals an
in-memory one byte for byte, ``timings.json`` aside. An adapter trained on it names its owner
in ``TRAIN_MARKER`` under ``OWNER_KEY``: the sha256 of the ``qcorda.json`` bytes
(:func:`manifest_sha256`); the trainer writes it and merge / to-lora check it with these constants.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch

from .checkpoint import ADAPTER_PREFIX, dedupe_tied, write_adapter, write_shards
from .config import ConfigError, InitConfig
from .decompose import matmul_precision
from .experts import loader_class
from .io import atomic_dir
from .models import resolve_device
from .quantize import keep_dequantize_path

#: Version 2: the iterative methods store the codes their adapter was fitted to (Q_T), not
#: NF4(W − s·B_T·A_T). Version-1 directories are still valid models and are read as they are.
FORMAT = "qcorda.prepared/2"
READABLE_FORMATS = ("qcorda.prepared/1", FORMAT)
MANIFEST = "qcorda.json"
ADAPTER_INIT = "adapter_init"
#: Written next to a trained adapter; ``OWNER_KEY`` holds :func:`manifest_sha256` of its prepared directory.
TRAIN_MARKER = "qcorda_train.json"
OWNER_KEY = "prepared_qcorda_json_sha256"
TRAIN_FORMAT = "qcorda.train/1"


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class LayerResult:
    """One target after preparation (what the report and the summary table show)."""

    name: str
    shape: tuple[int, int]
    """``(out_features, in_features)``."""
    err: float
    """‖W − (deq(Q_stored) + s·B·A)‖²_F: the error the initialized 4-bit layer carries."""
    qlora_err: float
    """‖W − deq(Q(W))‖²_F: plain NF4's error on the same layer."""
    damping: float | None
    """Final ridge λ of the layer's covariance (data-driven methods)."""
    seconds: float
    iters: int | None = None
    """Iterative methods: the alternations T of the stored iterate (chosen per layer with ``--iters auto``)."""
    tokens: int | None = None
    """Experts (data-driven methods): the calibration tokens the router sent to it. Fewer than in_features:
    its covariance is singular and the damping λ makes it definite; 0: the identity (λ → ∞), a data-free split."""

    @property
    def few_tokens(self) -> bool:
        """An expert whose covariance the damping rule, not the data, decides (fewer tokens than inputs)."""
        return self.tokens is not None and self.tokens < self.shape[1]

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
    storage: dict | None = None
    """:meth:`qcorda.targets.StoragePlan.to_json`: the NF4 fraction of the block weights' bytes, the
    non-target Linears stored as NF4(W), every weight left in full precision with its reason."""

    @property
    def err(self) -> float:
        return sum(l.err for l in self.layers)

    @property
    def qlora_err(self) -> float:
        return sum(l.qlora_err for l in self.layers)

    def to_json(self) -> dict:
        d = asdict(self)
        d["format"] = FORMAT
        d["config"] = config_json(self.config)
        d["totals"] = {"err": self.err, "qlora_err": self.qlora_err, "rel_err": self.err / self.qlora_err if self.qlora_err else None}
        return d


def config_json(cfg: InitConfig) -> dict:
    """``cfg`` as ``qcorda.json`` records it (lists, resolved alpha and iterations)."""
    d = asdict(cfg)
    d["target_modules"] = list(cfg.target_modules)
    d["keep_full_precision"] = list(cfg.keep_full_precision)
    d["calib"]["fields"] = list(cfg.calib.fields)
    d["lora_alpha"] = cfg.lora_alpha
    d["iters"] = cfg.iters if cfg.iters == "auto" else cfg.n_iters
    return d


def versions() -> dict:
    """The versions of qcorda and of the libraries whose numbers it stores, and torch's fp32 matmul
    precision (``float32_matmul_precision``: ``high`` is TF32 on CUDA; the splits themselves always run
    at ``highest``, :func:`qcorda.decompose.full_fp32_matmul`)."""
    out = {}
    for pkg in ("qcorda", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["float32_matmul_precision"] = matmul_precision()
    return out


def manifest_sha256(prepared: str | Path) -> str:
    """sha256 of the prepared directory's ``qcorda.json`` bytes: what a trained adapter records as its owner."""
    return hashlib.sha256((Path(prepared) / MANIFEST).read_bytes()).hexdigest()


def read_manifest(prepared: str | Path, flag: str = "PREPARED") -> dict:
    """The ``qcorda.json`` of ``prepared``, refused unless this qcorda can read its format."""
    path = Path(prepared) / MANIFEST
    if not path.exists():
        raise ConfigError(f"{flag} {prepared}: not a qcorda prepared directory (no {MANIFEST}); run qcorda prepare first")
    data = json.loads(path.read_text())
    if data.get("format") not in READABLE_FORMATS:
        raise ConfigError(
            f"{flag} {prepared}: {MANIFEST} has format {data.get('format')!r}, this qcorda reads "
            f"{', '.join(READABLE_FORMATS)}; prepare the model again with this version"
        )
    return data


# --------------------------------------------------------------------------- writing


def lora_config(cfg: InitConfig, targets: list[str]):
    """The PEFT ``LoraConfig`` of ``adapter_init``: qcorda sets A and B itself, so PEFT must never re-initialize them."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=sorted(targets), lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM", init_lora_weights=False, use_dora=cfg.method == "qdora",
    )


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``tokenizer.save_pretrained`` without the truncation and padding of its last call: a fast
    tokenizer keeps them in its backend and would write them into ``tokenizer.json`` (calibration's
    max_length baked into the saved tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # transformers sets both again on every call, so clearing them changes no encoding
        backend.no_truncation()
        backend.no_padding()
    tokenizer.save_pretrained(str(directory))


def write_prepared(
    directory: Path,
    specs: dict[str, torch.Tensor],
    produce: Callable[[str], "torch.Tensor | Iterable[torch.Tensor]"],
    config,
    generation,
    adapter: dict[str, torch.Tensor],
    tokenizer,
    report: PrepareReport,
) -> None:
    """The prepared directory's files, into the (temporary) ``directory``: the model tensors
    (``specs`` / ``produce`` as :func:`qcorda.checkpoint.write_shards` takes them) with ``config``
    and ``generation``, ``adapter_init`` from ``adapter`` (``{name.lora_A: A, name.lora_B: B, ...}``
    by target module name), the tokenizer (an object, or a directory of saved tokenizer files) and
    ``qcorda.json``."""
    write_shards(directory, specs, produce, config, generation)
    lcfg = lora_config(report.config, list(report.targets))
    write_adapter(directory / ADAPTER_INIT, lcfg, {f"{ADAPTER_PREFIX}{k}": v for k, v in adapter.items()})
    if isinstance(tokenizer, (str, Path)):
        for f in Path(tokenizer).iterdir():
            shutil.copy2(f, directory / f.name)
    elif tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    # no wall clock in qcorda.json: its sha256 is the adapters' owner key, the same for every run of the same inputs
    # and either engine (the streamed engine writes its timings to timings.json)
    still = replace(report, seconds=0.0, layers=tuple(replace(layer, seconds=0.0) for layer in report.layers))
    (directory / MANIFEST).write_text(json.dumps(still.to_json(), indent=2, default=str))


def adapter_tensors(peft_model, targets: Iterable[str]) -> dict[str, torch.Tensor]:
    """``{name.lora_A.weight, name.lora_B.weight[, name.lora_magnitude_vector]}`` of every target, as
    PEFT's adapter files key them (adapter name dropped)."""
    out = {}
    inner = peft_model.base_model.model
    for name in targets:
        layer = inner.get_submodule(name)
        out[f"{name}.lora_A.weight"] = layer.lora_A["default"].weight
        out[f"{name}.lora_B.weight"] = layer.lora_B["default"].weight
        magnitude = getattr(layer, "lora_magnitude_vector", None)
        if magnitude is not None and "default" in magnitude:
            out[f"{name}.lora_magnitude_vector"] = magnitude["default"].weight
    return {k: v.detach() for k, v in out.items()}


def base_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's tensors without the LoRA layers, under the original module names."""
    base = peft_model.get_base_model()
    return {
        k.replace(".base_layer.", "."): v
        for k, v in base.state_dict().items()
        if ".lora_" not in k and "lora_magnitude" not in k
    }


def save_prepared(peft_model, out: str | Path, tokenizer, report: PrepareReport, overwrite: bool = False) -> Path:
    """Write an in-memory prepared model (from :func:`qcorda.prepare.prepare`) as a prepared directory, atomically."""
    with atomic_dir(out, overwrite) as tmp:
        base = peft_model.get_base_model()
        sd = dedupe_tied(base_state_dict(peft_model))
        write_prepared(tmp, sd, sd.__getitem__, base.config, getattr(base, "generation_config", None),
                       adapter_tensors(peft_model, report.targets), tokenizer, report)
    return Path(out)


# --------------------------------------------------------------------------- reading


def device_map(device: str | torch.device | None) -> dict[str, str]:
    """``{"": device}`` for ``from_pretrained``: the whole model on one device, always explicit.

    ``device_map=None`` is not "the CPU" for a bitsandbytes checkpoint: transformers' quantizer then
    maps the model to the current CUDA device. A bare ``cuda`` is resolved to the current device's
    index (``cuda:N``), the device a process of ``accelerate launch`` was given."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return {"": str(dev)}


def compute_in(model, dtype: torch.dtype) -> int:
    """Make every ``Linear4bit`` of ``model`` dequantize straight into ``dtype``, its compute dtype.

    A ``QuantState`` keeps the dtype the weight was quantized from (fp32 for qcorda's residuals), and
    bitsandbytes dequantizes into it in every forward and backward, then casts: an fp32 ``(out, in)``
    temporary per layer and step. Dequantizing into ``dtype`` gives the same numbers (each element is
    one product absmax·code rounded once). Only the loaded model changes: the files keep their state.
    Returns the number of layers changed."""
    n = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if type(module).__name__ in ("Linear4bit", "LinearNF4") and state is not None and state.dtype != dtype:
            state.dtype = dtype
            n += 1
    return n


def load_prepared(prepared: str | Path, adapter: str | Path | None = None, is_trainable: bool = True, device: str | None = None):
    """The prepared 4-bit model with ``adapter`` (default ``adapter_init``) attached, as a ``PeftModel``, on
    ``device`` (default CUDA when present) in the stored compute dtype, computing with the dequantized NF4
    weight as training does (:func:`qcorda.quantize.keep_dequantize_path`, :func:`compute_in`).

    A mixture-of-experts model is built with its experts unfused (:func:`qcorda.experts.loader_class`): every
    expert a ``Linear4bit``, as prepared. Plain ``AutoModelForCausalLM.from_pretrained`` cannot load those."""
    from peft import PeftModel
    from transformers import AutoConfig

    manifest = read_manifest(prepared)
    dtype = getattr(torch, manifest["compute_dtype"])
    # a mixture of experts: its per-expert NF4 layers load into an unfused model (plain transformers would fuse them)
    cls = loader_class(AutoConfig.from_pretrained(str(prepared)))
    model = cls.from_pretrained(str(prepared), dtype=dtype, device_map=device_map(device))
    keep_dequantize_path(model)
    compute_in(model, dtype)
    model.config.use_cache = False
    adapter = Path(adapter) if adapter is not None else Path(prepared) / ADAPTER_INIT
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)
