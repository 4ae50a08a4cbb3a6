"""eval/gpu_check.py's dry run, so that the GPU check cannot rot between GPU runs: every part runs at toy size on
the CPU, the markdown and JSON results hold each part's status and time, and a part that raises is recorded while
the next one still runs. Slow: about 1.5 minutes on 2 CPU cores, and the synthetic checkpoint borrows Gemma-3-270M's
tokenizer files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["prepare", "compare", "train", "merge_eval", "decompose", "synthetic"]


def _dry_run(tmp_path, out, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, str(ROOT / "eval" / "gpu_check.py"), "--dry-run", "--out", str(out), "--workdir", str(tmp_path), *args],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.with_suffix(".json").read_text()), out.read_text()


def test_dry_run_runs_every_part_and_records_it(tmp_path):
    doc, md = _dry_run(tmp_path, tmp_path / "check.md")
    assert doc["dry_run"] and doc["finished"]
    assert [p["part"] for p in doc["parts"]] == PARTS
    for p in doc["parts"]:
        failed = [c for c in p.get("result", {}).get("checks", []) if c["pass"] is False]
        assert p["status"] == "ok", (p["part"], p.get("error"), p.get("traceback"), failed)
        assert p["seconds"] > 0 and p["result"]["tables"]
    assert doc["environment"]["versions"]["torch"] and doc["environment"]["versions"]["bitsandbytes"]
    assert "dry run: toy sizes, not GPU figures" in md
    for i, (name, part) in enumerate(zip(PARTS, doc["parts"], strict=True), 1):
        assert f"## {i}. {name}: ok ({part['seconds']:.1f} s)" in md
    prepared = doc["parts"][0]["result"]["figures"]
    assert len(prepared) == 12 and all("error" not in f for f in prepared.values())
    assert all(c["pass"] is not False for p in doc["parts"] for c in p["result"]["checks"])


def test_a_failing_part_is_recorded_and_the_next_one_still_runs(tmp_path):
    doc, md = _dry_run(tmp_path, tmp_path / "fail.md", "--parts", "compare,decompose", "--inject-failure", "compare")
    compare, decompose = doc["parts"]
    assert compare["status"] == "error" and "injected" in compare["error"]
    assert "Traceback" in compare["traceback"] and compare["seconds"] >= 0
    assert decompose["status"] == "ok" and decompose["result"]["figures"]["rows"]
    assert "## 1. compare: error" in md and "RuntimeError: failure injected" in md and "## 2. decompose: ok" in md
