"""Layer-streamed, resumable ``qcorda prepare``: the original model never has to fit in memory.

The original weights are read tensor by tensor from the model's safetensors shards
(``safe_open``); each target ``(out_features, in_features)`` is split and quantized in
fp32 on the compute device by :func:`qcorda.prepare.prepare_layer` (the same code as
the in-memory :func:`qcorda.prepare.prepare`), and written at once to a work directory
beside the target::

    .OUT.partial/
        manifest.json            what the run depends on (model files, config, calibration)
        covariance.safetensors   the calibration covariances (calibrated methods), read one at a time
        tokenizer/               the tokenizer, saved while calibration had it loaded
        layers/00012.safetensors one finished target: its Linear4bit tensors, lora_A, lora_B

A rerun with the same arguments continues from the finished layers (each layer file
is renamed into place only when complete). At the end the HF directory (4-bit
residual with ``quantization_config``, ``adapter_init/``, tokenizer, ``qcorda.json``)
is written tensor by tensor (:func:`qcorda.io.write_safetensors`; the embeddings in 64 MB row
blocks) into a temporary directory and renamed to ``OUT``.
Every layer uses a seed derived from its name, so a resumed run writes the same bytes
as an uninterrupted one. Wall-clock timings go to ``timings.json``, the one file that
differs between runs.

Peak memory ≈ one fp32 copy of the largest target and its decomposition workspace, and its
covariance. Calibration (the ``qcorda-*`` methods) walks the model one decoder block at a
time (:mod:`qcorda.blockwise`): its peak is the embedding rows of the calibration tokens, then
the hidden states of the calibration batches + one fp32 block + that block's covariances,
which are spilled to ``.OUT.scratch/`` as each block finishes and gathered into the work
directory's file one matrix at a time. It is skipped when ``--covariance`` is given or a
previous attempt already saved the covariances in the work directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import Checkpoint, file_fingerprint, meta_tensor, save_tensors, write_shards
from .config import ConfigError, InitConfig
from .covariance import Covariances
from .decompose import DecompositionError
from .models import resolve_local, skeleton

#: Version 2: layer files of iterative methods hold Q_T (see ``qcorda.prepare.FORMAT``); a work
#: directory of an older version is never resumed, its layers would mix two definitions.
PARTIAL_FORMAT = "qcorda.partial/2"
#: Methods whose output is an NF4 residual plus a plain LoRA A/B (what this writer knows how
#: to store); other methods go through the in-memory ``prepare`` + ``save_prepared``.
STREAMED: frozenset[str] = frozenset({"qlora", "loftq", "qpissa", "qmilora", "qcorda-ipm", "qcorda-kpm", "qcorda-cal", "qera"})
#: Test hook: seconds to sleep after each finished layer (makes kill-and-resume tests reliable).
DELAY_ENV = "QCORDA_TEST_LAYER_DELAY"


def partial_dir(out: str | Path) -> Path:
    """The work directory of ``out``: ``.OUT.partial`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


# --------------------------------------------------------------------------- source


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """Everything a streamed prepare writes, decided before any layer is computed."""

    targets: tuple[str, ...]
    conv1d: frozenset[str]
    """Targets stored ``(in, out)`` (GPT-2's Conv1D), transposed on read."""
    has_bias: frozenset[str]
    order: tuple[str, ...]
    """The untied state-dict keys of the original model, in module order."""


def make_plan(model, cfg: InitConfig, ckpt: Checkpoint, flag: str = "MODEL") -> Plan:
    from .targets import check_rank, find_targets

    targets = find_targets(model, cfg.target_modules)
    check_rank(model, targets, cfg.rank)
    seen: set[int] = set()
    order = []
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:  # a tied alias (lm_head ↔ embed_tokens): written once, re-tied on load
            continue
        seen.add(id(v))
        order.append(k)
    missing = [k for k in order if k not in ckpt]
    if missing:
        raise ConfigError(
            f"{flag} {ckpt.path}: the checkpoint has no tensor {missing[0]} (and {len(missing) - 1} more) that "
            f"{type(model).__name__} expects; save the model with transformers' save_pretrained and pass that directory"
        )
    conv = frozenset(t for t in targets if type(model.get_submodule(t)).__name__ == "Conv1D")
    bias = frozenset(t for t in targets if getattr(model.get_submodule(t), "bias", None) is not None)
    return Plan(tuple(targets), conv, bias, tuple(order))


# --------------------------------------------------------------------------- work dir


def _config_fingerprint(cfg: InitConfig) -> dict:
    from .prepare import _config_json

    d = _config_json(cfg)
    d.pop("device", None)  # the split is the same wherever it runs
    return d


def work_manifest(model_id: str, ckpt: Checkpoint, cfg: InitConfig, plan: Plan, calib: dict | None) -> dict:
    """What a finished layer depends on; a work directory is reused only when this matches."""
    from .prepare import _versions

    return {
        "format": PARTIAL_FORMAT,
        "model": model_id,
        "files": ckpt.fingerprint(),
        "config": _config_fingerprint(cfg),
        "targets": list(plan.targets),
        "calibration": calib,
        "versions": _versions(),
    }


def open_work_dir(out: Path, manifest: dict, log=print) -> tuple[Path, bool]:
    """Create, reuse (same manifest) or restart (other arguments) the work directory of ``out``."""
    from .io import write_text_atomic

    work = partial_dir(out)
    if work.exists():
        mf = work / "manifest.json"
        try:
            old = json.loads(mf.read_text())
        except (OSError, ValueError):
            old = None
        fmt = old.get("format") if isinstance(old, dict) else None
        if not isinstance(fmt, str) or not fmt.startswith("qcorda.partial/"):
            raise ConfigError(f"--out: {work} exists but is not a qcorda work directory; remove it and rerun")
        if old == manifest:
            return work, True
        if fmt != PARTIAL_FORMAT:
            log(f"qcorda prepare: {work} was left by another qcorda version ({fmt}, this one writes {PARTIAL_FORMAT}); "
                "its layers are not reused, starting over", file=sys.stderr)
        else:
            log(f"qcorda prepare: {work} holds work for other arguments; starting over", file=sys.stderr)
        shutil.rmtree(work)
    (work / "layers").mkdir(parents=True)
    write_text_atomic(work / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    return work, False


def _layer_file(work: Path, i: int) -> Path:
    return work / "layers" / f"{i:05d}.safetensors"


def read_layer(path: Path):
    """(checkpoint, LayerResult, key order) of a finished layer file, or None if unreadable."""
    from .prepare import LayerResult

    try:
        ckpt = Checkpoint(path, flag="work directory")
        meta = json.loads(ckpt.metadata()["qcorda"])
        r = dict(meta["result"], shape=tuple(meta["result"]["shape"]))
        return ckpt, LayerResult(**r), meta["keys"]
    except Exception:
        return None


# --------------------------------------------------------------------------- run


def _same_manifest(work: Path, manifest: dict) -> bool:
    try:
        return json.loads((work / "manifest.json").read_text()) == manifest
    except (OSError, ValueError):
        return False


def _calibration(model_id, path, skel_config, skel, ckpt: Checkpoint, plan: Plan, cfg, covariance, trust_remote_code, progress,
                 spill: Path | None = None, tok_dir: Path | None = None) -> Covariances:
    """The covariances: from ``--covariance`` (checked against this model, targets and samples)
    or collected one decoder block at a time from the checkpoint (:mod:`qcorda.blockwise`);
    a model that is not a plain stack of blocks runs whole, in fp32."""
    from transformers import AutoTokenizer

    from .blockwise import NotBlockwise, collect_blockwise
    from .data import calibration_batches
    from .prepare import calibration_texts, collect_covariances, covariance_expectations, covariance_manifest, model_fingerprint
    from .models import load_model, resolve_device

    targets = list(plan.targets)
    floats = [k for k in plan.order if ckpt.spec(k)[1].is_floating_point]
    fingerprint = model_fingerprint(skel_config, ckpt.first_rows, floats)
    expect = {"model": fingerprint, "targets": targets, **({"heldout_every": cfg.heldout_every} if cfg.heldout_every else {})}
    if cfg.calib.data is not None:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if tok_dir is not None:  # saved now for the output, so it is never loaded again on top of the layers
            tok.save_pretrained(str(tok_dir))
        texts = calibration_texts(cfg, tok)
        full = covariance_manifest(model_id, None, targets, cfg, texts, fingerprint=fingerprint)
        expect = covariance_expectations(cfg, full)
    if covariance is not None:
        return Covariances.load(covariance, expect=expect, lazy=True)
    if cfg.calib.data is None:
        raise ConfigError(f"--method {cfg.method} needs --calib-data (e.g. --calib-data gsm8k-train --calib-fields question,answer)")
    batches = list(calibration_batches(tok, texts, cfg.calib.max_length, cfg.calib.batch_size, cfg.heldout_every)[0])
    del tok  # the walk needs only the token ids; Gemma-3's 262k-entry tokenizer holds ~330 MB
    try:
        return collect_blockwise(skel, ckpt.get, batches, targets, getattr(torch, cfg.cov_dtype), resolve_device(cfg.device),
                                 progress, manifest=full, get_rows=ckpt.rows, spill=spill)
    except NotBlockwise as e:
        print(f"qcorda prepare: covariance by a whole-model forward ({e})", file=sys.stderr)
    model, tok = load_model(str(path), trust_remote_code)
    covs = collect_covariances(model, tok, targets, cfg, model_id, progress)
    if covs.manifest.get("model") != fingerprint:  # both read the same weights: a mismatch is a bug
        raise RuntimeError("model fingerprint differs between the checkpoint and the loaded model")
    return covs


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
):
    """Prepare ``model`` (a local HF directory, hub id or ``gemma-3-270m``) into ``out``, layer by layer.

    Returns the :class:`~qcorda.prepare.PrepareReport`. Resumes from ``.OUT.partial``
    when it was left by a run with the same arguments.
    """
    from tqdm.auto import tqdm

    from .io import atomic_dir, check_out_dir, write_text_atomic
    from .prepare import PrepareReport, _versions, prepare_layer
    from .models import resolve_compute_dtype, resolve_device
    from .quantize import linear4bit

    t_start = time.perf_counter()
    out = check_out_dir(out, overwrite)
    path = resolve_local(model)
    _check_out_vs_source(out, path)
    config, skel = skeleton(path, trust_remote_code)
    ckpt = Checkpoint(path)
    plan = make_plan(skel, cfg, ckpt)
    device = resolve_device(cfg.device)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype)

    # Calibration saves the tokenizer (loaded there anyway) and spills each block's finished
    # covariances (21.9 GB at 7B, more than the rest of prepare together) to a scratch directory
    # beside --out; both move into the resumable work directory once it exists. A run killed
    # before that leaves the scratch directory, and the next run starts by removing it.
    scratch = out.parent / f".{out.name}.scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        # Everything that can reject the input runs before the first byte is written.
        covs: Covariances | None = None
        tok_dir = spill = None
        calib_key = None
        if cfg.needs_covariance:
            calib_key = {"data": cfg.calib.data, "covariance": _file_digest(covariance) if covariance else None}
        manifest = work_manifest(model, ckpt, cfg, plan, calib_key)
        work = partial_dir(out)
        cached = work / "covariance.safetensors"
        if cfg.needs_covariance:
            if _same_manifest(work, manifest) and cached.exists():
                try:
                    covs = Covariances.load(cached, expect={"targets": list(plan.targets)}, flag="work directory", lazy=True)
                except ConfigError:
                    covs = None
            if covs is None:
                tok_dir, spill = scratch / "tokenizer", scratch / "covariance"
                for d in (tok_dir, spill):
                    d.mkdir(parents=True)
                covs = _calibration(model, path, config, skel, ckpt, plan, cfg, covariance, trust_remote_code, progress, spill, tok_dir)
            unknown = [t for t in plan.targets if t not in covs.members]
            if unknown:
                raise ConfigError(f"--covariance has no entry for layers {', '.join(unknown[:3])}; recompute it for these targets")

        work, resumed = open_work_dir(out, manifest, log)
        try:
            if covs is not None:
                if not cached.exists():
                    _save_covariance(covs, cached)  # one matrix in memory at a time
                covs = Covariances.load(cached, flag="work directory", lazy=True)  # read back layer by layer
            if tok_dir is not None:
                shutil.rmtree(work / "tokenizer", ignore_errors=True)
                os.replace(tok_dir, work / "tokenizer")
            shutil.rmtree(scratch, ignore_errors=True)  # the spilled blocks are in the cached file now
            if covs is not None and save_covariance:
                _save_covariance(covs, Path(save_covariance))

            results = []
            done = 0
            delay = float(os.environ.get(DELAY_ENV, "0") or 0)
            bar = tqdm(list(enumerate(plan.targets)), desc=f"prepare {cfg.method} r={cfg.rank}", unit="layer", disable=not progress)
            for i, name in bar:
                f = _layer_file(work, i)
                if f.exists():
                    got = read_layer(f)
                    if got is not None and got[1].name == name:
                        results.append(got[1])
                        done += 1
                        continue
                    f.unlink()
                W = ckpt.get(f"{name}.weight")
                W = (W.T if name in plan.conv1d else W).to(device=device, dtype=torch.float32)
                split, q, result = prepare_layer(W, cfg, name, covs)
                bias = ckpt.get(f"{name}.bias").float() if name in plan.has_bias else None
                sd = linear4bit(q, bias, compute_dtype).state_dict()
                tensors = {**sd, "lora_A": split.A, "lora_B": split.B}
                meta = {"result": asdict(result), "keys": list(sd)}
                save_tensors(f, tensors, metadata={"qcorda": json.dumps(meta)}, fsync=True)
                results.append(result)
                del W, split, q, sd, tensors
                bar.set_postfix(err=f"{result.rel_err:.3f}")
                if delay:
                    time.sleep(delay)

            calibration = None
            if covs is not None:
                calibration = dict(covs.manifest, n_tokens=covs.n_tokens, groups=len(covs.matrices), data=cfg.calib.data)
            covs = None  # the covariances are done with: free them before the output shards are assembled
            _return_freed_memory()
            report = PrepareReport(
                config=cfg,
                model=model,
                targets=plan.targets,
                layers=tuple(replace(r, seconds=0.0) for r in results),
                calibration=calibration,
                compute_dtype=str(compute_dtype).removeprefix("torch."),
                seconds=0.0,
                versions=_versions(),
            )
            with atomic_dir(out, overwrite) as tmp:
                _assemble(tmp, path, ckpt, config, skel, plan, cfg, work, compute_dtype, report, trust_remote_code, work / "tokenizer")
                timings = {"seconds": time.perf_counter() - t_start, "resumed_layers": done,
                           "layers": {r.name: r.seconds for r in results}}
                write_text_atomic(tmp / "timings.json", json.dumps(timings, indent=1))
        except (ConfigError, DecompositionError):
            # a problem of the input: the arguments must change, so this work can never be resumed
            shutil.rmtree(work, ignore_errors=True)
            raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ConfigError(
                    f"--out {out}: no space left on the device ({e.strerror}); nothing was written to {out}. "
                    f"Free space, then rerun the same command: finished layers in {work} are reused"
                ) from e
            raise
        shutil.rmtree(work, ignore_errors=True)
        return replace(report, layers=tuple(results), seconds=time.perf_counter() - t_start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    The covariances are hundreds of 1–16 MB blocks, below glibc's adaptive mmap threshold, so
    once freed they stay in its heap: RSS would stay at the covariance peak through assembly,
    where the tokenizer load then stacks on top of it (Gemma-3-270M: 1.45 GB peak, 1.09 GB
    with the trim)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check_out_vs_source(out: Path, source: Path) -> None:
    o, s = out.resolve(), source.resolve()
    if o == s or o in s.parents:
        raise ConfigError(f"--out {out} is the model directory {source} or contains it; choose another --out")


def _file_digest(path) -> str:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--covariance {path}: no such file")
    return file_fingerprint(p)


def _save_covariance(covs: Covariances, path: Path) -> None:
    from .io import replace_atomic

    replace_atomic(path, covs.save)


def _assemble(tmp: Path, path: Path, ckpt: Checkpoint, config, skel, plan: Plan, cfg: InitConfig, work: Path,
              compute_dtype: torch.dtype, report, trust_remote_code: bool, tok_dir: Path | None = None) -> None:
    """Write the prepared HF directory into ``tmp`` from the layer files and the source shards
    (the tokenizer from ``tok_dir`` when calibration already saved it there)."""
    from transformers import AutoTokenizer, GenerationConfig

    from .quantize import bnb_config

    index = {name: i for i, name in enumerate(plan.targets)}
    owner: dict[str, str] = {}
    for k in plan.order:
        mod = k.rsplit(".", 1)[0]
        if mod in index:
            owner[k] = mod
    specs: dict[str, torch.Tensor] = {}
    source: dict[str, tuple] = {}  # key → ("layer", i, local key) | ("ckpt", key)
    for k in plan.order:
        mod = owner.get(k)
        if mod is None:
            meta = meta_tensor(*ckpt.spec(k))
            if meta.is_floating_point():
                meta = meta.to(compute_dtype)
            specs[k] = meta
            source[k] = ("ckpt", k)
        elif f"{mod}.weight" == k:
            layer, _, keys = read_layer(_layer_file(work, index[mod]))
            for lk in keys:
                specs[f"{mod}.{lk}"] = meta_tensor(*layer.spec(lk))
                source[f"{mod}.{lk}"] = ("layer", layer, lk)

    def produce(k: str):
        src = source[k]
        return ckpt.blocks(src[1], specs[k].dtype) if src[0] == "ckpt" else src[1].get(src[2])

    config.quantization_config = bnb_config(compute_dtype, skip_modules=["lm_head"])
    config.use_cache = False
    config.dtype = torch.float32  # as the in-memory path, which loads the original in fp32
    try:
        generation = GenerationConfig.from_pretrained(str(path))
    except OSError:
        generation = GenerationConfig.from_model_config(config) if config._get_generation_parameters() else None
    write_shards(tmp, specs, produce, config, generation)
    _write_adapter(tmp / "adapter_init", skel, plan, cfg, work)
    if tok_dir is not None and tok_dir.is_dir() and any(tok_dir.iterdir()):
        for f in tok_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
    else:
        AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code).save_pretrained(tmp)
    (tmp / "qcorda.json").write_text(json.dumps(report.to_json(), indent=2, default=str))


def _write_adapter(dest: Path, skel, plan: Plan, cfg: InitConfig, work: Path) -> None:
    """``adapter_init/`` written by PEFT itself, from a weightless model whose LoRA factors are the real ones."""
    from peft import get_peft_model

    from .prepare import lora_config, stable_adapter_config

    peft_model = get_peft_model(skel, lora_config(cfg, list(plan.targets)))
    for i, name in enumerate(plan.targets):
        layer = peft_model.base_model.model.get_submodule(name)
        f = Checkpoint(_layer_file(work, i), flag="work directory")
        layer.lora_A["default"].weight = torch.nn.Parameter(f.get("lora_A"), requires_grad=True)
        layer.lora_B["default"].weight = torch.nn.Parameter(f.get("lora_B"), requires_grad=True)
    peft_model.save_pretrained(str(dest))
    stable_adapter_config(dest)
