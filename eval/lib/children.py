"""Child processes: each measured case runs in a fresh interpreter (clean peak RSS, nothing leaks
between cases) and hands its result back as one JSON line on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict:
    """The environment of a child: this one, with the repository importable (``qcorda`` and ``eval``),
    no tokenizer thread pool and no hub access; ``extra`` overrides."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **extra)


def run_child(module: str, *args: str, env: dict | None = None, tail: int = 4000, cwd: str | Path = REPO) -> dict:
    """Run ``python -m module *args`` from the repository root and return the JSON object of the last
    line it printed (:func:`emit`). Raises RuntimeError with the end of its stderr if it fails.
    ``cwd``: another directory to run from (``python -m`` puts it first on the path, before ``PYTHONPATH``,
    so a child that must import another copy of qcorda through ``env`` runs outside the repository)."""
    out = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                         env=env or child_env())
    if out.returncode:
        raise RuntimeError(f"python -m {module} {' '.join(map(str, args))} failed (exit {out.returncode}):\n{out.stderr[-tail:]}")
    lines = out.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"python -m {module} printed no result; stderr:\n{out.stderr[-tail:]}")
    return json.loads(lines[-1])


def emit(result: dict) -> None:
    """Print a child's result as the last line of stdout, for :func:`run_child`."""
    print(json.dumps(result, default=str), flush=True)
