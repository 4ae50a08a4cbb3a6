"""qcorda's per-layer splits against PEFT's (CorDA's eigen step, PiSSA's init) on synthetic layers,
on any device: shared by ``eval.bench_prepare`` (CPU) and ``eval.gpu_check`` (CUDA)."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from .measure import timed
from .synthetic import synthetic_cov, synthetic_weight


def corda_low_rank(eig, rank: int, device):
    """PEFT's rank-``rank`` CorDA term ``U_r·diag(S_r)·V_rᵀ``, ``(out_features, in_features)``, on ``device``.

    PEFT's ``collect_eigens_for_layer`` offloads U and V to the CPU and leaves S where the weight was,
    so on a GPU the three must be brought to one device before they are multiplied."""
    U, S, V = (t.to(device) for t in (eig.U_WC[:, :rank], eig.S_WC[:rank], eig.V_WC[:, :rank]))
    return (U * S) @ V.T


def bench_decompose(rank: int, shapes: str | Sequence[str], device: str = "cpu", log: bool = True) -> list[dict]:
    """Per shape (``"OUTxIN"``, a comma list or a sequence), qcorda's CorDA-IPM and PiSSA splits (full and
    randomized SVD) against PEFT's ``collect_eigens_for_layer`` and its ``pissa`` / ``pissa_niter_4`` init at
    rank ``rank``: seconds and rank-r error of each, two rows per shape. The weights, covariances and splits
    live on ``device``; timings synchronize it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.corda import collect_eigens_for_layer

    from qcorda.decompose import corda_split, damp, low_rank_term, svd_split

    torch.manual_seed(0)
    r, rows = rank, []
    shapes = shapes.split(",") if isinstance(shapes, str) else list(shapes)
    lcfg = LoraConfig(r=r, init_lora_weights="corda")
    for shape in shapes:
        out_f, in_f = map(int, shape.split("x"))
        W, C = synthetic_weight(out_f, in_f, 0).to(device), synthetic_cov(in_f, 0).to(device)

        def corda_err(BA):  # the error CorDA minimizes: ‖(W − B·A)·C‖_F
            return ((W - BA) @ C).norm().item()

        lin = torch.nn.Linear(in_f, out_f, bias=False, device=device)
        lin.weight.data = W.clone()
        lin.covariance_matrix = C.clone()
        eig, t_peft = timed(lambda: collect_eigens_for_layer(lin, lcfg), device)
        e_peft = corda_err(corda_low_rank(eig, r, W.device))
        del eig, lin
        res = {}
        for solver in ("full", "randomized"):
            split, t = timed(lambda: corda_split(W, damp(C, 0.01), r, 1.0, "top", solver=solver, oversample=16, power_iters=4, seed=0), device)
            res[solver] = (t, corda_err(low_rank_term(split, 1.0)))
        rows.append({"shape": shape, "method": "CorDA-IPM", "peft": "collect_eigens_for_layer", "peft_s": t_peft, "peft_err": e_peft,
                     "full_s": res["full"][0], "full_err": res["full"][1], "rand_s": res["randomized"][0], "rand_err": res["randomized"][1]})

        def peft_pissa(init):
            m = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False, device=device))
            m[0].weight.data = W.clone()
            pm, dt = timed(lambda: get_peft_model(m, LoraConfig(r=r, lora_alpha=r, target_modules=["0"], init_lora_weights=init)), device)
            layer = pm.base_model.model[0]
            return dt, (W - layer.lora_B["default"].weight @ layer.lora_A["default"].weight).norm().item()

        tp, ep = peft_pissa("pissa")
        tpn, epn = peft_pissa("pissa_niter_4")
        res = {}
        for solver in ("full", "randomized"):
            split, t = timed(lambda: svd_split(W, r, 1.0, "top", solver=solver, oversample=16, power_iters=4, seed=0), device)
            res[solver] = (t, (W - low_rank_term(split, 1.0)).norm().item())
        rows.append({"shape": shape, "method": "PiSSA", "peft": "pissa (full SVD)", "peft_s": tp, "peft_err": ep,
                     "full_s": res["full"][0], "full_err": res["full"][1], "rand_s": res["randomized"][0], "rand_err": res["randomized"][1],
                     "peft_niter_s": tpn, "peft_niter_err": epn})
        if log:
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


DECOMPOSE_HEAD = ["shape (out×in)", "method", "PEFT step", "PEFT s", "qcorda full s", "qcorda rand s", "speedup full",
                  "speedup rand", "err diff rand %", "err diff full %"]


def decompose_table(drows: list[dict]) -> tuple[list[str], list[list]]:
    """``(head, rows)`` of :func:`bench_decompose`'s results: one row per PEFT step (PiSSA's ``pissa_niter_4``
    gets its own), with qcorda's speedup over it and its error relative to PEFT's in %."""
    rows = []
    for d in drows:
        steps = [(d["peft"], d["peft_s"], d["peft_err"])]
        if "peft_niter_s" in d:
            steps.append(("pissa_niter_4", d["peft_niter_s"], d["peft_niter_err"]))
        for step, peft_s, peft_err in steps:
            rows.append([d["shape"], d["method"], step, peft_s, d["full_s"], d["rand_s"], peft_s / d["full_s"], peft_s / d["rand_s"],
                         100 * (d["rand_err"] - peft_err) / peft_err, 100 * (d["full_err"] - peft_err) / peft_err])
    return DECOMPOSE_HEAD, rows
