"""The layer-streamed, resumable prepare writer (qcorda.stream): same bits as the in-memory path,
deterministic, resumable after a crash or SIGKILL, nothing under the target name on failure."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qcorda.testing import tiny
from qcorda.config import CalibConfig, ConfigError, InitConfig
from qcorda.prepare import prepare
from qcorda.prepared import load_prepared
from qcorda.methods import names, spec
from qcorda.models import load_model
from qcorda.stream import partial_dir, stream_prepare

METHODS = names(baseline=False)
CALIB = CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=8, max_length=32, batch_size=4)
REPO = Path(__file__).resolve().parents[1]


def _cfg(method, **kw):
    iters = 2 if spec(method).iterative else None
    return InitConfig(method=method, rank=kw.pop("rank", 4), calib=CALIB, iters=kw.pop("iters", iters), **kw)


def hashes(d: Path) -> dict[str, str]:
    """sha256 of every file of a prepared directory, timings.json (wall clock) excepted."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != "timings.json"
    }


def leftovers(parent: Path, out: Path) -> list[str]:
    """Entries under ``parent`` that carry ``out``'s name (the target, temp dirs, work dir)."""
    return sorted(p.name for p in parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("src"), "llama")


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """6 decoder blocks: 42 targets, enough to kill a run halfway."""
    path = tmp_path_factory.mktemp("deep") / "tiny-llama6"
    tiny.model("llama", num_hidden_layers=6).save_pretrained(path)
    tiny.tokenizer().save_pretrained(path)
    return path


def _x(tok):
    return tok(["Natalia sold clips to 48 of her friends in April.", "How many clips?"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("method,kw", [
    ("qlora", {}), ("qpissa", {}), ("qcorda-ipm", {}), ("qcorda-cal", {}), ("qera", {}),
    ("qcorda-cal", {"iters": "auto", "cal_start": "zero"}), ("loftq", {"iters": "auto"}), ("qolora", {}),
])
def test_streamed_equals_in_memory(method, kw, llama, tok, tmp_path):
    cfg = _cfg(method, alpha=8.0, **kw)
    (tmp_path / ".s.scratch" / "covariance").mkdir(parents=True)  # left by a run killed while calibrating
    stream_prepare(str(llama), cfg, tmp_path / "s", progress=False)
    model, t = load_model(str(llama))
    prepare(model, cfg, tmp_path / "m", tokenizer=t, progress=False).out
    hs, hm = hashes(tmp_path / "s"), hashes(tmp_path / "m")
    # every file (calibrated methods copy the tokenizer calibration saved); qcorda.json too: its sha256 owns the adapters
    assert set(hs) == set(hm) and {"model.safetensors", "qcorda.json", "adapter_init/adapter_model.safetensors"} <= set(hs)
    for f in hs:
        assert hs[f] == hm[f], f
    x = _x(tok)
    assert torch.equal(load_prepared(tmp_path / "s")(**x).logits, load_prepared(tmp_path / "m")(**x).logits)
    assert leftovers(tmp_path, tmp_path / "s") == ["s"]  # the work dir and the stale scratch are gone


@pytest.mark.parametrize("method", METHODS)
def test_same_inputs_same_hashes(method, llama, tmp_path):
    a = stream_prepare(str(llama), _cfg(method), tmp_path / "a", progress=False)
    stream_prepare(str(llama), _cfg(method), tmp_path / "b", progress=False)
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")
    assert len(a.layers) == 14
    # a different seed must change the random parts (qlora's A)
    if method == "qlora":
        stream_prepare(str(llama), _cfg(method, seed=1), tmp_path / "c", progress=False)
        assert hashes(tmp_path / "c")["adapter_init/adapter_model.safetensors"] != hashes(tmp_path / "a")["adapter_init/adapter_model.safetensors"]


def _interrupt_after(monkeypatch, n: int) -> list:
    """Make the streamed engine's per-layer step raise KeyboardInterrupt after ``n`` layers (a Ctrl-C
    halfway); returns the list of layer names it was called for."""
    import qcorda.stream as st

    orig, calls = st.prepare_layer, []

    def step(*a, **k):
        calls.append(a[2])
        if len(calls) > n:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(st, "prepare_layer", step)
    return calls


def _count_layers(monkeypatch) -> list:
    """Undo :func:`_interrupt_after`; returns the list of layer names computed from now on."""
    import qcorda.stream as st

    monkeypatch.undo()
    orig, calls = st.prepare_layer, []
    monkeypatch.setattr(st, "prepare_layer", lambda *a, **k: (calls.append(a[2]), orig(*a, **k))[1])
    return calls


def test_resume_after_crash_is_byte_identical(llama, tmp_path, monkeypatch):
    cfg = _cfg("qcorda-cal")
    stream_prepare(str(llama), cfg, tmp_path / "ref", progress=False)
    _interrupt_after(monkeypatch, 5)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        stream_prepare(str(llama), cfg, out, progress=False)
    assert not out.exists()
    assert len(list((partial_dir(out) / "layers").glob("*.safetensors"))) == 5
    calls = _count_layers(monkeypatch)
    stream_prepare(str(llama), cfg, out, progress=False)
    assert len(calls) == 14 - 5  # only the unfinished layers were computed
    assert hashes(out) == hashes(tmp_path / "ref")
    assert not partial_dir(out).exists()


def test_work_of_an_older_format_is_never_resumed(llama, tmp_path, monkeypatch, capsys):
    """Layers written before the kept-codes change (qcorda.partial/1) must not be mixed with new ones."""
    import json

    cfg = _cfg("loftq")
    _interrupt_after(monkeypatch, 4)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        stream_prepare(str(llama), cfg, out, progress=False)
    manifest = partial_dir(out) / "manifest.json"
    old = dict(json.loads(manifest.read_text()), format="qcorda.partial/1")
    manifest.write_text(json.dumps(old))  # as the previous qcorda left it
    calls = _count_layers(monkeypatch)
    stream_prepare(str(llama), cfg, out, progress=False)
    assert "another qcorda version (qcorda.partial/1" in capsys.readouterr().err
    assert len(calls) == 14  # every layer computed again, none reused
    stream_prepare(str(llama), cfg, tmp_path / "ref", progress=False)
    assert hashes(out) == hashes(tmp_path / "ref")


def test_other_arguments_restart_the_work(llama, tmp_path, monkeypatch, capsys):
    _interrupt_after(monkeypatch, 3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        stream_prepare(str(llama), _cfg("qpissa"), out, progress=False)
    monkeypatch.undo()
    stream_prepare(str(llama), _cfg("qpissa", rank=8), out, progress=False)
    assert "holds work for other arguments" in capsys.readouterr().err
    stream_prepare(str(llama), _cfg("qpissa", rank=8), tmp_path / "ref", progress=False)
    assert hashes(out) == hashes(tmp_path / "ref")


@pytest.mark.parametrize("fail_at", [3, 15])  # a layer file; the model shard during assembly
def test_disk_full_leaves_nothing_under_the_target(fail_at, llama, tmp_path, monkeypatch):
    import qcorda.checkpoint as qck

    real_write = qck.write_safetensors
    count = []

    def disk_full_at(filename):  # the fail_at-th file written: half of it, then the disk is full
        count.append(filename)
        if len(count) == fail_at:
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_safetensors(path, specs, produce, metadata=None):  # layer files and the assembled model shards
        disk_full_at(path)
        return real_write(path, specs, produce, metadata)

    monkeypatch.setattr(qck, "write_safetensors", write_safetensors)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"no space left on the device.*rerun the same command"):
        stream_prepare(str(llama), _cfg("qpissa"), out, progress=False)
    assert len(count) == fail_at and (Path(count[-1]).name == "model.safetensors") == (fail_at == 15)
    assert not out.exists()
    assert leftovers(tmp_path, out) == [partial_dir(out).name]  # only the resumable work dir
    assert not [p for p in partial_dir(out).rglob("*") if ".tmp-" in p.name]
    monkeypatch.setattr(qck, "write_safetensors", real_write)
    stream_prepare(str(llama), _cfg("qpissa"), out, progress=False)
    stream_prepare(str(llama), _cfg("qpissa"), tmp_path / "ref", progress=False)
    assert hashes(out) == hashes(tmp_path / "ref")


def _cli(model, out, *extra, env=None):
    args = [sys.executable, "-m", "qcorda", "prepare", str(model), "--out", str(out), "--method", "qcorda-ipm",
            "--rank", "4", "--calib-data", "gsm8k-train", "--calib-fields", "question,answer",
            "--calib-samples", "8", "--calib-max-length", "32", *extra]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # keep a venv's site dirs
    e = dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **(env or {}))
    return args, e


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGKILL", "SIGINT"])
def test_killed_then_rerun_is_byte_identical(sig, deep_llama, tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    args, env = _cli(deep_llama, out, env={"QCORDA_TEST_LAYER_DELAY": "0.25"})
    # SIGINT back to its default in the child: a runner started in the background (`cmd &` in a
    # script) hands SIG_IGN down, and Python then never turns SIGINT into KeyboardInterrupt
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    layers = partial_dir(out) / "layers"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if layers.exists() and len(list(layers.glob("*.safetensors"))) >= 10:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "prepare finished or died before it could be killed"
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    finished = len(list(layers.glob("*.safetensors")))
    assert 10 <= finished < 42 and not out.exists()
    args, env = _cli(deep_llama, out)
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    args, env = _cli(deep_llama, ref)
    assert subprocess.run(args, env=env, capture_output=True, timeout=300).returncode == 0
    import json

    assert json.loads((out / "timings.json").read_text())["resumed_layers"] >= finished
    assert hashes(out) == hashes(ref)
    assert leftovers(tmp_path, out) == ["out"]


def test_work_of_another_device_is_started_over(llama, tmp_path, monkeypatch, capsys):
    """Another device computes other bits: the device is part of the work manifest, and the restart says so."""
    import qcorda.stream as st

    cfg = _cfg("qpissa")
    src = st.open_source(str(llama), cfg, tmp_path / "out", False)
    cpu = st.work_manifest(src, cfg, None)
    monkeypatch.setattr(st, "resolve_device", lambda device: torch.device("cuda"))
    gpu = st.work_manifest(src, cfg, None)
    assert cpu["config"]["device"] == "cpu" and gpu["config"]["device"] == "cuda"
    work = st.open_work_dir(tmp_path / "out", cpu)
    (work / "layers" / "00000.safetensors").write_bytes(b"finished on the cpu")
    st.open_work_dir(tmp_path / "out", gpu)
    assert "(config.device: cpu -> cuda); starting over" in capsys.readouterr().err
    assert list((work / "layers").iterdir()) == []


def test_timings_split_the_wall_time_into_phases(llama, tmp_path, monkeypatch):
    """timings.json's phases add up to the wall time, and the time spent on layers is counted under ``layers``."""
    monkeypatch.setenv("QCORDA_TEST_LAYER_DELAY", "0.05")  # after each of the 14 layers: 0.7 s in the layers phase
    import json

    out = tmp_path / "out"
    stream_prepare(str(llama), _cfg("qcorda-ipm"), out, progress=False)
    t = json.loads((out / "timings.json").read_text())
    phases = t["phases"]
    assert set(phases) == {"open", "covariance", "layers", "output"} and min(phases.values()) >= 0
    assert sum(phases.values()) == pytest.approx(t["seconds"], abs=1e-3)
    assert phases["layers"] >= 0.05 * len(t["layers"]) > max(phases["open"], phases["output"])
