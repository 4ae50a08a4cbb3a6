"""What only a CUDA GPU can check (marker ``gpu``: skipped, with the reason, where torch sees none).

The full check is eval/gpu_check.py (README "GPU check"); these are its smallest pieces, runnable in seconds on any
CUDA machine with ``python -m pytest -m gpu``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcorda.testing import tiny
from export_helpers import eval_script, inputs
from qcorda.config import CalibConfig, InitConfig
from qcorda.prepare import prepare
from qcorda.prepared import load_prepared

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
CALIB = CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=12, max_length=48, batch_size=4)


@pytest.mark.parametrize("method", ["qpissa", "qcorda-ipm", "qeva"])  # subset: SVD, covariance, EVA on the GPU
def test_bf16_prepare_on_cuda_reloads_bit_for_bit(method, tok, tmp_path):
    """The in-memory engine on the GPU (calibration, split, NF4 codes, bf16 compute) and its saved directory loaded
    back onto the GPU compute the same logits, as they do on the CPU (tests/test_prepare.py)."""
    cfg = InitConfig(method=method, rank=4, calib=CALIB, compute_dtype="bfloat16", device="cuda")
    p = prepare(tiny.model("llama").to("cuda"), cfg, tmp_path / "prep", tokenizer=tok, progress=False)
    x = {k: v.to("cuda") for k, v in inputs(tok).items()}
    with torch.no_grad():
        y = p.model(**x).logits
    loaded = load_prepared(tmp_path / "prep", is_trainable=False, device="cuda")
    codes = [m.weight for m in loaded.modules() if type(m).__name__ == "Linear4bit"]
    assert codes and all(w.device.type == "cuda" for w in codes)
    assert {m.compute_dtype for m in loaded.modules() if type(m).__name__ == "Linear4bit"} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, y)


def test_paged_adamw_8bit_pages_on_cuda_and_steps_as_unpaged():
    """bitsandbytes pages both Adam states of a parameter of >= 1e5 values on the GPU, and the step is AdamW8bit's."""
    probe = eval_script("gpu_check").paged_probe("cuda")
    assert probe["paged_buffers"] == 2
    assert probe["max_diff_vs_unpaged"] == 0 and probe["moved"] > 0


def test_gpu_check_at_toy_size_on_cuda(tmp_path):
    """eval/gpu_check.py's dry run on the GPU: every part at toy size, a minute instead of the full check's eight."""
    out = tmp_path / "check.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, str(ROOT / "eval" / "gpu_check.py"), "--dry-run", "--device", "cuda", "--out", str(out),
                          "--workdir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["environment"]["gpu"]
    assert {p["part"]: p["status"] for p in doc["parts"]} == {p: "ok" for p in eval_script("gpu_check").PARTS}
