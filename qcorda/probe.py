"""The learning rate from a measurement on the recipe's own model, init and data (``learning_rate: probe``).

Four measurements, each a pure function of the adapter at its init and a few training sequences
(the parameters are put back exactly; nothing is stored on the model), returning a frozen
:class:`ProbeResult`. Their cost is counted in *sequence passes* (one forward + backward of one
training sequence); :func:`probe_budget` allows :data:`BUDGET_FRACTION` of the training run's
``max_steps × batch_size × grad_accum`` passes.

``update``: the size of Adam's first update in weight space. Adam's first step moves
every adapter entry by ``lr · sign(g)`` (bias-corrected m̂/√v̂ = g/|g|), so to first order in lr each
adapted layer's effective weight ``W + s·B·A`` (B ``(out_features, r)``, A ``(r, in_features)``)
moves by ``lr · s·(sign(g_B)·A + B·sign(g_A))``. The probe measures

    u = sqrt(Σ_layers ‖s·(sign(g_B)·A + B·sign(g_A))‖²_F / Σ_layers ‖W_eff‖²_F)

(the relative weight-space update per unit lr, from one gradient over ``budget`` sequences) and sets
``lr = τ / u``, τ = :data:`UPDATE_TARGET`: the relative update QLoRA makes at its tuned rate. An
init whose factors are k times larger (both B and A) has a k times larger u and gets 1/k the lr.

``sharpness`` (the default, :data:`qcorda.recipe.DEFAULT_LR_PROBE`): λ, the top (largest |·|) eigenvalue of the Adam-preconditioned Hessian ``P^-1/2 H P^-1/2`` of the
adapter parameters (P = |g| + :data:`PRECOND_FLOOR` × the tensor's RMS gradient: Adam's √v̂ after its
first step), by power iteration with one-sided finite-difference Hessian-vector products
``H v ≈ (g(θ + h v) − g(θ)) / h``; ``lr = SHARPNESS_C / λ``. Tensors whose gradient is exactly zero
(QLoRA's A, next to B = 0) do not move in Adam's first step and are left out.

``direction``: the curvature along Adam's first step. With d = sign(g) (that step's direction) and
the one-sided finite difference ``H d ≈ (g(θ + h d) − g(θ)) / h``, the quadratic model of the loss along
d is lowest at ``lr* = gᵀd / dᵀHd = Σ|g| / dᵀHd``; ``lr = lr* / DIRECTION_DIVISOR``. Two passes per
sequence (one gradient at θ, one at θ + h d).

``range``: an lr range test on the adapter (restored afterwards): AdamW over one fixed batch while
the lr rises exponentially from :data:`RANGE_LR` [0] to [1], loss smoothed by an EMA; ``lr = lr_min
/ RANGE_DIVISOR``, lr_min being where the smoothed loss is lowest. A range test's minimum sits far
above the best training rate (transformers#16013: "usually indicates 1e-3 when the actual best is
1e-5"), hence the divisor.

The constants are calibrated on the grid of ``eval/results/finetune.md`` (Gemma-3-270M, r 16, 60
steps) and checked in ``eval/results/lr_probe.md``, which says how far each rule lands from each
init's best learning rate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .config import ConfigError
from .recipe import DEFAULT_LR_PROBE, LrProbe as ProbeMethod
from .scoring import encode_pairs, masked_nll

#: The probe may cost this fraction of the training run's sequence passes.
BUDGET_FRACTION = 0.05
#: ``update``: τ, the relative weight-space update per step QLoRA makes at its tuned rate: qlora's
#: u = 2.379 on Gemma-3-270M (r 16, NF4, every linear layer; eval/results/lr_probe.md) times its
#: grid-best lr 1.2e-3 (eval/results/finetune.md). Calibrated on that one init and setup.
UPDATE_TARGET = 2.855e-3
#: ``sharpness``: c in lr = c / λ: qlora's λ = 1.2543e4 on Gemma-3-270M (r 16, NF4, every linear layer,
#: 60 steps x 4 GSM8K sequences; eval/results/lr_probe.md, section 1) times its grid-best lr 1.2e-3
#: (eval/results/finetune.md). Calibrated on that one init; the other seven grid inits then land
#: within 0.55-1.50x of their grid-best lr (section 1), which is why it is the default.
SHARPNESS_C = 15.05
#: ``sharpness``: Adam's √v̂ is floored at this fraction of the tensor's RMS gradient.
PRECOND_FLOOR = 0.1
#: ``sharpness``: power-iteration steps (each one sequence pass per probe sequence); fewer (at least
#: one) when the budget is under SHARPNESS_ITERS + 1 passes.
SHARPNESS_ITERS = 5
#: ``direction``: lr = lr* / DIRECTION_DIVISOR: qlora's lr* = 6.218e-4 over its grid-best lr 1.2e-3
#: (eval/results/lr_probe.md, section 1; the same setup as SHARPNESS_C).
DIRECTION_DIVISOR = 0.5181
#: ``range``: the exponential ramp's first and last learning rates.
RANGE_LR = (1e-6, 1e-1)
#: ``range``: lr = (lr at the smoothed loss's minimum) / RANGE_DIVISOR: qlora's lr_min = 4.329e-3 over its
#: grid-best lr 1.2e-3 (eval/results/lr_probe.md, section 1; the same setup as SHARPNESS_C).
RANGE_DIVISOR = 3.607
#: ``range``: EMA weight of the previous smoothed loss.
RANGE_SMOOTHING = 0.5
#: What each measurement's ``ProbeResult.measured`` is, in words (``qcorda probe-lr`` prints it).
MEASURED: dict[str, str] = {
    "update": "u, relative weight-space update of Adam's first step per unit lr",
    "sharpness": "λ, top eigenvalue of the Adam-preconditioned Hessian",
    "direction": "lr*, the minimum of the quadratic model of the loss along Adam's first step",
    "range": "lr at the smoothed loss's minimum of the range test",
}


#: The fewest sequence passes each probe can spend: one gradient (update); a gradient and one Hessian-vector product
#: (sharpness); a gradient and one at the stepped point (direction); two ramp steps (range).
MIN_PASSES: dict[str, int] = {"update": 1, "sharpness": 2, "direction": 2, "range": 2}


class ProbeFailed(ConfigError):
    """The probe measured nothing usable (a NaN loss, a zero gradient); the message names the recipe key."""


@dataclass(frozen=True)
class ProbeResult:
    """What the probe measured and the learning rate it sets (saved in ``qcorda_train.json``)."""

    method: str
    """``update``, ``sharpness``, ``direction`` or ``range``."""
    learning_rate: float
    """The learning rate the probe sets."""
    measured: float
    """update: u, the relative weight-space update per unit lr; sharpness: λ; direction: lr*; range: lr at the smoothed-loss minimum."""
    rule: str
    """How ``learning_rate`` follows from ``measured`` (the formula with its constant)."""
    sequences: int
    """Training sequences the probe used (drawn by ``seed``)."""
    passes: int
    """Sequence passes (forward + backward of one sequence) the probe spent."""
    budget: int
    """Sequence passes allowed (:data:`BUDGET_FRACTION` of the run's)."""
    seconds: float
    seed: int
    trace: tuple[float, ...] = field(default=())
    """range: the smoothed losses of the ramp; sharpness: λ after each power iteration."""


def probe_budget(max_steps: int, batch_size: int, grad_accum: int = 1, fraction: float = BUDGET_FRACTION) -> int:
    """Sequence passes the probe may spend: ``fraction`` of the run's ``max_steps × batch_size × grad_accum`` (≥ 1)."""
    return max(1, int(fraction * max_steps * batch_size * grad_accum))


# --------------------------------------------------------------------------- the adapter


def lora_layers(model) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter, float, torch.nn.Module]]:
    """``(name, A (r, in_features), B (out_features, r), scaling s, base layer)`` of every LoRA layer (PEFT's default adapter)."""
    out = []
    for name, mod in model.named_modules():
        la, lb = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if not isinstance(la, torch.nn.ModuleDict) or not la:
            continue
        key = next(iter(la))
        out.append((name, la[key].weight, lb[key].weight, float(mod.scaling[key]), mod.base_layer))
    if not out:
        raise ConfigError("the model has no LoRA layers to probe (load the prepared model with is_trainable=True)")
    return out


def base_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The fp32 ``(out_features, in_features)`` weight of a base layer (an NF4 ``Linear4bit`` dequantized)."""
    w = layer.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(w.data, w.quant_state).float()
    return w.detach().float()


def _adapter(model) -> dict[str, torch.nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if not params:
        raise ConfigError("the model has no LoRA parameters to probe")
    return params


def probe_batches(tok, examples: Sequence, n: int, seed: int, max_length: int, batch_size: int) -> list[tuple]:
    """``n`` training examples drawn by ``seed`` (in the order of a seeded permutation, skipping those
    with no completion token within ``max_length``, which carry no loss), encoded as
    ``(input_ids, attention_mask, label_mask)`` micro-batches of ``batch_size`` (EOS appended to
    the completion, as in training)."""
    if not examples:
        raise ConfigError("no training examples to probe the learning rate on")
    g = torch.Generator().manual_seed(seed)
    eos = tok.eos_token or ""
    chosen = []
    for i in torch.randperm(len(examples), generator=g).tolist():
        e = examples[i]
        _, att, lab = encode_pairs(tok, [e.prompt], [e.completion + eos], max_length)
        if (lab[:, 1:].bool() & att[:, 1:].bool()).any():
            chosen.append(e)
        if len(chosen) == n:
            break
    if not chosen:
        raise ConfigError("no training record has a completion token within train.max_length; raise train.max_length")
    chosen = (chosen * math.ceil(n / len(chosen)))[:n]
    return [encode_pairs(tok, [e.prompt for e in chosen[i : i + batch_size]], [e.completion + eos for e in chosen[i : i + batch_size]], max_length)
            for i in range(0, n, batch_size)]


def _loss_and_grads(model, params: dict, batches: list[tuple], grad: bool = True) -> tuple[float, dict | None]:
    """Mean completion-token NLL over all ``batches`` (the training objective), and its gradient."""
    total = sum(int((lab[:, 1:].bool() & att[:, 1:].bool()).sum()) for _, att, lab in batches)
    if total == 0:
        raise ConfigError("no probe sequence has a completion token within train.max_length; raise train.max_length")
    for p in params.values():
        p.grad = None
    loss = 0.0
    with torch.set_grad_enabled(grad):
        for ids, att, lab in batches:
            sums, _ = masked_nll(model, ids, att, lab)
            part = sums.sum() / total
            if grad:
                part.backward()
            loss += float(part.detach())
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()} if grad else None
    for p in params.values():
        p.grad = None
    return loss, grads


def _check(value: float, what: str, key: str) -> None:
    if not math.isfinite(value):
        raise ProbeFailed(f"the learning-rate probe failed: {what} is {value}; set {key} to a number or auto, "
                          "or check the data and the init")


# --------------------------------------------------------------------------- the measurements


def update_size(model, grads: dict[str, torch.Tensor]) -> float:
    """u = sqrt(Σ ‖s·(sign(g_B)·A + B·sign(g_A))‖²_F / Σ ‖W + s·B·A‖²_F) over the LoRA layers: the
    relative weight-space change of Adam's first step per unit learning rate (first order in lr)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    num = den = 0.0
    with torch.no_grad():
        for _, A, B, s, base in lora_layers(model):
            gA, gB = grads[by_id[id(A)]].float(), grads[by_id[id(B)]].float()
            A32, B32 = A.detach().float(), B.detach().float()
            dW = s * (torch.sign(gB) @ A32 + B32 @ torch.sign(gA))
            W = base_weight(base).to(dW.device) + s * (B32 @ A32)
            num += float(dW.pow(2).sum())
            den += float(W.pow(2).sum())
    return math.sqrt(num / den)


def preconditioned_sharpness(model, params: dict, batches: list[tuple], grads: dict[str, torch.Tensor], iters: int,
                             seed: int, key: str = "train.learning_rate") -> tuple[float, tuple[float, ...]]:
    """λ, the spectral radius (largest |eigenvalue|) of ``P^-1/2 H P^-1/2``, by ``iters`` power iterations (one gradient each), P = |g| +
    PRECOND_FLOOR·rms(g) per tensor; the Hessian-vector product is the one-sided finite difference
    ``(g(θ + h·P^-1/2 v) − g(θ)) / h`` with h = 1e-3 × max(‖θ‖, 1) / ‖P^-1/2 v‖. Returns (λ, λ per iteration)."""
    live = [n for n in params if float(grads[n].abs().max()) > 0]
    if not live:
        raise ProbeFailed(f"the learning-rate probe failed: every adapter gradient is zero; set {key} to a number or auto")
    pinv = {n: 1.0 / (grads[n].abs() + PRECOND_FLOOR * grads[n].pow(2).mean().sqrt()).sqrt() for n in live}
    theta = {n: params[n].detach().clone() for n in live}
    norm_theta = math.sqrt(sum(float(t.pow(2).sum()) for t in theta.values()))
    g = torch.Generator().manual_seed(seed)
    v = {n: torch.randn(theta[n].shape, generator=g).to(theta[n]) for n in live}
    lam, trace = float("nan"), []
    try:
        for _ in range(iters):
            vn = math.sqrt(sum(float(x.pow(2).sum()) for x in v.values()))
            v = {n: x / vn for n, x in v.items()}
            step = {n: pinv[n] * v[n] for n in live}
            h = 1e-3 * max(norm_theta, 1.0) / math.sqrt(sum(float(x.pow(2).sum()) for x in step.values()))
            with torch.no_grad():
                for n in live:
                    params[n].copy_(theta[n] + h * step[n])
            loss, g1 = _loss_and_grads(model, params, batches)
            _check(loss, "the loss at a finite-difference point", key)
            hv = {n: pinv[n] * (g1[n] - grads[n]) / h for n in live}
            # ‖M v‖ with ‖v‖ = 1 converges to M's spectral radius; at an init the Hessian may be indefinite,
            # and the largest |eigenvalue| is what the step size must stay below either way
            lam = math.sqrt(sum(float(x.pow(2).sum()) for x in hv.values()))
            _check(lam, "the preconditioned sharpness", key)
            trace.append(lam)
            v = hv
    finally:
        with torch.no_grad():
            for n in live:
                params[n].copy_(theta[n])
    return lam, tuple(trace)


def step_curvature(model, params: dict, batches: list[tuple], grads: dict[str, torch.Tensor],
                   key: str = "train.learning_rate") -> float:
    """lr* = Σ|g| / dᵀHd with d = sign(g), the minimum of the quadratic model of the loss along Adam's
    first step; ``H d`` by the one-sided finite difference with h = 1e-3 × max(‖θ‖, 1) / ‖d‖. The
    adapter is put back. A non-positive curvature (no minimum along d) raises :class:`ProbeFailed`."""
    d = {n: torch.sign(g) for n, g in grads.items()}
    theta = {n: p.detach().clone() for n, p in params.items()}
    norm_d = math.sqrt(sum(float(x.abs().sum()) for x in d.values()))  # ‖sign(g)‖² = number of nonzero entries
    if norm_d == 0:
        raise ProbeFailed(f"the learning-rate probe failed: every adapter gradient is zero; set {key} to a number or auto")
    h = 1e-3 * max(math.sqrt(sum(float(t.pow(2).sum()) for t in theta.values())), 1.0) / norm_d
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.add_(d[n], alpha=h)
        loss, g1 = _loss_and_grads(model, params, batches)
        _check(loss, "the loss at the finite-difference point", key)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta[n])
    dhd = sum(float((d[n] * (g1[n] - grads[n])).sum()) for n in params) / h
    gd = sum(float(g.abs().sum()) for g in grads.values())
    _check(dhd, "the curvature along Adam's first step", key)
    if dhd <= 0:
        raise ProbeFailed(f"the learning-rate probe failed: the loss is not convex along Adam's first step (dᵀHd = {dhd:g}); "
                          f"set {key} to a number or auto, or use train.lr_probe: update")
    return gd / dhd


def range_test(model, params: dict, batches: list[tuple], steps: int, lr_range: tuple[float, float] | None = None,
               betas: tuple[float, float] = (0.9, 0.999), key: str = "train.learning_rate") -> tuple[float, tuple[float, ...]]:
    """AdamW over ``batches`` (the same every step) while the lr rises exponentially from
    ``lr_range[0]`` to ``lr_range[1]`` (default :data:`RANGE_LR`) in ``steps`` steps; the adapter is put back afterwards.
    Returns (the lr whose step gave the lowest EMA-smoothed loss, the smoothed losses). A NaN loss
    raises :class:`ProbeFailed` naming ``key``."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    lo, hi = lr_range or RANGE_LR
    lrs = [lo * (hi / lo) ** (i / max(1, steps - 1)) for i in range(steps)]
    opt = torch.optim.AdamW(list(params.values()), lr=lrs[0], betas=betas, weight_decay=0.0)
    smooth, trace = None, []
    try:
        for i, lr in enumerate(lrs):
            for group in opt.param_groups:
                group["lr"] = lr
            total = sum(int((lab[:, 1:].bool() & att[:, 1:].bool()).sum()) for _, att, lab in batches)
            loss = 0.0
            for ids, att, lab in batches:
                sums, _ = masked_nll(model, ids, att, lab)
                part = sums.sum() / max(total, 1)
                part.backward()
                loss += float(part.detach())
            _check(loss, f"the training loss at ramp step {i + 1} (lr {lr:.3g})", key)
            smooth = loss if smooth is None else RANGE_SMOOTHING * smooth + (1 - RANGE_SMOOTHING) * loss
            trace.append(smooth)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
                p.grad = None
    # the loss logged at step i is before step i's update: the lr that produced it is step i-1's
    best = min(range(1, len(trace)), key=lambda i: trace[i]) if len(trace) > 1 else 0
    return lrs[max(0, best - 1)], tuple(trace)


def probe_lr(model, tok, examples: Sequence, budget: int, method: ProbeMethod = DEFAULT_LR_PROBE, seed: int = 0,
             max_length: int = 512, batch_size: int = 4, key: str = "train.learning_rate") -> ProbeResult:
    """Measure ``method`` on ``model``'s adapter at its current values over training ``examples``
    within ``budget`` sequence passes, and set the learning rate from it (module docstring).
    ``key`` names the recipe setting in error messages."""
    if method in MIN_PASSES and budget < MIN_PASSES[method]:  # it would spend more than it may, not less
        raise ConfigError(f"the {method} learning-rate probe needs at least {MIN_PASSES[method]} sequence passes, and "
                          f"{BUDGET_FRACTION:.0%} of this run's passes is {budget}: raise train.max_steps (or batch_size, "
                          f"grad_accum), or set {key} to a number or auto")
    t0 = time.perf_counter()
    params = _adapter(model)
    was_training = model.training
    model.train()
    for p in params.values():
        p.requires_grad_(True)
    try:
        if method == "update":
            n = budget
            batches = probe_batches(tok, examples, n, seed, max_length, batch_size)
            loss, grads = _loss_and_grads(model, params, batches)
            _check(loss, "the probe's training loss", key)
            u = update_size(model, grads)
            _check(u, "the update size", key)
            if u <= 0:
                raise ProbeFailed(f"the learning-rate probe failed: the adapter's gradient is zero (no update); set {key} to a number or auto")
            res = dict(learning_rate=UPDATE_TARGET / u, measured=u, rule=f"lr = {UPDATE_TARGET:g} / u", passes=n, trace=())
        elif method == "sharpness":
            n = max(1, budget // (SHARPNESS_ITERS + 1))
            iters = max(1, min(SHARPNESS_ITERS, budget // n - 1))  # a budget under SHARPNESS_ITERS + 1 passes: fewer iterations
            batches = probe_batches(tok, examples, n, seed, max_length, batch_size)
            loss, grads = _loss_and_grads(model, params, batches)
            _check(loss, "the probe's training loss", key)
            lam, trace = preconditioned_sharpness(model, params, batches, grads, iters, seed, key)
            if lam <= 0:
                raise ProbeFailed(f"the learning-rate probe failed: the preconditioned sharpness is {lam:g} (not positive); "
                                  f"set {key} to a number or auto")
            res = dict(learning_rate=SHARPNESS_C / lam, measured=lam, rule=f"lr = {SHARPNESS_C:g} / λ",
                       passes=n * (iters + 1), trace=trace)
        elif method == "direction":
            n = max(1, budget // 2)
            batches = probe_batches(tok, examples, n, seed, max_length, batch_size)
            loss, grads = _loss_and_grads(model, params, batches)
            _check(loss, "the probe's training loss", key)
            lr_star = step_curvature(model, params, batches, grads, key)
            res = dict(learning_rate=lr_star / DIRECTION_DIVISOR, measured=lr_star, rule=f"lr = lr* / {DIRECTION_DIVISOR:g}",
                       passes=2 * n, trace=())
        elif method == "range":
            n = max(1, min(batch_size, budget // 8))
            steps = max(2, budget // n)
            batches = probe_batches(tok, examples, n, seed, max_length, batch_size)
            lr_min, trace = range_test(model, params, batches, steps, key=key)
            res = dict(learning_rate=lr_min / RANGE_DIVISOR, measured=lr_min, rule=f"lr = lr_min / {RANGE_DIVISOR:g}",
                       passes=n * steps, trace=trace)
        else:
            raise ConfigError(f"unknown probe method {method!r}; choose update, sharpness, direction or range", "lr_probe")
    finally:
        model.train(was_training)
    return ProbeResult(method=method, sequences=n, budget=budget, seconds=time.perf_counter() - t0, seed=seed, **res)
