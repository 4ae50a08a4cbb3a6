"""Safetensors files: the one reader and the one writer of every tensor qcorda reads or writes.

:class:`Checkpoint` reads a model or adapter directory in the HF layout (``STEM.safetensors.index.json``
and its shards, else ``STEM.safetensors``, else, for source models, every ``*.safetensors``) or a
single file (a covariance file, a finished layer of a streamed prepare). Every header is checked
when it opens, so a corrupted or truncated file is reported before any work starts, in one style
that names the flag. Tensors are read one at a time through a fresh handle each (a long-lived
memory map keeps every page it touched resident), whole, by rows, or in row blocks. A tensor stored in
MXFP4 (GPT-OSS's released checkpoints: ``X_blocks`` and ``X_scales``) is read as ``X``, dequantized
exactly as transformers does (:data:`MXFP4`).

:func:`write_safetensors` writes a file tensor by tensor and piece by piece from shapes and dtypes
alone; :func:`write_shards` splits a checkpoint into HF shards with that writer,
:func:`save_tensors` writes a small file atomically, and :func:`write_adapter` a PEFT adapter directory. Files are read back by ``safetensors`` itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .config import ConfigError
from .experts import conversion_transforms, slices
from .io import replace_atomic

#: safetensors dtype names ↔ torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
#: How PEFT keys an adapter's tensors: ``base_model.model.<module>.lora_A.weight``.
ADAPTER_PREFIX = "base_model.model."
#: Row blocks of :meth:`Checkpoint.blocks`: a 262k-row embedding is never whole in memory.
BLOCK_BYTES = 64 << 20
#: MXFP4 on disk (GPT-OSS): ``X_blocks`` (uint8, ``(*lead, rows, G, 16)``: two 4-bit codes a byte) and ``X_scales``
#: (uint8 powers of two, ``(*lead, rows, G)``) hold ``X`` of shape ``(*lead, G·32, rows)``: the suffixes.
MXFP4 = ("_blocks", "_scales")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``F32``, ``BF16``, ...)."""
    if name not in DTYPES:
        raise TypeError(f"no torch dtype for the safetensors dtype {name}")
    return DTYPES[name]


def meta_tensor(shape, dtype: torch.dtype | str) -> torch.Tensor:
    """A weightless stand-in of ``shape`` and ``dtype`` (a writer's spec)."""
    return torch.empty(tuple(shape), dtype=torch_dtype(dtype) if isinstance(dtype, str) else dtype, device="meta")


# --------------------------------------------------------------------------- reading


def file_fingerprint(path: str | os.PathLike) -> str:
    """``size:sha256(header)[:16]`` of a safetensors file (names, dtypes, shapes, offsets): cheap,
    and it changes when the file does. The file is not validated."""
    path = Path(path)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return f"{path.stat().st_size}:{hashlib.sha256(fh.read(min(n, 1 << 30))).hexdigest()[:16]}"


class Checkpoint:
    """The tensors of a safetensors directory or file, read one at a time.

    ``stem``: ``model`` (HF models) or ``adapter_model`` (PEFT adapters). ``flag`` and ``hint``
    shape every error: ``{flag} {path}: {file} is not a valid safetensors file (...); {hint}``.
    """

    def __init__(self, path: str | os.PathLike, stem: str = "model", flag: str = "MODEL",
                 hint: str = "it is corrupted: fetch or save the model again"):
        self.path, self.flag, self.hint = Path(path), flag, hint
        self.files = self._files(stem)
        self._where: dict[str, Path] = {}
        self._specs: dict[str, tuple[tuple[int, ...], str]] = {}
        self._metadata: dict[Path, dict] = {}
        self._disk: dict[str, str] = {}  # a model view's key → the key in the file (identity when absent)
        self._slices: dict[str, tuple[str, int, bool]] = {}  # a model view's key → (fused key, expert, transposed)
        self.fused: dict[str, tuple[str, ...]] = {}
        self._mxfp4: dict[str, tuple[tuple[str, Path], tuple[str, Path]]] = {}  # X → ((X_blocks, file), (X_scales, file))
        for f in self.files:
            self._read_header(f)
        self._find_mxfp4()

    def _find_mxfp4(self) -> None:
        """Read every MXFP4 pair as the one tensor it stores (:data:`MXFP4`), bf16 as transformers dequantizes it."""
        b, sc = MXFP4
        for key in [k for k in self._specs if k.endswith(b)]:
            whole, scales = key[: -len(b)], key[: -len(b)] + sc
            (shape, dtype), (s_shape, s_dtype) = self._specs[key], self._specs.get(scales, ((), ""))
            if dtype != "U8" or s_dtype != "U8" or len(shape) < 3 or shape[-1] != 16 or tuple(shape[:-1]) != tuple(s_shape):
                continue
            *lead, rows, groups, _ = shape
            self._mxfp4[whole] = ((key, self._where.pop(key)), (scales, self._where.pop(scales)))
            del self._specs[key], self._specs[scales]
            out = (groups * 32, rows) if lead else (rows, groups * 32)  # transformers transposes the last two of a stack
            self._specs[whole], self._where[whole] = ((*lead, *out), "BF16"), self._mxfp4[whole][0][1]

    def _files(self, stem: str) -> list[Path]:
        p = self.path
        if p.is_file():
            return [p]
        index, single = p / f"{stem}.safetensors.index.json", p / f"{stem}.safetensors"
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise self._error(index.name, e) from e
            return [p / n for n in names]
        if single.exists():
            return [single]
        others = sorted(p.glob("*.safetensors")) if stem == "model" and p.is_dir() else []
        if others:
            return others
        pickles = sorted(q.name for q in p.glob("*.bin")) + sorted(q.name for q in p.glob("*.pt*")) if p.is_dir() else []
        hint = f" (it has {', '.join(pickles[:2])}: pickle files, which qcorda never loads)" if pickles else ""
        raise ConfigError(
            f"{self.flag} {p}: no *.safetensors weights{hint}; convert the checkpoint to safetensors "
            "(model.save_pretrained(dir, safe_serialization=True)) and pass that directory"
        )

    def _error(self, name: str, e: Exception) -> ConfigError:
        return ConfigError(f"{self.flag} {self.path}: {name} is not a valid safetensors file ({type(e).__name__}: {e}); {self.hint}")

    def _read_header(self, f: Path) -> None:
        from safetensors import safe_open

        try:
            if f.stat().st_size < 8:
                raise ValueError("shorter than a header")
            with safe_open(str(f), framework="pt") as h:
                self._metadata[f] = dict(h.metadata() or {})
                for k in h.keys():
                    s = h.get_slice(k)
                    self._specs[k] = (tuple(s.get_shape()), s.get_dtype())
                    self._where[k] = f
        except Exception as e:  # safetensors raises its own error types (header, size, I/O)
            raise self._error(f.name, e) from e

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of ``key``, from the header alone."""
        shape, dtype = self._specs[key]
        return shape, torch_dtype(dtype)

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype name of ``key`` (``F32``, ``BF16``, ...)."""
        return self._specs[key][1]

    def metadata(self) -> dict:
        """The ``__metadata__`` of a single-file checkpoint (the first file of a directory)."""
        return self._metadata[self.files[0]]

    def fingerprint(self) -> dict[str, str]:
        """file name → :func:`file_fingerprint`."""
        return {f.name: file_fingerprint(f) for f in self.files}

    def model_view(self, model: torch.nn.Module) -> "Checkpoint":
        """This checkpoint keyed by ``model``'s state-dict names, the way transformers maps them when it
        loads the architecture (:func:`conversion_map`): GPT-NeoX's ``embed_out`` read as ``lm_head``,
        Mixtral's ``block_sparse_moe`` as ``mlp``. Keys that transformers fuses from several tensors
        (per-expert matrices into one 3-D parameter) are not readable keys; they are listed in
        ``fused`` (model key → on-disk keys), and their per-expert parts are readable under the names
        of an unfused model (:func:`qcorda.experts.unfuse`). For experts stored fused on disk (GPT-OSS),
        each expert's slice is readable under its unfused name (:func:`qcorda.experts.slices`)."""
        import copy

        renamed, fused = conversion_map(model, self.keys())
        view = copy.copy(self)
        view._where = {m: self._where[d] for m, d in renamed.items()}
        view._specs = {m: self._specs[d] for m, d in renamed.items()}
        view._disk = {m: d for m, d in renamed.items() if m != d}
        view._slices = {}
        for key, (whole, e, transposed) in slices(model).items():  # GPT-OSS: one expert of a fused tensor on disk
            if whole in renamed:
                shape, dtype = self._specs[renamed[whole]]
                view._where[key], view._slices[key] = self._where[renamed[whole]], (renamed[whole], e, transposed)
                view._specs[key] = (tuple(reversed(shape[1:])) if transposed else tuple(shape[1:]), dtype)
        view.fused = fused
        return view

    def _read(self, key: str, fn):
        from safetensors import safe_open

        f = self._where[key]
        try:  # a fresh handle per read: closing it unmaps the pages it touched
            with safe_open(str(f), framework="pt") as h:
                return fn(_Renamed(_Mxfp4(h, self._mxfp4) if self._mxfp4 else h, self._disk, self._slices))
        except Exception as e:
            raise ConfigError(f"{self.flag} {self.path}: tensor {key} cannot be read from {f.name} ({e}); {self.hint}") from e

    def get(self, key: str) -> torch.Tensor:
        return self._read(key, lambda h: h.get_tensor(key))

    def first_rows(self, key: str) -> torch.Tensor:
        """``tensor[:1]`` without the rest of the tensor (for fingerprints)."""
        return self._read(key, lambda h: h.get_slice(key)[:1] if self._specs[key][0] else h.get_tensor(key))

    def rows(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """``tensor[ids]`` for sorted unique row ``ids``, read run by run without the rest of the tensor."""
        ids = ids.tolist()

        def read(h):
            s, parts, start = h.get_slice(key), [], 0
            for j in range(1, len(ids) + 1):
                if j == len(ids) or ids[j] != ids[j - 1] + 1:  # the end of a run of consecutive rows
                    parts.append(s[ids[start] : ids[j - 1] + 1])
                    start = j
            return torch.cat(parts)

        return self._read(key, read)

    def blocks(self, key: str, dtype: torch.dtype | None = None, max_bytes: int = BLOCK_BYTES) -> Iterator[torch.Tensor]:
        """``tensor`` as consecutive row blocks of about ``max_bytes`` (in fp32) each, floats cast
        (through fp32) to ``dtype``."""
        shape, _ = self.spec(key)
        row = 4 * math.prod(shape[1:]) if shape else 0
        if not shape or shape[0] * row <= max_bytes:
            parts: Iterable[torch.Tensor] = [self.get(key)]
        else:
            step = max(1, max_bytes // max(row, 1))
            parts = (self._read(key, lambda h, a=a: h.get_slice(key)[a : a + step]) for a in range(0, shape[0], step))
        for t in parts:
            yield t.float().to(dtype) if dtype is not None and t.is_floating_point() else t


class _Mxfp4:
    """A safetensors handle that reads an MXFP4 pair (``X_blocks``, ``X_scales``) as ``X``, whole or by leading rows
    (a stack of experts read expert by expert), dequantized by transformers' own function."""

    def __init__(self, handle, pairs: dict[str, tuple[tuple[str, Path], tuple[str, Path]]]):
        self.handle, self.pairs = handle, pairs

    def _part(self, key: str, rows: slice | None) -> torch.Tensor:
        from safetensors import safe_open
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        parts = []
        for name, f in self.pairs[key]:  # blocks, then scales: each from its own shard
            with safe_open(str(f), framework="pt") as h:
                parts.append(h.get_tensor(name) if rows is None else h.get_slice(name)[rows])
        blocks, scales = parts
        if blocks.dim() == 3:  # a single matrix: no stack to transpose within
            return convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.bfloat16)[0].T.contiguous()
        return convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)

    def get_tensor(self, key: str):
        return self._part(key, None) if key in self.pairs else self.handle.get_tensor(key)

    def get_slice(self, key: str):
        if key not in self.pairs:
            return self.handle.get_slice(key)
        part = self._part

        class Rows:
            def __getitem__(self, rows: slice):
                return part(key, rows)

        return Rows()


class _Renamed:
    """A safetensors handle read by a model view's keys (an expert's slice of a fused tensor read alone)."""

    def __init__(self, handle, disk: dict[str, str], slices: dict[str, tuple[str, int, bool]]):
        self.handle, self.disk, self.slices = handle, disk, slices

    def get_tensor(self, key: str):
        if key in self.slices:
            whole, e, transposed = self.slices[key]
            t = self.handle.get_slice(whole)[e : e + 1][0]
            return t.T.contiguous() if transposed else t
        return self.handle.get_tensor(self.disk.get(key, key))

    def get_slice(self, key: str):
        return self.get_tensor(key) if key in self.slices else self.handle.get_slice(self.disk.get(key, key))


def conversion_map(model: torch.nn.Module, disk_keys: Iterable[str]) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """``(renamed, fused)``: the model key of every on-disk key, by transformers' own conversion mapping
    for ``model``'s architecture (``get_model_conversion_mapping`` + ``rename_source_key``, present in
    transformers 5.17 to 5.25), the one place qcorda maps checkpoint names.

    ``renamed``: model key → the one on-disk key it is read from (a rename or the same name).
    ``fused``: model key → the on-disk keys a ``WeightConverter`` combines into it (per-expert
    matrices stacked into a 3-D parameter). Each of those is also in ``renamed``, under its own name
    with the renamings alone applied (Mixtral's ``block_sparse_moe.experts.0.w1`` as
    ``mlp.experts.0.w1``): the name of its layer in a model unfused by :func:`qcorda.experts.unfuse`.
    Without these APIs every key maps to itself."""
    disk_keys = list(disk_keys)
    transforms = conversion_transforms(model)
    if transforms is None:  # a transformers without conversion mappings reads checkpoints by name
        return {k: k for k in disk_keys}, {}
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    renamed: dict[str, str] = {}
    fused: dict[str, list[str]] = {}
    for key in disk_keys:
        new, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if pattern is None:
            renamed[new] = key
        else:
            fused.setdefault(new, []).append(key)
            renamed[rename_source_key(key, renamings, [], prefix, meta)[0]] = key
    return renamed, {k: tuple(v) for k, v in fused.items()}


def disk_names(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """model key → the name a checkpoint of ``model``'s architecture stores it under: transformers' renamings
    for the architecture reversed, as its ``save_pretrained`` writes them (Mixtral's ``mlp`` as
    ``block_sparse_moe``; per-expert keys of an unfused model stay per-expert). Identity without these APIs."""
    keys = list(keys)
    transforms = conversion_transforms(model, add_legacy=False)
    if transforms is None:
        return {k: k for k in keys}
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    reverse = [t.reverse_transform() for t in transforms if isinstance(t, WeightRenaming)]
    meta, prefix = model.state_dict(), getattr(model, "base_model_prefix", None)
    return {k: rename_source_key(k, reverse, [], prefix, meta)[0] for k in keys}


# --------------------------------------------------------------------------- writing


def write_safetensors(
    path: str | os.PathLike,
    specs: dict[str, torch.Tensor],
    produce: Callable[[str], "torch.Tensor | Iterable[torch.Tensor]"],
    metadata: dict[str, str] | None = None,
) -> Path:
    """A safetensors file written tensor by tensor, piece by piece.

    ``safetensors.torch.save_file`` needs every tensor of a file in memory at once (for a 70B
    model's 5 GB shards, or Gemma's 262k-row embedding, that sets the peak). The format is a
    little-endian u64 header length, a JSON header (key → dtype, shape, byte range; padded with
    spaces to 8 bytes, as safetensors writes it) and the raw bytes in header order, so the header
    is written from ``specs`` (shape and dtype; ``meta`` tensors are fine) before any data exists.
    ``produce(key)`` returns the tensor or an iterator over consecutive row blocks of it in
    ``specs[key]``'s dtype; a piece of another dtype or a total of another size raises, so a wrong
    producer never leaves a file that reads back as something else.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    sizes = {}
    for key, spec in specs.items():
        if spec.dtype not in _NAMES:
            raise TypeError(f"safetensors has no dtype for {spec.dtype}")
        sizes[key] = spec.numel() * spec.element_size()
        header[key] = {"dtype": _NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + sizes[key]]}
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


def write_shards(
    directory: str | os.PathLike,
    specs: dict[str, torch.Tensor],
    produce: Callable[[str], "torch.Tensor | Iterable[torch.Tensor]"],
    config=None,
    generation_config=None,
    max_shard_size: int | str = "5GB",
    stem: str = "model",
) -> list[str]:
    """An HF checkpoint (``save_pretrained``'s shards and index) whose tensors are produced one at
    a time, in pieces: peak memory is one piece, whatever the model and shard size. ``specs``:
    key → tensor of the final shape and dtype, in the order the shards should list them."""
    from huggingface_hub import split_torch_state_dict_into_shards

    directory = Path(directory)
    pattern = f"{stem}{{suffix}}.safetensors"
    split = split_torch_state_dict_into_shards(specs, filename_pattern=pattern, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        write_safetensors(directory / filename, {k: specs[k] for k in keys}, produce, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        config.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    return list(split.filename_to_tensors)


def dedupe_tied(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later keys that alias an earlier tensor (tied embeddings): safetensors refuses aliases
    and ``from_pretrained`` re-ties them from the config."""
    seen: set[tuple] = set()
    out = {}
    for k, v in state_dict.items():
        key = (v.device.type, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = v.detach()
    return out


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None, fsync: bool = False) -> Path:
    """A small safetensors file written whole and renamed into place (:func:`qcorda.io.replace_atomic`)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    specs = {k: meta_tensor(v.shape, v.dtype) for k, v in tensors.items()}
    return replace_atomic(path, lambda tmp: write_safetensors(tmp, specs, tensors.__getitem__, metadata), fsync=fsync)


def write_adapter(directory: str | Path, lora_config, tensors: dict[str, torch.Tensor]) -> Path:
    """A PEFT adapter directory: ``adapter_config.json`` from ``lora_config`` (``target_modules`` and
    ``target_parameters`` sorted: PEFT keeps them in sets, whose order changes with Python's string hashing) and
    ``adapter_model.safetensors`` from ``tensors`` keyed as PEFT keys them (``target_parameters`` sorted too)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(directory))
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    for key in ("target_modules", "target_parameters"):
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    save_tensors(directory / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    return directory
