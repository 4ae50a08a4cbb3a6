"""``qcorda prepare MODEL --method ... --rank ... --out DIR``"""

from __future__ import annotations

import argparse
import textwrap

from ..methods import training_evidence
from .common import add_init_arguments
from .flags import build


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF model directory, hub id, or gemma-3-270m (the bundled real model)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--covariance", default=None, help="reuse a covariance file saved by --save-covariance")
    p.add_argument("--save-covariance", default=None, help="also save the calibration covariances here (safetensors)")
    p.set_defaults(_init_flags=add_init_arguments(p))


def run(args) -> int:
    import warnings

    from ..config import ConfigError
    from ..decompose import DecompositionError
    from ..io import check_out_dir
    from ..prepare import prepare

    cfg = build(args, args._init_flags)
    check_out_dir(args.out, args.overwrite)
    if not cfg.needs_calibration and (cfg.calib.data or args.covariance):
        warnings.warn(f"--method {cfg.method} uses no calibration data; --calib-data/--covariance are ignored", stacklevel=1)
    try:  # before any model is read; prepare() checks again for callers of the Python API
        cfg.require_calibration(covariance=args.covariance is not None)
    except ConfigError as e:
        raise e.renamed(args._init_flags.flag(e.field)) from None
    try:
        result = prepare(args.model, cfg, args.out, calib=args.covariance if cfg.needs_covariance else None,
                         overwrite=args.overwrite, save_covariance=args.save_covariance, trust_remote_code=args.trust_remote_code)
    except DecompositionError as e:  # bad weights/activations: a user-facing problem of the input
        raise ConfigError(str(e)) from e
    _summary(result.report, cfg, args.out)
    return 0


def _summary(report, cfg, out) -> None:
    from ..experts import layer_type
    from ..table import print_table

    kinds: dict[str, list] = {}
    for layer in report.layers:  # per layer type; every expert of every block as experts.<leaf>
        kinds.setdefault(layer_type(layer.name), []).append(layer)
    rows = []
    for kind, layers in kinds.items():
        damping = [l.damping for l in layers if l.damping is not None]
        rows.append([
            kind, len(layers), sum(l.err for l in layers) / sum(l.qlora_err for l in layers),
            max(damping) if damping else None, sum(l.seconds for l in layers),
        ])
    rows.append(["total", len(report.layers), report.err / report.qlora_err, None, report.seconds])
    print_table(["layers", "n", "err / plain NF4", "max damping λ", "seconds"], rows,
                title=f"prepared {cfg.method} r={cfg.rank} alpha={cfg.lora_alpha:g} -> {out}")
    storage = report.storage
    if storage:
        kept = storage["full_precision"]
        print(f"NF4: {storage['nf4_fraction']:.1%} of the block weights' bytes ({len(report.targets)} targets with an adapter, "
              f"{len(storage['base_nf4'])} other block Linears as NF4(W)); full precision: "
              + ("none" if not kept else "; ".join(f"{d['name']} ({d['reason']})" for d in kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")))
        experts = storage.get("experts")
        if experts:
            print(f"experts: {experts['nf4_fraction']:.1%} of their bytes in NF4")
    few = [l for l in report.layers if l.few_tokens]
    if few:
        none = [l for l in few if l.tokens == 0]
        print(f"experts with few calibration tokens: {len(few)} layers got fewer routed tokens than their inputs "
              f"(min {min(l.tokens for l in few)}); the damping rule makes their covariance definite"
              + (f", and {len(none)} got none: the damping limit C = I, a data-free split (e.g. {none[0].name})" if none else "")
              + "; qcorda.json records each layer's tokens")
    print(textwrap.fill("what training showed: " + training_evidence(cfg.method, cfg.cal_start), 110))
