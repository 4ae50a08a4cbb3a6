"""prepare(), the one front door: a model by name never loads whole in fp32 unannounced, Prepared.model
is the PeftModel whichever engine ran, and what both engines need is checked once and alike (calibration
data, a reused covariance file)."""

import pytest
import torch

from peft import PeftModel

import qcorda.prepare as front
from qcorda.config import CalibConfig, ConfigError, InitConfig
from qcorda.models import load_model
from qcorda.prepare import prepare
from qcorda.prepared import load_prepared
from qcorda.testing import tiny

CALIB = CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=8, max_length=32, batch_size=4)


def _cfg(method="qcorda-ipm", calib=CALIB, **kw):
    return InitConfig(method=method, rank=4, calib=calib, **kw)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("src"), "llama")


def _logits(model, tok):
    x = tok(["Natalia sold clips to 48 of her friends in April."], return_tensors="pt")
    with torch.no_grad():
        return model(**x).logits


def _no_whole_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("prepare loaded the whole model in fp32")

    monkeypatch.setattr(front, "load_model", refuse)


def test_a_name_without_out_is_streamed_and_loaded(llama, tok, tmp_path, monkeypatch):
    import tempfile

    ref = prepare(str(llama), _cfg(), tmp_path / "ref", progress=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _no_whole_model(monkeypatch)
    p = prepare(str(llama), _cfg(), progress=False)
    assert p.out is None and p.in_memory is not None
    assert list((tmp_path / "tmp").iterdir()) == [], "the temporary directory is removed"
    assert torch.equal(_logits(p.model, tok), _logits(load_prepared(ref.out), tok))
    assert [(l.name, l.err) for l in p.report.layers] == [(l.name, l.err) for l in ref.report.layers]


def test_prepared_model_is_the_peft_model_after_a_streamed_run(llama, tok, tmp_path, monkeypatch):
    _no_whole_model(monkeypatch)
    p = prepare(str(llama), _cfg("qpissa"), tmp_path / "out", progress=False)
    assert p.in_memory is None  # nothing loaded until asked for
    model = p.model
    assert isinstance(model, PeftModel) and p.model is model  # loaded once, on first use
    assert torch.equal(_logits(model, tok), _logits(load_prepared(tmp_path / "out"), tok))


def test_an_unstreamable_method_by_name_says_it_loads_the_whole_model(llama, tmp_path, capfd):
    p = prepare(str(llama), _cfg("lora", calib=CalibConfig()), tmp_path / "out", progress=False)
    assert isinstance(p.model, PeftModel)
    assert "method lora runs in memory" in capfd.readouterr().err


@pytest.mark.parametrize("engine", ["in-memory", "streamed"])
def test_needs_calibration_data_is_one_check(engine, llama, tok, tmp_path, monkeypatch):
    _no_whole_model(monkeypatch)  # refused at the front door, before either engine or any model is read
    monkeypatch.setattr(front, "stream_prepare", lambda *a, **k: pytest.fail("the streamed engine ran"))
    monkeypatch.setattr(front, "prepare_model", lambda *a, **k: pytest.fail("the in-memory engine ran"))
    source = tiny.model("llama") if engine == "in-memory" else str(llama)
    with pytest.raises(ConfigError, match=r"^calib\.data is needed by method qcorda-cal: give calibration text"):
        prepare(source, _cfg("qcorda-cal", calib=CalibConfig()), tmp_path / "out", tokenizer=tok, progress=False)
    with pytest.raises(ConfigError, match=r"^calib\.data is needed by method qeva: .*question,answer\)$"):  # no file instead
        prepare(source, _cfg("qeva", calib=CalibConfig()), tmp_path / "out", calib=tmp_path / "c.safetensors", tokenizer=tok, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine", ["in-memory", "streamed"])
def test_a_reused_covariance_file_is_checked_alike_by_both_engines(engine, llama, tok, tmp_path):
    cov = tmp_path / "c.safetensors"
    prepare(str(llama), _cfg(), tmp_path / "first", save_covariance=cov, progress=False)

    def run(cfg, source=llama, name="out"):  # in memory: the model loaded from the same files (modified in place)
        source = load_model(str(source))[0] if engine == "in-memory" else str(source)
        return prepare(source, cfg, tmp_path / name, calib=cov, tokenizer=tok, progress=False)

    run(_cfg("qera"), name="ok")  # same model, targets and data: reused by another method
    other_data = CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=6, max_length=32, batch_size=4)
    with pytest.raises(ConfigError, match=r"c\.safetensors was built for a different (data_hash|n_samples)"):
        run(_cfg(calib=other_data))
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match=r"c\.safetensors was built for a different model"):
        run(_cfg(), source=tiny.save(tmp_path / "other", "llama", seed=1))
    with pytest.raises(ConfigError, match=r"c\.safetensors was built for a different targets"):
        run(_cfg(target_modules=("q_proj", "v_proj")))
