"""Model directories compared tensor by tensor: the same weights written on two devices."""

from __future__ import annotations

from pathlib import Path


def prepared_tensors(directory: Path) -> dict:
    """``{name: tensor}`` of a model directory's shards (a prepared directory's model, not its adapter)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def equal_fraction(a: dict, b: dict, keys) -> tuple[float, int]:
    """``(fraction of equal bytes, values compared)`` of ``a[k]`` against ``b[k]`` over ``keys``."""
    import torch

    same = total = 0
    for k in keys:
        x, y = a[k].contiguous().view(-1).view(torch.uint8), b[k].contiguous().view(-1).view(torch.uint8)
        same += int((x == y).sum())
        total += x.numel()
    return (same / total if total else float("nan")), total
