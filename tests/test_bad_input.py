"""Every bad input of issue 6 for ``qcorda prepare``: a clear error naming the option and the
fix (exit code 2, no traceback), and nothing written under the output name."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from qcorda.testing import tiny
from qcorda.cli import main

CALIB = ["--calib-data", "gsm8k-train", "--calib-fields", "question,answer", "--calib-samples", "8", "--calib-max-length", "32"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("src"), "llama")


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def fails(capsys, tmp_path, model, *args, out="out", pattern, method="qpissa"):
    """Run the CLI, expect exit 2 with ``pattern`` in the message, and nothing written."""
    argv = ["prepare", str(model), "--out", str(tmp_path / out), "--method", method, "--rank", "4", *args]
    before = leftovers(tmp_path, out)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    import re

    assert re.search(pattern, err), err
    assert leftovers(tmp_path, out) == before
    return err


def test_model_path_does_not_exist(capsys, tmp_path):
    fails(capsys, tmp_path, tmp_path / "nope", pattern=r"nope: no such model directory .*give an HF model directory")


def test_not_a_causal_lm(capsys, tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "vit")
    fails(capsys, tmp_path, tmp_path / "vit", pattern=r"'vit' model is not a causal language model; give a decoder-only LM")


@pytest.mark.parametrize("rank,pattern", [
    ("0", r"--rank must be a positive integer, got 0"),
    ("-3", r"--rank must be a positive integer, got -3"),
    ("65", r"--rank 65 exceeds min\(out, in\) = 64 of layer model\.layers\.0\.self_attn\.q_proj .*use --rank 64 or less"),
])
def test_bad_rank(rank, pattern, capsys, tmp_path, llama):
    argv = ["prepare", str(llama), "--out", str(tmp_path / "out"), "--method", "qpissa", "--rank", rank]
    assert main(argv) == 2
    import re

    assert re.search(pattern, capsys.readouterr().err)
    assert leftovers(tmp_path, "out") == []


def test_targets_match_nothing(capsys, tmp_path, llama):
    fails(capsys, tmp_path, llama, "--target-modules", "qq_proj", pattern=r"--target-modules: pattern 'qq_proj' matches no Linear layer; available names end in .*q_proj")


@pytest.mark.parametrize("kind,pattern", [
    ("missing", r"--calib-data .*nothere\.jsonl: no such file"),
    ("empty", r"--calib-data .*empty\.jsonl: the file holds no records; give a non-empty file"),
    ("fields", r"--calib-fields: record 0 has no field answer .*fix the field names"),
    ("padding", r"tokenizes to nothing .*check --calib-data and --calib-fields"),
])
def test_bad_calibration_data(kind, pattern, capsys, tmp_path, llama):
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.jsonl").write_text("")
    (data / "q.jsonl").write_text("\n".join(json.dumps({"question": "How many?"}) for _ in range(4)))
    (data / "blank.jsonl").write_text("\n".join(json.dumps({"text": ""}) for _ in range(4)))
    source, fields = {"missing": ("nothere.jsonl", "text"), "empty": ("empty.jsonl", "text"),
                      "fields": ("q.jsonl", "question,answer"), "padding": ("blank.jsonl", "text")}[kind]
    fails(capsys, tmp_path, llama, "--calib-data", str(data / source), "--calib-fields", fields,
          "--save-covariance", str(tmp_path / "cov.safetensors"), method="qcorda-ipm", pattern=pattern)
    assert not (tmp_path / "cov.safetensors").exists()


def test_nan_activations(capsys, tmp_path):
    m = tiny.model("llama")
    with torch.no_grad():
        m.model.layers[0].input_layernorm.weight.fill_(float("inf"))
    m.save_pretrained(tmp_path / "bad")
    tiny.tokenizer().save_pretrained(tmp_path / "bad")
    fails(capsys, tmp_path, tmp_path / "bad", *CALIB, method="qcorda-kpm", pattern=r"NaN/Inf activations .*load it in float32")


@pytest.fixture(scope="module")
def cov(llama, tmp_path_factory):
    """A covariance file built for ``llama``, 8 gsm8k samples, all-linear."""
    d = tmp_path_factory.mktemp("cov")
    assert main(["prepare", str(llama), "--out", str(d / "p"), "--method", "qcorda-ipm", "--rank", "4", *CALIB,
                 "--save-covariance", str(d / "c.safetensors")]) == 0
    return d / "c.safetensors"


@pytest.mark.parametrize("change,pattern", [
    ("model", r"was built for a different model .*pass the matching model"),
    ("targets", r"was built for a different targets"),
    ("samples", r"was built for a different (data_hash|n_samples)"),
])
def test_covariance_built_for_something_else(change, pattern, cov, capsys, tmp_path, llama):
    model, extra = llama, list(CALIB)
    if change == "model":  # same architecture, other weights
        model = tmp_path / "other"
        tiny.model("llama", seed=1).save_pretrained(model)
        tiny.tokenizer().save_pretrained(model)
    elif change == "targets":
        extra += ["--target-modules", "q_proj,v_proj"]
    else:
        extra[extra.index("--calib-samples") + 1] = "9"
    fails(capsys, tmp_path, model, *extra, "--covariance", str(cov), method="qcorda-ipm", pattern=pattern)


def test_output_exists_without_overwrite(capsys, tmp_path, llama):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    fails(capsys, tmp_path, llama, pattern=r"--out .*out already exists; choose another path or pass --overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupted_safetensors(damage, capsys, tmp_path, llama):
    bad = tmp_path / "bad"
    shutil.copytree(llama, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    fails(capsys, tmp_path, bad, pattern=r"model\.safetensors is not a valid safetensors file .*corrupted: fetch or save the model again")


def test_corrupted_covariance_file(capsys, tmp_path, llama):
    (tmp_path / "c.safetensors").write_bytes(b"garbage" * 10)
    fails(capsys, tmp_path, llama, *CALIB, "--covariance", str(tmp_path / "c.safetensors"), method="qcorda-ipm",
          pattern=r"--covariance .*not a readable safetensors covariance file .*delete it and recompute")


def test_calibrated_method_without_data(capsys, tmp_path, llama):
    fails(capsys, tmp_path, llama, method="qcorda-cal", pattern=r"--calib-data is needed by method qcorda-cal: give calibration text \(e\.g\. gsm8k-train")


def test_calibration_given_to_a_data_free_method_warns(tmp_path, llama):
    with pytest.warns(UserWarning, match=r"--method qpissa uses no calibration data; --calib-data/--covariance are ignored"):
        assert main(["prepare", str(llama), "--out", str(tmp_path / "out"), "--method", "qpissa", "--rank", "4", *CALIB]) == 0


def test_out_is_the_model_directory(capsys, tmp_path, llama):
    src = tmp_path / "src"
    shutil.copytree(llama, src)
    assert main(["prepare", str(src), "--out", str(src), "--overwrite", "--method", "qpissa", "--rank", "4"]) == 2
    assert "is the model directory" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in llama.iterdir())
    assert main(["prepare", str(src), "--out", str(tmp_path), "--overwrite", "--method", "qpissa", "--rank", "4"]) == 2
    assert "or contains it" in capsys.readouterr().err


def test_pickle_checkpoint_is_refused(capsys, tmp_path, llama):
    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(llama / "config.json", d / "config.json")
    torch.save(tiny.model("llama").state_dict(), d / "pytorch_model.bin")
    fails(capsys, tmp_path, d, pattern=r"no \*\.safetensors weights \(it has pytorch_model\.bin: pickle files, which qcorda never loads\)")


def test_remote_code_needs_the_flag(capsys, tmp_path):
    d = tmp_path / "custom"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "my-custom-lm", "auto_map": {
        "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}}))
    (d / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
    fails(capsys, tmp_path, d, pattern=r"needs its own code; review it, then pass --trust-remote-code")


def test_no_pickle_loading_in_the_package():
    root = Path(__file__).resolve().parents[1] / "qcorda"
    offenders = [str(p) for p in root.rglob("*.py") if "torch.load(" in p.read_text() or "pickle.load" in p.read_text()]
    assert offenders == []
