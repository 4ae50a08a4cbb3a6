"""eval/lib, the library of the benchmark scripts (tests import eval as a package; eval never imports tests)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from eval.lib import Results, corda_low_rank, llama_shape, write_synthetic_llama


def test_corda_low_rank_brings_peft_factors_to_one_device():
    """PEFT's collect_eigens_for_layer leaves S on the weight's device and offloads U and V to the CPU (issue 24,
    part 5): on a GPU their product failed. 'meta' stands in for the GPU here."""
    g = torch.Generator().manual_seed(0)
    eig = SimpleNamespace(U_WC=torch.randn(6, 4, generator=g), S_WC=torch.rand(4, generator=g).to("meta"),
                          V_WC=torch.randn(5, 4, generator=g))
    BA = corda_low_rank(eig, 3, "meta")
    assert BA.device.type == "meta" and BA.shape == (6, 5)
    cpu = SimpleNamespace(U_WC=eig.U_WC, S_WC=torch.rand(4, generator=g), V_WC=eig.V_WC)
    expect = eig.U_WC[:, :3] @ torch.diag(cpu.S_WC[:3]) @ eig.V_WC[:, :3].T
    torch.testing.assert_close(corda_low_rank(cpu, 3, "cpu"), expect)


def test_results_resume_only_with_the_same_key(tmp_path):
    store = Results(tmp_path / "study", key={"rank": 16})
    assert store.load() == {"key": {"rank": 16}}
    store.save({"rows": [1, 2]}, "# table")
    assert store.load()["rows"] == [1, 2] and store.md_path.read_text() == "# table\n"
    assert Results(tmp_path / "study", key={"rank": 32}).load() == {"key": {"rank": 32}}  # other numbers: start afresh
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.json", "study.md"]  # no temporary file left


def test_synthetic_llama_has_the_planned_shape_and_loads(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    shape = write_synthetic_llama(tmp_path / "m", 3e6, 256, tokenizer=tok)
    assert shape == {**llama_shape(3e6, 256), "bf16_gb": shape["bf16_gb"]}
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == shape["layers"] + 1  # one shard per block, one for the embeddings
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert sum(p.numel() for p in model.parameters()) == shape["params"]
    assert shape["bf16_gb"] * 1e9 == pytest.approx(2 * shape["params"], rel=1e-3)
