"""The residual is quantized by bitsandbytes itself, as Linear4bit stores it."""

import pytest
import torch

from qcorda.quantize import BLOCKSIZE, dequantize_nf4, linear4bit, nf4_roundtrip, quantize_nf4


def test_matches_bitsandbytes_linear4bit_quantization():
    import bitsandbytes as bnb

    W = torch.randn(96, 128)
    ref = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=BLOCKSIZE)
    ref = ref.to("cpu")  # quantizes
    q = quantize_nf4(W)
    assert torch.equal(q.packed, ref.weight.data)
    assert q.quant_state.nested and q.quant_state.blocksize == BLOCKSIZE and q.quant_state.quant_type == "nf4"
    x = torch.randn(5, 128)
    ours = linear4bit(q, None, torch.float32)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
    torch.testing.assert_close(ours(x), x @ dequantize_nf4(q).T, atol=1e-5, rtol=1e-5)


def test_roundtrip_error_is_nf4_sized_and_idempotent():
    W = torch.randn(64, 256)
    D = nf4_roundtrip(W)
    rel = ((W - D).norm() / W.norm()).item()
    assert 0.03 < rel < 0.15
    # nearly idempotent: only the double-quantized absmax moves a little
    assert ((nf4_roundtrip(D) - D).norm() / D.norm()).item() < 0.01


def test_bias_kept():
    W, b = torch.randn(8, 64), torch.randn(8)
    layer = linear4bit(quantize_nf4(W), b, torch.float32)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ nf4_roundtrip(W).T + b, atol=1e-5, rtol=1e-5)


def _has_avx512_bf16() -> bool:
    """What bitsandbytes asks before it switches a CPU eval-mode forward to its bf16 kernel."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@pytest.mark.skipif(not _has_avx512_bf16(), reason="bitsandbytes takes its bf16 CPU kernel only on CPUs with AVX512-BF16; "
                    "without it the dequantize path is the only one, and the test cannot fail")
def test_linear4bit_eval_mode_multiplies_by_the_dequantized_weight_in_fp32():
    """On CPUs with AVX512-BF16, bitsandbytes' eval-mode forward would switch to a bf16 kernel;
    qcorda's layers (built here or reloaded by load_prepared) keep the dequantize path, so the
    eval output is exactly x @ deq(Q(W))^T in fp32, as in training."""
    from qcorda.quantize import keep_dequantize_path, linear4bit

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q = quantize_nf4(w)
    layer = keep_dequantize_path(linear4bit(q, None, torch.float32)).eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = layer(x)
    assert torch.allclose(y, x @ dequantize_nf4(q).T, atol=1e-5, rtol=0)
