"""Writing ``qcorda compare``'s report: report.md, report.json, report.csv and three plots (see :mod:`qcorda.compare`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .compare import CompareReport, set_key, suffix
from .io import atomic_dir
from .table import markdown_table


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
    paths.append(_save(fig, out / "error_by_layer.png"))

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
    paths.append(_save(fig, out / "error_vs_rank.png"))

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
        paths.append(_save(fig, out / "ppl_gap.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def write_report(report: CompareReport, out: str | Path, overwrite: bool = False, plots: bool = True) -> Path:
    """Write report.md, report.json, report.csv and the PNG plots into ``out``, atomically."""
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
