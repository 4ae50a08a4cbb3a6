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
- LoftQ: alternate Q_t = Q(W − s·B_{t−1}A_{t−1}) and B_tA_t = best rank-r fit of W − deq(Q_t).
- QERA (QERA-exact, CLoQ, EoRA): Q = Q(W) once, B·A = the best rank-r fit of W − deq(Q)
  in the activation norm ‖(·)L‖_F with C = L·Lᵀ (SVD of E·L, mapped back through L⁻¹).
- qcorda-cal: like LoftQ, but every fit is QERA's activation-norm fit; it starts from the
  CorDA-IPM split (``start="ipm"``) or from B·A = 0 (``start="zero"``: iteration 1 is QERA).

The iterative methods keep the codes their last fit was made for (:attr:`Split.codes`): the
stored residual is Q_T, and s·B_T·A_T is the optimal rank-r fit of W − deq(Q_T) in the
method's norm. Quantizing W − s·B_T·A_T once more would leave the new rounding error
uncorrected. With a held-out covariance (``iters="auto"``) every iterate is scored on
held-out activations and the best one is kept.

Every split is *balanced*: component i has ‖B_i‖ = ‖A_i‖ (columns of B, rows of A), so the
factors do not depend on the scale of the activations (CorDA's C⁻¹ would otherwise move it
all into A).

Every function here is pure: tensors in, a frozen :class:`Split` out; the quantizer is passed in.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import torch

from .methods import NAMES, TABLE, spec

if TYPE_CHECKING:
    from .quantize import Quantizer

Which = Literal["top", "bottom"]
#: A covariance whose mean diagonal is below this carries no activations (all-zero inputs).
VANISHING = 1e-20


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
    codes: object | None = None
    """Iterative methods: the quantized residual Q_T that B·A was fitted to (what ``Quantizer.quantize``
    returns, e.g. an ``NF4Weight``); it is stored as is. None: the caller quantizes W − s·B·A."""
    iters: int | None = None
    """Iterative methods: the number of alternations T of the kept iterate."""
    heldout: tuple[float, ...] | None = None
    """With ``iters="auto"``: the held-out activation error tr(E_t·C_h·E_tᵀ) of every iterate t."""


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


def _from_factors(U: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor, scaling: float, damping=None, orthonormal: bool = True) -> Split:
    """Balanced factors with s·B·A = U·diag(S)·Vᵀ, U ``(m, r)`` orthonormal, Vᵀ ``(r, n)``.

    ``orthonormal`` rows of Vᵀ (PiSSA, LoftQ): B = U√S/√s, A = √S·Vᵀ/√s, already balanced.
    Other rows (CorDA's (VᵀC⁻¹)_i, whose norms n_i go as 1/scale(C), and the activation fit's
    (VᵀL⁻¹)_i): B_i = U_i·√(S_i·n_i/s), A_i = Vᵀ_i·√(S_i/(n_i·s)), so ‖B_i‖ = ‖A_i‖ = √(S_i·n_i/s)
    and the split no longer depends on the scale of the activations.
    """
    S = S.clamp_min(0)
    norms = torch.ones_like(S)
    if not orthonormal:
        norms = torch.linalg.vector_norm(Vt, dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    root_b = (S * norms / scaling).sqrt()
    root_a = (S / (norms * scaling)).sqrt()
    return Split(
        B=(U * root_b).contiguous(),
        A=(root_a[:, None] * Vt).contiguous(),
        damping=damping,
        sigma=S.clone(),
    )


def svd_top(M: torch.Tensor, r: int, solver: str = "full", oversample: int = 16, power_iters: int = 4, seed: int = 0):
    """Top-r singular triplets (U_r, S_r, V_rᵀ) of M ``(m, n)``.

    ``randomized`` is ``torch.svd_lowrank``'s algorithm with q = r + oversample columns and
    ``power_iters`` power iterations, its sketch drawn from ``seed`` (:func:`svd_lowrank`).
    """
    if solver == "randomized" and r + oversample < min(M.shape):
        U, S, V = svd_lowrank(M, r + oversample, power_iters, seed)
        return U[:, :r], S[:r], V[:, :r].T
    U, S, Vt = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r], S[:r], Vt[:r]


def svd_lowrank(M: torch.Tensor, q: int, niter: int, seed: int):
    """``(U, S, V)`` of ``torch.svd_lowrank(M, q, niter)`` (Halko et al. 2009, algorithms 4.4 and 5.1, the
    same operations in the same order), its Gaussian sketch drawn on the CPU by a generator seeded with
    ``seed`` and moved to ``M``'s device. torch draws it with the device's own generator, which for one seed
    gives other numbers on a GPU (Philox) than on the CPU (Mersenne twister): the GPU's split would differ from
    the CPU's beyond rounding. On the CPU the result is bit for bit ``torch.manual_seed(seed)`` then
    ``torch.svd_lowrank``, and no global generator is touched."""
    m, n = M.shape
    A = M.mH if m < n else M  # tall
    R = torch.randn(A.shape[-1], q, dtype=A.dtype, generator=torch.Generator().manual_seed(seed)).to(A.device)
    Q = torch.linalg.qr(torch.matmul(A, R)).Q
    for _ in range(niter):
        Q = torch.linalg.qr(torch.matmul(A.mH, Q)).Q
        Q = torch.linalg.qr(torch.matmul(A, Q)).Q
    U, S, Vh = torch.linalg.svd(torch.matmul(Q.mH, A), full_matrices=False)
    U, V = Q.matmul(U), Vh.mH
    return (V, S, U) if m < n else (U, S, V)


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
    scale = C.diagonal().mean()
    if abs(float(scale)) <= VANISHING:
        raise DecompositionError(
            f"{name}: the layer's inputs are zero on the calibration data (its covariance vanishes, mean diagonal "
            f"{float(scale):.3g}), so no data-driven split exists; leave the layer out of --target-modules or "
            "calibrate on other data (--calib-data)"
        )
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
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
    return _from_factors(U, S, VtCinv, scaling, damping=cov.damping, orthonormal=False)


def activation_fit(E: torch.Tensor, cov: DampedCovariance, r: int, scaling: float, **svd_kw) -> Split:
    """argmin over rank-r M of ‖(E − M)·L‖_F with C = L·Lᵀ: M = U_rΣ_rV_rᵀL⁻¹, SVD of E·L."""
    U, S, Vt = svd_top(E.float() @ cov.L, r, **_svd_defaults(svd_kw))
    VtLinv = torch.linalg.solve_triangular(cov.L.T, Vt.T.contiguous(), upper=True).T
    return _from_factors(U, S, VtLinv, scaling, damping=cov.damping, orthonormal=False)


def activation_error(E: torch.Tensor, C: torch.Tensor) -> float:
    """‖E·L‖²_F = tr(E·C·Eᵀ) for E ``(out_features, in_features)``, C = L·Lᵀ ``(in_features, in_features)``."""
    return float(((E @ C.to(E)) * E).sum())


def alternate(
    weight: torch.Tensor,
    start: Split | None,
    iters: int,
    scaling: float,
    quantizer: "Quantizer",
    fit: Callable[[torch.Tensor], Split],
    heldout: torch.Tensor | None = None,
    start_is_iterate: bool = False,
) -> Split:
    """LoftQ-style alternation: for t = 1..iters, Q_t = Q(W − s·B_{t−1}A_{t−1}) and B_tA_t = fit(W − deq(Q_t)).

    ``start`` None begins from B·A = 0 (LoftQ, QERA). Returns B_TA_T with ``codes`` = Q_T, the
    codes it was fitted to, which the caller stores as they are.

    ``heldout`` ``(in_features, in_features)``: a covariance of held-out activations. Every
    iterate's stored error E_t = W − deq(Q_t) − s·B_tA_t is scored by tr(E_t·C_h·E_tᵀ) and the
    lowest one is kept (its T in ``iters``, all scores in ``heldout``): the error of the
    stored model is not monotone in t. ``start_is_iterate``: ``start`` (with its residual
    quantized) is iterate 1 and the alternations are 2..iters+1 (``qpissa``: T = 1 is PiSSA).
    """
    W = weight.float()
    split, t0 = start, 2 if start_is_iterate else 1
    best: Split | None = None
    scores: list[float] = []
    if start_is_iterate and heldout is not None:
        assert start is not None
        codes = quantizer.quantize(residual(W, start, scaling))
        scores.append(activation_error(W - quantizer.dequantize(codes) - low_rank_term(start, scaling), heldout))
        best = replace(start, codes=codes, iters=1)
    for t in range(t0, t0 + iters):
        R = W if split is None else residual(W, split, scaling)
        codes = quantizer.quantize(R)
        D = quantizer.dequantize(codes)
        del R
        split = replace(fit(W - D), codes=codes, iters=t)
        if heldout is not None:
            scores.append(activation_error(W - D - low_rank_term(split, scaling), heldout))
            if best is None or scores[-1] < min(scores[:-1]):
                best = split
        del D
    assert split is not None
    if heldout is None:
        return split
    assert best is not None
    return replace(best, heldout=tuple(scores))


def _svd_defaults(kw: dict) -> dict:
    return {
        "solver": kw.get("solver", "full"),
        "oversample": kw.get("oversample", 16),
        "power_iters": kw.get("power_iters", 4),
        "seed": kw.get("seed", 0),
    }


def matmul_precision() -> str:
    """torch's fp32 matmul precision as results record it: ``highest`` (full fp32), ``high`` (TF32 on
    CUDA), ``medium``; ``cuda:<fp32_precision>`` where the environment set it through torch's newer
    per-backend API (``torch.backends.cuda.matmul.fp32_precision``), which the legacy getter refuses."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return f"cuda:{torch.backends.cuda.matmul.fp32_precision}"


@contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls at full precision inside, whatever the environment asked for (TF32 on an Ampere or
    later GPU: ``torch.backends.cuda.matmul.allow_tf32``, ``set_float32_matmul_precision("high")``), and
    the setting restored after. TF32 rounds the inputs to 10 mantissa bits: an SVD of W·C would differ
    from the CPU's in the 4th digit. The API the environment used is the one set (torch refuses a mix)."""
    try:
        before = torch.get_float32_matmul_precision()
    except RuntimeError:
        before = None
    if before is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def decompose(
    method: str,
    weight: torch.Tensor,
    r: int,
    scaling: float,
    *,
    cov: DampedCovariance | None = None,
    iters: int = 1,
    quantizer: "Quantizer | None" = None,
    heldout: torch.Tensor | None = None,
    start: Literal["ipm", "zero"] = "ipm",
    seed: int = 0,
    solver: str = "full",
    oversample: int = 16,
    power_iters: int = 4,
) -> Split:
    """The front door: the split that ``method`` makes of ``weight`` ``(out_features, in_features)``.

    ``cov`` (the damped calibration covariance) is required by ``qcorda-*`` and ``qera``;
    ``quantizer`` by the iterative methods (``loftq``, ``qcorda-cal``, ``qera``, ``qpissa`` with
    iters > 1), whose split carries the codes to store. ``iters``: alternations (``qpissa``:
    1 + alternations); with ``heldout`` (a held-out covariance) it is the maximum and the best
    iterate on held-out activations is kept. ``start``: where ``qcorda-cal`` starts.
    """
    W = weight.float()
    if not torch.isfinite(W).all():
        raise DecompositionError("the weight has NaN/Inf entries")
    if method not in DECOMPOSITIONS_OF:
        raise ValueError(f"unknown method {method!r}" + (" (PEFT initializes it: qcorda.baselines)" if method in NAMES else ""))
    if spec(method).covariance:
        _need(cov, method, "cov")
    svd_kw = dict(solver=solver, oversample=oversample, power_iters=power_iters, seed=seed)
    with full_fp32_matmul():  # the same split on every GPU and the CPU, TF32 or not
        return DECOMPOSITIONS_OF[method](W, r, scaling, _Job(method, cov, iters, quantizer, heldout, start, seed, svd_kw))


@dataclass(frozen=True)
class _Job:
    """:func:`decompose`'s arguments beyond W, r, s, as every decomposition receives them."""

    method: str
    cov: DampedCovariance | None
    iters: int
    quantizer: "Quantizer | None"
    heldout: torch.Tensor | None
    start: str
    seed: int
    svd_kw: dict


def _qlora(W: torch.Tensor, r: int, scaling: float, job: _Job) -> Split:
    return qlora_split(W, r, job.seed)


def _milora(W: torch.Tensor, r: int, scaling: float, job: _Job) -> Split:
    return svd_split(W, r, scaling, "bottom")


def _pissa(W: torch.Tensor, r: int, scaling: float, job: _Job) -> Split:
    """The top-r SVD split, then ``iters − 1`` LoftQ alternations from it."""
    first = svd_split(W, r, scaling, "top", **job.svd_kw)
    if job.iters - 1 <= 0:
        return first
    _need(job.quantizer, job.method, "quantizer")
    fit = lambda E: svd_split(E, r, scaling, "top", **job.svd_kw)  # noqa: E731
    return alternate(W, first, job.iters - 1, scaling, job.quantizer, fit, job.heldout, start_is_iterate=True)


def _loftq(W: torch.Tensor, r: int, scaling: float, job: _Job) -> Split:
    if job.iters <= 0:
        raise ValueError(f"method {job.method!r} needs iters >= 1, got {job.iters}")
    _need(job.quantizer, job.method, "quantizer")
    fit = lambda E: svd_split(E, r, scaling, "top", **job.svd_kw)  # noqa: E731
    return alternate(W, None, job.iters, scaling, job.quantizer, fit, job.heldout, start_is_iterate=False)


def _corda_ipm(W: torch.Tensor, r: int, scaling: float, job: _Job) -> Split:
    return corda_split(W, job.cov, r, scaling, "top", **job.svd_kw)


def _corda_kpm(W: torch.Tensor, r: int, scaling: float, job: _Job) -> Split:
    return corda_split(W, job.cov, r, scaling, "bottom", **job.svd_kw)


def _qera(W: torch.Tensor, r: int, scaling: float, job: _Job) -> Split:
    """One activation-norm fit to the error of Q(W)."""
    _need(job.quantizer, job.method, "quantizer")
    fit = lambda E: activation_fit(E, job.cov, r, scaling, **job.svd_kw)  # noqa: E731
    return alternate(W, None, 1, scaling, job.quantizer, fit)


def _qcorda_cal(W: torch.Tensor, r: int, scaling: float, job: _Job) -> Split:
    """Activation-norm alternations from the CorDA-IPM split (``start="ipm"``) or from B·A = 0."""
    _need(job.quantizer, job.method, "quantizer")
    fit = lambda E: activation_fit(E, job.cov, r, scaling, **job.svd_kw)  # noqa: E731
    first = corda_split(W, job.cov, r, scaling, "top", **job.svd_kw) if job.start == "ipm" else None
    return alternate(W, first, job.iters, scaling, job.quantizer, fit, job.heldout)


#: The decompositions by name (:attr:`qcorda.methods.MethodSpec.decomposition`): ``fn(W, r, s, job) -> Split``.
DECOMPOSITIONS: dict[str, Callable[[torch.Tensor, int, float, _Job], Split]] = {
    "random-a": _qlora,
    "svd-bottom": _milora,
    "svd-top": _pissa,
    "svd-alternation": _loftq,
    "corda-top": _corda_ipm,
    "corda-bottom": _corda_kpm,
    "activation-fit": _qera,
    "activation-alternation": _qcorda_cal,
}
#: Each method of the table that qcorda splits, with its decomposition.
DECOMPOSITIONS_OF: dict[str, Callable[[torch.Tensor, int, float, _Job], Split]] = {
    s.name: DECOMPOSITIONS[s.decomposition] for s in TABLE if s.decomposition is not None
}


def _need(value, method: str, what: str) -> None:
    if value is None:
        raise ValueError(f"method {method!r} needs {what}")
