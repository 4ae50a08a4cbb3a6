"""The quantization-error report behind ``qcorda compare``.

For every target layer W ``(out_features, in_features)`` and every method × rank, the
initialized 4-bit layer computes with W_eff = deq(Q(W_res)) + s·B·A, built by the very
code ``prepare`` uses (:func:`qcorda.prepare.prepare_layer`, or
:func:`qcorda.baselines.baseline_layer` for the PEFT baselines). With E = W − W_eff:

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
states ``(tokens, hidden)`` are kept per model; the LM head runs ``HEAD_CHUNK`` tokens at a
time, so a 262k vocabulary never materializes for a whole set.

Row keys (``report.json`` ``rows``, ``report.csv``): ``method``, ``rank``, ``layer`` (a module
name, ``*.<type>`` for a layer type such as ``*.q_proj``, or ``total``), ``weight_err_rel``,
``nuclear_err_rel``, ``act_err_rel`` (first eval set), ``act_err_rel_<set>`` for every further
eval set, and on ``total`` rows ``ppl``, ``kl`` (first set) and ``ppl_<set>``, ``kl_<set>``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from .calibration import collect_covariances
from .decompose import activation_error, low_rank_term
from .layer import prepare_layer
from .models import resolve_compute_dtype, resolve_device
from .prepared import config_json as init_json
from .quantize import dequantize_nf4, nf4_roundtrip
from .scoring import final_hidden, ppl_and_kl, scored_batches
from .config import BASELINES, CALIBRATED, ITERATIVE, METHODS, CalibConfig, ConfigError, InitConfig

#: The methods of the default report (issue 3); baselines (lora, qolora, ...) on request.
DEFAULT_METHODS: tuple[str, ...] = ("qlora", "loftq", "qpissa", "qmilora", "qcorda-ipm", "qcorda-kpm", "qcorda-cal", "qera")
DEFAULT_RANKS: tuple[int, ...] = (16, 64)
DEFAULT_EVAL: tuple[str, ...] = ("gsm8k-test", "wikitext2")
#: Methods whose W_eff does not depend on the rank (B = 0 at init): their model is scored once.
RANK_FREE: frozenset[str] = frozenset({"qlora", "qdora", "lora"})
FORMAT = "qcorda.compare/1"


def default_init() -> InitConfig:
    """The issue's reference setup: calibration on the first 64 GSM8K train records (≤ 256 tokens),
    ridge 0.01, α = r; randomized top-r SVD (within 0.01 of the full SVD, see eval/results)."""
    return InitConfig(
        svd="randomized",
        calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=64, max_length=256),
    )


@dataclass(frozen=True)
class CompareConfig:
    """What ``qcorda compare`` measures."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    """Initializations to compare (any of ``prepare``'s methods). CLI: ``--methods``."""
    ranks: tuple[int, ...] = DEFAULT_RANKS
    """LoRA ranks. CLI: ``--ranks 16,64``."""
    init: InitConfig = field(default_factory=default_init)
    """Everything else of the split (alpha, iters, ridge, SVD solver, calibration data); its
    ``method`` and ``rank`` are replaced by each entry of ``methods`` × ``ranks``."""
    eval_data: tuple[str, ...] = DEFAULT_EVAL
    """Held-out eval sets (bundled alias or file; records with ``text`` or ``question``/``answer``).
    The first one gives the unsuffixed ``act_err_rel``, ``ppl``, ``kl``. CLI: ``--eval-data``."""
    eval_samples: int = 32
    """Records per eval set for C_eval (the first N). 32 keeps the default run under 10 minutes
    on 2 CPU cores (XᵀX of the 2048-wide down_proj inputs dominates collection); the golden
    figures use 64. CLI: ``--eval-samples``."""
    eval_max_length: int = 256
    """Tokens per eval record. CLI: ``--eval-max-length``."""
    eval_tokens: int = 512
    """Scored tokens per eval set for perplexity and KL; 0 skips them. CLI: ``--eval-tokens``."""
    eval_batch_size: int = 8
    """Records per forward pass in evaluation. CLI: ``--eval-batch-size``."""

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError(f"--methods is empty; choose from {','.join(METHODS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"--methods: unknown method {', '.join(unknown)}; choose from {','.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("--methods lists a method twice; name each once")
        if not self.ranks:
            raise ConfigError("--ranks is empty; give positive integers such as 16,64")
        bad = [r for r in self.ranks if not isinstance(r, int) or isinstance(r, bool) or r <= 0]
        if bad:
            raise ConfigError(f"--ranks must be positive integers, got {', '.join(map(str, bad))}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ConfigError("--ranks lists a rank twice; name each once")
        if not self.eval_data:
            raise ConfigError("--eval-data is empty; give held-out text such as gsm8k-test,wikitext2")
        if len({set_key(e) for e in self.eval_data}) != len(self.eval_data):
            raise ConfigError("--eval-data: two eval sets have the same name; give distinct files")
        if self.eval_samples <= 0:
            raise ConfigError(f"--eval-samples must be positive, got {self.eval_samples}")
        if self.eval_max_length <= 1:
            raise ConfigError(f"--eval-max-length must be at least 2, got {self.eval_max_length}")
        if self.eval_tokens < 0:
            raise ConfigError(f"--eval-tokens must be >= 0 (0 skips perplexity and KL), got {self.eval_tokens}")
        if self.eval_batch_size <= 0:
            raise ConfigError(f"--eval-batch-size must be positive, got {self.eval_batch_size}")
        if any(m in CALIBRATED for m in self.methods) and self.init.calib.data is None:
            raise ConfigError("the data-driven methods need --calib-data (e.g. --calib-data gsm8k-train)")

    def method_config(self, method: str, rank: int) -> InitConfig:
        """The :class:`InitConfig` of one cell: ``iters`` applies to the iterative methods only."""
        return replace(self.init, method=method, rank=rank, iters=self.init.iters if method in ITERATIVE else None)


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
    """The three error figures of E = W − W_eff; ``covs`` are ``(in_features, in_features)``."""
    E = W.float() - W_eff.float()
    act = tuple(activation_error(E, C) for C in covs)
    return LayerErrors(float(E.pow(2).sum()), float(torch.linalg.svdvals(E).sum()), act)


def effective_weight(W: torch.Tensor, cfg: InitConfig, name: str, covs, eva_A: torch.Tensor | None = None):
    """``(W_eff, LayerResult)``: the weight the initialized layer computes with, by ``prepare``'s code.

    NF4 methods: deq(Q_stored) + s·B·A. ``lora``: W in ``compute_dtype`` + s·B·A. ``covs``: the
    calibration :class:`~qcorda.covariance.Covariances` (methods that need them), else None.
    """
    split, q, result = prepare_layer(W, cfg, name, covs, eva_A)
    base = dequantize_nf4(q) if q is not None else W.to(resolve_compute_dtype(cfg.compute_dtype)).float()  # lora: 16-bit
    return base + low_rank_term(split, cfg.scaling), result


def relative(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def aggregate(method: str, rank: int, names: Sequence[str], errs: dict[str, LayerErrors], ref: dict[str, LayerErrors],
              keys: Sequence[str]) -> list[dict]:
    """Rows per layer, per layer type (``*.q_proj``) and ``total``: each figure summed over the
    group and divided by qlora's sum over the same group."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault("*." + n.rsplit(".", 1)[-1], []).append(n)
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
    from .data import load_examples, load_records

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
    d["init"] = init_json(cfg.init)
    for k in ("method", "rank", "iters"):
        d["init"].pop(k, None)
    d["init"]["iters"] = cfg.init.iters
    return d


def compare(model, tokenizer, config: CompareConfig, model_id: str = "", progress: bool = True, cache: dict | None = None) -> CompareReport:
    """Measure every method × rank on ``model`` (an fp32 HF causal LM, restored on return).

    Covariances are collected once (calibration, for the data-driven methods) plus one C_eval
    per eval set; then one progress bar runs over the qlora reference and methods × ranks ×
    layers, each cell built by ``prepare_layer``/``baseline_layer``. ``cache``: a dict kept by
    the caller across calls on the same model, so that covariances are collected only once.
    """
    from tqdm.auto import tqdm

    from . import covariance
    from .data import calibration_batches
    from .targets import check_rank, find_targets, weight_of

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise ConfigError("the model is already quantized; pass the original (16/32-bit) model to compare")
    targets = find_targets(model, config.init.target_modules)
    for r in config.ranks:
        check_rank(model, targets, r, flag="--ranks")
    keys = [set_key(s) for s in config.eval_data]
    texts = {s: eval_texts(s, config.eval_samples, tokenizer) for s in config.eval_data}  # bad --eval-data fails here
    model.eval()
    device = resolve_device(config.init.device)

    # 1. covariances: calibration (once, shared by every data-driven method and rank), C_eval per set
    t = time.perf_counter()
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
            cache[key] = covariance.collect(model, batches, targets, torch.float32, progress=progress, total=n, manifest={"data": s})
        eval_covs.append(cache[key])
    eva = {}
    if "qeva" in config.methods:
        from .baselines import eva_components

        for r in config.ranks:
            eva[r] = eva_components(model, tokenizer, targets, config.method_config("qeva", r), progress)
    timings["covariances"] = time.perf_counter() - t

    # 2. held-out tokens for ppl/KL: the original's final hidden states
    t = time.perf_counter()
    scored = {}
    if config.eval_tokens:
        for s in config.eval_data:
            scored[s] = scored_batches(tokenizer, texts[s], config.eval_max_length, config.eval_batch_size, config.eval_tokens)
    ref_hidden = {s: final_hidden(model, b) for s, b in scored.items()}
    timings["eval_original"] = time.perf_counter() - t

    modules = {n: model.get_submodule(n) for n in targets}
    original = {n: weight_of(m).detach().clone() for n, m in modules.items()}
    cells = [(m, r) for m in config.methods for r in config.ranks]
    rows: list[dict] = []
    hidden: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    t = time.perf_counter()
    bar = tqdm(total=len(targets) * (1 + len(cells)), desc="compare", unit="layer", disable=not progress)
    try:
        ref: dict[str, LayerErrors] = {}
        bar.set_description("compare qlora reference")
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
                if method in RANK_FREE and method in done:  # the same weights: score once
                    hidden[(method, rank)] = hidden[done[method]]
                else:
                    hidden[(method, rank)] = {s: final_hidden(model, b)[0] for s, b in scored.items()}
                    done[method] = (method, rank)
    finally:
        bar.close()
        with torch.no_grad():
            for n, m in modules.items():
                weight_of(m).copy_(original[n])
    timings["layers"] = time.perf_counter() - t

    # 3. perplexity and KL: one pass of the LM head per chunk and model
    t = time.perf_counter()
    orig: dict = {}
    if scored:
        by_cell = {(r["method"], r["rank"]): r for r in rows if r["layer"] == "total"}
        for i, s in enumerate(config.eval_data):
            ref_h, labels = ref_hidden[s]
            uniq = {}
            for cell, hs in hidden.items():
                uniq.setdefault(id(hs[s]), (cell, hs[s]))
            ref_ppl, res = ppl_and_kl(model, ref_h, labels, {cell: h for cell, h in uniq.values()}, progress, f"ppl/KL {s}")
            by_id = {id(h): res[cell] for cell, h in uniq.values()}
            sfx = suffix(i, keys[i])
            orig["ppl" + sfx] = ref_ppl
            orig["n_tokens" + sfx] = int(labels.shape[0])
            for cell, hs in hidden.items():
                p, k = by_id[id(hs[s])]
                by_cell[cell]["ppl" + sfx] = p
                by_cell[cell]["kl" + sfx] = k
    timings["ppl_kl"] = time.perf_counter() - t
    return CompareReport(
        rows=tuple(rows), original=orig, config=_config_json(config), eval_sets=tuple(config.eval_data),
        model=model_id, targets=tuple(targets), seconds=time.perf_counter() - t0, timings=timings,
    )


# --------------------------------------------------------------------------- output


def row_keys(report: CompareReport) -> list[str]:
    """CSV columns: the union of the row keys, in first-seen order."""
    cols: dict[str, None] = {}
    for r in report.rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def summary_table(report: CompareReport) -> tuple[list[str], list[list]]:
    """Headers and rows of the totals table (terminal and report.md)."""
    keys = [set_key(s) for s in report.eval_sets]
    headers = ["method", "rank", "weight", "nuclear"] + [f"act {k}" for k in keys]
    has_ppl = any("ppl" in r for r in report.totals())
    if has_ppl:
        headers += [f"ppl {k}" for k in keys] + [f"KL {k}" for k in keys]
    out = []
    for r in report.totals():
        line = [r["method"], r["rank"], r["weight_err_rel"], r["nuclear_err_rel"]]
        line += [r["act_err_rel" + suffix(i, k)] for i, k in enumerate(keys)]
        if has_ppl:
            line += [r.get("ppl" + suffix(i, k)) for i, k in enumerate(keys)]
            line += [r.get("kl" + suffix(i, k)) for i, k in enumerate(keys)]
        out.append(line)
    if has_ppl:
        line = ["fp32 original", "-", None, None] + [None] * len(keys)
        line += [report.original.get("ppl" + suffix(i, k)) for i, k in enumerate(keys)] + [0.0] * len(keys)
        out.append(line)
    return headers, out


def markdown(report: CompareReport) -> str:
    from .table import markdown_table

    keys = [set_key(s) for s in report.eval_sets]
    h, rows = summary_table(report)
    init = report.config["init"]
    calib = init.get("calib", {})
    lines = [
        f"# qcorda compare: {report.model}",
        "",
        f"{len(report.targets)} target layers; methods {', '.join(report.config['methods'])}; ranks "
        f"{', '.join(map(str, report.config['ranks']))}; alpha {init.get('alpha') or 'r'}; SVD {init.get('svd')}; "
        f"calibration {calib.get('data')} ({calib.get('samples')} records, ≤ {calib.get('max_length')} tokens), ridge {init.get('ridge')}.",
        f"Held-out eval sets: {', '.join(report.eval_sets)} ({report.config['eval_samples']} records each for C_eval; "
        f"scored tokens for perplexity and KL: " + ", ".join(
            f"{report.original.get('n_tokens' + suffix(i, k), 0)} of {s}" for i, (s, k) in enumerate(zip(report.eval_sets, keys))
        ) + f", {report.config['eval_tokens']} requested each).",
        "",
        "Errors are squared Frobenius (weight, activation ‖E·L‖², C_eval = L·Lᵀ) or nuclear (Σσ(E)), summed over the "
        "layers and divided by qlora's (plain NF4) on the same layers: qlora = 1, lower is better. "
        "KL = mean KL(p_original ‖ p_method) per token, nats.",
        "",
        "## Totals",
        "",
        markdown_table(h, rows),
        "",
        "## By layer type (weight / activation " + keys[0] + ")",
        "",
    ]
    types = sorted({r["layer"] for r in report.rows if r["layer"].startswith("*.")})
    trows = []
    for r in report.totals():
        cell = [x for x in report.rows if x["method"] == r["method"] and x["rank"] == r["rank"]]
        by = {x["layer"]: x for x in cell}
        trows.append([r["method"], r["rank"]] + [f"{by[t]['weight_err_rel']:.3f} / {by[t]['act_err_rel']:.3f}" for t in types])
    lines += [markdown_table(["method", "rank"] + [t[2:] for t in types], trows), ""]
    lines += ["Per-layer figures: report.json / report.csv. Plots: error_by_layer.png, error_vs_rank.png, ppl_gap.png.", ""]
    lines += [f"Time: {report.seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in report.timings.items()) + ")."]
    return "\n".join(lines) + "\n"


def plot(report: CompareReport, out: Path) -> list[Path]:
    """error_by_layer.png, error_vs_rank.png and (with perplexities) ppl_gap.png under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [set_key(s) for s in report.eval_sets]
    methods = list(dict.fromkeys(r["method"] for r in report.rows))
    ranks = sorted({r["rank"] for r in report.rows})
    layer_rows = [r for r in report.rows if r["layer"] not in ("total",) and not r["layer"].startswith("*.")]
    order = {n: i for i, n in enumerate(report.targets)}
    paths = []

    fig, axes = plt.subplots(2, len(ranks), figsize=(5 * len(ranks), 6), squeeze=False, sharex=True)
    for j, r in enumerate(ranks):
        for i, (metric, label) in enumerate([("weight_err_rel", "weight"), ("act_err_rel", f"activation ({keys[0]})")]):
            ax = axes[i][j]
            for m in methods:
                pts = sorted((order[x["layer"]], x[metric]) for x in layer_rows if x["method"] == m and x["rank"] == r)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, label=m)
            ax.set_title(f"r={r}: {label} error / qlora", fontsize=9)
            ax.set_yscale("log")
            if i == 1:
                ax.set_xlabel("target layer (model order)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "error_by_layer.png")
    fig.savefig(paths[-1], dpi=72)
    plt.close(fig)

    metrics = [("weight_err_rel", "weight"), ("nuclear_err_rel", "nuclear")] + [
        ("act_err_rel" + suffix(i, k), f"activation {k}") for i, k in enumerate(keys)
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.5 * len(metrics), 3.2), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics):
        for m in methods:
            pts = sorted((x["rank"], x[metric]) for x in report.totals() if x["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank")
        ax.set_title(f"{label} error / qlora", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "error_vs_rank.png")
    fig.savefig(paths[-1], dpi=72)
    plt.close(fig)

    if report.original:
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.2), squeeze=False)
        width = 0.8 / len(ranks)
        for ax, (i, k) in zip(axes[0], enumerate(keys)):
            base = report.original["ppl" + suffix(i, k)]
            for j, r in enumerate(ranks):
                vals = [next((x.get("ppl" + suffix(i, k), float("nan")) for x in report.totals() if x["method"] == m and x["rank"] == r), float("nan")) - base for m in methods]
                ax.bar([q + j * width for q in range(len(methods))], vals, width, label=f"r={r}")
            ax.set_xticks([q + 0.4 - width / 2 for q in range(len(methods))], methods, rotation=30, fontsize=7)
            ax.set_title(f"perplexity − original ({k}, original {base:.2f})", fontsize=9)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "ppl_gap.png")
        fig.savefig(paths[-1], dpi=72)
        plt.close(fig)
    return paths


def write_report(report: CompareReport, out: str | Path, overwrite: bool = False, plots: bool = True) -> Path:
    """Write report.md, report.json, report.csv and the PNG plots into ``out``, atomically."""
    import csv

    from .io import atomic_dir

    with atomic_dir(out, overwrite) as tmp:
        (tmp / "report.md").write_text(markdown(report))
        (tmp / "report.json").write_text(json.dumps(report.to_json(), indent=1, default=str))
        cols = row_keys(report)
        with open(tmp / "report.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="")
            w.writeheader()
            for r in report.rows:
                w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
        if plots:
            plot(report, tmp)
    return Path(out)
