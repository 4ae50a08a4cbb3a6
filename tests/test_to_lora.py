"""qcorda to-lora on tiny models: exact-delta is exact without quantization, compress at full rank
equals it, absorb-quant-error is closer to the trained 4-bit model at equal rank."""

import json

import pytest
import torch
from peft import PeftModel

from export_helpers import edited_adapter, inputs, prepared_and_trained
from qcorda.scoring import logit_agreement as compare
from qcorda.config import ConfigError, ToLoraConfig, VerifyConfig
from qcorda.adapters import read_adapter
from qcorda.prepared import load_prepared
from qcorda.models import load_model
from qcorda.targets import weight_of
from qcorda.to_lora import absorb_quant_error, compress, exact_delta, to_lora, truncate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return prepared_and_trained(tmp_path_factory.mktemp("tolora"))


def _with_lora(base, lora_dir):
    model, _ = load_model(str(base))
    return PeftModel.from_pretrained(model, str(lora_dir), is_trainable=False).eval()


def _unquantized_trained(base, prep, trained):
    """The trained model had the residual not been quantized: W − s₀B₀A₀ + s·B·A, all fp32."""
    model, _ = load_model(str(base))
    spec, init = read_adapter(trained), read_adapter(prep / "adapter_init")
    with torch.no_grad():
        for name in json.loads((prep / "qcorda.json").read_text())["targets"]:
            B, A = spec.factors(name)
            B0, A0 = init.factors(name)
            w = weight_of(model.get_submodule(name))
            w.copy_(w - init.scaling(name) * B0 @ A0 + spec.scaling(name) * B @ A)
    return model.eval()


def test_pure_functions():
    g = torch.Generator().manual_seed(0)
    B, A, B0, A0 = (torch.randn(s, generator=g) for s in [(32, 4), (4, 24), (32, 4), (4, 24)])
    delta = 2.0 * B @ A - 0.5 * B0 @ A0
    f = exact_delta(B, A, 2.0, B0, A0, 0.5)
    assert f.rank == 8
    torch.testing.assert_close(2.0 * f.B @ f.A, delta, atol=1e-5, rtol=0)
    c = compress(B, A, 2.0, B0, A0, 0.5, 8)
    torch.testing.assert_close(c.B @ c.A, delta, atol=1e-4, rtol=0)
    assert c.energy == pytest.approx(1.0)
    c3 = compress(B, A, 2.0, B0, A0, 0.5, 3)
    t3 = truncate(delta, 3)
    torch.testing.assert_close(c3.B @ c3.A, t3.B @ t3.A, atol=1e-4, rtol=0)
    assert 0 < c3.energy < 1 and c3.energy == pytest.approx(t3.energy, rel=1e-6)
    W, Wq = torch.randn(32, 24, generator=g), torch.randn(32, 24, generator=g)
    a = absorb_quant_error(W, Wq, B, A, 2.0, 8)
    D = Wq + 2.0 * B @ A - W
    assert (D - a.B @ a.A).norm() <= (D - f.B @ f.A * 2.0).norm() + 1e-6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_delta_reproduces_unquantized_trained_model(arch, tok, tmp_path):
    base, prep, trained = prepared_and_trained(tmp_path, arch)
    out = to_lora(prep, str(base), tmp_path / "lora", ToLoraConfig(mode="exact-delta", verify=False), adapter=trained, progress=False).out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0
    x = inputs(tok)
    with torch.no_grad():
        y = _with_lora(base, out)(**x).logits
        ref = _unquantized_trained(base, prep, trained)(**x).logits
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_compress_full_rank_equals_exact_delta(setup, tok, tmp_path):
    base, prep, trained = setup
    ex = to_lora(prep, str(base), tmp_path / "ex", ToLoraConfig(mode="exact-delta", verify=False), adapter=trained, progress=False)
    co = to_lora(prep, str(base), tmp_path / "co", ToLoraConfig(mode="compress", rank=8, verify=False), adapter=trained, progress=False)
    assert all(l.energy == pytest.approx(1.0, abs=1e-6) for l in co.layers)
    x = inputs(tok)
    with torch.no_grad():
        torch.testing.assert_close(_with_lora(base, co.out)(**x).logits, _with_lora(base, ex.out)(**x).logits, atol=1e-5, rtol=1e-5)
    half = to_lora(prep, str(base), tmp_path / "half", ToLoraConfig(mode="compress", verify=False), adapter=trained, progress=False)
    assert {l.rank for l in half.layers} == {4} and all(l.energy < 1 for l in half.layers)


def test_absorb_beats_exact_delta_at_equal_rank(setup, tok, tmp_path):
    base, prep, trained = setup
    ex = to_lora(prep, str(base), tmp_path / "ex", ToLoraConfig(mode="exact-delta", verify=False), adapter=trained, progress=False)
    ab = to_lora(prep, str(base), tmp_path / "ab", ToLoraConfig(mode="absorb-quant-error", rank=8, verify=False), adapter=trained, progress=False)
    for e, a in zip(ex.layers, ab.layers):
        assert a.rank == e.rank == 8 and a.err_to_trained < e.err_to_trained
    from qcorda.scoring import held_out_batches

    models = {"trained": load_prepared(prep, trained, is_trainable=False), "ex": _with_lora(base, ex.out), "ab": _with_lora(base, ab.out)}
    batches, _ = held_out_batches(tok, "gsm8k-test", ("question", "answer"), 4, 48, 2)
    res = {a.other: a for a in compare(models, [("trained", "ex"), ("trained", "ab")], batches, progress=False)}
    assert res["ab"].mean_kl < res["ex"].mean_kl


def test_verification_report(setup, tmp_path):
    base, prep, trained = setup
    res = to_lora(prep, str(base), tmp_path / "v", ToLoraConfig(mode="absorb-quant-error", verification=VerifyConfig(samples=2, max_length=24)), adapter=trained, progress=False)
    saved = json.loads((res.out / "qcorda_to_lora.json").read_text())
    pairs = {(a["reference"], a["other"]) for a in saved["agreement"]}
    assert ("trained 4-bit+adapter", "base+LoRA") in pairs and ("merged float16", "base+LoRA") in pairs
    assert len(saved["layers"]) == 14 and all(0 < l["energy"] <= 1 for l in saved["layers"])


def test_refusals(setup, tmp_path):
    base, prep, trained = setup
    edited = edited_adapter(trained, tmp_path / "rs", use_rslora=True, alpha_pattern={"q_proj": 3.0})
    with pytest.raises(ConfigError, match="rsLoRA.*rank_pattern/alpha_pattern"):
        to_lora(prep, str(base), tmp_path / "a", ToLoraConfig(mode="exact-delta", verify=False), adapter=edited, progress=False)
    # compress writes scale-folded factors, so the same adapter converts (exactly at rank 2r)
    to_lora(prep, str(base), tmp_path / "b", ToLoraConfig(mode="compress", rank=8, verify=False), adapter=edited, progress=False)
    from qcorda.testing import tiny

    other = tiny.save(tmp_path / "other", "llama", seed=5)
    with pytest.raises(ConfigError, match="not the model .* was prepared from"):
        to_lora(prep, str(other), tmp_path / "c", ToLoraConfig(mode="exact-delta", verify=False), adapter=trained, progress=False)
    with pytest.raises(ConfigError, match="^mode must be one of"):
        ToLoraConfig(mode="svd")
    with pytest.raises(ConfigError, match="^rank applies to mode compress"):
        ToLoraConfig(mode="exact-delta", rank=3)
    with pytest.raises(ConfigError, match="has no layer"):
        to_lora(prep, str(tiny.save(tmp_path / "gpt2", "gpt2")), tmp_path / "f", ToLoraConfig(verify=False), adapter=trained, progress=False)
    assert not any((tmp_path / n).exists() for n in "acf")
