"""Atomic output directories and safe tensor files.

Every command writes into a temporary directory beside the target and renames it
into place only when complete, so a failure (disk full, Ctrl-C, a bug) never leaves
a partial artifact under the target name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import torch


class OutputExistsError(FileExistsError):
    pass


def check_out_dir(out: str | os.PathLike, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse an existing output directory unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{flag} {out} already exists; choose another path or pass --overwrite to replace it"
        )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{flag} {out} exists and is not a directory; remove it or choose another path")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; move it to ``out`` on success.

    On any exception the temporary directory is removed and ``out`` is untouched.
    """
    out = check_out_dir(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any mkdir
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dedupe_tied(state_dict: dict) -> dict:
    """Drop later keys that alias an earlier tensor (tied embeddings); safetensors refuses aliases
    and ``from_pretrained`` re-ties them from the config."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in state_dict.items():
        key = (v.device.type, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        out[k] = v
    return out


def write_checkpoint(
    directory: str | os.PathLike,
    state_dict: dict,
    config=None,
    generation_config=None,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """Write ``state_dict`` as (sharded) safetensors, HF layout, into an existing directory.

    Returns the shard file names. Shards above ``max_shard_size`` get a
    ``model.safetensors.index.json`` as ``save_pretrained`` writes it.
    """
    state_dict = {k: v.detach() for k, v in _dedupe_tied(state_dict).items()}
    return write_shards(directory, state_dict, state_dict.__getitem__, config, generation_config, max_shard_size)


def write_shards(
    directory: str | os.PathLike,
    specs: dict,
    produce: Callable[[str], "torch.Tensor | Iterable[torch.Tensor]"],
    config=None,
    generation_config=None,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """Write a checkpoint whose tensors are produced one at a time, in pieces.

    ``specs``: key → a tensor with the final shape and dtype (``meta`` tensors are fine),
    in the order ``save_pretrained`` would list them; ``produce(key)`` returns that tensor,
    or an iterator over consecutive row blocks of it (see :func:`write_safetensors`).
    Peak memory is one piece, whatever the model and shard size.
    """
    import json

    from huggingface_hub import split_torch_state_dict_into_shards

    directory = Path(directory)
    split = split_torch_state_dict_into_shards(specs, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        write_safetensors(directory / filename, {k: specs[k] for k in keys}, produce, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        config.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    return list(split.filename_to_tensors)


def _dtype_names() -> dict:
    import torch

    return {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }


def _safetensors_dtype(dtype) -> str:
    names = _dtype_names()
    if dtype not in names:
        raise TypeError(f"safetensors has no dtype for {dtype}")
    return names[dtype]


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name (``F32``, ``BF16``, ...)."""
    by_name = {v: k for k, v in _dtype_names().items()}
    if name not in by_name:
        raise TypeError(f"no torch dtype for the safetensors dtype {name}")
    return by_name[name]


def write_safetensors(
    path: str | os.PathLike,
    specs: dict,
    produce: Callable[[str], "torch.Tensor | Iterable[torch.Tensor]"],
    metadata: dict[str, str] | None = None,
) -> Path:
    """A safetensors file written tensor by tensor, piece by piece.

    ``safetensors.torch.save_file`` needs every tensor of a file in memory at once (for a
    70B model's 5 GB shards, or Gemma's 262k-row embedding, that sets the peak). The format
    is a little-endian u64 header length, a JSON header (key → dtype, shape, byte range;
    padded with spaces to 8 bytes, as safetensors writes it) and the raw bytes in header order,
    so the header can be written from ``specs`` (shape and dtype only, ``meta`` is fine)
    before any data exists. ``produce(key)`` returns the tensor or an iterator over consecutive
    row blocks of it in ``specs[key]``'s dtype; a piece of another dtype or a total of another
    size raises, so a wrong producer never leaves a file that reads back as something else.
    Files are read back by ``safetensors`` itself.
    """
    import json
    import struct

    import torch

    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    sizes = {}
    for key, spec in specs.items():
        sizes[key] = spec.numel() * spec.element_size()
        header[key] = {"dtype": _safetensors_dtype(spec.dtype), "shape": list(spec.shape), "data_offsets": [offset, offset + sizes[key]]}
        offset += sizes[key]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, spec in specs.items():
            got = produce(key)
            written = 0
            for piece in (got,) if isinstance(got, torch.Tensor) else got:
                if piece.dtype != spec.dtype:
                    raise ValueError(f"{path.name}: {key} was produced as {piece.dtype}, its header says {spec.dtype}")
                data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                written += data.nbytes
                del data, piece
            if written != sizes[key]:
                raise ValueError(f"{path.name}: {key} was produced as {written} bytes, its header says {sizes[key]} ({tuple(spec.shape)})")
    return path


def replace_atomic(path: str | os.PathLike, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` for a temporary name beside ``path``, then rename it into place:
    a reader (or a resumed run) sees either the whole file or none, whatever fails in between."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_tensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """``safetensors.save_file`` through :func:`replace_atomic`, fsynced before the rename."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return replace_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fsync=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` through :func:`replace_atomic`."""
    return replace_atomic(path, lambda tmp: tmp.write_text(text))


def check_inside(path: str | os.PathLike, root: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` resolved, refused unless it lies under ``root`` (no ``..`` or symlink escapes)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if p != r and r not in p.parents:
        raise OutputExistsError(f"{flag}: refusing to write {path} outside {root}")
    return p


class CheckpointReader:
    """The tensors of a safetensors checkpoint directory (one file or sharded with an index),
    read one at a time through memory maps, so a caller holds one layer, never the model.

    ``stem`` is ``model`` for HF models and ``adapter_model`` for PEFT adapters.
    """

    def __init__(self, directory: str | os.PathLike, stem: str = "model", flag: str = "PATH"):
        import json

        from safetensors import safe_open

        self.directory, self.flag = Path(directory), flag
        index = self.directory / f"{stem}.safetensors.index.json"
        single = self.directory / f"{stem}.safetensors"
        self._open = safe_open
        self._files: dict[str, object] = {}
        if index.exists():
            try:
                self._where: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise self._corrupt(index.name, e) from e
        elif single.exists():
            self._where = {k: single.name for k in self._file(single.name).keys()}
        else:
            raise FileNotFoundError(f"{flag} {directory}: no {stem}.safetensors (or its index) there")

    def _corrupt(self, name: str, e: Exception):
        from .config import ConfigError

        return ConfigError(
            f"{self.flag} {self.directory}: {name} is not a valid safetensors file ({type(e).__name__}: {e}); "
            "it is corrupted or truncated: write or copy it again"
        )

    def _file(self, name: str):
        if name not in self._files:
            try:
                self._files[name] = self._open(str(self.directory / name), framework="pt")
            except Exception as e:  # safetensors raises its own error types (header, size, I/O)
                raise self._corrupt(name, e) from e
        return self._files[name]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def spec(self, key: str) -> tuple[tuple[int, ...], "torch.dtype"]:
        """Shape and dtype of ``key``, from the file header alone."""
        name = self._where[key]
        f = self._file(name)
        try:
            s = f.get_slice(key)
            return tuple(s.get_shape()), torch_dtype(s.get_dtype())
        except Exception as e:
            raise self._corrupt(name, e) from e

    def get(self, key: str):
        # A fresh handle per tensor: the pages a long-lived memory map has touched stay resident
        # (counted in RSS) until it closes, so a walk over every tensor would end holding the file.
        name = self._where[key]
        self._file(name)  # validates the file once
        try:
            with self._open(str(self.directory / name), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as e:
            raise self._corrupt(name, e) from e
