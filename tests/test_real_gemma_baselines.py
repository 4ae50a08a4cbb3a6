"""The baselines (lora, qdora, qeva, qolora) on the real Gemma-3-270M (slow)."""

import pytest
import torch

from qcorda.config import CalibConfig, InitConfig
from qcorda.methods import names

pytestmark = pytest.mark.slow

CALIB = CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=32, max_length=256)


def test_baselines_per_layer_errors(gemma_path):
    """Weight and held-out activation error of each baseline at init, relative to plain NF4 (qlora)."""
    from qcorda.baselines import baseline_layer
    from qcorda.covariance import collect
    from qcorda.data import load_examples, token_batches
    from qcorda.decompose import damp, low_rank_term
    from qcorda.models import load_model, resolve_compute_dtype
    from qcorda.quantize import dequantize_nf4
    from qcorda.targets import find_targets, weight_of

    model, tok = load_model(str(gemma_path))
    targets = find_targets(model, ("all-linear",))
    held = [e.text for e in load_examples("gsm8k-test", ("question", "answer"), limit=16)]
    held_covs = collect(model, token_batches(tok, held, 256, 8), targets, progress=False)
    eva: dict = {}  # qeva's B = 0: its error is plain NF4's whatever A is (EVA itself: the test below)
    chol = {t: damp(held_covs.of(t), 1e-6).L for t in targets}
    totals = {}
    for method in (m for m in names(baseline=True) if m != "qeva"):
        cfg = InitConfig(method=method, rank=16, calib=CALIB)
        w_err = a_err = q_w = q_a = 0.0
        for t in targets:
            W = weight_of(model.get_submodule(t)).detach().float()
            split, q, res = baseline_layer(W, cfg, t)
            base = dequantize_nf4(q) if q is not None else W.to(resolve_compute_dtype(cfg.compute_dtype)).float()
            E = W - base - low_rank_term(split, cfg.scaling)
            L = chol[t]
            assert res.err == pytest.approx(E.pow(2).sum().item(), rel=1e-4, abs=1e-12)
            w_err, q_w = w_err + res.err, q_w + res.qlora_err
            a_err += (E @ L).pow(2).sum().item()
            if method == "qdora":  # qlora's activation error, for the denominators
                q_a += (E @ L).pow(2).sum().item()
        totals[method] = (w_err / q_w, a_err)
    base_a = totals["qdora"][1]
    print("\nmethod   weight/qlora  held-out act/qlora")
    for m, (w, a) in totals.items():
        print(f"{m:8s} {w:.4f}        {a / base_a:.4f}")
    assert totals["lora"][0] == 0.0  # Gemma's bf16 weights are exact in fp32: no quantization error
    assert totals["qdora"][0] == pytest.approx(1.0)  # B = 0: plain NF4
    assert 0.5 < totals["qolora"][0] < 1.5


def test_qeva_prepares_and_runs(gemma_path, tmp_path):
    from qcorda.data import token_batches
    from qcorda.prepare import prepare

    cfg = InitConfig(method="qeva", rank=8, target_modules=("q_proj", "v_proj"), calib=CalibConfig(
        data="gsm8k-train", fields=("question", "answer"), samples=32, max_length=64, batch_size=8))  # PEFT's EVA hooks are slow on CPU
    p = prepare(gemma_path, cfg, progress=False)
    model, rep = p.model, p.report
    assert len(rep.targets) == 36 and rep.calibration["data"] == "gsm8k-train"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gemma_path))
    batch = next(token_batches(tok, ["Natalia sold clips to 48 of her friends."], 32, 1))
    with torch.no_grad():
        y = model(**batch).logits
    assert torch.isfinite(y).all()
    # no reload here: with partial --target-modules, prepare keeps the other Linears 16-bit in
    # memory while from_pretrained quantizes them (a prepare-core issue; tiny tests reload all-linear)
