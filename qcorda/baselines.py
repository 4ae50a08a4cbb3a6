"""The seeds' other systems as baselines, initialized by PEFT (no second copy of their math).

- ``lora``: 16-bit base (``compute_dtype``), PEFT's default init (A Kaiming-uniform, B = 0).
- ``qdora``: NF4 base, DoRA (PEFT ``use_dora``): magnitude m = ‖deq(Q(W)) + s·B·A‖ per output row.
- ``qeva``: NF4 base, EVA (PEFT ``get_eva_state_dict`` with ``EvaConfig(rho=1)``): A = the top-r
  right singular vectors of each target's inputs on ``--calib-data`` (padding dropped with the
  attention mask), B = 0.
- ``qolora``: OLoRA (PEFT ``init_lora_weights="olora"``): W = Q·R, B = Q[:, :r], A = R[:r];
  the residual W − s·B·A (computed by PEFT in fp32) is quantized like every other method.

Per layer, :func:`baseline_layer` is the counterpart of :func:`qcorda.prepare.prepare_layer`
(``(Split, NF4Weight | None, LayerResult)``, error against plain NF4 by the same quantizer);
:func:`prepare_baseline` assembles the same kind of ``PeftModel`` and ``PrepareReport`` as
:func:`qcorda.prepare.prepare`, so ``save_prepared``/``load_prepared`` work unchanged.

For merging, :func:`dense_weight` gives the dense weight an adapter layer computes with
(DoRA's magnitude included) and :func:`plain_lora_refusal` says why an adapter cannot be
written as a plain LoRA (DoRA).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import BASELINES, ConfigError, InitConfig
from .decompose import Split, low_rank_term, residual

#: Baselines whose base stays 16-bit (no quantization).
UNQUANTIZED: frozenset[str] = frozenset({"lora"})
#: EVA's redistribution factor: 1 keeps rank r in every layer (the same budget as every method).
EVA_RHO = 1.0
#: Passes over the calibration batches EVA may take to converge before qcorda gives up.
EVA_MAX_EPOCHS = 20


# --------------------------------------------------------------------------- merge helpers


def dense_weight(
    base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense weight ``(out_features, in_features)`` of a LoRA or DoRA layer, in fp32.

    LoRA: W' = W + s·B·A. DoRA (``magnitude`` m of shape ``(out_features,)``), PEFT's formula:
    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm taken over ``in_features`` for each output
    row (PEFT's ``get_weight_norm``: ``linalg.norm(W + s·B·A, dim=1)``; the DoRA paper's
    column norm of Wᵀ). ``base`` is the weight the base layer computes with (dequantized NF4).
    """
    W = base.float() + scaling * (B.float() @ A.float())
    if magnitude is None:
        return W
    norm = torch.linalg.norm(W, dim=1)
    return (magnitude.float() / norm).unsqueeze(1) * W


dora_merged_weight = dense_weight


def plain_lora_refusal(adapter) -> str | None:
    """Why ``adapter`` cannot be expressed as a plain LoRA (B, A on the same base), or None.

    ``adapter``: a PEFT ``LoraConfig``, an ``adapter_config.json`` dict, or an adapter
    directory. DoRA rescales every output row by m/‖W + s·B·A‖, a full-rank change of W
    that no rank-r B·A reproduces.
    """
    import json

    if isinstance(adapter, (str, Path)):
        path = Path(adapter)
        path = path / "adapter_config.json" if path.is_dir() else path
        adapter = json.loads(path.read_text())
    get = adapter.get if isinstance(adapter, dict) else lambda k, d=None: getattr(adapter, k, d)
    if get("use_dora", False):
        return (
            "the adapter is DoRA (use_dora): its magnitude vector rescales every output row of W, "
            "a full-rank change that no plain LoRA B·A can express; use `qcorda merge` to get a dense model instead"
        )
    if get("peft_type", "LORA") not in ("LORA", None):
        return f"the adapter is {get('peft_type')}, not LoRA"
    return None


# --------------------------------------------------------------------------- per layer


def peft_init(weight: torch.Tensor, cfg: InitConfig, name: str, init) -> tuple[Split, torch.Tensor]:
    """PEFT's init ``init`` (``True``: default, ``"olora"``) of one layer ``(out_features, in_features)``.

    Returns the fp32 split and the base weight PEFT leaves behind (W itself, or W − s·B·A for
    OLoRA, which PEFT subtracts in place). Seeded per layer, independent of layer order.
    """
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    from .prepare import layer_seed

    W = weight.detach().float()
    base = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device)
    with torch.no_grad():
        base.weight.copy_(W)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, init_lora_weights=init)
    with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []):
        torch.manual_seed(layer_seed(cfg.seed, name))
        layer = LoraLinear(base, "default", config=lcfg, r=cfg.rank, lora_alpha=cfg.lora_alpha)
    A = layer.lora_A["default"].weight.detach().float().clone()
    B = layer.lora_B["default"].weight.detach().float().clone()
    return Split(B, A), layer.get_base_layer().weight.detach().float().clone()


def baseline_layer(weight: torch.Tensor, cfg: InitConfig, name: str, eva_A: torch.Tensor | None = None):
    """Init one target by ``cfg.method`` and measure it: ``(Split, NF4Weight | None, LayerResult)``.

    Like :func:`qcorda.prepare.prepare_layer`: ``err`` = ‖W − (base + s·B·A)‖²_F where base
    is deq(Q(W_res)) (NF4 methods) or W in ``compute_dtype`` (``lora``: 0 when that is exact),
    ``qlora_err`` = ‖W − deq(Q(W))‖²_F. DoRA's magnitude equals ‖base + s·B·A‖ at init, so
    its layer computes base + s·B·A too. ``eva_A`` ``(r, in_features)``: EVA's components
    (:func:`eva_components`), required for ``qeva``.
    """
    from .prepare import LayerResult
    from .models import resolve_compute_dtype
    from .quantize import dequantize_nf4, nf4_roundtrip, quantize_nf4

    t0 = time.perf_counter()
    W = weight.detach().float()
    method = cfg.method
    if method not in BASELINES:
        raise ValueError(f"{method} is not a baseline; use qcorda.prepare.prepare_layer")
    if method == "qeva":
        if eva_A is None:
            raise ConfigError(f"method qeva needs calibration data for layer {name}; pass --calib-data")
        if tuple(eva_A.shape) != (cfg.rank, W.shape[1]):
            raise ValueError(f"{name}: EVA components have shape {tuple(eva_A.shape)}, expected {(cfg.rank, W.shape[1])}")
        A = eva_A.detach().to(W.device, torch.float32)
        split, res = Split(torch.zeros(W.shape[0], cfg.rank, device=W.device), A), W
    else:
        split, res = peft_init(W, cfg, name, "olora" if method == "qolora" else True)
        if method != "qolora":
            res = residual(W, split, cfg.scaling)  # = W: B is zero at PEFT's default init
    q = None
    if method in UNQUANTIZED:
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

    from .data import token_batches
    from .prepare import calibration_texts

    if tokenizer is None:
        raise ConfigError("method qeva needs a tokenizer for --calib-data; pass tokenizer= or a model path")
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
    sd = get_eva_state_dict(model, batches, peft_config=pcfg, forward_fn=forward, show_progress_bar=progress)
    missing = [t for t in targets if t not in sd]
    if missing:
        raise ConfigError(f"EVA found no inputs for layers {', '.join(missing[:3])}; leave them out of --target-modules")
    return {t: sd[t].float() for t in targets}


# --------------------------------------------------------------------------- model


def prepare_baseline(model, cfg: InitConfig, model_id: str, tokenizer=None, progress: bool = True, t_start: float | None = None):
    """:func:`qcorda.prepare.prepare` for a method in ``BASELINES``: a ``PeftModel`` (report via ``report_of``)."""
    from peft import get_peft_model
    from tqdm.auto import tqdm

    from .prepare import _set_module, attach_report, lora_config, mark_quantized
    from .models import resolve_compute_dtype, resolve_device
    from .quantize import linear4bit
    from .targets import check_rank, find_targets, weight_of

    t_start = time.perf_counter() if t_start is None else t_start
    targets = find_targets(model, cfg.target_modules)
    check_rank(model, targets, cfg.rank)
    device = resolve_device(cfg.device)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype)
    quantized = cfg.method not in UNQUANTIZED

    eva: dict[str, torch.Tensor] = {}
    calibration = None
    if cfg.method == "qeva":
        model.to(device)
        eva = eva_components(model, tokenizer, targets, cfg, progress)
        calibration = {"data": cfg.calib.data, "n_samples": cfg.calib.samples, "max_length": cfg.calib.max_length, "eva_rho": EVA_RHO}

    splits: dict[str, Split] = {}
    results = []
    bar = tqdm(targets, desc=f"prepare {cfg.method} r={cfg.rank}", unit="layer", disable=not progress)
    for name in bar:
        module = model.get_submodule(name)
        W = weight_of(module).detach().to(device=device, dtype=torch.float32)
        split, q, result = baseline_layer(W, cfg, name, eva.get(name))
        if q is not None:
            bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
            _set_module(model, name, linear4bit(q, bias, compute_dtype))
        splits[name] = split
        results.append(result)
        bar.set_postfix(err=f"{result.rel_err:.3f}")

    # Everything not quantized (all of the model for lora) computes in compute_dtype, as
    # from_pretrained(dtype=compute_dtype) loads it: non-persistent buffers (rotary inv_freq)
    # are not in the checkpoint and stay fp32 there, so they stay fp32 here (exact round trip).
    for mod in model.modules():
        if quantized and type(mod).__name__ == "Linear4bit":
            if mod.bias is not None:
                mod.bias.data = mod.bias.data.to(compute_dtype)
            continue
        for p in mod.parameters(recurse=False):
            p.data = p.data.to(compute_dtype)
        for bname, b in mod.named_buffers(recurse=False):
            if b.is_floating_point() and bname not in mod._non_persistent_buffers_set:
                setattr(mod, bname, b.to(compute_dtype))
    model.to(device)
    if quantized:
        mark_quantized(model, compute_dtype)
    model.config.use_cache = False

    lcfg = lora_config(cfg, targets)
    lcfg.use_dora = cfg.method == "qdora"
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, split in splits.items():
            layer = peft_model.base_model.model.get_submodule(name)
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.copy_(split.A)
            B.copy_(split.B)
            if cfg.method == "qdora":
                # PEFT set m from the placeholder A, B; recompute it (PEFT's DoRA) from the real ones.
                layer.lora_magnitude_vector["default"].update_layer(
                    base_layer=layer.get_base_layer(), lora_A=A, lora_B=B, scaling=layer.scaling["default"]
                )

    return attach_report(peft_model, cfg, model_id, targets, results, calibration, compute_dtype, t_start)
