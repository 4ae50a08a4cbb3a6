"""Input covariances C = XᵀX / n of the target layers on calibration text.

Forward pre-hooks read each target's input ``(batch, seq, in_features)``, drop the
padding positions with the attention mask, and accumulate XᵀX in fp32 (or fp64).
Batches may mark records as held out (``batch["heldout"]``, ``(batch,)`` bool, every
``HELDOUT_EVERY``-th record, for ``--iters auto``): their X_hᵀX_h is accumulated a second
time, apart, so that C_h and C_fit = (n·C − n_h·C_h)/(n − n_h) come out of one pass.
Layers that read the same tensor (q/k/v, gate/up) share one accumulator, found on
the first batch by tensor identity. Results are saved as safetensors with a manifest
(model, targets, samples, tokens, data hash) so they can be reused across ranks
and methods, and never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .checkpoint import Checkpoint, meta_tensor, write_safetensors
from .config import ConfigError
from .decompose import DecompositionError, full_fp32_matmul
from .experts import routed_rows

FORMAT = "qcorda.covariance/1"
#: Key prefixes in a covariance file (and in a spilled block): C over every record, C_h over the held-out ones.
COV, HELD = "cov.", "held."
NO_TOKENS = "the calibration data tokenizes to nothing (every position is padding); check --calib-data and --calib-fields"
NO_HELDOUT = ("the held-out calibration records (every 8th) hold no tokens; --iters auto needs at least 8 calibration "
              "records (--calib-samples)")


@dataclass(frozen=True)
class Covariances:
    """Per-group covariance matrices and the map from target layer to group."""

    matrices: Mapping[str, torch.Tensor]
    """group name (its first member) → C ``(in_features, in_features)`` = XᵀX / n_tokens (a dict,
    or :class:`OnDisk` when the matrices stay in files until asked for)."""
    members: dict[str, str]
    """target name → group name."""
    n_tokens: int
    """Non-padding tokens accumulated."""
    manifest: dict = field(default_factory=dict)
    """model, targets, n_samples, max_length, data_hash, dtype: what this was built from."""
    heldout: Mapping[str, torch.Tensor] | None = None
    """group → C_h = X_hᵀX_h / n_h over the held-out records alone (``manifest["heldout_every"]``),
    when they were marked; else None."""
    n_heldout: int = 0
    """Non-padding tokens of the held-out records (included in ``n_tokens``)."""
    routed: dict[str, int] = field(default_factory=dict)
    """group → its tokens, for the groups that saw fewer than ``n_tokens`` (experts: the tokens their
    router sent them). Their C is still XᵀX / n_tokens: a scale common to every group."""

    def tokens_of(self, target: str) -> int:
        """The calibration tokens ``target``'s covariance holds (``n_tokens`` unless it is an expert's)."""
        return self.routed.get(self.members[target], self.n_tokens)

    def of(self, target: str) -> torch.Tensor:
        """C over every calibration record ``(in_features, in_features)``."""
        return self.matrices[self.members[target]]

    def heldout_of(self, target: str) -> torch.Tensor:
        """C_h over the held-out records."""
        if self.heldout is None:
            raise ConfigError(
                "the covariances have no held-out part (--iters auto needs one); recompute them with --iters auto "
                "instead of reusing --covariance"
            )
        return self.heldout[self.members[target]]

    def fit_of(self, target: str) -> torch.Tensor:
        """C_fit over the records that are not held out: (n·C − n_h·C_h) / (n − n_h)."""
        n, nh = self.n_tokens, self.n_heldout
        return (self.of(target).double() * n - self.heldout_of(target).double() * nh).div_(n - nh).float()

    def save(self, path: str | Path) -> None:
        """Write every matrix to one safetensors file, one matrix in memory at a time."""
        meta = {"format": FORMAT, "members": self.members, "n_tokens": self.n_tokens, "manifest": self.manifest,
                "n_heldout": self.n_heldout, **({"routed": self.routed} if self.routed else {})}
        parts = {COV: self.matrices, **({HELD: self.heldout} if self.heldout is not None else {})}
        specs = {}
        for prefix, mats in parts.items():
            for g in mats:
                n = mats.shape_of(g)[0] if isinstance(mats, OnDisk) else mats[g].shape[0]
                specs[prefix + g] = meta_tensor((n, n), torch.float32)

        def produce(key: str) -> torch.Tensor:
            prefix = HELD if key.startswith(HELD) else COV
            return parts[prefix][key[len(prefix):]].float().contiguous().cpu()

        write_safetensors(path, specs, produce, metadata={"qcorda": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, expect: dict | None = None, flag: str = "--covariance", lazy: bool = False) -> "Covariances":
        """Load from safetensors; ``expect`` keys must equal the manifest's (else a clear error).

        ``lazy``: leave the matrices on disk and read each when it is asked for (:class:`OnDisk`),
        so that a caller going layer by layer holds one covariance, not all of them.
        """
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{flag} {path}: no such file")
        try:
            ckpt = Checkpoint(path, flag=flag, hint="delete it and recompute")
            meta = json.loads(ckpt.metadata().get("qcorda", "{}"))
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{flag} {path}: not a readable safetensors covariance file ({e}); delete it and recompute") from e
        parts: dict[str, Mapping[str, torch.Tensor]] = {}
        for prefix in (COV, HELD):
            where = {k[len(prefix):]: (ckpt, k) for k in ckpt.keys() if k.startswith(prefix)}
            parts[prefix] = OnDisk(where) if lazy else {g: c.get(k) for g, (c, k) in where.items()}
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{flag} {path}: not a qcorda covariance file; delete it and recompute")
        manifest = meta["manifest"]
        for key, want in (expect or {}).items():
            if manifest.get(key) != want:
                raise ConfigError(
                    f"{flag} {path} was built for a different {key} ({_short(manifest.get(key))} vs {_short(want)}); "
                    "delete it or pass the matching model, targets and calibration data"
                )
        held = parts[HELD] if len(parts[HELD]) else None
        return cls(parts[COV], meta["members"], int(meta["n_tokens"]), manifest, held, int(meta.get("n_heldout", 0)),
                   {g: int(n) for g, n in meta.get("routed", {}).items()})


class OnDisk(Mapping):
    """group → C, read from safetensors on each access (:class:`qcorda.checkpoint.Checkpoint`: a fresh
    handle each time, so no memory map keeps the pages resident). Immutable: ``{group: (checkpoint, key)}``."""

    def __init__(self, where: dict[str, tuple[Checkpoint, str]]):
        self._where = dict(where)

    def __getitem__(self, group: str) -> torch.Tensor:
        ckpt, key = self._where[group]
        return ckpt.get(key)

    def shape_of(self, group: str) -> tuple[int, ...]:
        ckpt, key = self._where[group]
        return ckpt.spec(key)[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) < 80 else s[:77] + "..."


def masks_of(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention mask of ``batch`` and the mask of its held-out records' tokens, ``(batch, seq)``
    bool each (the second None when the batch marks no held-out records)."""
    mask = batch["attention_mask"].to(device).bool()
    rows = batch.get("heldout")
    return mask, (None if rows is None else mask & rows.to(device).bool()[:, None])


class Accumulator:
    """XᵀX per target group, fed by forward pre-hooks on the targets.

    Targets that read the same tensor object (q/k/v, gate/up) are put in one group on
    the first batch of a pass (:meth:`start_pass`), by tensor identity, and only the
    group's first member accumulates afterwards. Padding positions are dropped with the
    attention mask of the current batch (:attr:`mask`, ``(batch, seq)`` bool). With
    :attr:`held_mask` set, the held-out tokens' X_hᵀX_h is accumulated apart as well.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.sums: dict[str, torch.Tensor] = {}
        self.held_sums: dict[str, torch.Tensor] = {}
        self.group_of: dict[str, str] = {}
        self.tokens: dict[str, int] = {}
        """group → the tokens its inputs held (fewer than all for an expert: those routed to it)."""
        self.mask: torch.Tensor | None = None
        self.held_mask: torch.Tensor | None = None
        self._first, self._last_x, self._last_group = True, None, None

    def start_pass(self) -> None:
        """The next batch is the first one these hooks see: groups are found on it."""
        self._first, self._last_x = True, None

    def end_batch(self) -> None:
        self._first, self._last_x = False, None

    def _add(self, sums: dict[str, torch.Tensor], name: str, X: torch.Tensor) -> None:
        acc = sums.get(name)
        if acc is None:
            acc = sums[name] = torch.zeros(X.shape[1], X.shape[1], dtype=self.dtype, device=self.device)
        acc.addmm_(X.T, X)  # fused in-place XᵀX update, no (n, n) temporary

    def hook(self, module: torch.nn.Module, name: str):
        """Register the pre-hook of target ``name`` on ``module``; returns the handle."""

        def hook(mod, args):
            x = args[0]
            if self._first:
                if x is self._last_x:
                    self.group_of[name] = self._last_group
                    return
                self.group_of[name] = name
                self._last_x, self._last_group = x, name
            elif self.group_of[name] != name:
                return
            mask, held = self.mask, self.held_mask
            rows = routed_rows()
            if x.dim() == 2 and rows is not None and x.shape[0] == rows.numel():
                # an expert's input: the flattened tokens its router sent to it, rows[i] being row i's token
                mask, held = mask.reshape(-1)[rows], None if held is None else held.reshape(-1)[rows]
            elif x.dim() == 2 and x.shape[0] == mask.numel():
                # OPT flattens the hidden states to (batch·seq, features) before fc1/fc2: the same tokens,
                # in the mask's row-major order
                mask, held = mask.reshape(-1), None if held is None else held.reshape(-1)
            elif x.dim() != 3 or x.shape[:2] != mask.shape:
                raise ConfigError(
                    f"layer {name}: input of shape {tuple(x.shape)} is neither (batch, seq, features) nor "
                    f"(batch·seq, features) matching the attention mask {tuple(mask.shape)}; leave it out of --target-modules"
                )
            X = x[mask].to(device=self.device, dtype=self.dtype)
            if not torch.isfinite(X).all():
                raise DecompositionError(
                    f"layer {name}: the model produces NaN/Inf activations on the calibration data; "
                    "check the model's dtype (load it in float32) and the calibration text"
                )
            self._add(self.sums, name, X)
            self.tokens[name] = self.tokens.get(name, 0) + X.shape[0]
            if held is not None and held.any():
                self._add(self.held_sums, name, x[held].to(device=self.device, dtype=self.dtype))

        return module.register_forward_pre_hook(hook)

    def pop_final(self, groups: list[str], n_tokens: int, n_heldout: int | None = None) -> dict[str, torch.Tensor]:
        """``{COV + g: XᵀX / n}`` of ``groups`` (and ``{HELD + g: X_hᵀX_h / n_h}`` when ``n_heldout``
        is given), taken out of the accumulator one at a time (never two copies of every C), as
        fp32 tensors a caller can use outside inference mode."""
        if n_tokens == 0:
            raise ConfigError(NO_TOKENS)
        if n_heldout == 0:
            raise ConfigError(NO_HELDOUT)
        parts = [(COV, self.sums, n_tokens)] + ([(HELD, self.held_sums, n_heldout)] if n_heldout is not None else [])
        matrices = {}
        for g in groups:
            for prefix, sums, n in parts:
                s = sums.pop(g)
                with torch.inference_mode(s.is_inference()):  # the sums were made under inference mode
                    s = s.div_(n).float()
                matrices[prefix + g] = s.clone() if s.is_inference() else s
        return matrices

    def result(self, targets: list[str], n_tokens: int, n_samples: int, manifest: dict | None,
               spilled: dict[str, tuple[Checkpoint, str]] | None = None, n_heldout: int | None = None) -> "Covariances":
        """The :class:`Covariances` of ``targets``; ``spilled``: matrices already written to files
        (``file key → (checkpoint, key)``, keys as :meth:`pop_final` makes them), which then stay there
        (:class:`OnDisk`). ``n_heldout``: held-out tokens, when held-out records were marked."""
        if n_tokens == 0:
            raise ConfigError(NO_TOKENS)
        missing = [t for t in targets if t not in self.group_of]
        if missing:
            raise ConfigError(f"layers {', '.join(missing[:3])} never ran on the calibration data; leave them out of --target-modules")
        if spilled:
            if self.sums:
                raise RuntimeError(f"groups {', '.join(list(self.sums)[:3])} were neither spilled nor kept")
            parts = {p: OnDisk({k[len(p):]: v for k, v in spilled.items() if k.startswith(p)}) for p in (COV, HELD)}
        else:
            found = self.pop_final(list(self.sums), n_tokens, n_heldout)
            parts = {p: {k[len(p):]: v for k, v in found.items() if k.startswith(p)} for p in (COV, HELD)}
        manifest = dict(manifest or {}, n_samples=n_samples, n_tokens=n_tokens)
        held = parts[HELD] if n_heldout is not None else None
        routed = {g: self.tokens.get(g, 0) for g in set(self.group_of.values()) if self.tokens.get(g, 0) != n_tokens}
        return Covariances(parts[COV], dict(self.group_of), n_tokens, manifest, held, n_heldout or 0, routed)


def collect(
    model: torch.nn.Module,
    batches: Iterable[dict],
    targets: list[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
    total: int | None = None,
    manifest: dict | None = None,
) -> Covariances:
    """Run ``batches`` (``input_ids``, ``attention_mask``) through ``model`` and return C per target group.

    The lm_head is skipped (the decoder alone runs): only the targets' inputs are needed,
    and full-vocabulary logits would cost far more memory than the whole accumulation.
    The whole model must be in memory; :func:`qcorda.blockwise.collect_blockwise` walks a
    checkpoint one decoder block at a time instead. The forward and the accumulation run at full fp32
    (:func:`qcorda.decompose.full_fp32_matmul`) whatever the environment asks for: C is the splits' input.
    """
    from tqdm.auto import tqdm

    device = torch.device(device or next(model.parameters()).device)
    acc = Accumulator(dtype, device)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    handles = [acc.hook(model.get_submodule(t), t) for t in targets]
    n_tokens = n_samples = 0
    n_heldout: int | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), full_fp32_matmul():
            for batch in tqdm(batches, total=total, desc="covariance", unit="batch", disable=not progress):
                ids = batch["input_ids"].to(next(model.parameters()).device)
                acc.mask, acc.held_mask = masks_of(batch, ids.device)
                decoder(input_ids=ids, attention_mask=acc.mask.long())
                acc.end_batch()
                n_tokens += int(acc.mask.sum())
                n_samples += ids.shape[0]
                if acc.held_mask is not None:
                    n_heldout = (n_heldout or 0) + int(acc.held_mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return acc.result(targets, n_tokens, n_samples, manifest, n_heldout=n_heldout)
