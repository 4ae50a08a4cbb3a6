"""Evaluations: GSM8K accuracy, NQ-open knowledge retention, and perplexity.

Every evaluation takes a causal LM (plain HF, a prepared 4-bit ``PeftModel``, or a merged
model) and its tokenizer and returns a frozen :class:`TaskResult` (metrics, per-example
records, a one-line summary). :func:`load_for_eval` opens any of the three kinds of
directory; :func:`evaluate` runs several tasks and :func:`write_results` saves the JSON.

Log-likelihoods are streamed by :mod:`qcorda.scoring`: Gemma-3's 262k-token vocabulary never
materializes as full ``(batch, seq, vocab)`` logits.

Prompts use the alpaca template of :func:`qcorda.data.format_record`, the one training uses.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .config import EvalConfig, ConfigError
from .data import format_record, load_records
from .models import load_model
from .prepared import device_map, load_prepared
from .scoring import completion_logprobs, model_device, sequence_nll



@dataclass(frozen=True)
class TaskResult:
    """One evaluation's outcome."""

    task: str
    metrics: dict
    """Name -> value; the first entry is the headline metric."""
    n: int
    """Examples (gsm8k, nq) or scored tokens (ppl)."""
    seconds: float
    config: dict = field(default_factory=dict)
    """The settings that produced it (data, limit, prompt, lengths)."""
    samples: list = field(default_factory=list)
    """Per-example records (prediction, gold, scores)."""

    def summary(self) -> str:
        vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items() if v is not None)
        return f"{self.task}: {vals} (n={self.n}, {self.seconds:.0f}s)"

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- answers

_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?|-?[$]?\.\d+")


def _clean_number(s: str) -> str | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return None
    if math.isfinite(v) and v == int(v):
        return str(int(v))
    return repr(v)


def extract_answer(text: str) -> str | None:
    """The final number of a GSM8K solution: the number after ``####``, else the last number.

    Commas, ``$`` and a trailing period are stripped; integral values are written without a
    decimal point (``"1,000.00"`` -> ``"1000"``). None when the text holds no number.
    """
    if "####" in text:
        tail = text.split("####", 1)[1]
        m = _NUMBER.search(tail)
        if m:
            return _clean_number(m.group())
    numbers = _NUMBER.findall(text)
    for raw in reversed(numbers):
        v = _clean_number(raw)
        if v is not None:
            return v
    return None


def normalize_answer(s: str) -> str:
    """NQ-open / SQuAD normalization: lowercase, drop punctuation, articles (a, an, the), extra spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: Sequence[str]) -> bool:
    """True when the normalized prediction equals any normalized accepted answer."""
    p = normalize_answer(prediction)
    return any(p == normalize_answer(g) for g in golds)


# --------------------------------------------------------------------------- loading


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / "qcorda.json").exists()


def load_for_eval(model_or_prepared: str | Path, adapter: str | Path | None = None, device: str | None = None,
                  trust_remote_code: bool = False, dtype: str = "auto"):
    """``(model, tokenizer, kind)`` for evaluation, in eval mode, loaded straight onto ``device``
    (default CUDA when present).

    - a prepared directory (it holds ``qcorda.json``): the 4-bit model with ``adapter``
      (default ``adapter_init``) in its compute dtype, kind ``prepared``;
    - any other HF directory, hub id or ``gemma-3-270m`` (a merged export, an original model):
      the model in ``dtype`` (auto: the dtype it is stored in), kind ``hf``; with ``adapter`` a
      plain PEFT LoRA is attached (``hf+lora``).
    """
    from transformers import AutoTokenizer

    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there; give a PEFT adapter directory (e.g. PREPARED/adapter_init)")
    if is_prepared(model_or_prepared):
        model = load_prepared(model_or_prepared, adapter, is_trainable=False, device=device)
        tok = AutoTokenizer.from_pretrained(str(model_or_prepared))
        kind = "prepared"
    else:
        model, tok = load_model(str(model_or_prepared), trust_remote_code, "MODEL", dtype, device_map(device), original=False)
        kind = "hf"
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
            kind = "hf+lora"
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, kind


# --------------------------------------------------------------------------- generation


class _StopAfter:
    """Per-sequence stop test on the decoded continuation (a ``StoppingCriteria``)."""

    def __init__(self, tok, prompt_len: int, pattern: re.Pattern):
        self.tok, self.prompt_len, self.pattern = tok, prompt_len, pattern

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([bool(self.pattern.search(t)) for t in texts], device=input_ids.device)


@torch.inference_mode()
def generate(model, tok, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8, stop: str | None = None, progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded), cut at the regex ``stop``."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    pattern = re.compile(stop) if stop else None
    dev = model_device(model)
    out: list[str] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
        # generation continues from the last column: pad on the left, whatever the tokenizer's default
        enc = tok(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True, padding_side="left").to(dev)
        width = enc["input_ids"].shape[1]
        criteria = StoppingCriteriaList([_StopAfter(tok, width, pattern)]) if pattern else None
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
            stopping_criteria=criteria, pad_token_id=tok.pad_token_id,
            temperature=None, top_p=None, top_k=None,
        )
        for text in tok.batch_decode(gen[:, width:], skip_special_tokens=True):
            m = pattern.search(text) if pattern else None
            out.append(text[: m.end()] if m else text)
    return out


# --------------------------------------------------------------------------- tasks


def _records(source: str, limit: int | None, flag: str) -> list[dict]:
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}")
    records = load_records(source, "test", flag)
    return records[:limit] if limit else records


def gsm8k_prompts(records: Sequence[dict], shots: int = 0, shot_source: str = "gsm8k-train") -> list[tuple[str, str]]:
    """``(prompt, gold solution)`` per record: the alpaca template of training, after ``shots``
    solved training examples (fixed: the first ones of ``shot_source``)."""
    fields = ("question", "answer")
    prefix = ""
    if shots:
        prefix = "".join(format_record(r, fields).text + "\n\n" for r in load_records(shot_source)[:shots])
    out = []
    for r in records:
        ex = format_record(r, fields)
        out.append((prefix + ex.prompt, ex.completion))
    return out


#: Stop a GSM8K continuation once the final answer line is complete or a new section starts.
GSM8K_STOP = r"####\s*[-$]?[\d,.]+\s*\n|\n###|\n\n\n"


def gsm8k(model, tok, data: str = "gsm8k-test", limit: int | None = None, shots: int = 0, max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True, generate_answers: bool = True) -> TaskResult:
    """Greedy-decoding accuracy, plus the teacher-forced NLL per token of the gold solutions.

    ``accuracy``: :func:`extract_answer` of the continuation equals that of the gold solution.
    ``answer_nll``: mean −log p per token over all gold-solution tokens (held-out answer loss).
    ``generate_answers=False`` skips generation, the slow part (``accuracy`` is then None).
    """
    t0 = time.perf_counter()
    records = _records(data, limit, "--gsm8k-data")
    pairs = gsm8k_prompts(records, shots)
    prompts = [p for p, _ in pairs]
    outs = generate(model, tok, prompts, max_new_tokens, batch_size, GSM8K_STOP, progress, "gsm8k generate") if generate_answers else [""] * len(prompts)
    lls = completion_logprobs(model, tok, prompts, [g for _, g in pairs], batch_size, progress, "gsm8k answer loss")
    samples, correct = [], 0
    for r, (_, gold_text), out, (ll, n) in zip(records, pairs, outs, lls):
        gold, pred = extract_answer(gold_text), extract_answer(out)
        ok = pred is not None and pred == gold
        correct += ok
        samples.append({"question": r["question"], "gold": gold, "pred": pred, "correct": ok, "output": out, "answer_logprob": ll, "answer_tokens": n})
    tokens = sum(n for _, n in lls)
    metrics = {"accuracy": correct / len(records) if generate_answers else None, "answer_nll": -sum(ll for ll, _ in lls) / max(tokens, 1)}
    cfg = {"data": data, "limit": limit, "shots": shots, "template": "alpaca", "max_new_tokens": max_new_tokens, "decoding": "greedy"}
    return TaskResult("gsm8k", metrics, len(records), time.perf_counter() - t0, cfg, samples)


def nq_prompts(records: Sequence[dict]) -> list[str]:
    return [format_record({"question": r["question"]}, ("question",)).prompt for r in records]


def _answers(r: dict) -> list[str]:
    a = r["answer"]
    return [str(x) for x in a] if isinstance(a, (list, tuple)) else [str(a)]


def nq(model, tok, data: str = "nq-open", limit: int | None = None, max_new_tokens: int = 24, batch_size: int = 8, progress: bool = True, generate_answers: bool = True) -> TaskResult:
    """NQ-open knowledge retention.

    ``exact_match``: the first line of the greedy continuation equals an accepted answer
    after :func:`normalize_answer`.
    ``gold_logprob``: per question, the teacher-forced mean log-probability per token of
    each accepted answer given the prompt, the MAX over accepted answers (the best-supported
    phrasing; per-token so that answers of different lengths compare), averaged over questions.
    ``gold_logprob_sum``: the same with the summed (not per-token) log-probability.
    ``generate_answers=False`` skips generation (``exact_match`` is then None).
    """
    t0 = time.perf_counter()
    records = _records(data, limit, "--nq-data")
    prompts = nq_prompts(records)
    outs = generate(model, tok, prompts, max_new_tokens, batch_size, r"\n", progress, "nq generate") if generate_answers else [""] * len(prompts)
    flat_p, flat_a, owner = [], [], []
    for i, (p, r) in enumerate(zip(prompts, records)):
        for a in _answers(r):
            flat_p.append(p)
            flat_a.append(a)
            owner.append(i)
    lls = completion_logprobs(model, tok, flat_p, flat_a, batch_size, progress, "nq gold log-likelihood")
    per_tok = [[] for _ in records]
    per_sum = [[] for _ in records]
    for i, (ll, n) in zip(owner, lls):
        per_tok[i].append(ll / max(n, 1))
        per_sum[i].append(ll)
    samples, hits = [], 0
    for r, out, pt, ps in zip(records, outs, per_tok, per_sum):
        pred = out.strip().split("\n")[0].strip()
        ok = exact_match(pred, _answers(r))
        hits += ok
        samples.append({"question": r["question"], "answers": _answers(r), "pred": pred, "exact_match": ok, "gold_logprob": max(pt), "gold_logprob_sum": max(ps)})
    n = len(records)
    metrics = {
        "exact_match": hits / n if generate_answers else None,
        "gold_logprob": sum(s["gold_logprob"] for s in samples) / n,
        "gold_logprob_sum": sum(s["gold_logprob_sum"] for s in samples) / n,
    }
    cfg = {"data": data, "limit": limit, "template": "alpaca", "max_new_tokens": max_new_tokens, "gold_logprob": "max over accepted answers of the mean per-token log-prob"}
    return TaskResult("nq", metrics, n, time.perf_counter() - t0, cfg, samples)


def perplexity(model, tok, data: str = "wikitext2", max_tokens: int | None = 8192, window: int = 512, stride: int = 256, batch_size: int = 4, progress: bool = True) -> TaskResult:
    """Sliding-window perplexity of the first ``max_tokens`` tokens of ``data``.

    The paragraphs are joined by blank lines and tokenized once (without special tokens;
    each window is prefixed by BOS when the tokenizer uses one). Windows of ``window``
    tokens start every ``stride`` tokens; each scores only the tokens the previous window
    did not (so every token is scored once, with at least ``window − stride`` tokens of
    context after the first window). ppl = exp(Σ −log p / scored tokens).
    """
    from tqdm.auto import tqdm

    if not 0 < stride <= window:
        raise ConfigError(f"--ppl-stride must be in (0, --ppl-window={window}], got {stride}")
    t0 = time.perf_counter()
    records = load_records(data, "test", "--ppl-data")
    if "text" not in records[0]:
        raise ConfigError(f"--ppl-data {data}: records have no 'text' field; give a .txt file or a dataset with a text column")
    text = "\n\n".join(r["text"] for r in records)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if max_tokens:
        ids = ids[:max_tokens]
    # Models trained with a BOS token (Gemma) degrade without one: every window starts with it.
    probe = tok("a")["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id else []
    spans = []  # (begin, end, first scored position)
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        spans.append((begin, end, prev_end))
        prev_end = end
        if end == len(ids):
            break
    total_nll, total_n = 0.0, 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    k = len(bos)
    for i in tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch", disable=not progress):
        chunk = spans[i : i + batch_size]
        width = k + max(e - b for b, e, _ in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros_like(x)
        lab = torch.zeros_like(x)
        for j, (b, e, first) in enumerate(chunk):
            x[j, : k + e - b] = torch.cat([torch.tensor(bos, dtype=torch.long), ids[b:e]])
            att[j, : k + e - b] = 1
            # score each token once; without a BOS the text's first token has no context
            lab[j, k + max(first, b if k else b + 1) - b : k + e - b] = 1
        sums, counts = sequence_nll(model, x, att, lab)
        total_nll += sums.sum().item()
        total_n += int(counts.sum())
    nll = total_nll / max(total_n, 1)
    metrics = {"ppl": math.exp(nll), "nll": nll}
    cfg = {"data": data, "max_tokens": max_tokens, "window": window, "stride": stride}
    return TaskResult("ppl", metrics, total_n, time.perf_counter() - t0, cfg)


# --------------------------------------------------------------------------- front door


def evaluate(model, tok, cfg: EvalConfig = EvalConfig(), progress: bool = True, echo: bool = False) -> dict[str, TaskResult]:
    """Run ``cfg.builtin_tasks`` in order with ``cfg``'s settings (``cfg.limit`` applies to gsm8k and nq);
    ``echo`` prints each task's summary line as it finishes."""
    runs = {
        "gsm8k": lambda: gsm8k(model, tok, cfg.gsm8k_data, cfg.limit, cfg.shots, cfg.gsm8k_max_new_tokens, cfg.batch_size, progress),
        "nq": lambda: nq(model, tok, cfg.nq_data, cfg.limit, cfg.nq_max_new_tokens, cfg.batch_size, progress),
        "ppl": lambda: perplexity(model, tok, cfg.ppl_data, cfg.ppl_tokens or None, cfg.ppl_window, cfg.ppl_stride, cfg.batch_size, progress),
    }
    results = {}
    for task in cfg.builtin_tasks:
        results[task] = runs[task]()
        if echo:
            print(results[task].summary(), flush=True)
    return results


def write_results(path: str | Path, results: dict[str, TaskResult], meta: dict | None = None, harness=None) -> Path:
    """Write ``{"meta": ..., "tasks": {task: TaskResult}}`` atomically (temp file, then rename).
    ``harness``: a :class:`qcorda.harness.HarnessResult`, written under ``harness`` (summary: ``harness``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta or {}, "summary": {t: r.summary() for t, r in results.items()}, "tasks": {t: r.to_json() for t, r in results.items()}}
    if harness is not None:
        doc["summary"]["harness"] = harness.summary()
        doc["harness"] = harness.to_json()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
