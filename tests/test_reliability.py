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

from qcorda.testing import tiny
from qcorda.prepared import OWNER_KEY, TRAIN_MARKER
from export_helpers import prepared_and_trained
from qcorda.cli import main
from qcorda.config import CalibConfig, InitConfig
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
    (marked / TRAIN_MARKER).write_text(json.dumps({OWNER_KEY: hashlib.sha256(b"other").hexdigest()}))
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
    import qcorda.checkpoint as qio
    from qcorda.config import MergeConfig
    from qcorda.merge import merge

    _, prep, trained = setup
    real = qio.write_safetensors

    def full_disk(path, specs, produce, metadata=None):  # a few tensors land, then the disk is full
        written = []

        def produce_until_full(key):
            written.append(key)
            if len(written) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return produce(key)

        return real(path, specs, produce_until_full, metadata)

    monkeypatch.setattr(qio, "write_safetensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        merge(prep, tmp_path / "out", MergeConfig(verify=False), adapter=trained, progress=False)
    assert tree(tmp_path) == []
    monkeypatch.setattr(qio, "write_safetensors", real)
    merge(prep, tmp_path / "out", MergeConfig(verify=False), adapter=trained, progress=False)
    assert tree(tmp_path)[0] == "out"


def test_trust_remote_code_is_off_by_default():
    import inspect

    from qcorda import models, prepare, stream

    root = Path(__file__).resolve().parents[1] / "qcorda"
    assert [str(p) for p in root.rglob("*.py") if re.search(r"trust_remote_code\s*=\s*True", p.read_text())] == []
    for fn in (models.load_model, prepare.prepare, stream.stream_prepare):
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


def test_streamed_safetensors_reads_back_as_save_file_writes_it(tmp_path):
    """qcorda.checkpoint.write_safetensors (tensor by tensor, piece by piece) against safetensors itself."""
    from safetensors.torch import load_file, save_file

    from qcorda.checkpoint import write_safetensors, write_shards

    g = torch.Generator().manual_seed(0)
    tensors = {
        "emb": torch.randn(1000, 24, generator=g),
        "half": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(3, generator=g).half(),
        "packed": torch.randint(0, 255, (333, 1), dtype=torch.uint8, generator=g),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }
    specs = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}

    def produce(key):  # the big one in uneven row blocks, the rest whole
        t = tensors[key]
        return iter(t.split(300)) if key == "emb" else t

    write_safetensors(tmp_path / "ours.safetensors", specs, produce, metadata={"format": "pt"})
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ours, ref = load_file(str(tmp_path / "ours.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert ours.keys() == ref.keys() == tensors.keys()
    for k in tensors:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k

    # a producer that disagrees with the header is refused, never written as something else
    with pytest.raises(ValueError, match="emb was produced as 9600 bytes, its header says 96000"):
        write_safetensors(tmp_path / "short.safetensors", specs, lambda k: tensors[k][:100] if k == "emb" else tensors[k])
    with pytest.raises(ValueError, match="half was produced as torch.float32"):
        write_safetensors(tmp_path / "dtype.safetensors", specs, lambda k: tensors[k].float() if k == "half" else tensors[k])

    # sharded: the index maps every key, and each shard holds only its keys
    (tmp_path / "sharded").mkdir()
    assert len(write_shards(tmp_path / "sharded", specs, produce, max_shard_size=40_000)) > 1
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(tensors)
    for k, f in index.items():
        assert torch.equal(load_file(str(tmp_path / "sharded" / f))[k], tensors[k])
