"""Covariances collected one decoder block at a time, straight from a safetensors checkpoint.

The whole-model collection (:func:`qcorda.covariance.collect`) needs every weight in fp32
at once. Here only the embeddings and one decoder block are ever materialized:

1. The decoder of a weightless (``meta``) model gets its embeddings, final norm and rotary
   module from the checkpoint, and its blocks are replaced by recorders that pass the
   hidden states through unchanged. One forward per calibration batch then yields the
   block inputs ``(batch, seq, hidden)`` and the keyword arguments each block receives from
   the model's own code (attention mask of its layer type, sliding or global, rotary
   ``position_embeddings`` of its layer type, position ids). The embeddings are freed.
2. For each block in order: its weights are read from the checkpoint into fp32, its
   targets are hooked (:class:`qcorda.covariance.Accumulator`: shared inputs accumulated
   once, padding dropped), it runs on the stored hidden states of every batch with the
   recorded arguments, its outputs replace the stored hidden states, and it is freed.

The result equals the whole-model collection to fp32 round-off (the same modules run the
same fp32 arithmetic on the same inputs). Peak memory ≈ the embeddings (during step 1),
then the hidden states of all batches + one block + the covariances.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from .covariance import Accumulator, Covariances


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
                 device: torch.device) -> None:
    """Give a ``meta`` ``module`` real fp32 storage: persistent tensors from ``get(prefix + key)``,
    non-persistent buffers (rotary frequencies, embedding scales) from the model's own init."""
    module.to_empty(device=device)
    init = getattr(owner, "_init_weights", None)
    for sub in module.modules():
        if sub._non_persistent_buffers_set:
            if init is None:
                raise NotBlockwise(f"{type(sub).__name__} has computed buffers and the model has no _init_weights")
            init(sub)
    state = {k: get(prefix + k).to(device=device, dtype=v.dtype if not v.is_floating_point() else torch.float32)
             for k, v in module.state_dict().items()}
    module.load_state_dict(state, strict=True)


def collect_blockwise(
    skeleton: torch.nn.Module,
    get: Callable[[str], torch.Tensor],
    batches: list[dict],
    targets: list[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
    manifest: dict | None = None,
) -> Covariances:
    """C = XᵀX/n per target group of a checkpoint, one decoder block at a time.

    ``skeleton``: the model on the ``meta`` device (not modified; a weightless copy is used).
    ``get(key)``: the checkpoint tensor of state-dict ``key`` (e.g. :meth:`qcorda.stream.Checkpoint.get`).
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

    # 1. embeddings → block inputs and per-block arguments, one forward per batch
    _materialize(skeleton, decoder, dec_prefix, get, device)
    decoder.eval()
    hidden: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    block_args: list[dict[int, tuple]] = []
    with torch.inference_mode():
        for batch in tqdm(batches, desc="covariance: embeddings", unit="batch", disable=not progress):
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            calls.clear()
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            if len(calls) != len(blocks) or [c[0] for c in calls] != list(range(len(blocks))):
                raise NotBlockwise("the decoder does not call each block once, in order")
            hidden.append(calls[0][1])
            block_args.append({i: (a, k) for i, _, a, k in calls})
            masks.append(mask.bool())
            n_tokens += int(mask.sum())
            n_samples += ids.shape[0]
    calls.clear()
    decoder.to_empty(device="meta")  # frees the embeddings
    del decoder

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
                    acc.mask = masks[b]
                    args, kwargs = block_args[b][i]
                    out = block(hidden[b], *args, **kwargs)
                    hidden[b] = out[0] if isinstance(out, tuple) else out
                    acc.end_batch()
            finally:
                for h in handles:
                    h.remove()
            del block
    return acc.result(targets, n_tokens, n_samples, manifest)
