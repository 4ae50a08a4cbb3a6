"""Argument groups shared by several verbs (one definition, one flag name)."""

from __future__ import annotations

import argparse

from ..config import METHODS, CalibConfig, InitConfig


def csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def iters(value: str) -> int | str:
    """``--iters``: a positive integer or ``auto``."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {value!r}") from None


def add_init_arguments(p: argparse.ArgumentParser, method: bool = True, rank: bool = True) -> None:
    """Flags of :class:`InitConfig` and :class:`CalibConfig` (defaults come from the dataclasses).
    ``method``/``rank`` False: the verb takes several (``compare --methods --ranks``)."""
    d, c = InitConfig(), CalibConfig()
    g = p.add_argument_group("initialization")
    if method:
        g.add_argument("--method", default=d.method, help=f"one of {', '.join(METHODS)} (default {d.method})")
    if rank:
        g.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default {d.rank})")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha, s = alpha/r (default r)")
    g.add_argument("--iters", type=iters, default=None,
                   help="alternations for loftq (5), qpissa (1), qcorda-cal (5); auto: chosen per layer on held-out calibration records")
    g.add_argument("--cal-start", default=d.cal_start, help=f"where qcorda-cal starts: ipm or zero (default {d.cal_start})")
    g.add_argument("--target-modules", type=csv, default=d.target_modules, help="module patterns (default all-linear)")
    g.add_argument("--ridge", type=float, default=d.ridge, help=f"initial covariance damping λ (default {d.ridge})")
    g.add_argument("--max-damping-steps", type=int, default=d.max_damping_steps)
    g.add_argument("--svd", default=d.svd, help="full or randomized (top-r methods)")
    g.add_argument("--svd-oversample", type=int, default=d.svd_oversample)
    g.add_argument("--svd-power-iters", type=int, default=d.svd_power_iters)
    g.add_argument("--cov-dtype", default=d.cov_dtype, help="float32 or float64 accumulation of XᵀX")
    g.add_argument("--compute-dtype", default=d.compute_dtype, help="auto, float32, bfloat16 or float16")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=None, help="cuda or cpu (default cuda when present)")
    k = p.add_argument_group("calibration")
    k.add_argument("--calib-data", default=None, help="file, dataset name, or bundled alias (gsm8k-train, nq-open, ...)")
    k.add_argument("--calib-fields", type=csv, default=(), help="fields joined by the template, e.g. question,answer")
    k.add_argument("--template", default=c.template, help="alpaca, plain or chat")
    k.add_argument("--calib-samples", type=int, default=c.samples)
    k.add_argument("--calib-max-length", type=int, default=c.max_length)
    k.add_argument("--calib-batch-size", type=int, default=c.batch_size)
    k.add_argument("--calib-split", default=c.split)
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model repo")


def calib_config(args) -> CalibConfig:
    return CalibConfig(
        data=args.calib_data,
        fields=tuple(args.calib_fields),
        template=args.template,
        samples=args.calib_samples,
        max_length=args.calib_max_length,
        batch_size=args.calib_batch_size,
        split=args.calib_split,
    )


def init_config(args, method: str | None = None, rank: int | None = None) -> InitConfig:
    return InitConfig(
        method=method or args.method,
        rank=rank if rank is not None else args.rank,
        alpha=args.alpha,
        iters=args.iters,
        cal_start=args.cal_start,
        target_modules=tuple(args.target_modules),
        ridge=args.ridge,
        max_damping_steps=args.max_damping_steps,
        svd=args.svd,
        svd_oversample=args.svd_oversample,
        svd_power_iters=args.svd_power_iters,
        cov_dtype=args.cov_dtype,
        compute_dtype=args.compute_dtype,
        seed=args.seed,
        device=args.device,
        calib=calib_config(args),
    )
