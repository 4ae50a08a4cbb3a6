"""Measuring: peak and current RSS, wall time, and the machine a figure was taken on."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: ``VmHWM``. (``ru_maxrss`` survives ``exec`` on Linux,
    so a child started by a process that once held more would report its parent's peak; it is the
    fallback where ``/proc`` is missing.)"""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024  # Linux: KiB


def rss_mb() -> float:
    """This process's resident memory now, in MiB (``VmRSS``; 0.0 where ``/proc`` is missing)."""
    return (_status_kib("VmRSS") or 0) / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux), so that what was
    loaded before does not count in the next :func:`peak_rss_mb`. False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], T], device: str = "cpu") -> tuple[T, float]:
    """``(fn(), seconds)``. On CUDA the device is synchronized before and after: kernels run asynchronously."""
    sync = lambda: None  # noqa: E731
    if str(device).startswith("cuda"):
        import torch

        sync = torch.cuda.synchronize
    sync()
    t = time.perf_counter()
    value = fn()
    sync()
    return value, time.perf_counter() - t


def environment() -> dict:
    """The machine and software a figure was measured on, for a results JSON: CPU, cores, RAM, GPU, torch
    and its threads, the fp32 matmul precision, ``OMP_NUM_THREADS``, the load average and the UTC time."""
    import torch

    from qcorda.decompose import matmul_precision

    try:
        load = list(os.getloadavg())
    except OSError:
        load = [float("nan")] * 3
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "matmul_precision": matmul_precision(),  # torch's getter raises once the newer per-backend API was used
        "load": load,
        "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def machine(env: dict | None = None) -> str:
    """:func:`environment` (or ``env``) as one line for a results markdown."""
    e = env or environment()
    load = "/".join(f"{x:.2f}" for x in e["load"])
    return (f"{e['cpu']}, {e['cores']} CPU cores, {e['ram_gib']:.0f} GiB RAM, {e['gpu'] or 'no CUDA'}; "
            f"torch {e['torch']} ({e['threads']} threads); load average {load} at {e['utc']}")
