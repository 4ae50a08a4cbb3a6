"""The PEFT-initialized baselines (lora, qdora, qeva, qolora) on tiny models: init, train, save/load, merge."""

import json

import pytest
import torch

from qcorda.testing import tiny
from qcorda.baselines import baseline_layer, eva_components
from qcorda.config import CalibConfig, ConfigError, InitConfig
from qcorda.adapters import dense_weight, plain_lora_refusal
from qcorda.calibration import calibration_texts
from qcorda.methods import names
from qcorda.prepare import prepare
from qcorda.prepared import load_prepared, save_prepared
from qcorda.quantize import nf4_roundtrip
from qcorda.targets import weight_of

METHODS = names(baseline=True)
CALIB = CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=12, max_length=48, batch_size=4)


def _cfg(method, **kw):
    return InitConfig(method=method, rank=kw.pop("rank", 4), calib=CALIB, **kw)


def _inputs(tok):
    return tok(["Natalia sold clips to 48 of her friends in April.", "How many clips?"], return_tensors="pt", padding=True)


def _base_weight(layer):
    """The weight a LoRA layer's base computes with: dequantized NF4 or the 16-bit weight, fp32."""
    import bitsandbytes.functional as F

    w = layer.get_base_layer().weight
    if type(layer.get_base_layer()).__name__ == "Linear4bit":
        return F.dequantize_4bit(w.data, w.quant_state).float()
    return w.detach().float()


def _magnitude(layer):
    return layer.lora_magnitude_vector["default"].weight if "default" in layer.lora_magnitude_vector else None


def _dense_model(peft_model):
    """A plain fp32 llama whose target weights are the merged dense weights of ``peft_model``."""
    base = peft_model.get_base_model()
    dense = tiny.model("llama")
    with torch.no_grad():
        for name, mod in dense.named_modules():
            src = base.get_submodule(name)
            if hasattr(src, "base_layer"):
                A, B = src.lora_A["default"].weight, src.lora_B["default"].weight
                mod.weight.copy_(dense_weight(_base_weight(src), A, B, src.scaling["default"], _magnitude(src)))
            else:
                for pname, p in mod.named_parameters(recurse=False):
                    p.copy_(getattr(src, pname).float())
    return dense.eval()


@pytest.mark.parametrize("method", METHODS)
def test_init_layer_is_base_plus_adapter(method, tok):
    original = tiny.model("llama")
    weights = {n: weight_of(m).detach().clone() for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)}
    p = prepare(original, _cfg(method, alpha=8.0), tokenizer=tok, progress=False)
    model, rep = p.model, p.report
    assert rep.config.method == method and len(rep.targets) == 14 and "lm_head" not in rep.targets
    quantized = method != "lora"
    assert ("quantization_config" in model.config.to_dict()) == quantized
    for res in rep.layers:
        layer = model.base_model.model.get_submodule(res.name)
        assert (type(layer.get_base_layer()).__name__ == "Linear4bit") == quantized
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        assert s == pytest.approx(2.0)
        W, Wb = weights[res.name], _base_weight(layer)
        x = torch.randn(3, W.shape[1])
        torch.testing.assert_close(layer(x), x @ (Wb + s * B @ A).T, atol=1e-5, rtol=1e-5)
        # the reported error is that of the layer as it computes at init, vs plain NF4
        assert res.err == pytest.approx((W - Wb - s * B @ A).pow(2).sum().item(), rel=1e-4, abs=1e-9)
        assert res.qlora_err == pytest.approx((W - nf4_roundtrip(W)).pow(2).sum().item(), rel=1e-6)
        if method == "lora":
            assert torch.equal(Wb, W) and res.err == 0.0  # fp32 compute on CPU: the 16-bit reference is exact
        elif method == "qolora":  # OLoRA: W = QR, B = Q[:, :r], A = R[:r], residual quantized by bnb
            Q, R = torch.linalg.qr(W)
            torch.testing.assert_close(B, Q[:, :4])
            torch.testing.assert_close(A, R[:4])
            torch.testing.assert_close(Wb, nf4_roundtrip(W - s * B @ A), atol=0, rtol=0)
        else:  # PEFT's zero B: the base is plain NF4 of W, the error is qlora's
            assert torch.count_nonzero(B) == 0
            torch.testing.assert_close(Wb, nf4_roundtrip(W), atol=0, rtol=0)
            assert res.err == pytest.approx(res.qlora_err, rel=1e-6)
        if method == "qdora":  # PEFT's DoRA magnitude: per-output-row norm of the base at init
            torch.testing.assert_close(_magnitude(layer), torch.linalg.norm(Wb, dim=1))
        else:
            assert _magnitude(layer) is None
        if method == "qeva":  # EVA's A: orthonormal rows (principal directions of the inputs)
            torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-4, rtol=0)


def test_qeva_captures_input_variance(tok):
    """EVA's A spans high-variance input directions: more energy than random orthonormal rows."""
    from qcorda import covariance
    from qcorda.data import token_batches

    model = tiny.model("llama")
    cfg = _cfg("qeva")
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    eva = eva_components(model, tok, targets, cfg, progress=False)
    covs = covariance.collect(model, token_batches(tok, calibration_texts(cfg, tok), 48, 4), targets, progress=False)
    g = torch.Generator().manual_seed(0)
    for t in targets:
        C, A = covs.of(t), eva[t]
        R = torch.linalg.qr(torch.randn(C.shape[0], 4, generator=g)).Q.T
        assert torch.trace(A @ C @ A.T) > 3 * torch.trace(R @ C @ R.T)


def test_qeva_needs_calibration_data(tok):
    cfg = InitConfig(method="qeva", rank=4)
    with pytest.raises(ConfigError, match=r"^calib\.data is needed by method qeva"):  # the CLI shows it as --calib-data
        prepare(tiny.model("llama"), cfg, tokenizer=tok, progress=False)
    with pytest.raises(ConfigError, match=r"calib\.data"):
        baseline_layer(torch.randn(8, 16), InitConfig(method="qeva", rank=2), "x")


@pytest.mark.parametrize("method", METHODS)
def test_train_save_load_merge(method, tok, tmp_path):
    torch.manual_seed(0)
    p = prepare(tiny.model("llama"), _cfg(method), tokenizer=tok, progress=False)
    model = p.model
    x = _inputs(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    if method == "qdora":
        assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    model(**x, labels=labels).loss.backward()
    opt.step()
    model.eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) > 0  # the step moved B off zero
    with torch.no_grad():
        y = model(**x).logits

    out = save_prepared(model, tmp_path / "prep", tok, p.report)
    model.save_pretrained(tmp_path / "trained")
    meta = json.loads((out / "qcorda.json").read_text())
    assert meta["config"]["method"] == method and meta["compute_dtype"] == "float32"
    assert ("quantization_config" in json.loads((out / "config.json").read_text())) == (method != "lora")
    loaded = load_prepared(out, adapter=tmp_path / "trained", is_trainable=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, y)
        # the dense merge (dequantized base + adapter, DoRA's magnitude included) reproduces it
        y_dense = _dense_model(loaded)(**x).logits
    torch.testing.assert_close(y_dense, y, atol=2e-4, rtol=1e-4)
    assert (plain_lora_refusal(tmp_path / "trained") is None) == (method != "qdora")
    # ... and so does `qcorda merge`, the one the DoRA refusal of to-lora sends users to
    from transformers import AutoModelForCausalLM

    from qcorda.config import MergeConfig
    from qcorda.merge import merge

    merged = merge(out, tmp_path / "merged", MergeConfig(dtype="float32", verify=False), adapter=tmp_path / "trained", progress=False).out
    with torch.no_grad():
        y_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(**x).logits
    torch.testing.assert_close(y_merged, y, atol=2e-4, rtol=1e-4)


def test_dense_weight_matches_peft_dora_merge():
    """dense_weight agrees with PEFT's own DoRA merge on an unquantized Linear."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=False)
    W0 = base.weight.detach().clone()
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True)
    layer = LoraLinear(base, "default", config=cfg, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(16) + 0.5)
    A, B = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    m = layer.lora_magnitude_vector["default"].weight.detach().clone()
    x = torch.randn(5, 24)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
    expected = dense_weight(W0, A, B, 2.0, m)
    torch.testing.assert_close(layer.get_base_layer().weight, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x @ expected.T, y, atol=1e-5, rtol=1e-5)
    # without the magnitude it is plain LoRA, and DoRA is not the same map
    torch.testing.assert_close(dense_weight(W0, A, B, 2.0), W0 + 2.0 * B @ A)
    assert not torch.allclose(dense_weight(W0, A, B, 2.0), expected, atol=1e-3)


def test_plain_lora_refusal():
    from peft import LoraConfig

    assert plain_lora_refusal(LoraConfig(r=4)) is None
    msg = plain_lora_refusal({"peft_type": "LORA", "use_dora": True})
    assert msg and "DoRA" in msg and "qcorda merge" in msg


def test_cli_prepare_baselines(tmp_path, capsys):
    from qcorda.cli import main

    src = tiny.save(tmp_path, "llama")
    rc = main(["prepare", str(src), "--method", "qolora", "--rank", "4", "--out", str(tmp_path / "p")])
    assert rc == 0 and json.loads((tmp_path / "p" / "qcorda.json").read_text())["config"]["method"] == "qolora"
    assert main(["prepare", str(src), "--method", "qeva", "--rank", "4", "--out", str(tmp_path / "e")]) == 2
    assert "--calib-data" in capsys.readouterr().err and not (tmp_path / "e").exists()
    calib = ["--calib-data", "gsm8k-train", "--calib-fields", "question,answer", "--calib-samples", "8", "--calib-max-length", "32"]
    assert main(["prepare", str(src), "--method", "qeva", "--rank", "4", "--out", str(tmp_path / "e"), *calib]) == 0
    assert load_prepared(tmp_path / "e").peft_config["default"].r == 4


@pytest.mark.parametrize("method", ["lora", "qdora"])
def test_bfloat16_round_trip_is_exact(method, tok, tmp_path):
    p = prepare(tiny.model("llama"), _cfg(method, compute_dtype="bfloat16"), tokenizer=tok, progress=False)
    model = p.model
    x = _inputs(tok)
    with torch.no_grad():
        y = model(**x).logits
    assert y.dtype == torch.bfloat16
    loaded = load_prepared(save_prepared(model, tmp_path / "prep", tok, p.report))
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, y)
