"""Issue 6 items not covered by test_bad_input.py / test_stream.py: bad inputs of merge and
to-lora (corrupted files, an adapter of another prepared directory), NaN activations in the
in-memory path, disk full during merge, trust_remote_code off by default, no writes outside --out."""

import argparse
import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import tiny
from export_helpers import prepared_and_trained
from qcorda.cli import main
from qcorda.config import CalibConfig, ConfigError, InitConfig
from qcorda.decompose import DecompositionError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return prepared_and_trained(tmp_path_factory.mktemp("rel"))


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def fails(capsys, argv, pattern, parent: Path, out: str = "out"):
    before = tree(parent)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert re.search(pattern, err), err
    assert tree(parent) == before, "something was written"
    return err


def _damaged_copy(src: Path, dst: Path, file: str) -> Path:
    shutil.copytree(src, dst)
    f = dst / file
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated mid-tensor
    return dst


@pytest.mark.parametrize("verb", ["merge", "to-lora"])
def test_corrupted_adapter(verb, setup, capsys, tmp_path):
    base, prep, trained = setup
    bad = _damaged_copy(trained, tmp_path / "bad", "adapter_model.safetensors")
    extra = ["--base", str(base)] if verb == "to-lora" else []
    fails(capsys, [verb, str(prep), "--adapter", str(bad), "--out", str(tmp_path / "out"), *extra, "--no-verify"] if verb == "merge"
          else [verb, str(prep), "--adapter", str(bad), "--out", str(tmp_path / "out"), *extra],
          r"--adapter .*adapter_model\.safetensors.*(corrupt|not a valid)", tmp_path)


def test_corrupted_prepared_model(setup, capsys, tmp_path):
    _, prep, trained = setup
    bad = _damaged_copy(prep, tmp_path / "prep", "model.safetensors")
    fails(capsys, ["merge", str(bad), "--adapter", str(trained), "--out", str(tmp_path / "out"), "--no-verify"],
          r"PREPARED .*model\.safetensors.*(corrupt|not a valid)", tmp_path)


def test_to_lora_adapter_of_another_prepared_directory(setup, capsys, tmp_path):
    base, prep, trained = setup
    marked = tmp_path / "marked"
    shutil.copytree(trained, marked)
    (marked / "qcorda_train.json").write_text(json.dumps({"prepared_sha256": hashlib.sha256(b"other").hexdigest()}))
    fails(capsys, ["to-lora", str(prep), "--base", str(base), "--adapter", str(marked), "--out", str(tmp_path / "out")],
          r"--adapter .*was trained from another prepared directory.*pass the PREPARED directory", tmp_path)


def test_nan_activations_in_memory_prepare(tok):
    from qcorda.prepare import prepare

    m = tiny.model("llama")
    with torch.no_grad():
        m.model.layers[1].post_attention_layernorm.weight.fill_(float("nan"))
    cfg = InitConfig(method="qcorda-ipm", rank=4, calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=4, max_length=32))
    with pytest.raises(DecompositionError, match=r"layer model\.layers\.1\.mlp\.gate_proj: the model produces NaN/Inf activations"):
        prepare(m, cfg, tokenizer=tok, progress=False)


def test_disk_full_during_merge_leaves_nothing(setup, tmp_path, monkeypatch):
    import safetensors.torch as st

    from qcorda.merge import merge

    _, prep, trained = setup
    real = st.save_file

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        merge(prep, tmp_path / "out", trained, verify=None, progress=False)
    assert tree(tmp_path) == []
    monkeypatch.setattr(st, "save_file", real)
    merge(prep, tmp_path / "out", trained, verify=None, progress=False)
    assert tree(tmp_path)[0] == "out"


def test_trust_remote_code_is_off_by_default():
    import inspect

    from qcorda import cli, prepare, stream

    root = Path(__file__).resolve().parents[1] / "qcorda"
    assert [str(p) for p in root.rglob("*.py") if re.search(r"trust_remote_code\s*=\s*True", p.read_text())] == []
    for fn in (prepare.load_model, prepare.prepare, stream.stream_prepare):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn
    import importlib

    for verb in ("prepare", "evaluate"):
        p = argparse.ArgumentParser()
        importlib.import_module(f"qcorda.commands.{verb}").add_arguments(p)
        assert p.parse_args(["m", "--out", "o"] if verb == "prepare" else ["m"]).trust_remote_code is False


def test_check_inside_refuses_escapes(tmp_path):
    from qcorda.io import check_inside

    root = tmp_path / "out"
    root.mkdir()
    assert check_inside(root / "a" / "b.json", root) == (root / "a" / "b.json").resolve()
    for bad in (root / ".." / "x", tmp_path / "x", Path("/etc/passwd")):
        with pytest.raises(FileExistsError, match="refusing to write .* outside"):
            check_inside(bad, root)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(FileExistsError, match="outside"):
        check_inside(root / "link" / "x", root)


def test_prepare_writes_only_under_out(tmp_path, capsys):
    src = tiny.save(tmp_path / "src", "llama")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    before = tree(tmp_path)
    out = work / "sub" / ".." / "out"  # a dotted path resolves beside sub, nowhere else
    assert main(["prepare", str(src), "--out", str(out), "--method", "qcorda-ipm", "--rank", "4", "--calib-data", "gsm8k-train",
                 "--calib-fields", "question,answer", "--calib-samples", "4", "--calib-max-length", "32"]) == 0
    new = sorted(set(tree(tmp_path)) - set(before))
    assert new and all(n.startswith("work/out") for n in new), new
