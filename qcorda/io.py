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
from typing import Callable, Iterator


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
    state_dict = {k: v.detach().contiguous().cpu() for k, v in _dedupe_tied(state_dict).items()}
    return write_shards(directory, state_dict, lambda keys: {k: state_dict[k] for k in keys}, config, generation_config, max_shard_size)


def write_shards(
    directory: str | os.PathLike,
    specs: dict,
    fetch: Callable[[list[str]], dict],
    config=None,
    generation_config=None,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """Write a checkpoint whose tensors are fetched one shard at a time.

    ``specs``: key → a tensor with the final shape and dtype (``meta`` tensors are fine),
    in the order ``save_pretrained`` would list them; ``fetch(keys)`` returns the real
    CPU tensors of one shard. Peak memory is one shard, whatever the model size.
    """
    import json

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    directory = Path(directory)
    split = split_torch_state_dict_into_shards(specs, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        tensors = fetch(list(keys))
        save_file({k: tensors[k].contiguous() for k in keys}, str(directory / filename), metadata={"format": "pt"})
        del tensors
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        config.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    return list(split.filename_to_tensors)


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

    def get(self, key: str):
        name = self._where[key]
        f = self._file(name)
        try:
            return f.get_tensor(key)
        except Exception as e:
            raise self._corrupt(name, e) from e
