"""Covariance collection: padding excluded, shared inputs accumulated once, safe files."""

import pytest
import torch

from qcorda.testing import tiny
from qcorda.config import ConfigError
from qcorda.covariance import Covariances, collect
from qcorda.data import token_batches
from qcorda.targets import find_targets

TEXTS = ["Natalia sold clips to 48 of her friends in April.", "Weng earns $12 an hour.", "A robe takes 2 bolts of blue fiber and half that much white fiber."]


def test_masked_batch_equals_unpadded_sequences(tok):
    model = tiny.model("llama")
    targets = find_targets(model, ("all-linear",))
    padded = collect(model, token_batches(tok, TEXTS, 64, 3), targets, progress=False)
    single = collect(model, token_batches(tok, TEXTS, 64, 1), targets, progress=False)
    assert padded.n_tokens == single.n_tokens == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    for g in padded.matrices:
        torch.testing.assert_close(padded.matrices[g], single.matrices[g], atol=1e-5, rtol=1e-5)


def test_shared_inputs_share_one_group_and_match_manual(tok):
    model = tiny.model("llama")
    targets = find_targets(model, ("all-linear",))
    covs = collect(model, token_batches(tok, TEXTS, 64, 2), targets, dtype=torch.float64, progress=False)
    m = covs.members
    assert m["model.layers.0.self_attn.k_proj"] == m["model.layers.0.self_attn.v_proj"] == "model.layers.0.self_attn.q_proj"
    assert m["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"
    assert len(covs.matrices) == 2 * 4  # per block: qkv, o, gate/up, down
    # manual: XᵀX/n of the real inputs of down_proj, captured without qcorda
    xs = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda mod, a: xs.append(a[0].detach()))
    for t in TEXTS:
        model(**tok([t], return_tensors="pt"))
    h.remove()
    X = torch.cat([x[0] for x in xs]).double()
    torch.testing.assert_close(covs.of("model.layers.1.mlp.down_proj").double(), X.T @ X / X.shape[0], atol=1e-5, rtol=1e-5)


def test_save_load_and_manifest_check(tok, tmp_path):
    model = tiny.model("llama")
    targets = find_targets(model, ("q_proj",))
    covs = collect(model, token_batches(tok, TEXTS, 64, 2), targets, progress=False, manifest={"model": "m1", "targets": targets})
    covs.save(tmp_path / "c.safetensors")
    back = Covariances.load(tmp_path / "c.safetensors", expect={"model": "m1"})
    assert back.members == covs.members and back.n_tokens == covs.n_tokens
    for g in covs.matrices:
        assert torch.equal(back.matrices[g], covs.matrices[g])
    with pytest.raises(ConfigError, match="different model"):
        Covariances.load(tmp_path / "c.safetensors", expect={"model": "m2"})
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable"):
        Covariances.load(tmp_path / "bad.safetensors")


def test_all_padding_is_an_error(tok):
    model = tiny.model("llama")
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}
    with pytest.raises(ConfigError, match="tokenizes to nothing"):
        collect(model, [batch], find_targets(model, ("q_proj",)), progress=False)


TEXTS6 = TEXTS + ["James writes a 3-page letter to 2 friends twice a week.", "Betty is saving money for a wallet.", "Julie is reading a 120-page book."]


def test_heldout_records_are_accumulated_apart(tok, tmp_path):
    """--iters auto: every 2nd record held out here; C, C_h and C_fit equal separate collections."""
    model = tiny.model("llama")
    targets = find_targets(model, ("all-linear",))
    both = collect(model, token_batches(tok, TEXTS6, 64, 4, heldout_every=2), targets, progress=False)
    full = collect(model, token_batches(tok, TEXTS6, 64, 4), targets, progress=False)
    held = collect(model, token_batches(tok, TEXTS6[1::2], 64, 4), targets, progress=False)
    fit = collect(model, token_batches(tok, TEXTS6[0::2], 64, 4), targets, progress=False)
    assert both.n_tokens == full.n_tokens and both.n_heldout == held.n_tokens
    assert full.heldout is None
    for t in targets:
        torch.testing.assert_close(both.of(t), full.of(t), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(both.heldout_of(t), held.of(t), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(both.fit_of(t), fit.of(t), atol=1e-5, rtol=1e-4)
    both.save(tmp_path / "c.safetensors")
    for lazy in (False, True):
        back = Covariances.load(tmp_path / "c.safetensors", lazy=lazy)
        assert back.n_heldout == both.n_heldout
        for t in targets:
            assert torch.equal(back.heldout_of(t), both.heldout_of(t)) and torch.equal(back.of(t), both.of(t))
    with pytest.raises(ConfigError, match="no held-out part"):
        full.heldout_of(targets[0])
