"""``qcorda compare``: how far each initialized 4-bit model is from the original (the measuring; :mod:`qcorda.render` writes it).

For every target layer W ``(out_features, in_features)`` and every method × rank, the
initialized 4-bit layer computes with W_eff = deq(Q(W_res)) + s·B·A, built by the very
code ``prepare`` uses (:func:`qcorda.layer.prepare_layer`). With E = W − W_eff:

- weight error ‖E‖²_F;
- nuclear error ‖E‖_* = Σ σᵢ(E) (the PiSSA paper's metric; lm_head is never a target);
- activation error ‖E·L‖²_F = tr(E·C_eval·Eᵀ), C_eval = L·Lᵀ = XᵀX/n from **held-out**
  evaluation text (one C_eval per eval set), not the calibration text.

Each figure is divided by ``qlora``'s (plain NF4, E = W − deq(Q(W))) on the same layer, per
layer type (sums over the layers of that type) and in total (sums over all targets), so
``qlora`` is 1 everywhere and smaller is better. ``lora`` (16-bit base) is the point of zero
quantization error.

End to end, each initialized model (W_eff swapped into one reused fp32 copy of the model) and
the fp32 original are scored on the first ``eval_tokens`` tokens of each eval set: perplexity,
and the mean KL(p_original ‖ p_method) of the next-token distributions. Only final hidden
states ``(tokens, hidden)`` are kept per model, and :mod:`qcorda.scoring` runs the LM head a
chunk at a time, so a 262k vocabulary never materializes for a whole set.

Row keys (``report.json`` ``rows``, ``report.csv``): ``method``, ``rank``, ``layer`` (a module
name, ``*.<type>`` for a layer type such as ``*.q_proj`` or ``*.experts.gate_proj``, every expert of every
block, or ``total``), ``weight_err_rel``,
``nuclear_err_rel``, ``act_err_rel`` (first eval set), ``act_err_rel_<set>`` for every further
eval set, and on ``total`` rows ``ppl``, ``kl`` (first set) and ``ppl_<set>``, ``kl_<set>``.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .baselines import eva_components
from .calibration import collect_covariances
from .config import CompareConfig, ConfigError, InitConfig
from .covariance import Covariances, collect
from .experts import layer_type, unfuse
from .data import calibration_batches, load_examples, load_records
from .decompose import activation_error, full_fp32_matmul, low_rank_term
from .layer import prepare_layer
from .methods import spec
from .models import resolve_compute_dtype, resolve_device
from .prepared import config_json
from .quantize import dequantize_nf4, nf4_roundtrip
from .scoring import final_hidden, ppl_and_kl, scored_batches
from .targets import check_rank, find_targets, weight_of

FORMAT = "qcorda.compare/1"


def set_key(source: str) -> str:
    """The suffix of an eval set's keys: ``wikitext2``, ``gsm8k_test``, a file's stem."""
    name = Path(source).stem if ("/" in source or "." in source) else source
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower() or "eval"


def suffix(i: int, key: str) -> str:
    return "" if i == 0 else f"_{key}"


# --------------------------------------------------------------------------- per layer (pure fp32)


@dataclass(frozen=True)
class LayerErrors:
    """Squared errors of one layer's E = W − W_eff ``(out_features, in_features)``."""

    weight: float
    """‖E‖²_F."""
    nuclear: float
    """‖E‖_* = Σ σᵢ(E)."""
    act: tuple[float, ...]
    """tr(E·C·Eᵀ) = ‖E·L‖²_F for each eval covariance C = L·Lᵀ, in eval-set order."""


def layer_errors(W: torch.Tensor, W_eff: torch.Tensor, covs: Sequence[torch.Tensor]) -> LayerErrors:
    """The three error figures of E = W − W_eff; ``covs`` are ``(in_features, in_features)``. At full fp32
    whatever the environment asks for (TF32 on a GPU would move tr(E·C·Eᵀ) in the 4th digit)."""
    E = W.float() - W_eff.float()
    with full_fp32_matmul():
        act = tuple(activation_error(E, C) for C in covs)
        return LayerErrors(float(E.pow(2).sum()), float(torch.linalg.svdvals(E).sum()), act)


def effective_weight(W: torch.Tensor, cfg: InitConfig, name: str, covs, eva_A: torch.Tensor | None = None):
    """``(W_eff, LayerResult)``: the weight the initialized layer computes with, by ``prepare``'s code.

    NF4 methods: deq(Q_stored) + s·B·A. ``lora``: W in ``compute_dtype`` + s·B·A. ``covs``: the
    calibration :class:`~qcorda.covariance.Covariances` (methods that need them), else None.
    """
    split, q, result = prepare_layer(W, cfg, name, covs, eva_A)
    base = dequantize_nf4(q) if q is not None else W.to(resolve_compute_dtype(cfg.compute_dtype)).float()  # lora: 16-bit
    with full_fp32_matmul():  # s·B·A as prepare_layer computes it, not in the environment's TF32
        return base + low_rank_term(split, cfg.scaling), result


def relative(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def aggregate(method: str, rank: int, names: Sequence[str], errs: dict[str, LayerErrors], ref: dict[str, LayerErrors],
              keys: Sequence[str]) -> list[dict]:
    """Rows per layer, per layer type (``*.q_proj``; the experts of every block rolled up as ``*.experts.w1``)
    and ``total``: each figure summed over the group and divided by qlora's sum over the same group."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault("*." + layer_type(n), []).append(n)
    rows = []
    for label, members in [(n, [n]) for n in names] + list(groups.items()) + [("total", list(names))]:
        row = {"method": method, "rank": rank, "layer": label}
        row["weight_err_rel"] = relative(sum(errs[n].weight for n in members), sum(ref[n].weight for n in members))
        row["nuclear_err_rel"] = relative(sum(errs[n].nuclear for n in members), sum(ref[n].nuclear for n in members))
        for i, k in enumerate(keys):
            row["act_err_rel" + suffix(i, k)] = relative(sum(errs[n].act[i] for n in members), sum(ref[n].act[i] for n in members))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- eval text


def eval_texts(source: str, samples: int, tokenizer) -> list[str]:
    """The first ``samples`` records of ``source``: ``text`` as is, or question/answer in the
    alpaca template (the prompt format training uses)."""
    records = load_records(source, "test", "--eval-data")
    first = records[0]
    if "text" in first:
        fields: tuple[str, ...] = ("text",)
    elif "question" in first and "answer" in first:
        fields = ("question", "answer")
    else:
        raise ConfigError(
            f"--eval-data {source}: records have fields {sorted(first)}; give a .txt file or records with "
            "a 'text' field or 'question' and 'answer' fields"
        )
    texts = [e.text for e in load_examples(source, fields, "alpaca", samples, tokenizer, "test", "--eval-data")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"--eval-data {source}: the records hold no text")
    return texts


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class CompareReport:
    """Everything ``qcorda compare`` measured (``report.json``)."""

    rows: tuple[dict, ...]
    """Per layer, per layer type and total, for every method × rank (keys: module docstring)."""
    original: dict
    """The fp32 original's ``ppl`` (first eval set) and ``ppl_<set>``; ``n_tokens`` per set."""
    config: dict
    eval_sets: tuple[str, ...]
    """Eval-set sources in order; keys of the 2nd, 3rd, ... carry ``_<set_key>``."""
    model: str
    targets: tuple[str, ...]
    seconds: float
    timings: dict = field(default_factory=dict)

    def totals(self) -> list[dict]:
        return [r for r in self.rows if r["layer"] == "total"]

    def to_json(self) -> dict:
        d = asdict(self)
        d["format"] = FORMAT
        d["rows"] = list(self.rows)
        d["keys"] = {"eval_sets": {s: suffix(i, set_key(s)) for i, s in enumerate(self.eval_sets)}}
        return d


def _config_json(cfg: CompareConfig) -> dict:
    d = asdict(cfg)
    d["init"] = config_json(cfg.init)
    for k in ("method", "rank", "iters"):
        d["init"].pop(k, None)
    d["init"]["iters"] = cfg.init.iters
    return d


def compare(model, tokenizer, config: CompareConfig, model_id: str = "", progress: bool = True, cache: dict | None = None) -> CompareReport:
    """Measure every method × rank on ``model`` (an fp32 HF causal LM, restored on return; fused experts stay
    unfused, :func:`qcorda.experts.unfuse`, which computes the same).

    Covariances are collected once (calibration, for the data-driven methods) plus one C_eval
    per eval set; then one progress bar runs over the qlora reference and methods × ranks ×
    layers, each cell built by ``prepare_layer``. ``cache``: a dict kept by the caller across
    calls on the same model, so that covariances are collected only once.
    """
    t0 = time.perf_counter()
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise ConfigError("the model is already quantized; pass the original (16/32-bit) model to compare")
    unfuse(model)  # a mixture of experts: each expert a layer, as prepare splits it (the same forward)
    targets = find_targets(model, config.init.target_modules)
    for r in config.ranks:
        check_rank(model, targets, r, flag="--ranks")
    texts = {s: eval_texts(s, config.eval_samples, tokenizer) for s in config.eval_data}  # bad --eval-data fails here
    model.eval()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    calib, eval_covs, eva = compare_covariances(model, tokenizer, config, targets, texts, model_id, progress, cache)
    timings["covariances"] = time.perf_counter() - t
    t = time.perf_counter()
    scored = {s: scored_batches(tokenizer, texts[s], config.eval_max_length, config.eval_batch_size, config.eval_tokens)
              for s in config.eval_data} if config.eval_tokens else {}
    ref_hidden = {s: final_hidden(model, b) for s, b in scored.items()}
    timings["eval_original"] = time.perf_counter() - t
    t = time.perf_counter()
    rows, hidden = _cells(model, config, targets, calib, eval_covs, eva, scored, progress)
    timings["layers"] = time.perf_counter() - t
    t = time.perf_counter()
    original = _ppl_kl(model, config, rows, ref_hidden, hidden, progress)
    timings["ppl_kl"] = time.perf_counter() - t
    return CompareReport(
        rows=tuple(rows), original=original, config=_config_json(config), eval_sets=tuple(config.eval_data),
        model=model_id, targets=tuple(targets), seconds=time.perf_counter() - t0, timings=timings,
    )


def compare_covariances(model, tokenizer, config: CompareConfig, targets: list[str], texts: dict, model_id: str = "",
                        progress: bool = True, cache: dict | None = None):
    """What :func:`compare` measures with: ``(calibration covariances or None, one C_eval per eval set of
    ``config.eval_data``, EVA components by rank)``. ``texts``: eval set → its texts (:func:`eval_texts`).
    Calibration is collected once, shared by every data-driven method and rank, and kept in ``cache``
    (a dict the caller keeps across calls on the same model) under keys of everything it depends on."""
    cache = {} if cache is None else cache
    calib = None
    if any(config.method_config(m, r).needs_covariance for m in config.methods for r in config.ranks):
        key = ("calib", tuple(targets), repr(config.init.calib), config.init.cov_dtype, config.init.heldout_every)
        if key not in cache:
            cache[key] = collect_covariances(model, tokenizer, targets, config.init, model_id, progress)
        calib = cache[key]
    eval_covs = []
    for s in config.eval_data:
        key = ("eval", tuple(targets), s, config.eval_samples, config.eval_max_length)
        if key not in cache:
            batches, n = calibration_batches(tokenizer, texts[s], config.eval_max_length, config.eval_batch_size)
            cache[key] = collect(model, batches, targets, torch.float32, progress=progress, total=n, manifest={"data": s})
        eval_covs.append(cache[key])
    eva = {r: eva_components(model, tokenizer, targets, config.method_config("qeva", r), progress)
           for r in config.ranks} if "qeva" in config.methods else {}
    return calib, eval_covs, eva


def _cells(model, config: CompareConfig, targets: list[str], calib: Covariances | None, eval_covs: list[Covariances],
           eva: dict, scored: dict, progress: bool):
    """The error rows of the qlora reference and every method × rank, and the final hidden states of each
    initialized model on the scored text (its W_eff swapped into ``model``, restored at the end)."""
    from tqdm.auto import tqdm

    device = resolve_device(config.init.device)
    keys = [set_key(s) for s in config.eval_data]
    modules = {n: model.get_submodule(n) for n in targets}
    original = {n: weight_of(m).detach().clone() for n, m in modules.items()}
    cells = [(m, r) for m in config.methods for r in config.ranks]
    rows: list[dict] = []
    hidden: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    bar = tqdm(total=len(targets) * (1 + len(cells)), desc="compare qlora reference", unit="layer", disable=not progress)
    try:
        ref: dict[str, LayerErrors] = {}
        for n in targets:
            W = original[n].to(device=device, dtype=torch.float32)
            ref[n] = layer_errors(W, nf4_roundtrip(W), [c.of(n).to(device) for c in eval_covs])
            bar.update()
        done: dict[str, tuple[str, int]] = {}
        for method, rank in cells:
            cfg = config.method_config(method, rank)
            bar.set_description(f"compare {method} r={rank}")
            errs: dict[str, LayerErrors] = {}
            for n in targets:
                W = original[n].to(device=device, dtype=torch.float32)
                W_eff, _ = effective_weight(W, cfg, n, calib if cfg.needs_covariance else None, eva.get(rank, {}).get(n))
                errs[n] = layer_errors(W, W_eff, [c.of(n).to(device) for c in eval_covs])
                with torch.no_grad():
                    weight_of(modules[n]).copy_(W_eff.to(original[n]))
                bar.update()
            rows += aggregate(method, rank, targets, errs, ref, keys)
            if scored:
                if spec(method).rank_free and method in done:  # the same weights: score once
                    hidden[(method, rank)] = hidden[done[method]]
                else:
                    hidden[(method, rank)] = {s: final_hidden(model, b)[0] for s, b in scored.items()}
                    done[method] = (method, rank)
    finally:
        bar.close()
        with torch.no_grad():
            for n, m in modules.items():
                weight_of(m).copy_(original[n])
    return rows, hidden


def _ppl_kl(model, config: CompareConfig, rows: list[dict], ref_hidden: dict, hidden: dict, progress: bool) -> dict:
    """Perplexity and KL of every scored model into its total row (one LM-head pass per chunk and
    distinct model); returns the original's perplexities and scored-token counts."""
    original: dict = {}
    if not ref_hidden:
        return original
    keys = [set_key(s) for s in config.eval_data]
    by_cell = {(r["method"], r["rank"]): r for r in rows if r["layer"] == "total"}
    for i, s in enumerate(config.eval_data):
        ref_h, labels = ref_hidden[s]
        uniq = {}
        for cell, hs in hidden.items():
            uniq.setdefault(id(hs[s]), (cell, hs[s]))
        ref_ppl, res = ppl_and_kl(model, ref_h, labels, {cell: h for cell, h in uniq.values()}, progress, f"ppl/KL {s}")
        by_id = {id(h): res[cell] for cell, h in uniq.values()}
        sfx = suffix(i, keys[i])
        original["ppl" + sfx] = ref_ppl
        original["n_tokens" + sfx] = int(labels.shape[0])
        for cell, hs in hidden.items():
            by_cell[cell]["ppl" + sfx], by_cell[cell]["kl" + sfx] = by_id[id(hs[s])]
    return original
