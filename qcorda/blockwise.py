"""Covariances collected one decoder block at a time, straight from a safetensors checkpoint.

The whole-model collection (:func:`qcorda.covariance.collect`) needs every weight in fp32
at once. Here only the embeddings and one decoder block are ever materialized:

1. The decoder of a weightless (``meta``) model gets its final norm, rotary module and the
   embedding rows of the calibration tokens (not the whole table) from the checkpoint, and its blocks are replaced by recorders that pass the
   hidden states through unchanged. One forward per calibration batch then yields the
   block inputs ``(batch, seq, hidden)`` and the keyword arguments each block receives from
   the model's own code (attention mask of its layer type, sliding or global, rotary
   ``position_embeddings`` of its layer type, position ids). The embeddings are freed.
2. For each block in order: its weights are read from the checkpoint into fp32, its
   targets are hooked (:class:`qcorda.covariance.Accumulator`: shared inputs accumulated
   once, padding dropped), it runs on the stored hidden states of every batch with the
   recorded arguments, its outputs replace the stored hidden states, and it is freed.

The result equals the whole-model collection to fp32 round-off (the same modules run the
same fp32 arithmetic on the same inputs). Peak memory ≈ the hidden states of all batches
``(batch, seq, hidden)`` in fp32 + one fp32 block + the covariances (one block's, with ``spill``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import Checkpoint, save_tensors
from .config import ConfigError
from .covariance import NO_TOKENS, Accumulator, Covariances, masks_of


class NotBlockwise(Exception):
    """The model does not have the shape this walk needs (the caller loads the whole model)."""


class _Recorder(torch.nn.Module):
    """Stands in for a decoder block: records what it is called with, returns its input."""

    def __init__(self, block: torch.nn.Module, index: int, calls: list):
        super().__init__()
        # not registered as a submodule: materializing the decoder must not touch the block
        object.__setattr__(self, "_block", block)
        self.index = index
        self._calls = calls

    def __getattr__(self, name):  # the decoder may read block attributes (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self._calls.append((self.index, hidden_states, args, kwargs))
        return hidden_states


def find_blocks(model: torch.nn.Module, targets: list[str]) -> tuple[str, str, torch.nn.ModuleList]:
    """(decoder name, blocks attribute, blocks) of ``model``; every target must sit in a block."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise NotBlockwise("the model has no get_decoder()")
    dec_name = next((n for n, m in model.named_modules() if m is decoder), None)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for attr, child in decoder.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n_layers:
            prefix = f"{dec_name}.{attr}." if dec_name else f"{attr}."
            outside = [t for t in targets if not t.startswith(prefix)]
            if outside:
                raise NotBlockwise(f"targets outside the decoder blocks: {outside[:3]}")
            return dec_name or "", attr, child
    raise NotBlockwise("no ModuleList of num_hidden_layers blocks in the decoder")


def _materialize(owner: torch.nn.Module, module: torch.nn.Module, prefix: str, get: Callable[[str], torch.Tensor],
                 device: torch.device, given: dict[str, torch.Tensor] | None = None) -> None:
    """Give a ``meta`` ``module`` real storage on ``device``, in the module's own dtypes: persistent tensors from
    ``get(prefix + key)`` (or ``given[key]``), copied into it one at a time, so that a block never exists twice on the
    device; non-persistent buffers (rotary frequencies, embedding scales) from the model's own init."""
    given = given or {}
    module.to_empty(device=device)
    init = getattr(owner, "_init_weights", None)
    for sub in module.modules():
        if sub._non_persistent_buffers_set:
            if init is None:
                raise NotBlockwise(f"{type(sub).__name__} has computed buffers and the model has no _init_weights")
            init(sub)
    with torch.no_grad():
        for k, v in module.state_dict(keep_vars=True).items():
            t = given[k] if k in given else get(prefix + k)
            if t.shape != v.shape:
                raise RuntimeError(f"{prefix}{k}: the checkpoint holds {tuple(t.shape)}, the model {tuple(v.shape)}")
            v.copy_(t)  # converts device and dtype on the way in
            del t  # the source tensor is gone before the next one is read


def _compact_embedding(decoder: torch.nn.Module, batches: list[dict], key_prefix: str, get, get_rows):
    """Shrink the decoder's input embedding to the rows of the tokens in ``batches``.

    Returns (state-dict key, rows ``(n_used, hidden)``, lookup: token id → row), or None when
    the decoder has no plain input embedding. An embedding lookup reads one row per token,
    so the rows of unused tokens never matter; Gemma-3's 262k × 640 table shrinks to the few
    thousand rows calibration text uses.
    """
    emb = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    key = next((f"{n}.weight" for n, m in decoder.named_modules() if m is emb and n), None)
    if key is None or not batches or not isinstance(emb, torch.nn.Embedding):
        return None
    used = torch.unique(torch.cat([b["input_ids"].reshape(-1) for b in batches]))
    rows = get_rows(key_prefix + key, used) if get_rows is not None else get(key_prefix + key)[used]
    lookup = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    lookup[used] = torch.arange(len(used))
    emb.weight = torch.nn.Parameter(torch.empty(len(used), rows.shape[1], device="meta"), requires_grad=False)
    emb.num_embeddings = len(used)
    return key, rows, lookup


def collect_blockwise(
    skeleton: torch.nn.Module,
    get: Callable[[str], torch.Tensor],
    batches: list[dict],
    targets: list[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
    manifest: dict | None = None,
    get_rows: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    spill: Path | None = None,
) -> Covariances:
    """C = XᵀX/n per target group of a checkpoint, one decoder block at a time.

    ``skeleton``: the model on the ``meta`` device (not modified; a weightless copy is used).
    ``get(key)``: the checkpoint tensor of state-dict ``key`` (e.g. :meth:`qcorda.checkpoint.Checkpoint.get`).
    ``get_rows(key, ids)``: rows ``ids`` (sorted) of that tensor, read without the rest
    (:meth:`qcorda.checkpoint.Checkpoint.rows`); only the embedding rows of the calibration tokens are loaded.
    ``spill``: an existing directory; each block's finished covariances are written there
    (``block-NNNNN.safetensors``) and freed, and the result reads them back one at a time
    (:class:`qcorda.covariance.OnDisk`). Without it every covariance stays in memory: for
    Llama-7B that is 32 × (3·4096² + 11008²) fp32 = 21.9 GB.
    ``batches``: ``{"input_ids", "attention_mask"}`` of ``(batch, seq)``.
    Raises :class:`NotBlockwise` when the model is not a plain stack of blocks.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    dec_name, attr, _ = find_blocks(skeleton, targets)
    decoder = copy.deepcopy(skeleton.get_decoder())  # weightless: cheap, and the skeleton stays intact
    blocks = getattr(decoder, attr)
    calls: list = []
    setattr(decoder, attr, torch.nn.ModuleList([_Recorder(b, i, calls) for i, b in enumerate(blocks)]))
    dec_prefix = f"{dec_name}." if dec_name else ""
    acc = Accumulator(dtype, device)
    n_tokens = n_samples = 0
    n_heldout: int | None = None
    spilled: dict[str, tuple[Checkpoint, str]] = {}

    # 1. embeddings → block inputs and per-block arguments, one forward per batch
    compact = _compact_embedding(decoder, batches, dec_prefix, get, get_rows)
    _materialize(skeleton, decoder, dec_prefix, get, device, {compact[0]: compact[1]} if compact else None)
    decoder.eval()
    hidden: list[torch.Tensor] = []
    masks: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    block_args: list[dict[int, tuple]] = []
    with torch.inference_mode():
        for batch in tqdm(batches, desc="covariance: embeddings", unit="batch", disable=not progress):
            ids = batch["input_ids"] if compact is None else compact[2][batch["input_ids"]]
            ids = ids.to(device)
            mask, held = masks_of(batch, device)
            calls.clear()
            decoder(input_ids=ids, attention_mask=mask.long(), use_cache=False)
            if len(calls) != len(blocks) or [c[0] for c in calls] != list(range(len(blocks))):
                raise NotBlockwise("the decoder does not call each block once, in order")
            hidden.append(calls[0][1])
            block_args.append({i: (a, k) for i, _, a, k in calls})
            masks.append((mask, held))
            n_tokens += int(mask.sum())
            n_samples += ids.shape[0]
            if held is not None:
                n_heldout = (n_heldout or 0) + int(held.sum())
    calls.clear()
    if n_tokens == 0:
        raise ConfigError(NO_TOKENS)
    decoder.to_empty(device="meta")  # frees the embeddings
    del decoder, compact

    # 2. one block at a time on the stored hidden states
    block_prefix = f"{dec_prefix}{attr}."
    with torch.inference_mode():
        for i, block in enumerate(tqdm(blocks, desc="covariance: blocks", unit="block", disable=not progress)):
            prefix = f"{block_prefix}{i}."
            mine = [t for t in targets if t.startswith(prefix)]
            block = copy.deepcopy(block)
            _materialize(skeleton, block, prefix, get, device)
            block.eval()
            handles = [acc.hook(block.get_submodule(t[len(prefix):]), t) for t in mine]
            acc.start_pass()
            try:
                for b in range(len(hidden)):
                    acc.mask, acc.held_mask = masks[b]
                    args, kwargs = block_args[b][i]
                    out = block(hidden[b], *args, **kwargs)
                    hidden[b] = out[0] if isinstance(out, tuple) else out
                    acc.end_batch()
            finally:
                for h in handles:
                    h.remove()
            del block
            if spill is not None:  # this block's groups are complete: to disk, out of memory
                groups = list(dict.fromkeys(g for t in mine if (g := acc.group_of.get(t)) in acc.sums))
                file = Path(spill) / f"block-{i:05d}.safetensors"
                save_tensors(file, acc.pop_final(groups, n_tokens, n_heldout))
                ckpt = Checkpoint(file, flag="covariance spill", hint="the scratch directory was changed; rerun")
                spilled.update({k: (ckpt, k) for k in ckpt.keys()})
    return acc.result(targets, n_tokens, n_samples, manifest, spilled, n_heldout)
