"""The wheels the GPU machine lacks, in ``.whl/``, and the one command that runs the GPU check there (issue 24).

    python -m eval.gpu_bundle            # fill .whl/ (cp312, manylinux x86_64), check the sizes, print the command
    python -m eval.gpu_bundle --local    # also .whl-local/: the same releases for this machine's Python, where they differ

The lent machine (``/work/.library/device/KINDS.md``) runs CPython 3.12 on x86-64 Linux, reaches no package registry,
and carries at most 64 MiB of working tree, extra wheels included. Its image holds torch, transformers 5.17,
accelerate 1.15, peft and the rest of :data:`DEVICE_IMAGE`, but not bitsandbytes, trl or datasets. This script
downloads those (the releases this tree is tested with: the versions installed here), plus every dependency of
theirs that the image lacks (:data:`BUNDLE`), checks that each requirement of each bundled wheel is met by the
bundle or the image (else it names what is missing), checks that the working tree plus ``.whl/`` is at most
:data:`LIMIT_MIB`, and prints the command to run there. It imports no torch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
LOCAL_WHEELS = ROOT / ".whl-local"
MIB = 1024**2
#: The device carries 64 MiB of working tree; 4 MiB stay free for the results and for the tree's growth.
LIMIT_MIB = 60
#: The device's Python (KINDS.md: "python3 is Python 3.12.3").
DEVICE_PYTHON = "3.12"
#: pip matches a manylinux tag exactly: the tags a glibc-2.28+ x86-64 machine accepts, newest first.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
#: What the bundle carries. fsspec is in the image, but datasets pins ``fsspec<=2026.9.0`` and the image's release is
#: unknown: carried, it shadows the image's (PYTHONPATH comes first), 0.2 MiB.
BUNDLE = ("bitsandbytes", "trl", "datasets", "dill", "multiprocess", "fsspec")
#: The Python packages of the device image, as KINDS.md lists them (read 2026-11-17), normalized.
DEVICE_IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
#: Where the check installs the bundle on the device, and its output folder there (the device tool's ``$OUT``).
SITE = "/tmp/site"


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pinned() -> dict[str, str]:
    """``{package: version}`` of :data:`BUNDLE`, the releases installed here (the ones the tests ran with)."""
    try:
        return {p: importlib.metadata.version(p) for p in BUNDLE}
    except importlib.metadata.PackageNotFoundError as e:
        raise SystemExit(f"gpu_bundle: {e.name} is not installed here; install qcorda's dependencies first "
                         "(pip install -e .) so that the bundle carries the tested releases") from e


def download(dest: Path, pins: dict[str, str], python: str, platforms=PLATFORMS) -> None:
    """``pip download`` of the pinned releases for ``python`` into ``dest`` (binary wheels only, no dependencies)."""
    dest.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", *(a for p in platforms for a in ("--platform", p)), "-d", str(dest),
           *(f"{p}=={v}" for p, v in pins.items())]
    subprocess.run(cmd, check=True)


def wheels_of(dest: Path) -> dict[str, Path]:
    """``{normalized name: wheel}`` in ``dest``; two releases of one package would stop the install there."""
    out: dict[str, Path] = {}
    for w in sorted(dest.glob("*.whl")):
        name = normalize(w.name.split("-")[0])
        if name in out:
            raise SystemExit(f"gpu_bundle: {dest.name}/ holds two wheels of {name} ({out[name].name}, {w.name}); "
                             f"delete {dest.name}/ and run again")
        out[name] = w
    return out


def requirements(wheel: Path) -> list[str]:
    """The wheel's ``Requires-Dist`` that apply on the device (Linux, CPython 3.12, no extras)."""
    from packaging.requirements import Requirement

    env = {"python_version": DEVICE_PYTHON, "python_full_version": DEVICE_PYTHON + ".3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [normalize(r.name) for r in reqs if r.marker is None or r.marker.evaluate(env)]


def unmet(wheels: dict[str, Path]) -> dict[str, list[str]]:
    """``{wheel: requirements neither bundled nor in the image}``: empty when the bundle is complete."""
    have = set(wheels) | DEVICE_IMAGE
    missing = {w.name: [r for r in requirements(w) if r not in have] for w in wheels.values()}
    return {k: v for k, v in missing.items() if v}


def tree_bytes() -> int:
    """What the device tool sends: tracked files and untracked files git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())


def device_command(out: str = "$OUT") -> str:
    """The one command to run in the repository root on the device: the bundle installed offline into :data:`SITE`,
    the tree on ``PYTHONPATH`` (no ``pip install -e .``: its build isolation needs the network), the check's results
    and log into ``out``."""
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target {SITE} .whl/*.whl || exit; "
            f"export PYTHONPATH={SITE}:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1; set -o pipefail; "
            f"python3 -m eval.gpu_check --out {out}/gpu_check.md 2>&1 | tee {out}/gpu_check.log")


def local_wheels(pins: dict[str, str], wheels: dict[str, Path]) -> Path:
    """``.whl-local/``: the bundle's releases for this machine's Python, for the simulated device. A wheel of
    ``.whl/`` that this interpreter accepts is linked, not downloaded twice."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    here = set(sys_tags())
    LOCAL_WHEELS.mkdir(exist_ok=True)
    fetch = {}
    for name, w in wheels.items():
        if here & set(parse_wheel_filename(w.name)[3]):
            target = LOCAL_WHEELS / w.name
            if not target.exists():
                target.symlink_to(w)
        else:
            fetch[name] = pins[next(p for p in pins if normalize(p) == name)]
    if fetch:
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        download(LOCAL_WHEELS, fetch, py)
    wheels_of(LOCAL_WHEELS)  # one release each
    return LOCAL_WHEELS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--local", action="store_true", help="also fill .whl-local/ for this machine's Python (the simulated device)")
    ap.add_argument("--no-download", action="store_true", help="check and print only: .whl/ is already filled")
    args = ap.parse_args(argv)
    pins = pinned()
    if not args.no_download:
        download(WHEELS, pins, DEVICE_PYTHON)
    wheels = wheels_of(WHEELS)
    absent = [p for p in pins if normalize(p) not in wheels]
    if absent:
        raise SystemExit(f"gpu_bundle: .whl/ lacks {', '.join(absent)}; run without --no-download")
    stale = [w.name for n, w in wheels.items() if normalize(n) not in {normalize(p) for p in pins}
             or f"-{pins[next(p for p in pins if normalize(p) == n)]}-" not in w.name]
    if stale:
        raise SystemExit(f"gpu_bundle: .whl/ holds wheels outside the pinned bundle: {', '.join(stale)}; delete .whl/ and run again")
    missing = unmet(wheels)
    if missing:
        raise SystemExit("gpu_bundle: requirements neither bundled nor in the device image: "
                         + "; ".join(f"{w}: {', '.join(r)}" for w, r in missing.items()) + ". Add them to BUNDLE.")
    bundle = sum(w.stat().st_size for w in wheels.values())
    tree = tree_bytes()
    total = (bundle + tree) / MIB
    for name, w in sorted(wheels.items()):
        print(f"  {w.name:70s} {w.stat().st_size / MIB:6.2f} MiB")
    print(f"bundle {bundle / MIB:.1f} MiB + working tree {tree / MIB:.1f} MiB = {total:.1f} MiB (limit {LIMIT_MIB} MiB; the device carries 64)")
    if total > LIMIT_MIB:
        raise SystemExit(f"gpu_bundle: {total:.1f} MiB is over the {LIMIT_MIB} MiB limit")
    if args.local:
        print(f"local wheels (Python {sys.version_info.major}.{sys.version_info.minor}): {local_wheels(pins, wheels)}")
    print("\nOn the GPU machine (device tool: run with carry=[\".whl\"], timeout_s=420), in the repository root:\n")
    print(device_command())
    return 0


if __name__ == "__main__":
    sys.exit(main())
