"""qcorda merge on tiny models: merged == trained 4-bit + adapter, plain HF output, ownership checks."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from export_helpers import edited_adapter, inputs, prepared_and_trained
from qcorda.config import ConfigError
from qcorda.adapters import read_adapter
from qcorda.config import MergeConfig, VerifyConfig
from qcorda.merge import merge
from qcorda.prepared import OWNER_KEY, TRAIN_MARKER
from qcorda.prepared import load_prepared

QUICK = VerifyConfig(samples=4, max_length=32)
NO_VERIFY = MergeConfig(verify=False)
F32 = MergeConfig(dtype="float32", verify=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return prepared_and_trained(tmp_path_factory.mktemp("merge"))


def _trained_logits(prep, adapter, x):
    with torch.no_grad():
        return load_prepared(prep, adapter, is_trainable=False)(**x).logits


def test_fp32_merge_is_exact_and_plain(setup, tok, tmp_path):
    _, prep, trained = setup
    x = inputs(tok)
    res = merge(prep, tmp_path / "m32", MergeConfig(dtype="float32", verify=False), adapter=trained, progress=False)
    cfg = json.loads((res.out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in res.out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(res.out, dtype=torch.float32)
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    with torch.no_grad():
        y = merged(**x).logits
    ref = _trained_logits(prep, trained, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # the adapter matters: the merge is not just the 4-bit residual
    assert (ref - _trained_logits(prep, None, x)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_merge_within_rounding_and_verified(setup, tok, tmp_path, dtype):
    _, prep, trained = setup
    x = inputs(tok)
    res = merge(prep, tmp_path / dtype, MergeConfig(dtype=dtype, verification=QUICK), adapter=trained, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(res.out, dtype=getattr(torch, dtype))
    assert all(p.dtype == getattr(torch, dtype) for p in merged.parameters())
    with torch.no_grad():
        y = merged(**x).logits.float()
    ref = _trained_logits(prep, trained, x)
    tol = 2e-2 if dtype == "float16" else 1e-1
    assert (y - ref).abs().max() < tol * ref.abs().max()
    saved = json.loads((res.out / "qcorda_verify.json").read_text())["results"][0]
    assert saved["n_tokens"] > 0 and saved["top1"] > 0.9 and saved["mean_kl"] < 1e-3
    assert res.agreement[0].max_abs_diff == saved["max_abs_diff"]


def test_merged_loads_without_bitsandbytes(setup, tmp_path):
    _, prep, trained = setup
    out = merge(prep, tmp_path / "m", MergeConfig(verify=False), adapter=trained, progress=False).out
    code = (
        "import sys; sys.modules['bitsandbytes'] = None; sys.modules['qcorda'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(type(m).__name__)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_gpt2_conv1d_merge(tok, tmp_path):
    _, prep, trained = prepared_and_trained(tmp_path, "gpt2")
    x = inputs(tok)
    out = merge(prep, tmp_path / "m", F32, adapter=trained, progress=False).out
    with torch.no_grad():
        y = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(**x).logits
    torch.testing.assert_close(y, _trained_logits(prep, trained, x), atol=1e-5, rtol=1e-5)


def test_rslora_and_alpha_pattern_are_respected(setup, tok, tmp_path):
    _, prep, trained = setup
    edited = edited_adapter(trained, tmp_path / "edited", use_rslora=True, alpha_pattern={"q_proj": 3.0})
    spec = read_adapter(edited)
    assert spec.scaling("model.layers.0.self_attn.q_proj") == pytest.approx(3.0 / 2.0)
    assert spec.scaling("model.layers.0.self_attn.v_proj") == pytest.approx(8.0 / 2.0)
    x = inputs(tok)
    out = merge(prep, tmp_path / "m", F32, adapter=edited, progress=False).out
    with torch.no_grad():
        y = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(**x).logits
    torch.testing.assert_close(y, _trained_logits(prep, edited, x), atol=1e-5, rtol=1e-5)


def test_adapter_ownership(setup, tmp_path):
    _, prep, trained = setup
    marked = tmp_path / "marked"
    shutil.copytree(trained, marked)
    (marked / TRAIN_MARKER).write_text(json.dumps({OWNER_KEY: "0" * 64}))
    with pytest.raises(ConfigError, match="another prepared directory"):
        merge(prep, tmp_path / "a", NO_VERIFY, adapter=marked, progress=False)
    import hashlib

    (marked / TRAIN_MARKER).write_text(json.dumps({OWNER_KEY: hashlib.sha256((prep / "qcorda.json").read_bytes()).hexdigest()}))
    merge(prep, tmp_path / "b", NO_VERIFY, adapter=marked, progress=False)
    # an adapter of another prepared model (other targets / rank) is refused
    _, other_prep, other_trained = prepared_and_trained(tmp_path / "o", "llama", rank=8)
    with pytest.raises(ConfigError, match="rank 8"):
        merge(prep, tmp_path / "c", NO_VERIFY, adapter=other_trained, progress=False)
    _, _, gpt2_trained = prepared_and_trained(tmp_path / "g", "gpt2")
    with pytest.raises(ConfigError, match="target modules differ"):
        merge(prep, tmp_path / "d", NO_VERIFY, adapter=gpt2_trained, progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_bad_options(setup, tmp_path):
    _, prep, trained = setup
    with pytest.raises(ConfigError, match="^dtype must be one of"):
        MergeConfig(dtype="int8")
    with pytest.raises(ConfigError, match="PREPARED"):
        merge(tmp_path, tmp_path / "x", NO_VERIFY, adapter=trained)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge(prep, tmp_path / "exists", NO_VERIFY, adapter=trained)


def test_cli(setup, tmp_path, capsys):
    from qcorda.cli import main

    _, prep, trained = setup
    rc = main(["merge", str(prep), "--adapter", str(trained), "--out", str(tmp_path / "cli"), "--verify-samples", "2", "--verify-max-length", "24"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "top-1 agree" in out and "layers merged" in out
