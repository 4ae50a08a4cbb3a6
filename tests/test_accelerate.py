"""Multi-process training: `accelerate launch` of `qcorda train` with 2 CPU processes (gloo), and the
FSDP-QLoRA storage dtype (bnb_4bit_quant_storage) carried into the saved quantization_config."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from qcorda.testing import tiny
from qcorda.config import InitConfig
from qcorda.prepare import prepare
from qcorda.recipe import load_recipe
from qcorda.train import quant_storage_dtype, train

ROOT = Path(__file__).resolve().parent.parent


def _setup(tmp_path, tok, **train_kw):
    prep = prepare(tiny.model("llama"), InitConfig(method="qpissa", rank=4), tmp_path / "prep", tokenizer=tok, progress=False).out
    data = {"output_dir": str(tmp_path / "run"), "prepared": str(prep),
            "data": {"source": "gsm8k-train", "fields": ["question", "answer"], "limit": 32},
            "train": {"max_steps": 3, "batch_size": 2, "grad_accum": 1, "max_length": 192, "logging_steps": 1,
                      "save_steps": 100, "learning_rate": 1e-2, "warmup_ratio": 0.0, **train_kw}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_accelerate_launch_two_cpu_processes(tmp_path, tok):
    """Data-parallel over 2 processes: both ranks finish with the same loss and the same adapter."""
    recipe = _setup(tmp_path, tok)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")  # no GPU: accelerate runs the processes on the CPU with gloo
    # `--cpu` with several processes needs MPI (--mpirun_hostfile); without a GPU, --multi_gpu starts torchrun
    # processes that accelerate puts on the CPU with the gloo backend.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qcorda", "train", str(recipe)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    shas = re.findall(r"^adapter sha256: ([0-9a-f]{64})$", res.stdout, re.M)
    losses = re.findall(r"^loss: (\S+ -> \S+)$", res.stdout, re.M)
    assert len(shas) == 2 and len(set(shas)) == 1, res.stdout[-3000:]
    assert len(losses) == 2 and len(set(losses)) == 1
    meta = json.loads((tmp_path / "run" / "adapter" / "qcorda_train.json").read_text())
    assert meta["world_size"] == 2 and meta["global_step"] == 3
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log if "loss" in h] == [1, 2, 3]


def test_quant_storage_is_saved_and_changes_no_output(tmp_path, tok, monkeypatch):
    from qcorda.quantize import set_quant_storage

    path = _setup(tmp_path, tok, quant_storage="float32")
    r = train(load_recipe(path), progress=False)
    meta = json.loads((r.adapter / "qcorda_train.json").read_text())
    assert meta["quantization_config"]["bnb_4bit_quant_storage"] == "float32"
    assert meta["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and meta["quantization_config"]["bnb_4bit_use_double_quant"]

    # the storage dtype reinterprets the bytes: outputs are bit-identical
    from qcorda.prepared import load_prepared

    model = load_prepared(tmp_path / "prep", is_trainable=False)
    x = torch.randint(0, tiny.VOCAB, (2, 12))
    with torch.no_grad():
        before = model(input_ids=x).logits
        assert set_quant_storage(model, torch.bfloat16) == 14
        after = model(input_ids=x).logits
    assert torch.equal(before, after)
    assert model.get_base_model().config.quantization_config.bnb_4bit_quant_storage == torch.bfloat16

    # auto: uint8 normally, the compute dtype under FSDP (accelerate sets ACCELERATE_USE_FSDP)
    recipe = load_recipe(path, ["train.quant_storage=auto"])
    assert quant_storage_dtype(recipe, load_prepared(tmp_path / "prep")) == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert quant_storage_dtype(recipe, load_prepared(tmp_path / "prep")) == torch.float32  # compute dtype on the CPU


def test_fsdp_config_is_an_fsdp_qlora_accelerate_config():
    cfg = yaml.safe_load((ROOT / "qcorda/recipes/accelerate/fsdp_qlora.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["mixed_precision"] == "bf16"
    f = cfg["fsdp_config"]
    assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and f["fsdp_cpu_ram_efficient_loading"]
    assert "quant_storage" in (ROOT / "qcorda/recipes/accelerate/fsdp_qlora.yaml").read_text()
