"""Invariants of the fp32 splits (pure tensor functions, no model)."""

import pytest
import torch

from qcorda.decompose import (
    DecompositionError,
    activation_fit,
    corda_split,
    damp,
    decompose,
    low_rank_term,
    residual,
    svd_split,
    svd_top,
)
from qcorda.methods import names, spec
from qcorda.quantize import NF4, dequantize_nf4, nf4_roundtrip

METHODS = names(baseline=False)


def _weight(out=48, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) / inp**0.5


def _cov(d=64, n=400, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, d)  # anisotropic inputs
    return X.T @ X / n


def _truncated(M: torch.Tensor, r: int, which: str) -> torch.Tensor:
    """The rank-r truncation U_r Σ_r V_rᵀ of M by the top or bottom r singular triplets (torch.linalg.svd)."""
    U, S, Vt = torch.linalg.svd(M.double(), full_matrices=False)
    keep = slice(0, r) if which == "top" else slice(len(S) - r, len(S))
    return (U[:, keep] * S[keep]) @ Vt[keep]


def _definition(method: str, W: torch.Tensor, dc, r: int, codes) -> torch.Tensor:
    """s·B·A as the method defines it, computed from scratch in float64 (not by qcorda.decompose)."""
    L, C = dc.L.double(), dc.C.double()
    if codes is not None:  # the alternating methods: the best rank-r fit to what the stored codes miss
        E = W.double() - dequantize_nf4(codes).double()
        if not spec(method).covariance:
            return _truncated(E, r, "top")
        return torch.linalg.solve_triangular(L, _truncated(E @ L, r, "top"), upper=False, left=False)  # (·)L⁻¹
    name = spec(method).decomposition
    if name == "random-a":
        return torch.zeros_like(W, dtype=torch.float64)
    if name in ("svd-top", "svd-bottom"):
        return _truncated(W, r, name.removeprefix("svd-"))
    if name in ("corda-top", "corda-bottom"):
        return torch.linalg.solve(C, _truncated(W.double() @ C, r, name.removeprefix("corda-")).T).T  # (·)C⁻¹
    raise AssertionError(f"no reference for {method} ({name}): add it here")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("alpha_over_r", [1.0, 2.0, 0.5])
def test_low_rank_term_is_the_methods_definition_at_every_scaling(method, alpha_over_r):
    """s·B·A is the method's rank-r term (for the alternating methods: the best rank-r fit, in the method's
    norm, of what the stored codes miss), whatever s = α/r is: B and A are stored divided by √s."""
    W, dc = _weight(), damp(_cov())
    r, s = 8, alpha_over_r
    split = decompose(method, W, r, s, cov=dc, iters=3, quantizer=NF4, solver="full")
    assert split.B.shape == (48, r) and split.A.shape == (r, 64)
    term = low_rank_term(split, s).double()
    expect = _definition(method, W, dc, r, split.codes)
    assert (term - expect).norm() <= 1e-4 * max(W.norm(), 1.0), (term - expect).norm()
    # the same split at s = 1: the product does not move with α (the factors scale by 1/√s)
    ref = decompose(method, W, r, 1.0, cov=dc, iters=3, quantizer=NF4, solver="full")
    torch.testing.assert_close(low_rank_term(split, s), low_rank_term(ref, 1.0), atol=2e-5, rtol=1e-4)


def test_pissa_milora_take_top_and_bottom_singular_components():
    W = _weight()
    S = torch.linalg.svdvals(W)
    for which, expect in (("top", S[:6]), ("bottom", S[-6:])):
        term = low_rank_term(svd_split(W, 6, 2.0, which), 2.0)
        torch.testing.assert_close(torch.linalg.svdvals(term)[:6], expect, atol=1e-5, rtol=1e-4)


def test_corda_ipm_kpm_take_largest_and_smallest_components_of_WC():
    W, C = _weight(), _cov()
    dc = damp(C)
    S = torch.linalg.svdvals(W @ dc.C)
    for which, expect in (("top", S[:6]), ("bottom", S[-6:])):
        term = low_rank_term(corda_split(W, dc, 6, 1.0, which), 1.0)
        # (s·B·A)·C = U_r Σ_r V_rᵀ: its singular values are the chosen ones of W·C
        torch.testing.assert_close(torch.linalg.svdvals(term @ dc.C)[:6], expect, atol=1e-4, rtol=1e-4)


def test_corda_full_rank_recovers_W():
    W, C = _weight(32, 32), _cov(32)
    split = corda_split(W, damp(C), 32, 1.0, "top")
    torch.testing.assert_close(low_rank_term(split, 1.0), W, atol=1e-4, rtol=0)


def test_activation_fit_is_optimal_in_activation_norm():
    E, C = _weight(), _cov()
    dc = damp(C)
    fit = low_rank_term(activation_fit(E, dc, 8, 1.0), 1.0)
    plain = low_rank_term(svd_split(E, 8, 1.0), 1.0)
    act = lambda M: ((E - M) @ dc.L).pow(2).sum()
    assert act(fit) < act(plain)
    # Eckart–Young in the L-weighted norm: the error is the tail of σ(E·L)
    tail = torch.linalg.svdvals(E @ dc.L)[8:].pow(2).sum()
    torch.testing.assert_close(act(fit), tail, rtol=1e-4, atol=1e-6)


def test_loftq_and_cal_reduce_quantized_error():
    W, C = _weight(128, 128), _cov(128)
    dc = damp(C)
    plain = (W - nf4_roundtrip(W)).pow(2).sum()

    def err(split):
        return (W - nf4_roundtrip(residual(W, split, 1.0)) - low_rank_term(split, 1.0))

    lq = decompose("loftq", W, 8, 1.0, iters=5, quantizer=NF4)
    assert err(lq).pow(2).sum() < 0.9 * plain
    ipm = decompose("qcorda-ipm", W, 8, 1.0, cov=dc)
    cal = decompose("qcorda-cal", W, 8, 1.0, cov=dc, iters=5, quantizer=NF4)
    act = lambda E: (E @ dc.L).pow(2).sum()
    assert act(err(cal)) < act(err(ipm))


def test_damping_grows_on_singular_covariance_and_is_bounded():
    X = torch.randn(10, 32)
    C = X.T @ X / 10  # rank 10 < 32
    dc = damp(C, ridge=1e-12, max_steps=12)
    assert dc.damping > 1e-12
    torch.linalg.cholesky(dc.C)
    with pytest.raises(DecompositionError, match="--ridge"):
        damp(torch.zeros(8, 8) - torch.eye(8), ridge=1e-3, max_steps=1, name="layers.0.q_proj")


def test_nonfinite_covariance_names_layer():
    C = _cov(16)
    C[0, 0] = float("nan")
    with pytest.raises(DecompositionError, match="layers.3.mlp.up_proj"):
        damp(C, name="layers.3.mlp.up_proj")


def test_randomized_svd_within_one_percent_of_full():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(512, 256, generator=g) @ torch.diag(torch.logspace(0, -2, 256)) @ torch.linalg.qr(torch.randn(256, 256, generator=g))[0]
    full = low_rank_term(svd_split(W, 32, 1.0), 1.0)
    rand = low_rank_term(svd_split(W, 32, 1.0, solver="randomized", oversample=16, power_iters=4), 1.0)
    e_full, e_rand = (W - full).norm(), (W - rand).norm()
    assert e_rand <= 1.01 * e_full
    U1, S1, _ = svd_top(W, 8, "randomized", seed=3)
    U2, S2, _ = svd_top(W, 8, "randomized", seed=3)
    assert torch.equal(S1, S2) and torch.equal(U1, U2)  # seeded: reproducible


def test_qlora_split_is_peft_default_and_seeded():
    W = _weight(16, 100)
    a, b = decompose("qlora", W, 4, 1.0, seed=5), decompose("qlora", W, 4, 1.0, seed=5)
    assert torch.equal(a.A, b.A) and not a.B.any()
    assert a.A.abs().max() <= 1 / 100**0.5 + 1e-6  # kaiming_uniform(a=√5) bound 1/√in
    assert not torch.equal(a.A, decompose("qlora", W, 4, 1.0, seed=6).A)


# --------------------------------------------------------------------------- kept codes (issue 14)

ITERATIVE_CASES = [  # (method, iters, start): the iterative splits and the previous iterate's arguments
    ("loftq", 3, "ipm"),
    ("qpissa", 3, "ipm"),
    ("qcorda-cal", 3, "ipm"),
    ("qcorda-cal", 3, "zero"),
    ("qera", 1, "ipm"),
]


def _codes_bytes(q):
    return q.packed.view(-1).tolist(), q.quant_state.absmax.view(-1).tolist()


def _previous(method, W, r, s, dc, iters, start):
    """s·B_{T−1}·A_{T−1}: the split the last codes were quantized from (zero before the first)."""
    if method == "qera" or (iters == 1 and (method == "loftq" or start == "zero")):
        return torch.zeros_like(W)
    if method == "qcorda-cal" and iters == 1:
        return low_rank_term(corda_split(W, dc, r, s, "top"), s)
    return low_rank_term(decompose(method, W, r, s, cov=dc, iters=iters - 1, quantizer=NF4, start=start), s)


@pytest.mark.parametrize("method,iters,start", ITERATIVE_CASES)
def test_iterative_splits_keep_the_codes_their_adapter_was_fitted_to(method, iters, start):
    from qcorda.quantize import dequantize_nf4, quantize_nf4

    W, C, r, s = _weight(96, 128), _cov(128), 8, 2.0
    dc = damp(C)
    split = decompose(method, W, r, s, cov=dc, iters=iters, quantizer=NF4, start=start)
    assert split.codes is not None and split.iters == iters
    # the stored codes are bitsandbytes' quantize_4bit of the previous residual, byte for byte
    expect = quantize_nf4(W - _previous(method, W, r, s, dc, iters, start))
    assert _codes_bytes(split.codes) == _codes_bytes(expect)
    # and s·B·A is the optimal rank-r fit of W − deq(Q_stored) in the method's norm
    E = W - dequantize_nf4(split.codes)
    fit = svd_split(E, r, s) if method in ("loftq", "qpissa") else activation_fit(E, dc, r, s)
    torch.testing.assert_close(low_rank_term(split, s), low_rank_term(fit, s), atol=1e-6, rtol=1e-5)


def test_kept_codes_beat_requantizing_the_last_residual():
    """The defect: quantizing W − s·B_T·A_T again leaves the new rounding error uncorrected, and it
    is largest where the activations are (here 4 outlier input channels, as in LLMs)."""
    from qcorda.quantize import dequantize_nf4

    g = torch.Generator().manual_seed(3)
    d = 128
    U, V = (torch.linalg.qr(torch.randn(d, d, generator=g))[0] for _ in range(2))
    W = U @ torch.diag(torch.logspace(0.5, -1.5, d)) @ V.T / d**0.5
    scale = torch.full((d,), 0.3)
    scale[:4] = 30.0
    X = torch.randn(4000, d, generator=g) * scale
    dc = damp(X.T @ X / 4000)
    act = lambda E: (E @ dc.L).pow(2).sum()
    for iters in (1, 5):
        split = decompose("qcorda-cal", W, 16, 1.0, cov=dc, iters=iters, quantizer=NF4, start="zero")
        kept = W - dequantize_nf4(split.codes) - low_rank_term(split, 1.0)
        requantized = W - nf4_roundtrip(residual(W, split, 1.0)) - low_rank_term(split, 1.0)
        assert act(kept) < 0.7 * act(requantized)  # measured 0.27 (iters 1) and 0.66 (iters 5)


def test_qera_with_identity_covariance_is_the_svd_of_the_quantization_error():
    W = _weight(64, 96)
    split = decompose("qera", W, 6, 1.0, cov=damp(torch.eye(96)), quantizer=NF4)
    E = W - nf4_roundtrip(W)
    torch.testing.assert_close(low_rank_term(split, 1.0), low_rank_term(svd_split(E, 6, 1.0), 1.0), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qera_activation_error_is_never_above_plain_nf4(seed):
    from qcorda.quantize import dequantize_nf4

    W, C = _weight(64, 64, seed=seed), _cov(64, seed=seed + 10)
    dc = damp(C)
    split = decompose("qera", W, 4, 1.0, cov=dc, quantizer=NF4)
    act = lambda E: (E @ dc.L).pow(2).sum()
    assert act(W - dequantize_nf4(split.codes) - low_rank_term(split, 1.0)) <= act(W - nf4_roundtrip(W))


@pytest.mark.parametrize("method", names(iterative=True))
def test_auto_iterations_never_keep_an_iterate_worse_than_the_first(method):
    from qcorda.decompose import activation_error
    from qcorda.quantize import dequantize_nf4

    W, r = _weight(96, 128, seed=4), 8
    dc, held = damp(_cov(128, seed=5)), _cov(128, n=60, seed=6)  # fit and held-out covariances differ
    split = decompose(method, W, r, 1.0, cov=dc, iters=6, quantizer=NF4, heldout=held)
    assert len(split.heldout) == 6 and 1 <= split.iters <= 6
    kept = activation_error(W - dequantize_nf4(split.codes) - low_rank_term(split, 1.0), held)
    assert kept == pytest.approx(min(split.heldout), rel=1e-6)
    assert kept <= split.heldout[0]
    # the kept iterate is the one a fixed --iters T would store
    fixed = decompose(method, W, r, 1.0, cov=dc, iters=split.iters, quantizer=NF4)
    assert _codes_bytes(fixed.codes) == _codes_bytes(split.codes) if fixed.codes is not None else split.iters == 1


# --------------------------------------------------------------------------- balanced factors (issue 15)


@pytest.mark.parametrize("method", names(baseline=False, rank_free=False))  # qlora's B is 0
def test_factors_are_balanced_per_component(method):
    W, C = _weight(), _cov()
    split = decompose(method, W, 8, 2.0, cov=damp(C), iters=2, quantizer=NF4)
    torch.testing.assert_close(split.B.norm(dim=0), split.A.norm(dim=1), rtol=1e-4, atol=1e-7)


def test_balancing_keeps_the_product_and_removes_the_activation_scale():
    """CorDA's A = √Σ(VᵀC⁻¹) grew as 1/c with C → c·C (‖A‖/‖B‖ 161 vs 1.6e-4 for c = 0.01 vs 1e4)."""
    W, C = _weight(), _cov()
    U, S, Vt = torch.linalg.svd(W @ damp(C).C, full_matrices=False)
    unbalanced = U[:, :8] @ torch.diag(S[:8]) @ torch.cholesky_solve(Vt[:8].T.contiguous(), damp(C).L).T
    split = corda_split(W, damp(C), 8, 1.0, "top")
    rel = (low_rank_term(split, 1.0) - unbalanced).abs().max() / unbalanced.abs().max()
    assert rel < 1e-5
    ratios = []
    for c in (0.01, 1e4):
        sp = corda_split(W, damp(c * C), 8, 1.0, "top")
        ratios.append(float(sp.A.norm() / sp.B.norm()))
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-3) and ratios[0] == pytest.approx(1.0, rel=1e-4)


def test_zero_covariance_names_the_layer():
    with pytest.raises(DecompositionError, match="model.layers.1.mlp.down_proj: the layer's inputs are zero"):
        damp(torch.zeros(16, 16), name="model.layers.1.mlp.down_proj")
