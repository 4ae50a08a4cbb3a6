"""``qcorda to-lora``: the trained adapter as a plain PEFT LoRA for the original, unquantized base.

Per target layer ``(out_features, in_features)``, with W the original weight, W_res = W − s₀·B₀·A₀
the residual that was quantized, deq(Q(W_res)) what the 4-bit layer computes with, and s·B·A
the trained adapter (B₀, A₀, s₀ from ``adapter_init``):

- ``exact-delta``: ΔW = s·B·A − s₀·B₀·A₀ at rank 2r, written PEFT's way: A′ = [A; A₀],
  B′ = [B, −(s₀/s)·B₀], r and α doubled (α·√2 under rsLoRA) so that the scaling stays s.
  W + ΔW = W_res + s·B·A: the trained model, had the residual not been quantized.
- ``compress``: the same ΔW truncated by SVD to rank k (computed from the 2r factors, never
  forming ΔW's SVD at full size); the energy kept Σ_{i≤k}σᵢ² / Σσᵢ² is reported per layer.
- ``absorb-quant-error``: the best rank-k approximation (Eckart–Young) of
  D = deq(Q(W_res)) + s·B·A − W, so that W + D_k is as close to the trained 4-bit model
  as rank k allows; exact-delta's ΔW = D + (W − deq(Q(W_res)) − s₀B₀A₀) is one rank-2r candidate.

Truncated factors are written as B = U·√Σ, A = √Σ·Vᵀ with α = r (scaling 1).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

import torch

from .adapters import AdapterSpec, check_adapter, plain_lora_refusal, read_adapter
from .checkpoint import ADAPTER_PREFIX, Checkpoint, write_adapter
from .io import atomic_dir, check_out_dir
from .config import ConfigError, MergeConfig, ToLoraConfig, ToLoraMode, VerifyConfig
from .decompose import matmul_precision
from .experts import fused_layout, lora_keys, pack_lora, unfuse
from .merge import PREPARED_HINT, ExportResult, dequantized, load_plain, merge, verification
from .models import resolve_local, skeleton
from .prepared import ADAPTER_INIT, device_map, load_prepared, manifest_sha256, read_manifest
from .scoring import held_out_batches, logit_agreement

MODES: tuple[str, ...] = get_args(ToLoraMode)
REPORT_FILE = "qcorda_to_lora.json"


@dataclass(frozen=True)
class LoraFactors:
    """B ``(out, k)`` and A ``(k, in)`` in fp32; ``energy`` = fraction of ‖target‖²_F that B·A keeps."""

    B: torch.Tensor
    A: torch.Tensor
    energy: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def exact_delta(B: torch.Tensor, A: torch.Tensor, s: float, B0: torch.Tensor, A0: torch.Tensor, s0: float) -> LoraFactors:
    """s·[B, −(s₀/s)B₀]·[A; A₀] = s·B·A − s₀·B₀·A₀ (applied with the trained scaling s)."""
    return LoraFactors(torch.cat([B, -(s0 / s) * B0], dim=1), torch.cat([A, A0], dim=0))


def _split_sqrt(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    total = S.pow(2).sum().item()
    root = S[:k].sqrt()
    kept = S[:k].pow(2).sum().item()
    return U[:, :k] * root, root[:, None] * Vh[:k], kept / total if total > 0 else 1.0


def truncate(M: torch.Tensor, k: int) -> LoraFactors:
    """Best rank-k approximation of M ``(out, in)`` (scaling 1): B = U_k√Σ_k, A = √Σ_k V_kᵀ."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    B, A, energy = _split_sqrt(U, S, Vh, k)
    return LoraFactors(B.float(), A.float(), energy)


def truncate_factored(L: torch.Tensor, R: torch.Tensor, k: int) -> LoraFactors:
    """Best rank-k approximation of L·R, L ``(out, m)``, R ``(m, in)``, via two thin QRs and an m×m SVD."""
    Ql, Rl = torch.linalg.qr(L.double())
    Qr, Rr = torch.linalg.qr(R.double().T)
    U, S, Vh = torch.linalg.svd(Rl @ Rr.T)
    B, A, energy = _split_sqrt(Ql @ U, S, Vh @ Qr.T, min(k, S.shape[0]))
    return LoraFactors(B.float(), A.float(), energy)


def compress(B, A, s, B0, A0, s0, k: int) -> LoraFactors:
    """ΔW = s·B·A − s₀·B₀·A₀ truncated to rank k (scaling 1)."""
    return truncate_factored(torch.cat([s * B, -s0 * B0], dim=1), torch.cat([A, A0], dim=0), k)


def absorb_quant_error(W: torch.Tensor, w_deq: torch.Tensor, B, A, s, k: int) -> LoraFactors:
    """Best rank-k approximation of deq(Q(W_res)) + s·B·A − W (scaling 1)."""
    return truncate(w_deq.float() + s * (B @ A) - W.float(), k)


# --------------------------------------------------------------------------- command


@dataclass(frozen=True)
class ConvertedLayer:
    name: str
    rank: int
    energy: float
    """Fraction of the target's ‖·‖²_F kept (1 for exact-delta)."""
    err_to_trained: float
    """‖(W + s′·B′·A′) − (deq(Q(W_res)) + s·B·A)‖_F / ‖deq(Q(W_res)) + s·B·A‖_F: the weight-space gap."""


def check_convertible(spec: AdapterSpec, mode: str) -> None:
    """Refuse an adapter that ``mode`` cannot write as a plain PEFT LoRA (``mode`` itself is :class:`ToLoraConfig`'s)."""
    refusal = plain_lora_refusal(spec.path)
    if refusal:
        raise ConfigError(f"--adapter {spec.path}: {refusal}")
    if mode == "exact-delta" and spec.use_rslora and (spec.rank_pattern or spec.alpha_pattern):
        raise ConfigError(
            "--mode exact-delta cannot convert an rsLoRA adapter with rank_pattern/alpha_pattern exactly in PEFT's "
            "format (doubling r needs α·√2 per pattern entry, which PEFT's loader does not express for patterns); "
            "use --mode compress --rank 2r (exact up to SVD rounding) instead"
        )


def _lora_config(spec: AdapterSpec, mode: str, ranks: dict[str, int], targets: list[str], base: str, conv1d: bool):
    from peft import LoraConfig

    if mode == "exact-delta":
        r, alpha = 2 * spec.r, spec.lora_alpha * (math.sqrt(2) if spec.use_rslora else 2)
        rank_pattern = {k: 2 * v for k, v in spec.rank_pattern.items()}
        alpha_pattern = {k: 2 * v for k, v in spec.alpha_pattern.items()}
        rslora = spec.use_rslora
    else:  # truncated factors carry their scale: α = r everywhere
        r = Counter(ranks.values()).most_common(1)[0][0]
        rank_pattern = {n: k for n, k in ranks.items() if k != r}
        alpha, alpha_pattern, rslora = float(r), dict(rank_pattern), False
    return LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        target_modules=list(targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        fan_in_fan_out=conv1d, base_model_name_or_path=base,
    )


def _fused_adapter(found: dict[str, tuple[LoraFactors, float]], groups: dict[str, tuple[str, ...]], shapes: dict, dense: list[str],
                   base_dir: Path, base: str, trust_remote_code: bool):
    """(LoraConfig, tensors) of a plain PEFT LoRA for a base whose experts are fused 3-D parameters: the
    dense targets as ``target_modules``, the experts' fused parameters as PEFT's ``target_parameters``
    (:func:`qcorda.experts.pack_lora`). One rank R for all (each factor pair zero-padded, a fused
    ``gate_up_proj`` holding gate's and up's), the scale folded into B and α = R (scaling 1)."""
    from peft import LoraConfig, get_peft_model

    scaled = {n: (scale * f.B, f.A) for n, (f, scale) in found.items()}
    per = {p: len(ms) // len({m.rsplit(".", 2)[-2] for m in ms}) for p, ms in groups.items()}
    R = max([f.rank for n, (f, _) in found.items() if n in dense]
            + [per[p] * max(found[m][0].rank for m in ms if m in found) for p, ms in groups.items() if any(m in found for m in ms)])
    packed = pack_lora(scaled, groups, shapes, R)
    lcfg = LoraConfig(r=R, lora_alpha=float(R), target_modules=list(dense), target_parameters=sorted(packed), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base)
    _, fused = skeleton(base_dir, trust_remote_code, flag="--base")  # the base as PEFT will see it: experts fused
    keys = lora_keys(get_peft_model(fused, lcfg))  # PEFT's own names for each fused parameter's LoRA
    tensors = {}
    for name in dense:
        B, A = scaled[name]
        k = A.shape[0]
        tensors[f"{ADAPTER_PREFIX}{name}.lora_A.weight"] = torch.cat([A, A.new_zeros(R - k, A.shape[1])])
        tensors[f"{ADAPTER_PREFIX}{name}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], R - k)], dim=1)
    for param, (B, A) in packed.items():
        tensors[f"{ADAPTER_PREFIX}{keys[param]}.lora_A.weight"] = A
        tensors[f"{ADAPTER_PREFIX}{keys[param]}.lora_B.weight"] = B
    return lcfg, tensors


def convert_layer(name: str, W: torch.Tensor, w_deq: torch.Tensor, spec: AdapterSpec, init: AdapterSpec, mode: str,
                  rank: int | None, recorded_err: float | None, base: str, prepared: Path) -> tuple[LoraFactors, ConvertedLayer]:
    """The plain-LoRA factors of one layer by ``mode``, and how far W + s′·B′·A′ is from the trained layer.

    ``W``: the original weight, ``w_deq``: deq(Q(W_res)) ``(out, in)``; ``recorded_err``: the init error
    ``qcorda.json`` recorded, against which the base is checked to be the model that was prepared."""
    B, A = spec.factors(name)
    B0, A0 = init.factors(name)
    s, s0 = spec.scaling(name), init.scaling(name)
    if W.shape != w_deq.shape:
        raise ConfigError(f"--base {base}: layer {name} is {tuple(W.shape)}, the prepared one {tuple(w_deq.shape)}; pass the original model")
    err0 = (W - w_deq - s0 * (B0 @ A0)).pow(2).sum().item()
    if recorded_err is not None and err0 > 1.1 * recorded_err + 1e-6 * W.pow(2).sum().item():
        raise ConfigError(
            f"--base {base} is not the model {prepared} was prepared from (layer {name}: init error {err0:.4g}, "
            f"recorded {recorded_err:.4g}); pass the original model"
        )
    k = min(rank if rank is not None else spec.rank(name), *W.shape)
    if mode == "exact-delta":
        f, scale = exact_delta(B, A, s, B0, A0, s0), s
    elif mode == "compress":
        f, scale = compress(B, A, s, B0, A0, s0, k), 1.0
    else:
        f, scale = absorb_quant_error(W, w_deq, B, A, s, k), 1.0
    trained = w_deq + s * (B @ A)
    gap = ((W + scale * (f.B @ f.A)) - trained).norm().item() / max(trained.norm().item(), 1e-30)
    return f, ConvertedLayer(name, f.rank, f.energy, gap)


def to_lora(prepared: str | Path, base: str, out: str | Path, cfg: ToLoraConfig = ToLoraConfig(), *,
            adapter: str | Path | None = None, merged: str | Path | None = None, overwrite: bool = False,
            progress: bool = True, trust_remote_code: bool = False) -> ExportResult:
    """Write a PEFT LoRA adapter for ``base`` to ``out`` (atomically) by ``cfg.mode``; when ``cfg.verify``,
    report how far base + LoRA is from the trained 4-bit model and from the model merged to ``cfg.dtype``
    (``merged``, or merged into a temporary directory), all in ``qcorda_to_lora.json`` (Gemma-3 overflows
    float16, so verify it in bfloat16).

    The original weights are read from ``base``'s checkpoint one target at a time, never as a whole model;
    the verification loads its three models one after the other (:func:`qcorda.scoring.logit_agreement`)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    prepared = Path(prepared)
    check_out_dir(out, overwrite)
    manifest = read_manifest(prepared)
    spec = read_adapter(adapter if adapter is not None else prepared / ADAPTER_INIT)
    init = read_adapter(prepared / ADAPTER_INIT, "PREPARED/adapter_init")
    check_adapter(prepared, manifest, spec, init)
    check_convertible(spec, cfg.mode)
    targets = list(manifest["targets"])
    recorded = {l["name"]: l["err"] for l in manifest["layers"]}
    verify = verification(cfg)

    base_dir = resolve_local(base, flag="--base")
    _, skel = skeleton(base_dir, trust_remote_code, flag="--base")
    unfuse(skel)  # experts as prepared: one layer each, read from the checkpoint's per-expert tensors
    original = Checkpoint(base_dir, "model", "--base").model_view(skel)  # by the model's names, as transformers maps them
    reader = Checkpoint(prepared, "model", "PREPARED", PREPARED_HINT)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    layers: list[ConvertedLayer] = []
    conv1d = False
    groups = fused_layout(skel)
    experts = {m for members in groups.values() for m in members} & set(targets)
    found: dict[str, tuple[LoraFactors, float]] = {}
    for name in tqdm(targets, desc=f"to-lora {cfg.mode}", unit="layer", disable=not progress):
        try:
            module = skel.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or f"{name}.weight" not in original:
            raise ConfigError(f"--base {base} has no layer {name}; pass the model PREPARED was prepared from")
        is_conv = type(module).__name__ == "Conv1D"
        conv1d |= is_conv
        W = original.get(f"{name}.weight").float()
        f, layer = convert_layer(name, W.T if is_conv else W, dequantized(reader, name), spec, init, cfg.mode,
                                 cfg.rank, recorded.get(name), base, prepared)
        layers.append(layer)
        ranks[name] = f.rank
        if experts:
            found[name] = (f, spec.scaling(name) if cfg.mode == "exact-delta" else 1.0)
        else:
            tensors[f"{ADAPTER_PREFIX}{name}.lora_A.weight"] = f.A
            tensors[f"{ADAPTER_PREFIX}{name}.lora_B.weight"] = f.B
    if experts:
        shapes = {m: tuple(skel.get_submodule(m).weight.shape) for members in groups.values() for m in members}
        lcfg, tensors = _fused_adapter(found, groups, shapes, [t for t in targets if t not in experts], base_dir, str(base),
                                       trust_remote_code)
    else:
        lcfg = _lora_config(spec, cfg.mode, ranks, targets, str(base), conv1d)
    del skel, original
    with atomic_dir(out, overwrite) as tmp:
        write_adapter(tmp, lcfg, tensors)
        tensors.clear()
        agreement = ()
        if verify is not None:
            agreement = tuple(_verify(prepared, spec.path, base_dir, tmp, merged, verify, cfg, progress, trust_remote_code))
        report = {
            "format": "qcorda.to-lora/1",
            "mode": cfg.mode,
            "rank": cfg.rank,
            "verify_dtype": cfg.dtype,
            "prepared": str(prepared),
            "prepared_sha256": manifest_sha256(prepared),
            "adapter": str(spec.path),
            "base": str(base),
            "layers": [asdict(l) for l in layers],
            "verify": asdict(verify) if verify is not None else None,
            "agreement": [asdict(a) for a in agreement],
            "float32_matmul_precision": matmul_precision(),
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return ExportResult(Path(out), cfg.mode, tuple(layers), agreement, time.perf_counter() - t0)


def _verify(prepared, adapter, base_dir, lora_dir, merged, verify: VerifyConfig, cfg: ToLoraConfig, progress, trust_remote_code):
    """base + LoRA against the trained 4-bit + adapter model and against the model merged to ``cfg.dtype``,
    each model loaded onto ``cfg.device`` in its stored dtype only when its turn comes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def base_lora():
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto", device_map=device_map(cfg.device),
                                                     trust_remote_code=trust_remote_code, use_safetensors=True)
        return PeftModel.from_pretrained(model, str(lora_dir), is_trainable=False)

    tok = AutoTokenizer.from_pretrained(str(prepared))
    batches, n = held_out_batches(tok, verify.data, verify.fields, verify.samples, verify.max_length, verify.batch_size, verify.template)
    name = f"merged {cfg.dtype}"
    with tempfile.TemporaryDirectory(prefix="qcorda-merged-") as tmp:
        if merged is None:
            merged = merge(prepared, Path(tmp) / "merged", MergeConfig(dtype=cfg.dtype, verify=False), adapter=adapter, progress=progress).out
        models = {
            "trained 4-bit+adapter": lambda: load_prepared(prepared, adapter, is_trainable=False, device=cfg.device),
            name: lambda: load_plain(merged, getattr(torch, cfg.dtype), cfg.device),
            "base+LoRA": base_lora,
        }
        pairs = [("trained 4-bit+adapter", "base+LoRA"), (name, "base+LoRA"), ("trained 4-bit+adapter", name)]
        return logit_agreement(models, pairs, batches, progress, n)
