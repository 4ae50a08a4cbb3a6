"""The streamed, resumable prepare engine: the original model never has to fit in memory.

The original weights are read tensor by tensor from the model's safetensors shards
(:class:`qcorda.checkpoint.Checkpoint`); each target ``(out_features, in_features)`` is split
and quantized in fp32 on the compute device by :func:`qcorda.layer.prepare_layer` (the code
the in-memory engine runs), and written at once to a work directory beside the target::

    .OUT.partial/
        manifest.json            what the run depends on (model files, settings, device, calibration)
        covariance.safetensors   the calibration covariances (data-driven methods), read one at a time
        tokenizer/               the tokenizer, saved while calibration had it loaded
        layers/00012.safetensors one finished target: its Linear4bit tensors, lora_A, lora_B

A rerun with the same arguments continues from the finished layers (each layer file is renamed
into place only when complete); a work directory of other arguments, another device or another
qcorda version is started over, never mixed. At the end the prepared directory is written by
:func:`qcorda.prepared.write_prepared` tensor by tensor (the embeddings in 64 MB row blocks) into a
temporary directory and renamed to ``OUT``. Every layer uses a seed derived from its name, so a
resumed run writes the same bytes as an uninterrupted one; wall-clock timings go to ``timings.json``.

Peak memory ≈ one fp32 copy of the largest target, its decomposition workspace and its covariance.
Calibration walks the model one decoder block at a time (:mod:`qcorda.blockwise`), spilling each
block's covariances to ``.OUT.scratch/`` as it finishes.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .calibration import checkpoint_covariances
from .checkpoint import Checkpoint, file_fingerprint, meta_tensor, save_tensors
from .config import ConfigError, InitConfig
from .covariance import Covariances
from .decompose import DecompositionError, full_fp32_matmul
from .experts import unfuse
from .io import atomic_dir, check_out_dir, replace_atomic, write_text_atomic
from .layer import prepare_layer
from .methods import spec
from .models import Placement, resolve_device, resolve_local, skeleton
from .prepared import LayerResult, PrepareReport, config_json, versions, write_prepared
from .quantize import bnb_config, linear4bit, quantize_nf4
from .targets import StoragePlan, check_loadable, check_rank, find_targets, storage_plan

#: Version 2: layer files of iterative methods hold Q_T (see ``qcorda.prepared.FORMAT``); a work
#: directory of an older version is never resumed, its layers would mix two definitions.
PARTIAL_FORMAT = "qcorda.partial/2"
#: Test hook: seconds to sleep after each finished layer (makes kill-and-resume tests reliable).
DELAY_ENV = "QCORDA_TEST_LAYER_DELAY"


def partial_dir(out: str | Path) -> Path:
    """The work directory of ``out``: ``.OUT.partial`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class Source:
    """The original model as files, and everything the run writes, decided before any layer is computed."""

    model_id: str
    path: Path
    skel: torch.nn.Module
    """The model on the ``meta`` device: module names and shapes only."""
    ckpt: Checkpoint
    targets: tuple[str, ...]
    conv1d: frozenset[str]
    """Targets stored ``(in, out)`` (GPT-2's Conv1D), transposed on read."""
    has_bias: frozenset[str]
    order: tuple[str, ...]
    """The untied state-dict keys of the original model, in module order."""
    plan: StoragePlan
    """How every block weight is stored: the targets, the other block Linears in NF4 (``plan.base``), the rest."""

    @property
    def quantized(self) -> tuple[str, ...]:
        """Every module written as Linear4bit: the targets (with an adapter), then ``plan.base`` (W itself)."""
        return self.targets + self.plan.base


def open_source(model_id: str, cfg: InitConfig, out: Path, trust_remote_code: bool) -> Source:
    path = resolve_local(model_id)
    o, s = out.resolve(), path.resolve()
    if o == s or o in s.parents:
        raise ConfigError(f"--out {out} is the model directory {path} or contains it; choose another --out")
    _, skel = skeleton(path, trust_remote_code)
    unfuse(skel)  # fused experts as per-expert Linear layers, each an ordinary target (qcorda.experts)
    ckpt = Checkpoint(path).model_view(skel)  # read by the model's names, as transformers maps them
    params = dict(skel.named_parameters())
    fused = sorted(k for k in ckpt.fused if k in params)  # a fused experts module unfuse does not know
    if fused:
        raise ConfigError(
            f"MODEL {path}: {type(skel).__name__} fuses the per-expert tensors on disk into 3-D expert parameters "
            f"({fused[0]} from {len(ckpt.fused[fused[0]])} tensors such as {ckpt.fused[fused[0]][0]}) of a layout "
            "qcorda cannot split into per-expert layers (only gate_up_proj/down_proj with act(gate)·up); it never "
            "leaves experts silently in 16 bits"
        )
    targets = find_targets(skel, cfg.target_modules)
    check_rank(skel, targets, cfg.rank)
    seen: set[int] = set()
    order = []
    for k, v in skel.state_dict(keep_vars=True).items():
        if id(v) not in seen:  # a tied alias (lm_head ↔ embed_tokens) is written once and re-tied on load
            seen.add(id(v))
            order.append(k)
    missing = [k for k in order if k not in ckpt]
    if missing:
        raise ConfigError(
            f"MODEL {ckpt.path}: the checkpoint has no tensor {missing[0]} (and {len(missing) - 1} more) that "
            f"{type(skel).__name__} expects; save the model with transformers' save_pretrained and pass that directory"
        )
    plan = storage_plan(skel, targets, cfg.keep_full_precision)
    stored = list(targets) + list(plan.base)
    check_loadable(skel, stored)
    conv = frozenset(t for t in stored if type(skel.get_submodule(t)).__name__ == "Conv1D")
    bias = frozenset(t for t in stored if getattr(skel.get_submodule(t), "bias", None) is not None)
    return Source(model_id, path, skel, ckpt, tuple(targets), conv, bias, tuple(order), plan)


# --------------------------------------------------------------------------- the work directory


def work_manifest(src: Source, cfg: InitConfig, covariance: str | Path | None, device: torch.device | None = None) -> dict:
    """What a finished layer depends on; a work directory is reused only when this matches.
    The device (``device``, resolved by the caller; default ``cfg.device``'s) is part of it: another
    device computes other bits."""
    device = device or resolve_device(cfg.device)
    calibration = None
    if cfg.needs_covariance:
        if covariance is not None and not Path(covariance).exists():
            raise ConfigError(f"--covariance {covariance}: no such file")
        calibration = {"data": cfg.calib.data, "covariance": file_fingerprint(covariance) if covariance else None}
    return {
        "format": PARTIAL_FORMAT,
        "model": src.model_id,
        "files": src.ckpt.fingerprint(),
        "config": dict(config_json(cfg), device=device.type),
        "targets": list(src.targets),
        "base_nf4": list(src.plan.base),
        "calibration": calibration,
        "versions": versions(),
    }


def _differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for the top-level (and ``config``) entries that differ."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k == "config" and isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            out += [f"config.{c}: {old[k].get(c)} -> {new[k].get(c)}" for c in sorted(set(old[k]) | set(new[k])) if old[k].get(c) != new[k].get(c)]
        elif old.get(k) != new.get(k):
            out.append(k)
    return out


def open_work_dir(out: Path, manifest: dict, log=print) -> Path:
    """Create, reuse (same manifest) or restart (other arguments, device or version) the work directory of ``out``."""
    work = partial_dir(out)
    if work.exists():
        try:
            old = json.loads((work / "manifest.json").read_text())
        except (OSError, ValueError):
            old = None
        fmt = old.get("format") if isinstance(old, dict) else None
        if not isinstance(fmt, str) or not fmt.startswith("qcorda.partial/"):
            raise ConfigError(f"--out: {work} exists but is not a qcorda work directory; remove it and rerun")
        if old == manifest:
            return work
        if fmt != PARTIAL_FORMAT:
            log(f"qcorda prepare: {work} was left by another qcorda version ({fmt}, this one writes {PARTIAL_FORMAT}); "
                "its layers are not reused, starting over", file=sys.stderr)
        else:
            log(f"qcorda prepare: {work} holds work for other arguments ({'; '.join(_differences(old, manifest)[:4])}); "
                "starting over", file=sys.stderr)
        shutil.rmtree(work)
    (work / "layers").mkdir(parents=True)
    write_text_atomic(work / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    return work


def _layer_file(work: Path, i: int) -> Path:
    return work / "layers" / f"{i:05d}.safetensors"


def read_layer(path: Path):
    """(checkpoint, LayerResult or the module name of a base layer, key order) of a finished layer
    file, or None if unreadable."""
    try:
        ckpt = Checkpoint(path, flag="work directory")
        meta = json.loads(ckpt.metadata()["qcorda"])
        r = meta["result"]
        return ckpt, (meta["name"] if r is None else LayerResult(**dict(r, shape=tuple(r["shape"])))), meta["keys"]
    except Exception:
        return None


# --------------------------------------------------------------------------- the run


def stream_prepare(
    model: str,
    cfg: InitConfig,
    out: str | Path,
    overwrite: bool = False,
    covariance: str | Path | None = None,
    save_covariance: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    log=print,
    where: Placement | None = None,
) -> PrepareReport:
    """Prepare ``model`` (a local HF directory, hub id or ``gemma-3-270m``) into ``out``, layer by layer.

    Returns the :class:`~qcorda.prepared.PrepareReport`. Resumes from ``.OUT.partial`` when it
    was left by a run with the same arguments. Everything that can reject the input runs before
    the first byte is written.

    ``OUT/timings.json`` holds the wall time (``seconds``), each layer's, and ``phases``: seconds of
    ``open`` (the checkpoint and its skeleton), ``covariance`` (the block-by-block calibration walk
    and gathering its matrices into one file; ~0 when none is needed or it is reused), ``layers``
    (split and quantize every target) and ``output`` (assemble and write the prepared directory).

    ``where``: the device and compute dtype, resolved by the caller (:func:`qcorda.prepare.prepare`);
    default: ``cfg``'s, resolved here, once for the whole run.
    """
    t_start = time.perf_counter()
    where = where or Placement.of(cfg)
    out = check_out_dir(out, overwrite)
    src = open_source(model, cfg, out, trust_remote_code)
    manifest = work_manifest(src, cfg, covariance, where.device)
    t_open = time.perf_counter()
    scratch = out.parent / f".{out.name}.scratch"  # a killed calibration's leftovers go first
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        covs = _covariances(src, cfg, out, manifest, covariance, scratch, trust_remote_code, progress, where.device)
        work = open_work_dir(out, manifest, log)
        try:
            covs = _settle(work, covs, scratch, save_covariance)
            t_cov = time.perf_counter()
            results, resumed = _layers(work, src, cfg, covs, progress, where)
            t_layers = time.perf_counter()
            calibration = None if covs is None else dict(covs.manifest, n_tokens=covs.n_tokens, groups=len(covs.matrices), data=cfg.calib.data)
            covs = None  # the covariances are done with: free them before the output shards are assembled
            _return_freed_memory()
            report = PrepareReport(cfg, model, src.targets, tuple(results), calibration, where.dtype_name, t_layers - t_start,
                                   versions(), src.plan.to_json())
            with atomic_dir(out, overwrite) as tmp:
                _write_output(tmp, src, work, report, trust_remote_code)
                now = time.perf_counter()
                phases = {"open": t_open - t_start, "covariance": t_cov - t_open, "layers": t_layers - t_cov, "output": now - t_layers}
                timings = {"seconds": now - t_start, "phases": phases, "resumed_layers": resumed, "layers": {r.name: r.seconds for r in results}}
                write_text_atomic(tmp / "timings.json", json.dumps(timings, indent=1))
        except (ConfigError, DecompositionError):
            shutil.rmtree(work, ignore_errors=True)  # a problem of the input: this work can never be resumed
            raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ConfigError(
                    f"--out {out}: no space left on the device ({e.strerror}); nothing was written to {out}. "
                    f"Free space, then rerun the same command: finished layers in {work} are reused"
                ) from e
            raise
        shutil.rmtree(work, ignore_errors=True)
        return replace(report, seconds=time.perf_counter() - t_start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _covariances(src: Source, cfg: InitConfig, out: Path, manifest: dict, covariance, scratch: Path, trust_remote_code: bool,
                 progress: bool, device: torch.device) -> Covariances | None:
    """The calibration covariances: the work directory's (a resumed run), else collected block by block
    into ``scratch`` (or read from ``covariance``); None for a method that needs none."""
    if not cfg.needs_covariance:
        return None
    work = partial_dir(out)
    cached = work / "covariance.safetensors"
    covs = None
    if cached.exists() and _same_manifest(work, manifest):
        try:
            covs = Covariances.load(cached, expect={"targets": list(src.targets)}, flag="work directory", lazy=True)
        except ConfigError:
            covs = None
    if covs is None:
        for d in (scratch / "tokenizer", scratch / "covariance"):
            d.mkdir(parents=True)
        with full_fp32_matmul():  # C is the splits' input: the blocks' forward and XᵀX in fp32, not the environment's TF32
            covs = checkpoint_covariances(src.model_id, src.path, src.skel, src.ckpt, list(src.order), list(src.targets), cfg,
                                          covariance, trust_remote_code, progress, scratch / "covariance", scratch / "tokenizer",
                                          device=device)
    unknown = [t for t in src.targets if t not in covs.members]
    if unknown:
        raise ConfigError(f"--covariance has no entry for layers {', '.join(unknown[:3])}; recompute it for these targets")
    return covs


def _same_manifest(work: Path, manifest: dict) -> bool:
    try:
        return json.loads((work / "manifest.json").read_text()) == manifest
    except (OSError, ValueError):
        return False


def _settle(work: Path, covs: Covariances | None, scratch: Path, save_covariance) -> Covariances | None:
    """Move calibration's results into the work directory (the covariances gathered into one file,
    one matrix in memory at a time, and read back layer by layer; the tokenizer it saved)."""
    if covs is None:
        return None
    cached = work / "covariance.safetensors"
    if not cached.exists():
        replace_atomic(cached, covs.save)
    covs = Covariances.load(cached, flag="work directory", lazy=True)
    if (scratch / "tokenizer").is_dir():
        shutil.rmtree(work / "tokenizer", ignore_errors=True)
        os.replace(scratch / "tokenizer", work / "tokenizer")
    shutil.rmtree(scratch, ignore_errors=True)  # the spilled blocks are in the cached file now
    if save_covariance:
        replace_atomic(Path(save_covariance), covs.save)
    return covs


def _layers(work: Path, src: Source, cfg: InitConfig, covs: Covariances | None, progress: bool, where: Placement) -> tuple[list[LayerResult], int]:
    """Every target's layer file (finished ones are reused); ``(results, layers reused)``."""
    from tqdm.auto import tqdm

    device, compute_dtype = where.device, where.compute_dtype
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    results, resumed = [], 0
    bar = tqdm(list(enumerate(src.targets)), desc=f"prepare {cfg.method} r={cfg.rank}", unit="layer", disable=not progress)
    for i, name in bar:
        f = _layer_file(work, i)
        got = read_layer(f) if f.exists() else None
        if got is not None and got[1].name == name:
            results.append(got[1])
            resumed += 1
            continue
        f.unlink(missing_ok=True)
        W = src.ckpt.get(f"{name}.weight")
        W = (W.T if name in src.conv1d else W).to(device=device, dtype=torch.float32)
        split, q, result = prepare_layer(W, cfg, name, covs)
        bias = src.ckpt.get(f"{name}.bias").float() if name in src.has_bias else None
        sd = linear4bit(q, bias, compute_dtype).state_dict()
        meta = {"result": asdict(result), "keys": list(sd)}
        save_tensors(f, {**sd, "lora_A": split.A, "lora_B": split.B}, metadata={"qcorda": json.dumps(meta)}, fsync=True)
        del W, split, q, bias, sd  # freed before the next layer is read, not after: one layer in memory at a time
        results.append(result)
        bar.set_postfix(err=f"{result.rel_err:.3f}")
        if delay:
            time.sleep(delay)
    bias = src.has_bias
    for i, name in enumerate(src.plan.base, start=len(src.targets)):  # the rest of the 4-bit base: NF4(W), no adapter
        f = _layer_file(work, i)
        got = read_layer(f) if f.exists() else None
        if got is not None and got[1] == name:
            continue
        W = src.ckpt.get(f"{name}.weight")
        q = quantize_nf4((W.T if name in src.conv1d else W).to(device=device, dtype=torch.float32))
        sd = linear4bit(q, src.ckpt.get(f"{name}.bias").float() if name in bias else None, compute_dtype).state_dict()
        save_tensors(f, sd, metadata={"qcorda": json.dumps({"name": name, "result": None, "keys": list(sd)})}, fsync=True)
        del W, q, sd
    return results, resumed


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    The covariances are hundreds of 1–16 MB blocks, below glibc's adaptive mmap threshold, so
    once freed they stay in its heap: RSS would stay at the covariance peak through assembly,
    where the tokenizer load then stacks on top of it (Gemma-3-270M: 1.45 GB peak, 1.09 GB
    with the trim)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write_output(tmp: Path, src: Source, work: Path, report: PrepareReport, trust_remote_code: bool) -> None:
    """The prepared directory from the layer files and the source shards, by :func:`qcorda.prepared.write_prepared`."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    compute_dtype = getattr(torch, report.compute_dtype)
    index = {name: i for i, name in enumerate(src.quantized)}
    specs: dict[str, torch.Tensor] = {}
    source: dict[str, tuple] = {}  # key → (checkpoint, key in it)
    adapter: dict[str, torch.Tensor] = {}
    for k in src.order:
        mod = k.rsplit(".", 1)[0]
        if mod not in index:
            meta = meta_tensor(*src.ckpt.spec(k))
            specs[k] = meta.to(compute_dtype) if meta.is_floating_point() else meta
            source[k] = (src.ckpt, k)
        elif k == f"{mod}.weight":
            layer, _, keys = read_layer(_layer_file(work, index[mod]))
            for lk in keys:
                specs[f"{mod}.{lk}"] = meta_tensor(*layer.spec(lk))
                source[f"{mod}.{lk}"] = (layer, lk)
            if index[mod] < len(src.targets):
                adapter[f"{mod}.lora_A.weight"], adapter[f"{mod}.lora_B.weight"] = layer.get("lora_A"), layer.get("lora_B")

    def produce(k: str):
        ckpt, key = source[k]
        return ckpt.blocks(key, specs[k].dtype) if ckpt is src.ckpt else ckpt.get(key)

    config = AutoConfig.from_pretrained(str(src.path), trust_remote_code=trust_remote_code)
    config.quantization_config = bnb_config(compute_dtype, skip_modules=list(src.plan.skip_modules))
    config.use_cache = False
    config.dtype = torch.float32  # as the in-memory engine, which loads the original in fp32
    try:
        generation = GenerationConfig.from_pretrained(str(src.path))
    except OSError:
        generation = GenerationConfig.from_model_config(config) if config._get_generation_parameters() else None
    tok_dir = work / "tokenizer"
    tokenizer = tok_dir if tok_dir.is_dir() and any(tok_dir.iterdir()) else \
        AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=trust_remote_code)
    write_prepared(tmp, specs, produce, config, generation, adapter, tokenizer, report)
