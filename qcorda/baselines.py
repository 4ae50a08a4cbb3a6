"""The seeds' other systems as baselines, initialized by PEFT (no second copy of their math).

- ``lora``: 16-bit base (``compute_dtype``), PEFT's default init (A Kaiming-uniform, B = 0).
- ``qdora``: NF4 base, DoRA (PEFT ``use_dora``): magnitude m = ‖deq(Q(W)) + s·B·A‖ per output row.
- ``qeva``: NF4 base, EVA (PEFT ``get_eva_state_dict`` with ``EvaConfig(rho=1)``): A = the top-r
  right singular vectors of each target's inputs on ``--calib-data`` (padding dropped with the
  attention mask), B = 0.
- ``qolora``: OLoRA (PEFT ``init_lora_weights="olora"``): W = Q·R, B = Q[:, :r], A = R[:r];
  the residual W − s·B·A (computed by PEFT in fp32) is quantized like every other method.

Per layer, :func:`baseline_layer` is what :func:`qcorda.layer.prepare_layer` runs for them
(``(Split, NF4Weight | None, LayerResult)``, error against plain NF4 by the same quantizer); the
model is assembled by the one in-memory engine (:func:`qcorda.prepare.assemble`).
"""

from __future__ import annotations

import time

import torch

from .calibration import calibration_texts
from .config import ConfigError, InitConfig
from .data import token_batches
from .decompose import Split, full_fp32_matmul, low_rank_term, residual
from .methods import spec
from .models import resolve_compute_dtype
from .prepared import LayerResult
from .quantize import dequantize_nf4, nf4_roundtrip, quantize_nf4
from .targets import layer_seed

#: EVA's redistribution factor: 1 keeps rank r in every layer (the same budget as every method).
EVA_RHO = 1.0
#: Passes over the calibration batches EVA may take to converge before qcorda gives up.
EVA_MAX_EPOCHS = 20


# --------------------------------------------------------------------------- per layer


def peft_init(weight: torch.Tensor, cfg: InitConfig, name: str, init) -> tuple[Split, torch.Tensor]:
    """PEFT's init ``init`` (``True``: default, ``"olora"``) of one layer ``(out_features, in_features)``.

    Returns the fp32 split and the base weight PEFT leaves behind (W itself, or W − s·B·A for
    OLoRA, which PEFT subtracts in place). Seeded per layer, independent of layer order.
    """
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    W = weight.detach().float()
    base = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device)
    with torch.no_grad():
        base.weight.copy_(W)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, init_lora_weights=init)
    # manual_seed reseeds every GPU: fork (and so restore) all of them, not only W's
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        torch.manual_seed(layer_seed(cfg.seed, name))
        layer = LoraLinear(base, "default", config=lcfg, r=cfg.rank, lora_alpha=cfg.lora_alpha)
    A = layer.lora_A["default"].weight.detach().float().clone()
    B = layer.lora_B["default"].weight.detach().float().clone()
    return Split(B, A), layer.get_base_layer().weight.detach().float().clone()


def baseline_layer(weight: torch.Tensor, cfg: InitConfig, name: str, eva_A: torch.Tensor | None = None):
    """Init one target by ``cfg.method`` and measure it: ``(Split, NF4Weight | None, LayerResult)``.

    Like :func:`qcorda.layer.prepare_layer`: ``err`` = ‖W − (base + s·B·A)‖²_F where base
    is deq(Q(W_res)) (NF4 methods) or W in ``compute_dtype`` (``lora``: 0 when that is exact),
    ``qlora_err`` = ‖W − deq(Q(W))‖²_F. DoRA's magnitude equals ‖base + s·B·A‖ at init, so
    its layer computes base + s·B·A too. ``eva_A`` ``(r, in_features)``: EVA's components
    (:func:`eva_components`), required for ``qeva``.
    """
    t0 = time.perf_counter()
    W = weight.detach().float()
    method = cfg.method
    if not spec(method).baseline:
        raise ValueError(f"{method} is not a baseline; use qcorda.layer.prepare_layer")
    if method == "qeva":
        if eva_A is None:
            raise ConfigError(f"is needed by method qeva (layer {name}): give calibration text, e.g. gsm8k-train", "calib.data")
        if tuple(eva_A.shape) != (cfg.rank, W.shape[1]):
            raise ValueError(f"{name}: EVA components have shape {tuple(eva_A.shape)}, expected {(cfg.rank, W.shape[1])}")
        A = eva_A.detach().to(W.device, torch.float32)
        split, res = Split(torch.zeros(W.shape[0], cfg.rank, device=W.device), A), W
    else:
        split, res = peft_init(W, cfg, name, "olora" if method == "qolora" else True)
        if method != "qolora":
            res = residual(W, split, cfg.scaling)  # = W: B is zero at PEFT's default init
    q = None
    if not spec(method).quantized:
        base = W.to(resolve_compute_dtype(cfg.compute_dtype)).float()
    else:
        q = quantize_nf4(res)
        base = dequantize_nf4(q)
    err = (W - base - low_rank_term(split, cfg.scaling)).pow(2).sum().item()
    qlora_err = (W - nf4_roundtrip(W)).pow(2).sum().item()
    return split, q, LayerResult(name, tuple(W.shape), err, qlora_err, None, time.perf_counter() - t0)


# --------------------------------------------------------------------------- EVA


def eva_components(model, tokenizer, targets: list[str], cfg: InitConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    """EVA's A ``(r, in_features)`` per target, by PEFT's ``get_eva_state_dict`` on the original model.

    Batches come from :func:`qcorda.data.token_batches` on ``cfg.calib`` (right-padded, with
    attention masks that PEFT uses to drop padding); only the decoder runs (no logits).
    """
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    if tokenizer is None:
        raise ConfigError("needs a tokenizer with method qeva: pass tokenizer= or a model path", "calib.data")
    texts = calibration_texts(cfg, tokenizer)
    batches = list(token_batches(tokenizer, texts, cfg.calib.max_length, cfg.calib.batch_size))
    limit = EVA_MAX_EPOCHS * len(batches)
    calls = [0]

    def forward(m, inputs):
        calls[0] += 1
        if calls[0] > limit:
            raise ConfigError(
                f"EVA did not converge after {EVA_MAX_EPOCHS} passes over the calibration data; "
                "give more text (--calib-samples, --calib-max-length) or a lower --rank"
            )
        decoder = m.get_decoder() if hasattr(m, "get_decoder") else m
        return decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])

    pcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(targets),
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=EVA_RHO),
    )
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    with full_fp32_matmul():  # EVA's incremental SVDs of the activations: not in the environment's TF32
        sd = get_eva_state_dict(model, batches, peft_config=pcfg, forward_fn=forward, show_progress_bar=progress)
    missing = [t for t in targets if t not in sd]
    if missing:
        raise ConfigError(f"EVA found no inputs for layers {', '.join(missing[:3])}; leave them out of --target-modules")
    return {t: sd[t].float() for t in targets}
