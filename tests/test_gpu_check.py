"""eval/gpu_check.py, so that the GPU check cannot rot between GPU runs: the dry run runs every part at toy size on the
CPU; one deadline cuts a part that overruns (recorded, with what it measured) while the next parts still run; a failed
setup step skips only the parts that need it; a failing part is recorded and the next one runs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["prepare", "compare", "train", "merge_eval", "precision", "decompose", "synthetic", "families"]


def _run(tmp_path, name, *args):
    out = tmp_path / f"{name}.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "eval.gpu_check", "--dry-run", "--out", str(out), "--workdir", str(tmp_path), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.with_suffix(".json").read_text()), out.read_text(), time.perf_counter() - t0


@pytest.mark.slow
def test_dry_run_runs_every_part_and_records_it(tmp_path):
    # a budget no part reaches on a loaded machine: every part's code runs to its end (the default budget's run is
    # eval/results/gpu_check_dryrun.md)
    doc, md, _ = _run(tmp_path, "check", "--budget", "900")
    assert doc["dry_run"] and doc["finished"]
    assert [p["part"] for p in doc["parts"]] == PARTS
    assert all(s["status"] == "ok" for s in doc["setup"].values()), doc["setup"]
    for p in doc["parts"]:
        failed = [c for c in p["result"]["checks"] if c["pass"] is False]
        assert p["status"] == "ok", (p["part"], p.get("error"), p.get("traceback"), failed)
        assert p["seconds"] > 0 and p["result"]["tables"] and p["result"]["tables"][0]["rows"]
    env = doc["environment"]
    assert env["versions"]["torch"] and env["float32_matmul_precision"] in ("highest", "high", "medium")
    assert "dry run: toy sizes, not GPU figures" in md and "fp32 matmul precision" in md and "FSDP needs a machine" in md
    for i, (name, part) in enumerate(zip(PARTS, doc["parts"], strict=True), 1):
        assert f"## {i}. {name}: ok ({part['seconds']:.1f} s)" in md
    prepare = doc["parts"][0]["result"]["figures"]
    assert set(prepare["cpu"]) == {"qlora", "qpissa", "qcorda-ipm"} and not prepare["not_run"]  # subset: gpu_check's golden methods
    assert prepare["cpu"]["qlora"]["codes_equal"] == 1.0  # the same device here: every code byte-equal
    precision = doc["parts"][4]["result"]["figures"]["max_relative_difference"]
    assert set(precision) == {"qlora", "qpissa"}


@pytest.mark.slow
def test_a_part_overrunning_the_deadline_is_cut_and_recorded_while_the_others_run(tmp_path):
    # decompose measures its first shape, then hangs without checking the deadline: the alarm cuts it at its share
    # plus the grace period; synthetic then runs in the time left
    doc, md, wall = _run(tmp_path, "overrun", "--parts", "decompose,synthetic", "--inject-overrun", "decompose", "--budget", "40")
    decompose, synthetic = doc["parts"]
    assert decompose["status"] == "cut" and "interrupted" in decompose["error"]
    assert len(decompose["result"]["figures"]["rows"]) == 2  # the first shape's CorDA and PiSSA rows, kept
    assert decompose["result"]["tables"][0]["rows"] and len(decompose["result"]["figures"]["not_run"]) == 3
    assert decompose["share_seconds"] < decompose["seconds"] < decompose["share_seconds"] + 8 + 5
    assert synthetic["status"] == "ok", (synthetic.get("error"), synthetic.get("traceback"))
    assert doc["finished"] and doc["seconds"] <= 40 + 8 + 5
    assert "## 1. decompose: cut" in md and "## 2. synthetic: ok" in md


def test_a_spent_deadline_cuts_every_part_at_its_first_item(tmp_path):
    doc, md, wall = _run(tmp_path, "spent", "--parts", "decompose,synthetic", "--budget", "0")
    assert [p["status"] for p in doc["parts"]] == ["cut", "cut"]
    assert all("share of the deadline spent" in p["error"] for p in doc["parts"])
    assert doc["finished"] and doc["seconds"] < 30


def test_a_failed_setup_or_part_is_recorded_and_only_what_needs_it_is_skipped(tmp_path):
    # setup 'gemma' fails: prepare (which needs it) is skipped; decompose raises: recorded; synthetic still runs
    doc, md, _ = _run(tmp_path, "fail", "--parts", "prepare,decompose,synthetic", "--inject-failure", "gemma,decompose")
    prepare, decompose, synthetic = doc["parts"]
    assert doc["setup"]["gemma"]["status"] == "error" and "injected" in doc["setup"]["gemma"]["error"]
    assert prepare["status"] == "skipped" and "setup 'gemma' failed" in prepare["error"]
    assert decompose["status"] == "error" and "injected" in decompose["error"] and "Traceback" in decompose["traceback"]
    assert synthetic["status"] == "ok" and synthetic["result"]["figures"]["layers"] == 2
    assert doc["setup"]["llama"]["status"] == "ok" and doc["setup"]["libs"]["status"] == "ok"
    assert "## 1. prepare: skipped" in md and "## 2. decompose: error" in md and "RuntimeError: failure injected" in md
    assert "## 3. synthetic: ok" in md


def test_the_cpu_compare_baseline_is_the_newest_section_with_its_thread_count():
    from eval.gpu_check import cpu_compare_baseline

    text = ("# t\n\n## Measured after x: 15 min on one core (2026-11-29)\n\n| wall | 15:10 (compare's own timer: 898 s: a) |\n\n"
            "## Measured before x: 7 min on an idle 2-core machine\n\n| wall | 6:59 (compare's own timer: 411 s) |\n")
    seconds, source = cpu_compare_baseline(text)
    assert seconds == 898.0 and "one core" in source
    seconds, source = cpu_compare_baseline(text.split("## Measured after")[0] + "## Measured before" + text.split("## Measured before")[1])
    assert seconds == 411.0 and "2-core" in source
    with pytest.raises(ValueError, match="compare's own timer"):
        cpu_compare_baseline("## Measured on one core\n\nno timer\n")


def test_the_bundle_names_each_requirement_neither_bundled_nor_in_the_device_image(tmp_path):
    import zipfile

    from eval.gpu_bundle import device_command, unmet

    wheel = tmp_path / "foo-1.0-py3-none-any.whl"
    meta = "\n".join(["Metadata-Version: 2.1", "Name: foo", "Version: 1.0", "Requires-Dist: numpy>=1", "Requires-Dist: bar-baz>=2",
                      "Requires-Dist: not_in_image", "Requires-Dist: sphinx; extra == 'docs'",
                      "Requires-Dist: pywin32; sys_platform == 'win32'", "Requires-Dist: tomli; python_version < '3.11'"])
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("foo-1.0.dist-info/METADATA", meta)
    # numpy is in the image, bar-baz is bundled; extras and markers false on the device (Linux, CPython 3.12) do not count
    assert unmet({"foo": wheel, "bar-baz": wheel}) == {wheel.name: ["not-in-image"]}
    cmd = device_command()
    assert "--no-index --no-deps" in cmd and "--target /tmp/site" in cmd and "PYTHONPATH=/tmp/site:$PWD" in cmd
    assert "python3 -m eval.gpu_check --out $OUT/gpu_check.md" in cmd and "pip install -e" not in cmd


def test_the_environment_is_read_whatever_tf32_api_was_used():
    """transformers sets TF32 through torch's newer per-backend API (``tf32=True`` on torch >= 2.9), after which
    torch's legacy getter raises: the results' machine line and the GPU check's environment must still be written."""
    import torch

    from eval.gpu_check import Context, environment
    from eval.lib.measure import environment as machine_environment

    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        assert machine_environment()["matmul_precision"] == "cuda:tf32"
        ctx = Context(sizes={}, device="cpu", work=Path("/tmp"), toy=True, deadline=0.0)
        assert environment(ctx)["float32_matmul_precision"] == "cuda:tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
