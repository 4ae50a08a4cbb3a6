"""Shared test setup: a prepared tiny model and a 'trained' adapter (merge / to-lora tests), and
the scripts under eval/ imported as modules."""

from __future__ import annotations

import json
import shutil

import torch

from qcorda.testing import tiny
from qcorda.config import InitConfig
from qcorda.prepare import prepare
from qcorda.prepared import load_prepared


def prepared_and_trained(tmp_path, arch="llama", method="qpissa", rank=4, alpha=8.0, seed=1, scale=0.05):
    """(base dir, prepared dir, trained adapter dir): training is simulated by perturbing lora_A / lora_B."""
    base = tiny.save(tmp_path, arch)
    tok = tiny.tokenizer()
    prep = prepare(base, InitConfig(method=method, rank=rank, alpha=alpha), tmp_path / f"prep-{arch}", tokenizer=tok, progress=False).out
    trained = load_prepared(prep)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    trained.save_pretrained(tmp_path / f"trained-{arch}")
    return base, prep, tmp_path / f"trained-{arch}"


def inputs(tok):
    return tok(["Natalia sold clips to 48 of her friends in April.", "How many clips did she sell altogether?"],
               return_tensors="pt", padding=True)


def edited_adapter(trained, out, **config_updates):
    """A copy of the adapter directory ``trained`` at ``out`` with ``adapter_config.json`` updated."""
    shutil.copytree(trained, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(config_updates)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def eval_script(name: str):
    """The script ``eval/NAME.py``, imported as the module ``eval.NAME`` (the repository root is on pytest's path)."""
    import importlib

    return importlib.import_module(f"eval.{name}")
