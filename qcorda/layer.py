"""One target layer: split, quantize, measure. Both prepare engines and ``qcorda compare`` call it.

For a target W ``(out_features, in_features)``, :func:`prepare_layer` returns the fp32 split
(:mod:`qcorda.decompose`; PEFT's own init for the baselines, :mod:`qcorda.baselines`), the NF4
codes to store (the split's own for the iterative methods, else NF4(W − s·B·A), none for the
16-bit ``lora``), and a :class:`~qcorda.prepared.LayerResult` with the error of the initialized
layer against plain NF4's.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from .baselines import baseline_layer
from .config import ConfigError, InitConfig
from .covariance import Covariances
from .decompose import DampedCovariance, DecompositionError, Split, damp, decompose, full_fp32_matmul, low_rank_term, residual
from .methods import spec
from .prepared import LayerResult
from .quantize import NF4, NF4Weight, dequantize_nf4, nf4_roundtrip, quantize_nf4
from .targets import layer_seed


def split_layer(weight: torch.Tensor, cfg: InitConfig, name: str, covs: Covariances | None) -> Split:
    """The fp32 split of one layer's weight ``(out_features, in_features)`` by ``cfg.method``.

    ``covs``: the calibration covariances (methods with ``cfg.needs_covariance``). With
    ``iters="auto"`` the split is fitted on C_fit and its iterate chosen on C_h, the held-out records.
    """
    damped: DampedCovariance | None = None
    heldout = None
    if cfg.needs_covariance:
        if covs is None:
            raise ConfigError(f"method {cfg.method} needs calibration data for layer {name}; pass --calib-data")
        if covs.tokens_of(name) == 0:
            # an expert its router never chose on the calibration data: C = 0 has no split, so it takes the
            # damping rule's limit (λ → ∞, C + λ·I ∝ I), the data-free split of W; the report says so
            C = torch.eye(weight.shape[1], dtype=torch.float32)
            heldout = C.to(weight.device) if cfg.heldout_every else None
        elif cfg.heldout_every:
            C, heldout = covs.fit_of(name), covs.heldout_of(name).to(weight.device)
        else:
            C = covs.of(name)
        if spec(cfg.method).covariance:
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


def prepare_layer(weight: torch.Tensor, cfg: InitConfig, name: str, covs: Covariances | None,
                  eva_A: torch.Tensor | None = None) -> tuple[Split, NF4Weight | None, LayerResult]:
    """Split, quantize, and measure the error against plain NF4.

    The stored codes are the split's own (iterative methods: Q_T, which B_T·A_T was fitted to)
    or NF4(W − s·B·A). ``eva_A``: EVA's components of the layer (``qeva``).

    All of it runs at full fp32 (:func:`~qcorda.decompose.full_fp32_matmul`), not only the split: the residual
    W − s·B·A whose codes are stored, the damping's Cholesky of C and the error figures would otherwise be
    computed in TF32 on a GPU whose environment asks for it, and the stored codes would differ from the CPU's."""
    with full_fp32_matmul():
        return _prepare_layer(weight, cfg, name, covs, eva_A)


def _prepare_layer(weight: torch.Tensor, cfg: InitConfig, name: str, covs: Covariances | None,
                   eva_A: torch.Tensor | None) -> tuple[Split, NF4Weight | None, LayerResult]:
    if spec(cfg.method).baseline:
        return baseline_layer(weight, cfg, name, eva_A)
    t0 = time.perf_counter()
    W = weight.float()
    split = split_layer(W, cfg, name, covs)
    q = split.codes if split.codes is not None else quantize_nf4(residual(W, split, cfg.scaling))
    split = replace(split, codes=None)  # the codes travel as q; the split keeps only B and A
    err = _squared_distance(W, dequantize_nf4(q).add_(low_rank_term(split, cfg.scaling)))
    qlora_err = _squared_distance(W, nf4_roundtrip(W))
    tokens = covs.routed.get(covs.members.get(name)) if covs is not None and cfg.needs_covariance else None  # experts only
    result = LayerResult(name, tuple(W.shape), err, qlora_err, split.damping, time.perf_counter() - t0, split.iters, tokens)
    return split, q, result


def _squared_distance(W: torch.Tensor, W_eff: torch.Tensor) -> float:
    """‖W − W_eff‖²_F, computed in ``W_eff``'s storage: at a 7B layer every (out, in) fp32 temporary
    is 0.2 GB, and this runs beside the split's workspace."""
    return W_eff.sub_(W).pow_(2).sum().item()
