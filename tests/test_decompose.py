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
from qcorda.quantize import nf4_roundtrip

METHODS = ["qlora", "loftq", "qpissa", "qmilora", "qcorda-ipm", "qcorda-kpm", "qcorda-cal"]


def _weight(out=48, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) / inp**0.5


def _cov(d=64, n=400, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, d)  # anisotropic inputs
    return X.T @ X / n


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("alpha_over_r", [1.0, 2.0, 0.5])
def test_fp32_reconstruction(method, alpha_over_r):
    W, C = _weight(), _cov()
    r, s = 8, alpha_over_r
    split = decompose(method, W, r, s, cov=damp(C), iters=3, roundtrip=nf4_roundtrip)
    assert split.B.shape == (48, r) and split.A.shape == (r, 64)
    torch.testing.assert_close(residual(W, split, s) + low_rank_term(split, s), W, atol=1e-5, rtol=0)


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

    lq = decompose("loftq", W, 8, 1.0, iters=5, roundtrip=nf4_roundtrip)
    assert err(lq).pow(2).sum() < 0.9 * plain
    ipm = decompose("qcorda-ipm", W, 8, 1.0, cov=dc)
    cal = decompose("qcorda-cal", W, 8, 1.0, cov=dc, iters=5, roundtrip=nf4_roundtrip)
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
