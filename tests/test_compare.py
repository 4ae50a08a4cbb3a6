"""qcorda compare on tiny models: invariants of the report, its files, and bad input."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from qcorda.testing import tiny
from qcorda.config import CalibConfig, InitConfig
from qcorda.compare import compare, effective_weight, layer_errors
from qcorda.config import CompareConfig
from qcorda.render import write_report
from qcorda.scoring import final_hidden, ppl_and_kl, scored_batches

METHODS = ("qlora", "qpissa", "qcorda-cal", "lora")  # subset: the reference, SVD, covariance and 16-bit kinds
RANKS = (4, 8)
EVAL = ("gsm8k-test", "wikitext2")


def decaying(model, seed: int = 0):
    """Give every decoder Linear a decaying spectrum σ_i = σ_0·0.8^i (as trained weights have)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                o, i = m.weight.shape
                k = min(o, i)
                U, _ = torch.linalg.qr(torch.randn(o, k, generator=g))
                V, _ = torch.linalg.qr(torch.randn(i, k, generator=g))
                m.weight.copy_(0.1 * (U * 0.8 ** torch.arange(k)) @ V.T)
    return model


def config(**kw) -> CompareConfig:
    init = InitConfig(svd="full", calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=4, max_length=48))
    d = dict(methods=METHODS, ranks=RANKS, init=init, eval_data=EVAL, eval_samples=4, eval_max_length=48, eval_tokens=96)
    d.update(kw)
    return CompareConfig(**d)


@pytest.fixture(scope="module")
def run(tok):
    model = decaying(tiny.model("gemma"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = compare(model, tok, config(), model_id="tiny-gemma", progress=False)
    return model, before, report


def test_qlora_is_one_and_lora_is_zero(run):
    _, _, report = run
    rel = [k for k in report.rows[0] if k.endswith("_rel") or "_rel_" in k]
    assert set(rel) == {"weight_err_rel", "nuclear_err_rel", "act_err_rel", "act_err_rel_wikitext2"}
    for r in report.rows:
        if r["method"] == "qlora":
            assert all(r[k] == 1.0 for k in rel), r
        if r["method"] == "lora":  # fp32 base: no quantization error at all
            assert all(r[k] == 0.0 for k in rel), r
    totals = {(r["method"], r["rank"]): r for r in report.totals()}
    assert totals[("lora", 4)]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert totals[("lora", 4)]["ppl"] == pytest.approx(report.original["ppl"], rel=1e-5)
    assert totals[("qlora", 4)]["ppl"] == totals[("qlora", 8)]["ppl"]  # rank-free: scored once


def test_qpissa_beats_qlora_on_a_decaying_spectrum(run):
    _, _, report = run
    rows = [r for r in report.rows if r["method"] == "qpissa"]
    assert rows and all(r["weight_err_rel"] < 1 for r in rows)
    t = {r["rank"]: r for r in rows if r["layer"] == "total"}
    assert t[8]["weight_err_rel"] < t[4]["weight_err_rel"]  # more rank, less error
    for r in report.totals():
        assert r["kl"] >= 0 and r["kl_wikitext2"] >= 0 and r["ppl"] > 1


def test_rows_cover_every_layer_type_and_total(run):
    model, _, report = run
    layers = [r["layer"] for r in report.rows if r["method"] == "qpissa" and r["rank"] == 4]
    assert layers[: len(report.targets)] == list(report.targets)
    assert "total" in layers and "*.q_proj" in layers and len(set(layers)) == len(layers)
    assert len(report.rows) == len(METHODS) * len(RANKS) * len(layers)


def test_model_is_restored(run):
    model, before, _ = run
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_layer_errors_match_prepare_layer_and_definitions(run):
    model, _, _ = run
    W = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach().float()
    cfg = InitConfig(method="qpissa", rank=4)
    W_eff, result = effective_weight(W, cfg, "x", None)
    X = torch.randn(300, W.shape[1], dtype=torch.float64)
    C = (X.T @ X / 300).float()
    e = layer_errors(W, W_eff, [C])
    assert e.weight == pytest.approx(result.err, rel=1e-5)  # the same W_eff prepare_layer measured
    E = (W - W_eff).double()
    L = torch.linalg.cholesky(C.double())
    assert e.act[0] == pytest.approx(float((E @ L).pow(2).sum()), rel=1e-4)
    assert e.nuclear == pytest.approx(float(torch.linalg.svdvals(E).sum()), rel=1e-4)
    # C_eval itself, undamped: with fewer records than features it has no Cholesky factor, and still
    # tr(E·C·Eᵀ) = ‖E·Xᵀ‖²_F / n
    Xs = X[:8]
    assert layer_errors(W, W_eff, [(Xs.T @ Xs / 8).float()]).act[0] == pytest.approx(float((E @ Xs.T).pow(2).sum() / 8), rel=1e-4)


def test_scored_batches_and_streamed_kl(tok):
    from qcorda.scoring import sequence_nll
    from qcorda.compare import eval_texts

    model = tiny.model("llama")
    texts = eval_texts("gsm8k-test", 4, tok)
    batches = scored_batches(tok, texts, 64, 2, 77)
    h, y = final_hidden(model, batches)
    assert h.shape[0] == y.shape[0] == 77
    ref_ppl, res = ppl_and_kl(model, h, y, {"self": h}, progress=False)
    assert res["self"][1] == pytest.approx(0.0, abs=1e-6)
    nll = sum(sequence_nll(model, b["input_ids"], b["attention_mask"], b["attention_mask"])[0].sum().item() for b in batches)
    assert ref_ppl == pytest.approx(math.exp(nll / 77), rel=1e-4)  # the same figure evaluate.py gives


@pytest.mark.parametrize("side", ["left", "right"])
def test_scored_token_count_does_not_depend_on_the_padding_side(tok, side):
    """Gemma's tokenizer pads on the left; the default compare once scored 308 of 512 tokens."""
    import copy

    from qcorda.compare import eval_texts

    t = copy.deepcopy(tok)
    t.padding_side = side
    texts = eval_texts("gsm8k-test", 6, t)
    assert len({len(t(x)["input_ids"]) for x in texts[:4]}) > 1  # the first batch is padded
    for n in (77, 400):
        h, y = final_hidden(tiny.model("llama"), scored_batches(t, texts, 256, 4, n))
        assert y.shape[0] == h.shape[0] == n


def test_report_files(run, tmp_path):
    _, _, report = run
    out = write_report(report, tmp_path / "rep")
    assert sorted(p.name for p in out.iterdir()) == [
        "error_by_layer.png", "error_vs_rank.png", "ppl_gap.png", "report.csv", "report.json", "report.md",
    ]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "report.json").read_text())
    base = {"method", "rank", "layer", "weight_err_rel", "nuclear_err_rel", "act_err_rel", "act_err_rel_wikitext2"}
    for r in doc["rows"]:
        want = base | ({"ppl", "kl", "ppl_wikitext2", "kl_wikitext2"} if r["layer"] == "total" else set())
        assert set(r) == want, r
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["rows"])
    for c, j in zip(rows, doc["rows"]):
        for k, v in j.items():
            assert (float(c[k]) == v) if isinstance(v, float) else (c[k] == str(v)), (k, c[k], v)
        assert all(c[k] == "" for k in c if k not in j)
    md = (out / "report.md").read_text()
    assert "| qcorda-cal" in md and "fp32 original" in md
    from qcorda.io import OutputExistsError

    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_report(report, out)


# --------------------------------------------------------------------------- bad input (CLI)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--methods", "qlora,qfoo"], "--methods"),
        (["--ranks", "16,0"], "--ranks"),
        (["--ranks", "-4"], "--ranks"),
        (["--ranks", "a,b"], "--ranks"),
        (["--ranks", "4", "--eval-data", "/nonexistent/held_out.jsonl"], "--eval-data"),
        (["--ranks", "4", "--eval-data", "gsm8k-test,nosuch-alias.txt"], "--eval-data"),
        (["--eval-tokens", "-1"], "--eval-tokens"),
        (["--ranks", "4096"], "--ranks"),
    ],
)
def test_bad_input_names_the_flag_and_writes_nothing(tmp_path, capsys, args, flag):
    from qcorda.cli import main

    path = tiny.save(tmp_path, "llama")
    out = tmp_path / "report"
    rc = main(["compare", str(path), "--out", str(out), "--calib-samples", "4", "--eval-samples", "4", *args])
    assert rc == 2
    assert flag in capsys.readouterr().err
    assert not out.exists() and not any(p.name.startswith(".report") for p in tmp_path.iterdir())


def test_cli_writes_report_and_prints_summary(tmp_path, capsys):
    from qcorda.cli import main

    path = tiny.save(tmp_path, "llama")
    out = tmp_path / "report"
    argv = ["compare", str(path), "--out", str(out), "--methods", "qlora,qcorda-ipm", "--ranks", "4",
            "--calib-samples", "4", "--eval-samples", "4", "--eval-tokens", "32", "--no-plots"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| qcorda-ipm" in text and "fp32 original" in text
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.json", "report.md"]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
