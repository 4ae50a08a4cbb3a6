"""NF4 with double quantization, exactly as bitsandbytes' ``Linear4bit`` stores it.

qcorda never re-implements the quantizer: the residual is handed to
``bitsandbytes.functional.quantize_4bit`` with the settings of
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)`` (blocksize 64), so the adapter is initialized
against the very weights that training will see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

BLOCKSIZE = 64
QUANT_TYPE = "nf4"
DOUBLE_QUANT = True


@dataclass(frozen=True)
class NF4Weight:
    """A packed NF4 weight and its bitsandbytes ``QuantState``."""

    packed: torch.Tensor
    """uint8, ``(out_features * in_features // 2, 1)``."""
    quant_state: object
    """``bitsandbytes.functional.QuantState`` (absmax, nested stats, shape, dtype)."""


def quantize_nf4(weight: torch.Tensor) -> NF4Weight:
    """Quantize ``weight`` ``(out_features, in_features)`` to NF4 with double quantization.

    The tensor is quantized in its own dtype (fp32 for qcorda's residuals); the
    dequantized result is returned in that dtype too.
    """
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit(
        weight.contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=DOUBLE_QUANT,
        quant_type=QUANT_TYPE,
        quant_storage=torch.uint8,
    )
    return NF4Weight(packed, state)


def dequantize_nf4(q: NF4Weight) -> torch.Tensor:
    """The weight that ``Linear4bit`` computes with, in the dtype it was quantized from."""
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_4bit(q.packed, q.quant_state)


def nf4_from_state_dict(packed: torch.Tensor, quant_state: dict[str, torch.Tensor]) -> NF4Weight:
    """The NF4 weight a saved ``Linear4bit`` holds: its packed bytes (``<name>.weight``) and the
    quant-state tensors saved beside them (``<name>.weight.absmax``, ``...quant_map``, ...; keys
    given without the ``<name>.weight.`` prefix)."""
    import bitsandbytes.functional as bnbF

    return NF4Weight(packed, bnbF.QuantState.from_dict(quant_state, device=packed.device))


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """deq(Q(weight)): what a Linear4bit holding ``weight`` multiplies by."""
    return dequantize_nf4(quantize_nf4(weight))


@dataclass(frozen=True)
class Quantizer:
    """How a residual is stored: ``quantize(W) -> codes`` and ``dequantize(codes) -> W``.

    The iterative splits of :mod:`qcorda.decompose` call it and hand back the codes of
    their last fit, so that exactly those codes are stored."""

    quantize: Callable[[torch.Tensor], object]
    dequantize: Callable[[object], torch.Tensor]


#: NF4 + double quantization, blocksize 64: the quantizer of ``Linear4bit`` and of every qcorda residual.
NF4 = Quantizer(quantize_nf4, dequantize_nf4)


def linear4bit(q: NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding the already-quantized ``q`` (no re-quantization)."""
    import bitsandbytes as bnb

    out_features, in_features = q.quant_state.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=DOUBLE_QUANT,
        quant_type=QUANT_TYPE,
        quant_storage=torch.uint8,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        data=q.packed,
        quant_state=q.quant_state,
        bnb_quantized=True,
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=DOUBLE_QUANT,
        quant_type=QUANT_TYPE,
        quant_storage=torch.uint8,
        module=layer,
    )
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
    return keep_dequantize_path(layer)


def keep_dequantize_path(model: torch.nn.Module) -> torch.nn.Module:
    """Make every ``Linear4bit`` of ``model`` multiply by deq(Q) in its ``compute_dtype``, always.

    bitsandbytes >= 0.49, on a CPU with AVX512-BF16 and in eval mode, repacks the NF4 weight at
    the first forward and multiplies in bfloat16 whatever ``compute_dtype`` says. Training (train
    mode) takes the dequantize path, so evaluation and inference would see other numbers than
    training (logits off by ~1e-3 in fp32) and the outputs would depend on the CPU model.
    Returns ``model`` (changed in place).
    """
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "LinearNF4"):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_config(compute_dtype: torch.dtype, skip_modules: list[str] | None = None):
    """The ``BitsAndBytesConfig`` that describes qcorda's residual (saved in config.json)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=QUANT_TYPE,
        bnb_4bit_use_double_quant=DOUBLE_QUANT,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip_modules,
    )


def set_quant_storage(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store every ``Linear4bit``'s packed NF4 bytes as ``dtype`` (``bnb_4bit_quant_storage``).

    The bytes are unchanged, only reinterpreted (``uint8 (n/2, 1)`` → ``dtype (n/2/itemsize, 1)``),
    so the dequantized weight and every output stay bit-identical. FSDP needs this: it shards the
    4-bit weights together with the other parameters of a unit, flattened into one tensor of one
    dtype. Updates ``model.config.quantization_config``; returns the number of layers changed.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):  # PEFT's lora.Linear4bit wraps one; count it once
            continue
        w = module.weight
        if w.data.dtype != dtype:
            flat = w.data.reshape(-1).view(torch.uint8)
            if flat.numel() % dtype.itemsize:
                raise ValueError(f"a 4-bit weight of {flat.numel()} bytes cannot be stored as {dtype}")
            w.data = flat.view(dtype).reshape(-1, 1)
        w.quant_storage = dtype
        module.quant_storage = dtype
        n += 1
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        qcfg = getattr(getattr(m, "config", None), "quantization_config", None)
        if qcfg is not None:
            if isinstance(qcfg, dict):
                qcfg["bnb_4bit_quant_storage"] = str(dtype).removeprefix("torch.")
            else:
                qcfg.bnb_4bit_quant_storage = dtype
    return n
