"""Text data: bundled samples, local files, dataset names, and the prompt template.

Calibration and training share :func:`format_record`, so the covariance describes
the text the layers will see during fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .config import ConfigError

DATA_DIR = Path(__file__).parent / "data"

#: Bundled samples, usable wherever a data path is accepted.
BUNDLED = {
    "gsm8k-train": DATA_DIR / "gsm8k_train.jsonl",
    "gsm8k-test": DATA_DIR / "gsm8k_test.jsonl",
    "nq-open": DATA_DIR / "nq_open_dev.jsonl",
    "wikitext2": DATA_DIR / "wikitext2_test.txt",
}

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)


@dataclass(frozen=True)
class Example:
    """One record as text: ``prompt`` (no loss in training) and ``completion``."""

    prompt: str
    completion: str = ""

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def load_records(source: str, split: str = "train", flag: str = "--calib-data") -> list[dict]:
    """Records from a bundled alias, a local .jsonl/.json/.csv/.parquet/.txt file, or a dataset name.

    A .txt file gives one record ``{"text": ...}`` per paragraph (blank-line separated).
    """
    path = BUNDLED.get(source, Path(source))
    if path.exists():
        return _read_file(path, flag)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet", ".txt"):
        raise ConfigError(
            f"{flag} {source}: no such file; give an existing path, a dataset name, or one of {', '.join(BUNDLED)}"
        )
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # the hub is unreachable, or the name is wrong
        raise ConfigError(
            f"{flag} {source}: not a local file and the dataset could not be loaded ({type(e).__name__}: {e}); "
            f"give an existing path or one of {', '.join(BUNDLED)}"
        ) from e
    return [dict(r) for r in ds]


def _read_file(path: Path, flag: str) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif suffix == ".json":
            data = json.loads(path.read_text())
            records = data if isinstance(data, list) else data.get("data", data.get("rows"))
        elif suffix == ".txt":
            text = path.read_text().replace("\n \n", "\n\n")  # wikitext separates with " " lines
            records = [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
        elif suffix in (".csv", ".parquet"):
            import pandas as pd

            frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
            records = frame.to_dict("records")
        else:
            raise ConfigError(f"{flag} {path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .parquet or .txt")
    except (ValueError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{flag} {path}: could not be read ({e})") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{flag} {path}: expected a list of records (objects)")
    if not records:
        raise ConfigError(f"{flag} {path}: the file holds no records; give a non-empty file")
    return records


def resolve_fields(records: Sequence[dict], fields: Sequence[str], flag: str = "--calib-fields") -> tuple[str, ...]:
    """Check that every record has ``fields``; default to ``text`` or the only string field."""
    first = records[0]
    if not fields:
        if "text" in first:
            return ("text",)
        strings = [k for k, v in first.items() if isinstance(v, str)]
        if len(strings) == 1:
            return (strings[0],)
        raise ConfigError(f"{flag} is required: the records have fields {sorted(first)}; name one or more, e.g. {flag} question,answer")
    for i, r in enumerate(records):
        missing = [f for f in fields if f not in r]
        if missing:
            raise ConfigError(
                f"{flag}: record {i} has no field {', '.join(missing)} (it has {', '.join(sorted(r))}); fix the field names"
            )
    return tuple(fields)


def _as_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else ""
    return "" if value is None else str(value)


def format_record(record: dict, fields: Sequence[str], template: str = "alpaca", tokenizer=None) -> Example:
    """Join ``fields`` of ``record`` into prompt and completion.

    With two or more fields the last is the response and the others the instruction.
    With one field the record is an instruction alone (``alpaca``/``chat``) or plain text.
    - ``alpaca``: the Stanford Alpaca prompt ("### Instruction: ... ### Response:").
    - ``chat``: the tokenizer's chat template, user turn then assistant turn.
    - ``plain``: fields joined by blank lines.
    """
    parts = [_as_text(record[f]) for f in fields]
    instruction = "\n\n".join(parts[:-1]) if len(parts) > 1 else parts[0]
    response = parts[-1] if len(parts) > 1 else ""
    if template == "plain":
        if len(parts) == 1:
            return Example(parts[0])
        return Example(instruction + "\n\n", response)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--template chat needs a tokenizer with a chat template; use --template alpaca")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
        return Example(prompt, response)
    return Example(f"{ALPACA_HEADER}### Instruction:\n{instruction}\n\n### Response:\n", response)


def load_examples(
    source: str,
    fields: Sequence[str] = (),
    template: str = "alpaca",
    limit: int | None = None,
    tokenizer=None,
    split: str = "train",
    flag: str = "--calib-data",
    fields_flag: str = "--calib-fields",
) -> list[Example]:
    """The first ``limit`` records of ``source`` formatted by ``template``."""
    records = load_records(source, split, flag)
    if limit is not None:
        records = records[:limit]
    fields = resolve_fields(records, fields, fields_flag)
    if len(fields) == 1 and template == "alpaca" and fields[0] == "text":
        template = "plain"  # raw text (wikitext) is not an instruction
    return [format_record(r, fields, template, tokenizer) for r in records]


def examples_hash(examples: Iterable[Example]) -> str:
    """sha256 of the exact texts, for cache manifests."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.prompt.encode())
        h.update(b"\x00")
        h.update(ex.completion.encode())
        h.update(b"\x01")
    return h.hexdigest()


def token_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
                  heldout_every: int | None = None) -> Iterator[dict]:
    """Right-padded batches ``{"input_ids", "attention_mask"}`` of ``(batch, seq)`` tensors.

    The padding side is set on every call: tokenizers differ (Gemma's pads on the left), and
    the scoring code counts positions from the left. ``heldout_every`` k: records i with
    i % k == k − 1 are marked held out (``"heldout"``, ``(batch,)`` bool)."""
    import torch

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length, padding_side="right")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if heldout_every:
            batch["heldout"] = torch.tensor([(i + j) % heldout_every == heldout_every - 1 for j in range(len(chunk))])
        yield batch


def calibration_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
                        heldout_every: int | None = None) -> tuple[Iterator[dict], int]:
    """:func:`token_batches` without the all-padding ones (they carry no activations; a collector
    reports data that is padding throughout), and the number of batches at most (progress bars)."""
    batches = (b for b in token_batches(tokenizer, texts, max_length, batch_size, heldout_every) if b["attention_mask"].any())
    return batches, -(-len(texts) // batch_size)
