"""How closely two causal LMs agree on held-out text: max |Δlogit|, KL and top-1 agreement.

Logits are compared as a stream: each batch is run through every model once, reduced
to a few sums, and dropped, so a 262k vocabulary costs one batch of logits per model,
never an evaluation set's worth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch


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
    """fp32 logits of the unmasked tokens, ``(n_tokens, vocab)``, on the CPU-or-model device."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return out[mask.to(out.device)].float()


@torch.inference_mode()
def compare(
    models: Mapping[str, torch.nn.Module],
    pairs: Sequence[tuple[str, str]],
    batches: Iterable[dict],
    progress: bool = True,
    total: int | None = None,
) -> list[Agreement]:
    """For each ``(reference, other)`` in ``pairs``, the :class:`Agreement` of the two models'
    logits on ``batches`` (``{"input_ids", "attention_mask"}``, right-padded)."""
    from tqdm.auto import tqdm

    needed = list(dict.fromkeys(n for p in pairs for n in p))
    for m in needed:
        models[m].eval()
    sums = {p: {"n": 0, "max": 0.0, "kl": 0.0, "top1": 0, "bad": 0} for p in pairs}
    for batch in tqdm(batches, desc="compare logits", unit="batch", total=total, disable=not progress):
        mask = batch["attention_mask"].bool()
        logits = {n: _logits(models[n], batch, mask) for n in needed}
        logp = {n: torch.log_softmax(x, dim=-1) for n, x in logits.items()}
        for ref, other in pairs:
            a, b = logits[ref], logits[other].to(logits[ref].device)
            pa, pb = logp[ref], logp[other].to(logp[ref].device)
            s = sums[(ref, other)]
            s["n"] += a.shape[0]
            s["bad"] += int((~torch.isfinite(a).all(-1) | ~torch.isfinite(b).all(-1)).sum().item())
            diff = (a - b).abs().max().item()
            s["max"] = diff if diff != diff else max(s["max"], diff)  # keep a nan visible
            s["kl"] += (pa.exp() * (pa - pb)).sum().item()
            s["top1"] += (a.argmax(-1) == b.argmax(-1)).sum().item()
        del logits, logp
    return [
        Agreement(ref, other, s["n"], s["max"], s["kl"] / max(s["n"], 1), s["top1"] / max(s["n"], 1), s["bad"])
        for (ref, other), s in sums.items()
    ]


def held_out_batches(tokenizer, source: str, fields: Sequence[str], samples: int, max_length: int, batch_size: int, template: str = "alpaca"):
    """Right-padded token batches of the first ``samples`` records of ``source`` and their count."""
    from .data import load_examples, token_batches

    texts = [e.text for e in load_examples(source, tuple(fields), template, samples, tokenizer, flag="--verify-data", fields_flag="--verify-fields")]
    return token_batches(tokenizer, texts, max_length, batch_size), -(-len(texts) // batch_size)
