"""Real Gemma-3-270M end to end through the CLI (slow): the CPU smoke recipe, shortened by overrides,
`qcorda train` → `qcorda merge` → reload by plain transformers in a fresh process that never imports
qcorda or bitsandbytes → top-1 agreement with the trained 4-bit + adapter model on held-out text.

tests/test_real_merge.py checks the merge itself (trained by a hand-written loop, merge's own
verification, KL vs the untrained init); this test adds what it does not cover: the real recipe and
the Trainer, both CLI verbs, and a reload in which no qcorda/bitsandbytes code can take part.

The merge is to bfloat16: Gemma-3's activations overflow float16 (the unmerged original already
gives inf logits in fp16 on the CPU), so a float16 export of this model cannot be compared.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["train.max_steps=6", "train.save_steps=100", "train.logging_steps=1", "data.limit=48", "init.calib.samples=16"]

RELOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
batches = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.eval()
assert "quantization_config" not in model.config.to_dict()
with torch.no_grad():
    top1 = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1) for b in batches]
torch.save(top1, sys.argv[3])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("qcorda", "bitsandbytes", "peft"))
print("LEAKED", leaked)
"""


def _cli(*args, timeout=1500):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "qcorda", *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout


def test_smoke_recipe_train_merge_reload_plain_transformers(gemma_path, tmp_path):
    from qcorda.scoring import held_out_batches
    from qcorda.prepared import load_prepared

    run = tmp_path / "run"
    out = _cli("train", "gemma3-270m-cpu", *SHORT, f"output_dir={run}")
    assert "loss: " in out
    meta = json.loads((run / "adapter" / "qcorda_train.json").read_text())
    assert meta["global_step"] == 6

    merged = tmp_path / "merged"
    _cli("merge", str(run / "prepared"), "--adapter", str(run / "adapter"), "--out", str(merged), "--dtype", "bfloat16",
         "--no-verify")
    assert (merged / "config.json").exists()

    # held-out text the recipe did not train on (GSM8K test questions + answers)
    tok_path = run / "prepared"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_path))
    batches, _ = held_out_batches(tok, "gsm8k-test", ("question", "answer"), 8, 128, 4)
    batches = [{k: v for k, v in b.items()} for b in batches]
    torch.save(batches, tmp_path / "batches.pt")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # plain transformers, no qcorda on the path
    res = subprocess.run([sys.executable, "-c", RELOAD, str(merged), str(tmp_path / "batches.pt"), str(tmp_path / "top1.pt")],
                         env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LEAKED []" in res.stdout, res.stdout
    merged_top1 = torch.load(tmp_path / "top1.pt")

    trained = load_prepared(run / "prepared", run / "adapter", is_trainable=False)
    trained.eval()
    init = load_prepared(run / "prepared", is_trainable=False)
    init.eval()
    agree = changed = total = 0
    with torch.no_grad():
        for b, m in zip(batches, merged_top1):
            mask = b["attention_mask"].bool()
            t = trained(**b).logits.argmax(-1)
            i = init(**b).logits.argmax(-1)
            agree += int((t == m)[mask].sum())
            changed += int((t != i)[mask].sum())
            total += int(mask.sum())
    top1 = agree / total
    print(f"\nGemma-3-270M smoke recipe ({meta['global_step']} steps, loss {meta['first_loss']:.3f} -> {meta['last_loss']:.3f}): "
          f"merged bf16 (plain transformers) vs trained 4-bit+adapter top-1 agreement {top1:.4f} over {total} held-out tokens; "
          f"training changed the top-1 token at {changed} positions")
    assert top1 >= 0.95
