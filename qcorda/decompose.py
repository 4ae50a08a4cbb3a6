"""Low-rank splits W ≈ W_res + s·B·A, computed in fp32 from the original weights.

Shapes: W ``(out_features, in_features)``, B ``(out_features, r)``, A ``(r, in_features)``,
C ``(in_features, in_features)``. PEFT computes ``y = x·W_resᵀ + s·(x·Aᵀ)·Bᵀ`` with
s = alpha / r, so every split below stores B and A divided by √s: the product s·B·A
is then the rank-r term the method asks for, whatever alpha is.

Methods
-------
- PiSSA / MiLoRA: SVD W = UΣVᵀ, B = U_r√Σ_r, A = √Σ_r V_rᵀ (top or bottom r).
- CorDA: SVD of W·C = UΣVᵀ, B = U_r√Σ_r, A = √Σ_r (VᵀC⁻¹)_r. IPM keeps the largest r
  components, KPM the smallest. C is damped (C + λ·mean(diag C)·I) until Cholesky
  succeeds; C⁻¹ is applied by a Cholesky solve, never formed.
- LoftQ: alternate deq(Q(W − s·BA)) and B·A = best rank-r fit of W − deq(Q).
- qcorda-cal: like LoftQ, but the fit minimizes ‖(E − BA)·L‖_F with C = L·Lᵀ, the
  error seen by the calibration activations (SVD of E·L, mapped back through L⁻¹).

Every function here is pure: tensors in, a frozen :class:`Split` out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

Which = Literal["top", "bottom"]


class DecompositionError(RuntimeError):
    """A layer could not be decomposed (non-finite weights, singular covariance)."""


@dataclass(frozen=True)
class Split:
    """A rank-r adapter init: s·B·A is the part of W moved out of the quantized residual."""

    B: torch.Tensor
    """``(out_features, r)``, fp32."""
    A: torch.Tensor
    """``(r, in_features)``, fp32."""
    damping: float | None = None
    """Final ridge λ (relative to mean(diag C)) for data-driven splits, else None."""
    sigma: torch.Tensor | None = None
    """The r singular values the split was built from (of W, W·C or E·L), fp32."""


@dataclass(frozen=True)
class DampedCovariance:
    """C_d = C + λ·mean(diag C)·I and its Cholesky factor L (C_d = L·Lᵀ)."""

    C: torch.Tensor
    """``(in_features, in_features)``, fp32, symmetric positive definite."""
    L: torch.Tensor
    """``(in_features, in_features)``, lower triangular."""
    damping: float
    """The λ that made C_d positive definite."""


def low_rank_term(split: Split, scaling: float) -> torch.Tensor:
    """s·B·A ``(out_features, in_features)``."""
    return scaling * (split.B @ split.A)


def residual(weight: torch.Tensor, split: Split, scaling: float) -> torch.Tensor:
    """W_res = W − s·B·A in fp32."""
    return weight.float() - low_rank_term(split, scaling)


def _from_factors(U: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor, scaling: float, damping=None) -> Split:
    """B = U√S/√s, A = √S·Vᵀ/√s, so that s·B·A = U·diag(S)·Vᵀ."""
    root = (S.clamp_min(0) / scaling).sqrt()
    return Split(
        B=(U * root).contiguous(),
        A=(root[:, None] * Vt).contiguous(),
        damping=damping,
        sigma=S.clone(),
    )


def svd_top(M: torch.Tensor, r: int, solver: str = "full", oversample: int = 16, power_iters: int = 4, seed: int = 0):
    """Top-r singular triplets (U_r, S_r, V_rᵀ) of M ``(m, n)``.

    ``randomized`` uses ``torch.svd_lowrank`` with q = r + oversample columns and
    ``power_iters`` power iterations, seeded so that the result is reproducible.
    """
    if solver == "randomized" and r + oversample < min(M.shape):
        devices = [M.device] if M.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(M, q=r + oversample, niter=power_iters)
        return U[:, :r], S[:r], V[:, :r].T
    U, S, Vt = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r], S[:r], Vt[:r]


def svd_bottom(M: torch.Tensor, r: int):
    """Bottom-r singular triplets of M, from a full SVD in float64.

    Small singular values of an fp32 SVD carry an absolute error of about
    eps32·σ_max, which is the size of the values themselves for ill-conditioned
    weights; float64 keeps them (and their vectors) accurate.
    """
    U, S, Vt = torch.linalg.svd(M.double(), full_matrices=False)
    k = S.shape[0]
    return U[:, k - r :].float(), S[k - r :].float(), Vt[k - r :].float()


def _svd(M: torch.Tensor, r: int, which: Which, solver: str, oversample: int, power_iters: int, seed: int):
    if which == "bottom":
        return svd_bottom(M, r)
    return svd_top(M, r, solver, oversample, power_iters, seed)


def damp(C: torch.Tensor, ridge: float = 0.01, max_steps: int = 6, name: str = "layer") -> DampedCovariance:
    """C + λ·mean(diag C)·I with the smallest λ ∈ {ridge, 10·ridge, ...} that Cholesky accepts.

    λ grows at most ``max_steps`` times; beyond that the covariance is reported as
    singular, naming the layer.
    """
    C = C.float()
    if not torch.isfinite(C).all():
        raise DecompositionError(f"{name}: the input covariance has NaN/Inf entries; the model's activations overflow")
    scale = C.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    lam = ridge
    for _ in range(max_steps + 1):
        Cd = C + (lam * scale) * eye
        L, info = torch.linalg.cholesky_ex(Cd)
        if int(info) == 0:
            return DampedCovariance(Cd, L, lam)
        lam *= 10
    raise DecompositionError(
        f"{name}: the input covariance stays singular after damping up to λ={lam / 10:g}; "
        "raise --ridge or --max-damping-steps, or calibrate on more samples (--calib-samples)"
    )


def qlora_split(weight: torch.Tensor, r: int, seed: int) -> Split:
    """PEFT's default init: A ~ kaiming_uniform(a=√5) (i.e. U(±1/√in)), B = 0."""
    out_features, in_features = weight.shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.empty(r, in_features, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
    B = torch.zeros(out_features, r, dtype=torch.float32)
    return Split(B=B.to(weight.device), A=A.to(weight.device))


def svd_split(weight: torch.Tensor, r: int, scaling: float, which: Which = "top", **svd_kw) -> Split:
    """PiSSA (``top``) / MiLoRA (``bottom``): s·B·A = U_rΣ_rV_rᵀ of W."""
    U, S, Vt = _svd(weight.float(), r, which, **_svd_defaults(svd_kw))
    return _from_factors(U, S, Vt, scaling)


def corda_split(weight: torch.Tensor, cov: DampedCovariance, r: int, scaling: float, which: Which = "top", **svd_kw) -> Split:
    """CorDA: SVD of W·C = UΣVᵀ; s·B·A = U_rΣ_r(VᵀC⁻¹)_r (IPM ``top``, KPM ``bottom``).

    C⁻¹·V_r comes from a Cholesky solve with the damped C, so that the full-rank sum
    of all components is exactly W·C·C⁻¹ = W.
    """
    U, S, Vt = _svd(weight.float() @ cov.C, r, which, **_svd_defaults(svd_kw))
    VtCinv = torch.cholesky_solve(Vt.T.contiguous(), cov.L).T  # (VᵀC⁻¹)_r; C is symmetric
    return _from_factors(U, S, VtCinv, scaling, damping=cov.damping)


def activation_fit(E: torch.Tensor, cov: DampedCovariance, r: int, scaling: float, **svd_kw) -> Split:
    """argmin over rank-r M of ‖(E − M)·L‖_F with C = L·Lᵀ: M = U_rΣ_rV_rᵀL⁻¹, SVD of E·L."""
    U, S, Vt = svd_top(E.float() @ cov.L, r, **_svd_defaults(svd_kw))
    VtLinv = torch.linalg.solve_triangular(cov.L.T, Vt.T.contiguous(), upper=True).T
    return _from_factors(U, S, VtLinv, scaling, damping=cov.damping)


def alternate(
    weight: torch.Tensor,
    start: Split | None,
    iters: int,
    scaling: float,
    roundtrip: Callable[[torch.Tensor], torch.Tensor],
    fit: Callable[[torch.Tensor], Split],
) -> Split:
    """LoftQ-style alternation, ``iters`` times: D = deq(Q(W − s·BA)); B·A = fit(W − D).

    ``start`` None begins from B·A = 0 (LoftQ). The caller quantizes the final
    W − s·B·A once more, so the stored residual is consistent with the last fit.
    """
    W = weight.float()
    split = start
    for _ in range(iters):
        R = W if split is None else residual(W, split, scaling)
        split = fit(W - roundtrip(R))
    assert split is not None
    return split


def _svd_defaults(kw: dict) -> dict:
    return {
        "solver": kw.get("solver", "full"),
        "oversample": kw.get("oversample", 16),
        "power_iters": kw.get("power_iters", 4),
        "seed": kw.get("seed", 0),
    }


def decompose(
    method: str,
    weight: torch.Tensor,
    r: int,
    scaling: float,
    *,
    cov: DampedCovariance | None = None,
    iters: int = 1,
    roundtrip: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    solver: str = "full",
    oversample: int = 16,
    power_iters: int = 4,
) -> Split:
    """The front door: the split that ``method`` makes of ``weight`` ``(out_features, in_features)``.

    ``cov`` is required by the ``qcorda-*`` methods, ``roundtrip`` (deq∘Q, NF4) by the
    iterative ones (``loftq``, ``qcorda-cal``, ``qpissa`` with iters > 1).
    """
    W = weight.float()
    if not torch.isfinite(W).all():
        raise DecompositionError("the weight has NaN/Inf entries")
    svd_kw = dict(solver=solver, oversample=oversample, power_iters=power_iters, seed=seed)
    if method == "qlora":
        return qlora_split(W, r, seed)
    if method == "qmilora":
        return svd_split(W, r, scaling, "bottom")
    if method in ("qpissa", "loftq"):
        start = svd_split(W, r, scaling, "top", **svd_kw) if method == "qpissa" else None
        n = iters - 1 if method == "qpissa" else iters
        if n <= 0:
            assert start is not None
            return start
        _need(roundtrip, method, "roundtrip")
        return alternate(W, start, n, scaling, roundtrip, lambda E: svd_split(E, r, scaling, "top", **svd_kw))
    if method in ("qcorda-ipm", "qcorda-kpm", "qcorda-cal"):
        _need(cov, method, "cov")
        which: Which = "bottom" if method == "qcorda-kpm" else "top"
        start = corda_split(W, cov, r, scaling, which, **svd_kw)
        if method != "qcorda-cal":
            return start
        _need(roundtrip, method, "roundtrip")
        return alternate(W, start, iters, scaling, roundtrip, lambda E: activation_fit(E, cov, r, scaling, **svd_kw))
    raise ValueError(f"unknown method {method!r}")


def _need(value, method: str, what: str) -> None:
    if value is None:
        raise ValueError(f"method {method!r} needs {what}")
