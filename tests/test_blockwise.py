"""Block-by-block covariance collection equals the whole-model collection (issue 7)."""

import pytest
import torch

from qcorda.testing import tiny
from qcorda.blockwise import NotBlockwise, collect_blockwise
from qcorda.covariance import collect
from qcorda.data import token_batches
from qcorda.checkpoint import Checkpoint
from qcorda.models import skeleton
from qcorda.targets import find_targets

# long enough (> sliding_window=16 tokens) that sliding and global attention differ
TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell?",
    "Weng earns $12 an hour.",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take to make the robe?",
    "Betty is saving money for a new wallet which costs $100.",
]


def _gemma_mixed():
    # sliding, global, sliding: Gemma-3 uses a different rotary base per layer type
    return dict(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"])


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen2", "gpt2"])
def test_blockwise_equals_whole_model(arch, tok, tmp_path):
    kw = _gemma_mixed() if arch == "gemma" else {}
    model = tiny.model(arch, seed=3, **kw)
    path = tmp_path / arch
    model.save_pretrained(path)
    targets = find_targets(model, ("all-linear",))
    batches = list(token_batches(tok, TEXTS, 64, 3))  # right padding in the first batch
    whole = collect(model, batches, targets, progress=False)
    _, skel = skeleton(path, trust_remote_code=False)
    ckpt = Checkpoint(path)
    block = collect_blockwise(skel, ckpt.get, batches, targets, progress=False, get_rows=ckpt.rows)
    assert block.members == whole.members
    assert block.n_tokens == whole.n_tokens
    assert set(block.matrices) == set(whole.matrices)
    for g, m in whole.matrices.items():
        torch.testing.assert_close(block.matrices[g], m, atol=1e-5, rtol=1e-5, msg=f"{arch} {g}")
    # the skeleton is left weightless and untouched
    assert all(p.is_meta for p in skel.parameters())

    # spilled block by block to disk: the same matrices, read back one at a time
    spill = tmp_path / "spill"
    spill.mkdir()
    spilled = collect_blockwise(skel, ckpt.get, batches, targets, progress=False, get_rows=ckpt.rows, spill=spill)
    assert type(spilled.matrices).__name__ == "OnDisk"
    assert len(list(spill.glob("block-*.safetensors"))) == model.config.num_hidden_layers
    assert spilled.members == block.members and spilled.n_tokens == block.n_tokens and spilled.manifest == block.manifest
    assert set(spilled.matrices) == set(block.matrices)
    for g in block.matrices:
        assert torch.equal(spilled.matrices[g], block.matrices[g]), g
    # ... and saved from disk one matrix at a time, the file loads back equal
    spilled.save(tmp_path / "cov.safetensors")
    from qcorda.covariance import Covariances

    back = Covariances.load(tmp_path / "cov.safetensors")
    assert back.members == block.members and all(torch.equal(back.matrices[g], block.matrices[g]) for g in block.matrices)

    # held-out records (--iters auto) are accumulated apart in both walks, spilled or not
    marked = list(token_batches(tok, TEXTS, 64, 3, heldout_every=2))
    whole_h = collect(model, marked, targets, progress=False)
    spill_h = tmp_path / "spill_h"
    spill_h.mkdir()
    for kw in ({}, {"spill": spill_h}):
        block_h = collect_blockwise(skel, ckpt.get, marked, targets, progress=False, get_rows=ckpt.rows, **kw)
        assert block_h.n_heldout == whole_h.n_heldout > 0
        for t in targets:
            torch.testing.assert_close(block_h.heldout_of(t), whole_h.heldout_of(t), atol=1e-5, rtol=1e-5, msg=f"{arch} {t}")


def test_gemma_layer_types_matter(tok, tmp_path):
    """The equality above is not vacuous: the global layer's inputs change with its mask/rotary."""
    model = tiny.model("gemma", seed=3, **_gemma_mixed())
    targets = find_targets(model, ("o_proj",))
    batches = list(token_batches(tok, TEXTS, 64, 2))
    base = collect(model, batches, targets, progress=False)
    model.config.layer_types = ["sliding_attention"] * 3
    changed = collect(model, batches, targets, progress=False)
    assert not torch.allclose(base.of("model.layers.2.self_attn.o_proj"), changed.of("model.layers.2.self_attn.o_proj"), atol=1e-4)


def test_target_outside_blocks_is_refused(tmp_path):
    model = tiny.model("llama")
    model.save_pretrained(tmp_path / "m")
    _, skel = skeleton(tmp_path / "m", trust_remote_code=False)
    with pytest.raises(NotBlockwise, match="outside"):
        collect_blockwise(skel, Checkpoint(tmp_path / "m").get, [], ["lm_head"], progress=False)
