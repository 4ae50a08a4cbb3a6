"""Calibration: the text, where its covariances come from, and what they depend on.

The data-driven methods need C = XᵀX/n of every target's inputs on the calibration text
(:mod:`qcorda.covariance`). :func:`collect_covariances` runs a model that is in memory;
:func:`checkpoint_covariances` walks a safetensors checkpoint one decoder block at a time
(:mod:`qcorda.blockwise`) or takes a saved covariance file. The manifest of a covariance
(model fingerprint, targets, data hash, samples, length, held-out split) is what a reused
file must match.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from .blockwise import NotBlockwise, collect_blockwise
from .checkpoint import Checkpoint
from .config import InitConfig
from .covariance import Covariances, collect
from .data import calibration_batches, load_examples
from .models import load_model


def calibration_texts(cfg: InitConfig, tokenizer) -> list[str]:
    """The calibration records of ``cfg.calib`` as texts, in the prompt template training uses."""
    cfg.require_calibration()
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
    arch = config.to_dict()
    h = hashlib.sha256(
        json.dumps({k: arch.get(k) for k in sorted(arch) if not k.startswith("_") and k not in _NOT_FINGERPRINTED}, default=str, sort_keys=True).encode()
    )
    for key in keys[:3]:
        row = first_rows(key).detach().float().cpu().contiguous()
        h.update(key.encode())
        h.update(row.numpy().tobytes())
    return h.hexdigest()[:16]


def loaded_fingerprint(model: torch.nn.Module) -> str:
    """:func:`model_fingerprint` of a model in memory (the same value as of its checkpoint)."""
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
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return {
        "model": fingerprint or loaded_fingerprint(model),
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


def reused_covariances(covariance: str | Path, cfg: InitConfig, targets: list[str], fingerprint: str, tokenizer=None,
                       lazy: bool = False) -> Covariances:
    """A saved covariance file, checked against what it must match for this run: the one reuse check
    of both engines. Always the model (its :func:`model_fingerprint`), the targets and, for
    ``iters="auto"``, the held-out split; when ``cfg.calib.data`` and a ``tokenizer`` are given, also the
    calibration text itself (its hash, number of records and length), so a file of other data is refused.
    ``lazy``: leave the matrices on disk (:meth:`Covariances.load`)."""
    expect = {"model": fingerprint, "targets": list(targets), **({"heldout_every": cfg.heldout_every} if cfg.heldout_every else {})}
    if cfg.calib.data is not None and tokenizer is not None:
        texts = calibration_texts(cfg, tokenizer)
        expect = covariance_expectations(cfg, covariance_manifest("", None, targets, cfg, texts, fingerprint=fingerprint))
    return Covariances.load(covariance, expect=expect, lazy=lazy)


def collect_covariances(model, tokenizer, targets: list[str], cfg: InitConfig, model_id: str = "", progress: bool = True) -> Covariances:
    """C = XᵀX/n for every target group of ``model`` (in memory) on ``cfg.calib``."""
    texts = calibration_texts(cfg, tokenizer)
    manifest = covariance_manifest(model_id, model, targets, cfg, texts)
    batches, n_batches = calibration_batches(tokenizer, texts, cfg.calib.max_length, cfg.calib.batch_size, cfg.heldout_every)
    dtype = getattr(torch, cfg.cov_dtype)
    return collect(model, batches, targets, dtype, progress=progress, total=n_batches, manifest=manifest)


def checkpoint_covariances(model_id: str, path: Path, skel, ckpt: Checkpoint, order: list[str], targets: list[str],
                           cfg: InitConfig, covariance: str | Path | None, trust_remote_code: bool, progress: bool,
                           spill: Path | None = None, tok_dir: Path | None = None, *, device: torch.device) -> Covariances:
    """The covariances of a model given as a checkpoint directory ``path`` (``skel``: its weightless
    skeleton, ``ckpt``: its tensors, ``order``: its untied state-dict keys in module order): from ``covariance`` (a saved file, checked against this model,
    targets and data) or collected one decoder block at a time, spilled to ``spill``; a model that is
    not a plain stack of blocks runs whole, in fp32. The tokenizer, loaded here anyway, is saved to
    ``tok_dir`` so that the output never loads it again on top of the layers. ``device``: where the
    blocks run (resolved by the caller)."""
    from transformers import AutoTokenizer

    floats = [k for k in order if ckpt.spec(k)[1].is_floating_point]
    fingerprint = model_fingerprint(skel.config, ckpt.first_rows, floats)
    tok = None
    if cfg.calib.data is not None:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if tok_dir is not None:
            tok.save_pretrained(str(tok_dir))
    if covariance is not None:
        return reused_covariances(covariance, cfg, targets, fingerprint, tok, lazy=True)
    texts = calibration_texts(cfg, tok)
    full = covariance_manifest(model_id, None, targets, cfg, texts, fingerprint=fingerprint)
    batches = list(calibration_batches(tok, texts, cfg.calib.max_length, cfg.calib.batch_size, cfg.heldout_every)[0])
    del tok  # the walk needs only the token ids; Gemma-3's 262k-entry tokenizer holds ~330 MB
    try:
        return collect_blockwise(skel, ckpt.get, batches, targets, getattr(torch, cfg.cov_dtype), device,
                                 progress, manifest=full, get_rows=ckpt.rows, spill=spill)
    except NotBlockwise as e:
        print(f"qcorda prepare: covariance by a whole-model forward ({e})", file=sys.stderr)
    model, tok = load_model(str(path), trust_remote_code)
    covs = collect_covariances(model, tok, targets, cfg, model_id, progress)
    if covs.manifest.get("model") != fingerprint:  # both read the same weights: a mismatch is a bug
        raise RuntimeError("model fingerprint differs between the checkpoint and the loaded model")
    return covs
