"""The real Gemma-3-270M: every method prepares; the good ones beat plain NF4 (slow)."""

import pytest
import torch

from qcorda.config import CalibConfig, InitConfig
from qcorda.methods import names

pytestmark = pytest.mark.slow

METHODS = names(baseline=False)


@pytest.fixture(scope="module")
def gemma_setup(gemma_path):
    from qcorda.covariance import collect
    from qcorda.data import load_examples, token_batches
    from qcorda.calibration import collect_covariances
    from qcorda.models import load_model
    from qcorda.targets import find_targets

    model, tok = load_model(str(gemma_path))
    cfg = InitConfig(method="qcorda-ipm", rank=16, calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=32, max_length=256))
    targets = find_targets(model, cfg.target_modules)
    covs = collect_covariances(model, tok, targets, cfg, progress=False)
    # held-out activations: GSM8K test, not the calibration text
    held = [e.text for e in load_examples("gsm8k-test", ("question", "answer"), limit=32)]
    held_covs = collect(model, token_batches(tok, held, 256, 8), targets, progress=False)
    weights = {t: model.get_submodule(t).weight.detach().clone() for t in targets}
    return cfg, covs, held_covs, weights, targets


def test_every_method_prepares_and_good_ones_beat_qlora(gemma_setup):
    from qcorda.decompose import damp, low_rank_term
    from qcorda.layer import prepare_layer
    from qcorda.quantize import dequantize_nf4

    cfg0, covs, held, weights, targets = gemma_setup
    totals = {}
    for method in METHODS:
        cfg = InitConfig(method=method, rank=16, calib=cfg0.calib, iters=None)
        w_err = a_err = 0.0
        for t in targets:
            W = weights[t]
            split, q, res = prepare_layer(W, cfg, t, covs)
            E = W - dequantize_nf4(q) - low_rank_term(split, cfg.scaling)
            L = damp(held.of(t), 1e-6).L
            w_err += res.err
            a_err += (E @ L).pow(2).sum().item()
        totals[method] = (w_err, a_err)
    base_w, base_a = totals["qlora"]
    print("\nmethod        weight/qlora  held-out act/qlora")
    for m, (w, a) in totals.items():
        print(f"{m:12s}  {w / base_w:.3f}         {a / base_a:.3f}")
    for m in ("qpissa", "loftq", "qcorda-ipm", "qcorda-cal"):  # subset: the ones that beat plain NF4 on both errors
        w, a = totals[m]
        assert w <= base_w and a <= base_a, m


def test_prepare_end_to_end_and_reload(gemma_path, tmp_path):
    from qcorda.data import token_batches
    from qcorda.prepare import prepare
    from qcorda.prepared import load_prepared, save_prepared
    from transformers import AutoTokenizer

    cfg = InitConfig(method="qcorda-ipm", rank=16, calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=32, max_length=128))
    tok = AutoTokenizer.from_pretrained(gemma_path)
    p = prepare(gemma_path, cfg, tokenizer=tok, progress=False)  # no out: streamed into a temporary directory, loaded
    model, rep = p.model, p.report
    assert len(rep.targets) == 126 and rep.err < rep.qlora_err
    x = next(token_batches(tok, ["Natalia sold clips to 48 of her friends in April."], 64, 1))
    y = model(**x).logits
    out = save_prepared(model, tmp_path / "prep", tok, rep)
    assert torch.equal(load_prepared(out)(**x).logits, y)
