"""Scoring causal LMs on text, streamed: log-likelihoods, perplexity, KL and logit agreement.

Gemma-3's vocabulary has 262k tokens: full ``(batch, seq, vocab)`` logits of one evaluation
batch would be gigabytes. So the decoder's last hidden states are kept, and only the positions
that need a logit go through the LM head, ``HEAD_CHUNK`` rows at a time, each chunk reduced at
once (cross-entropy, log-softmax sums) and dropped. Every figure qcorda reports about a model's
predictions comes from here: ``qcorda eval``'s tasks, ``qcorda compare``'s perplexity and KL,
the logit agreement of ``merge`` / ``to-lora`` verification, and the studies under ``eval/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .data import load_examples, token_batches

#: Labelled positions per LM-head call: 128 x 262k fp32 logits = 128 MiB at most.
HEAD_CHUNK = 128


# --------------------------------------------------------------------------- log-likelihood


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def causal_lm(model):
    """The causal LM under a PEFT wrapper (the LoRA layers stay inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``(n, vocab)`` of final hidden states ``(n, d)``: the LM head, then the
    model's final logit soft-capping (Gemma-2) when it has one. Call it on a few rows at a
    time (HEAD_CHUNK): a 262k vocabulary costs 1 MiB per row."""
    logits = lm.get_output_embeddings()(hidden).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _head_nll(lm, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−log p(label) for ``hidden`` ``(n, d)`` and ``labels`` ``(n,)``, HEAD_CHUNK rows at a time.

    With gradients enabled each chunk is checkpointed, so backward recomputes its logits
    instead of keeping ``(n, vocab)`` of them alive."""
    from torch.utils.checkpoint import checkpoint

    def chunk_nll(h, y):
        return torch.nn.functional.cross_entropy(head_logits(lm, h), y, reduction="none")

    grad = torch.is_grad_enabled() and hidden.requires_grad
    out = []
    for i in range(0, hidden.shape[0], HEAD_CHUNK):
        h, y = hidden[i : i + HEAD_CHUNK], labels[i : i + HEAD_CHUNK]
        out.append(checkpoint(chunk_nll, h, y, use_reentrant=False) if grad else chunk_nll(h, y))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def masked_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed −log p and the token count of the labelled positions of each sequence.

    ``input_ids``, ``attention_mask``, ``label_mask``: ``(batch, seq)``; ``label_mask[b, t]``
    marks token t as a target (predicted from positions < t). Returns two ``(batch,)`` tensors
    (differentiable when gradients are enabled: a training loss is ``sums.sum() / counts.sum()``).
    Only the hidden states of the batch are held; logits exist for HEAD_CHUNK tokens at a time.
    """
    lm = causal_lm(model)
    dev = model_device(model)
    input_ids, attention_mask, label_mask = input_ids.to(dev), attention_mask.to(dev), label_mask.to(dev)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target = label_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    rows, cols = target.nonzero(as_tuple=True)
    nll = _head_nll(lm, hidden[:, :-1][rows, cols], input_ids[:, 1:][rows, cols])
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=dev).index_add(0, rows, nll)
    counts = torch.bincount(rows, minlength=input_ids.shape[0])
    return sums, counts


@torch.inference_mode()
def sequence_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`masked_nll` without gradients, on the CPU."""
    sums, counts = masked_nll(model, input_ids, attention_mask, label_mask)
    return sums.cpu(), counts.cpu()


def encode_pairs(tok, prompts: Sequence[str], completions: Sequence[str], max_length: int | None = None):
    """Right-padded ``(input_ids, attention_mask, label_mask)``: prompt ids (with the tokenizer's
    special tokens) then completion ids (without), so the boundary is exact; labels on the completion.
    ``max_length`` truncates on the right."""
    seqs, marks = [], []
    for p, c in zip(prompts, completions):
        pi = tok(p)["input_ids"]
        ci = tok(c, add_special_tokens=False)["input_ids"]
        seqs.append((pi + ci)[:max_length])
        marks.append(([0] * len(pi) + [1] * len(ci))[:max_length])
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, marks)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        lab[i, : len(s)] = torch.tensor(m)
    return ids, att, lab


def completion_logprobs(model, tok, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 8, progress: bool = True, desc: str = "log-likelihood") -> list[tuple[float, int]]:
    """Teacher-forced ``(sum log p(completion | prompt), completion tokens)`` per pair."""
    from tqdm.auto import tqdm

    out: list[tuple[float, int]] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
        ids, att, lab = encode_pairs(tok, prompts[i : i + batch_size], completions[i : i + batch_size])
        sums, counts = sequence_nll(model, ids, att, lab)
        out += [(-s, int(c)) for s, c in zip(sums.tolist(), counts.tolist())]
    return out


# --------------------------------------------------------------------------- perplexity and KL against a reference


def scored_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int, n_tokens: int) -> list[dict]:
    """Right-padded batches whose scored positions (next-token predictions) total ``n_tokens``
    (or all there are): records in order, the last one cut short. The padding side is set by
    :func:`qcorda.data.token_batches`, whatever the tokenizer's default (Gemma pads on the left)."""
    out, left, available = [], n_tokens, 0
    for b in token_batches(tokenizer, texts, max_length, batch_size):
        available += int((b["attention_mask"].sum(1) - 1).clamp_min(0).sum())
        if left <= 0:
            break
        mask = b["attention_mask"].clone()
        for i in range(mask.shape[0]):
            n = int(mask[i].sum())
            keep = min(n, left + 1) if left > 0 else 0  # k tokens give k − 1 predictions
            mask[i, keep:] = 0
            left -= max(keep - 1, 0)
        keep_rows = mask.sum(1) > 1
        if keep_rows.any():
            width = int(mask[keep_rows].sum(1).max())
            out.append({"input_ids": b["input_ids"][keep_rows, :width], "attention_mask": mask[keep_rows, :width]})
    scored = sum(int((b["attention_mask"].sum(1) - 1).sum()) for b in out)
    if scored != min(n_tokens, available):  # a padding-side mistake scored 308 of 512 tokens once
        raise RuntimeError(f"scored {scored} tokens, expected {min(n_tokens, available)} of the {n_tokens} requested")
    return out


@torch.inference_mode()
def final_hidden(model, batches: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states ``(n, hidden)`` at every position that predicts a next token, and
    those next tokens ``(n,)`` (the decoder alone runs; no logits)."""
    lm = causal_lm(model)
    dev = next(lm.parameters()).device
    hs, ys = [], []
    for b in batches:
        ids, att = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        h = lm.get_decoder()(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
        sel = att[:, :-1].bool() & att[:, 1:].bool()
        hs.append(h[:, :-1][sel].float().cpu())
        ys.append(ids[:, 1:][sel].cpu())
    return torch.cat(hs), torch.cat(ys)


@torch.inference_mode()
def ppl_and_kl(model, reference: torch.Tensor, labels: torch.Tensor, hidden: dict, progress: bool = True, desc: str = "ppl/KL"):
    """Perplexity of the reference and of each entry of ``hidden`` (``key → (n, d)`` final hidden
    states on the same positions), and the mean KL(p_ref ‖ p_key) in nats.

    The LM head runs on HEAD_CHUNK positions at a time: the reference's log-probabilities of a
    chunk are computed once and compared with every model's, then dropped.
    Returns ``(ref_ppl, {key: (ppl, kl)})``.
    """
    from tqdm.auto import tqdm

    lm = causal_lm(model)
    dev = next(lm.parameters()).device
    n = reference.shape[0]
    ref_nll, nll, kl = 0.0, {k: 0.0 for k in hidden}, {k: 0.0 for k in hidden}
    for i in tqdm(range(0, n, HEAD_CHUNK), desc=desc, unit="chunk", disable=not progress):
        y = labels[i : i + HEAD_CHUNK].to(dev)
        lp_ref = torch.log_softmax(head_logits(lm, reference[i : i + HEAD_CHUNK].to(dev)), -1)
        ref_nll -= lp_ref.gather(1, y[:, None]).sum().item()
        p_ref = lp_ref.exp()
        for k, h in hidden.items():
            lp = torch.log_softmax(head_logits(lm, h[i : i + HEAD_CHUNK].to(dev)), -1)
            nll[k] -= lp.gather(1, y[:, None]).sum().item()
            kl[k] += (p_ref * (lp_ref - lp)).sum().item()
            del lp
        del lp_ref, p_ref
    n = max(n, 1)
    return math.exp(ref_nll / n), {k: (math.exp(nll[k] / n), kl[k] / n) for k in hidden}


# --------------------------------------------------------------------------- logit agreement


@dataclass(frozen=True)
class Agreement:
    """``other`` against ``reference`` over the non-padding tokens of the held-out text."""

    reference: str
    other: str
    n_tokens: int
    max_abs_diff: float
    """max over tokens and vocabulary of |logit_ref − logit_other| (fp32)."""
    mean_kl: float
    """mean over tokens of KL(p_ref ‖ p_other) in nats."""
    top1: float
    """fraction of tokens where both models' argmax agree."""
    nonfinite: int = 0
    """tokens where either model's logits hold inf/nan (e.g. Gemma-3 overflows in float16)."""

    def row(self) -> list:
        return [self.other, self.reference, self.n_tokens, self.max_abs_diff, self.mean_kl, self.top1, self.nonfinite]


HEADERS = ["model", "against", "tokens", "max |Δlogit|", "mean KL (nats)", "top-1 agree", "non-finite tokens"]


def _logits(model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the unmasked tokens, ``(n_tokens, vocab)``, on the CPU."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return out[mask.to(out.device)].float().cpu()


def _release() -> None:
    """Drop what a loaded model left behind before the next one loads (the caller dropped its reference)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.inference_mode()
def logit_agreement(
    models: Mapping[str, "torch.nn.Module | Callable[[], torch.nn.Module]"],
    pairs: Sequence[tuple[str, str]],
    batches: Iterable[dict],
    progress: bool = True,
    total: int | None = None,
) -> list[Agreement]:
    """For each ``(reference, other)`` in ``pairs``, the :class:`Agreement` of the two models'
    logits on ``batches`` (``{"input_ids", "attention_mask"}``, right-padded).

    The models run one after the other, never two at once: a value of ``models`` that is a callable
    is called to load its model when that model's turn comes, and the model is released before the
    next one loads. Each model's logits are kept on the CPU (``n_tokens × vocab`` fp32) while a later
    model of one of its pairs is still to run."""
    from tqdm.auto import tqdm

    batches = list(batches)
    order = list(dict.fromkeys(n for p in pairs for n in p))
    last_use = {n: max(i for i, m in enumerate(order) if any(n in p and m in p for p in pairs)) for n in order}
    kept: dict[str, list[torch.Tensor]] = {}
    sums = {p: {"n": 0, "max": 0.0, "kl": 0.0, "top1": 0, "bad": 0} for p in pairs}
    for i, name in enumerate(order):
        model = models[name]
        model = model() if not isinstance(model, torch.nn.Module) and callable(model) else model
        model.eval()
        kept[name] = [_logits(model, b, b["attention_mask"].bool())
                      for b in tqdm(batches, desc=f"logits: {name}", unit="batch", total=total, disable=not progress)]
        del model
        _release()
        for ref, other in pairs:
            if name not in (ref, other) or ref not in kept or other not in kept:
                continue
            s = sums[(ref, other)]
            for a, b in zip(kept[ref], kept[other]):
                pa, pb = torch.log_softmax(a, dim=-1), torch.log_softmax(b, dim=-1)
                s["n"] += a.shape[0]
                s["bad"] += int((~torch.isfinite(a).all(-1) | ~torch.isfinite(b).all(-1)).sum().item())
                diff = (a - b).abs().max().item()
                s["max"] = diff if diff != diff else max(s["max"], diff)  # keep a nan visible
                s["kl"] += (pa.exp() * (pa - pb)).sum().item()
                s["top1"] += (a.argmax(-1) == b.argmax(-1)).sum().item()
        for n in [n for n in kept if last_use[n] <= i]:
            del kept[n]
    return [
        Agreement(ref, other, s["n"], s["max"], s["kl"] / max(s["n"], 1), s["top1"] / max(s["n"], 1), s["bad"])
        for (ref, other), s in sums.items()
    ]


def held_out_batches(tokenizer, source: str, fields: Sequence[str], samples: int, max_length: int, batch_size: int, template: str = "alpaca"):
    """Right-padded token batches of the first ``samples`` records of ``source`` and their count."""
    texts = [e.text for e in load_examples(source, tuple(fields), template, samples, tokenizer, flag="--verify-data", fields_flag="--verify-fields")]
    return token_batches(tokenizer, texts, max_length, batch_size), -(-len(texts) // batch_size)
