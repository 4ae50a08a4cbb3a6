"""The results store: ``eval/results/<stem>.json`` and ``<stem>.md``, written atomically, resumable."""

from __future__ import annotations

import json
from pathlib import Path

from qcorda.io import write_text_atomic

#: Where the committed results live.
RESULTS = Path(__file__).resolve().parents[1] / "results"


class Results:
    """A study's saved state under ``stem`` (a path without suffix, or a name under :data:`RESULTS`).

    ``key`` holds the arguments that change the numbers: :meth:`load` returns the saved document only
    when its key matches (a resumed run then skips what is done), else a fresh ``{"key": key}``.
    :meth:`save` rewrites the JSON and then the markdown, each through :func:`qcorda.io.write_text_atomic`,
    so a run cut at any point leaves the last complete pair.
    """

    def __init__(self, stem: str | Path, key: dict | None = None):
        stem = Path(stem)
        self.stem = stem if stem.parent != Path(".") else RESULTS / stem
        self.key = key

    @property
    def json_path(self) -> Path:
        return self.stem.with_suffix(".json")

    @property
    def md_path(self) -> Path:
        return self.stem.with_suffix(".md")

    def load(self) -> dict:
        """The saved document if its ``key`` equals this store's key (or no key was given), else ``{"key": key}``."""
        if self.json_path.exists():
            doc = json.loads(self.json_path.read_text())
            if self.key is None or doc.get("key") == self.key:
                return doc
        return {} if self.key is None else {"key": self.key}

    def save(self, doc: dict, markdown: str | None = None) -> None:
        """Write ``doc`` (with this store's key) as JSON, then ``markdown`` if given."""
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        if self.key is not None:
            doc = {**doc, "key": self.key}
        write_text_atomic(self.json_path, json.dumps(doc, indent=1, default=str) + "\n")
        if markdown is not None:
            write_text_atomic(self.md_path, markdown if markdown.endswith("\n") else markdown + "\n")
