"""lm-evaluation-harness tasks over the very model qcorda loads.

``qcorda eval`` has its own streamed tasks (:mod:`qcorda.evaluate`): fast on a CPU and the
ones the studies use, but their figures are qcorda's own. Published figures come from
lm-evaluation-harness (``lm_eval``). This module runs any lm-eval task through
``lm_eval.simple_evaluate`` and lm-eval's HF wrapper ``HFLM`` around the model object that
:func:`qcorda.evaluate.load_for_eval` built (the 4-bit residual + adapter with the
dequantize path kept, a merged export, or a plain HF model): ``HFLM`` is never given a
path, because it would reload a prepared directory without the adapter and without
:func:`qcorda.quantize.keep_dequantize_path`.

A task is an lm-eval task or group name (``gsm8k``: lm-eval fetches its dataset from the
hub), a path to a task YAML (local files, offline), or one of the YAMLs shipped in
``qcorda/harness_tasks`` by its short name (``qcorda_gsm8k``, ``qcorda_nq_open``), which
read the bundled GSM8K test and NQ-open samples through :func:`bundled_dataset`.

lm-eval is an optional extra (``pip install -e ".[harness]"``); it is imported inside the
functions, so ``import qcorda`` never needs it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from .config import ConfigError
from .data import load_records

#: The install command named by every "lm-eval is missing" error.
EXTRA = 'pip install -e ".[harness]"  (or: pip install "qcorda[harness]")'
TASKS_DIR = Path(__file__).parent / "harness_tasks"
#: Short name -> task YAML shipped with qcorda (the name is the YAML's ``task:``).
BUNDLED_TASKS: dict[str, Path] = {
    "qcorda_gsm8k": TASKS_DIR / "qcorda_gsm8k.yaml",
    "qcorda_nq_open": TASKS_DIR / "qcorda_nq_open.yaml",
}


def require_lm_eval():
    """The ``lm_eval`` module, or a :class:`ConfigError` that names the extra to install."""
    try:
        import lm_eval
    except ImportError as e:
        raise ConfigError(f"--harness needs lm-evaluation-harness, an optional extra: {EXTRA}") from e
    return lm_eval


def parse_harness_tasks(value: str | Sequence[str]) -> tuple[str, ...]:
    """Comma-separated task names and YAML paths; a path must exist (checked before the model loads)."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise ConfigError(f"--harness: no task given; e.g. --harness gsm8k, or offline {','.join(BUNDLED_TASKS)}")
    for n in names:
        if _is_yaml(n) and not Path(n).is_file():
            raise ConfigError(f"--harness {n}: no such task YAML; give an existing file, an lm-eval task name, or one of {', '.join(BUNDLED_TASKS)}")
    return tuple(names)


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


# --------------------------------------------------------------------------- used by the bundled YAMLs
# (``!function qcorda.harness.NAME``: lm-eval imports them; plain ``lm_eval --tasks FILE`` works too)


def bundled_dataset(test: str, train: str | None = None, **_metadata):
    """A ``datasets.DatasetDict`` with ``test`` (and ``train``) read by :func:`qcorda.data.load_records`
    from a bundled alias or a local file, so the YAML finds the data wherever qcorda is installed.
    lm-eval also passes the task's metadata (``version``, ...); it is not needed here."""
    import datasets

    splits = {"test": test} if train is None else {"test": test, "train": train}
    return datasets.DatasetDict({k: datasets.Dataset.from_list(load_records(v, k, "--harness")) for k, v in splits.items()})


def gsm8k_doc_to_text(doc: dict) -> str:
    """The prompt of qcorda's ``gsm8k`` task with 0 shots (the alpaca training template)."""
    from .evaluate import gsm8k_prompts  # evaluate imports torch; `qcorda eval --help` must not

    return gsm8k_prompts([doc])[0][0]


def nq_doc_to_text(doc: dict) -> str:
    """The prompt of qcorda's ``nq`` task."""
    from .evaluate import nq_prompts

    return nq_prompts([doc])[0]


def gsm8k_extract(resps, docs) -> list[list[str]]:
    """lm-eval filter: :func:`qcorda.evaluate.extract_answer` on every response (the number after
    ``####``, else the last number), ``[invalid]`` when there is none (lm-eval's regex fallback)."""
    from .evaluate import extract_answer

    return [[extract_answer(r) or "[invalid]" for r in inst] for inst in resps]


# --------------------------------------------------------------------------- tasks


def task_manager(names: Sequence[str]):
    """A TaskManager that knows the bundled YAMLs; lm-eval's own ~15k task index is built (about
    5 s) only when a name is neither bundled nor a YAML path."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    defaults = any(n not in BUNDLED_TASKS and not _is_yaml(n) for n in names)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=defaults)


def load_tasks(names: Sequence[str], manager=None) -> dict:
    """``TaskManager.load`` of ``names`` (datasets included), with errors that name ``--harness``.

    Called before the model is loaded, so an unknown name or an unreachable dataset fails fast."""
    manager = manager or task_manager(names)
    specs = [str(Path(n).resolve()) if _is_yaml(n) else n for n in names]
    try:
        with _quiet_expected_warnings():
            return manager.load(specs)
    except KeyError as e:
        raise ConfigError(
            f"--harness: {e.args[0] if e.args else e}; use an lm-eval task name (lm_eval ls tasks), a task YAML path, "
            f"or one of {', '.join(BUNDLED_TASKS)}"
        ) from e
    except ConfigError:
        raise
    except Exception as e:  # datasets / hub errors surface as many types
        if _looks_offline(e):
            raise ConfigError(
                f"--harness {','.join(names)}: the dataset could not be fetched ({type(e).__name__}: {_first_line(e)}). "
                f"Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no network), use the bundled tasks "
                f"{', '.join(BUNDLED_TASKS)} or a task YAML over local files (dataset_path: json, dataset_kwargs: data_files)"
            ) from e
        raise ConfigError(f"--harness {','.join(names)}: lm-eval could not load the task ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _looks_offline(e: BaseException) -> bool:
    """Whether an exception chain comes from fetching a dataset (offline mode, no network, not on the hub)."""
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError", "HfHubHTTPError", "ConnectError", "ConnectTimeout"}
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in names or "offline" in text or "couldn't reach" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class HarnessResult:
    """One ``simple_evaluate`` run: lm-eval's results, task configs and version, per-doc samples."""

    tasks: tuple[str, ...]
    """The names and paths asked for (``--harness``)."""
    headline: dict
    """Top-level task or group -> ``{"metric", "value", "stderr", "n"}``: the first metric of the
    task's ``metric_list`` under its first filter (``exact_match,strict-match`` for gsm8k)."""
    seconds: float
    lm_eval_version: str
    settings: dict
    """limit, num_fewshot, batch_size and gen_kwargs as asked."""
    results: dict
    """lm-eval's ``results`` (every metric and stderr, per task and group), ``groups``,
    ``group_subtasks``, ``configs`` (the task configs), ``versions``, ``n-shot``,
    ``n-samples``, ``higher_is_better`` and ``config`` (model info), as lm-eval returns them."""
    samples: dict = field(default_factory=dict)
    """Task -> per-doc records: ``doc_id``, ``prompt``, ``response`` (unfiltered), ``target``,
    ``filtered`` (filter -> extracted answer) and ``metrics`` (``metric,filter`` -> score)."""

    def summary(self) -> str:
        parts = []
        for task, h in self.headline.items():
            v = h["value"]
            val = f"{v:.4g}" if isinstance(v, float) else str(v)
            err = f" ± {h['stderr']:.2g}" if isinstance(h.get("stderr"), float) else ""
            parts.append(f"{task} {h['metric']}={val}{err} (n={h['n']})")
        return f"harness (lm_eval {self.lm_eval_version}): " + "; ".join(parts) + f" ({self.seconds:.0f}s)"

    def to_json(self) -> dict:
        return asdict(self)


def _plain(x):
    """JSON-ready copy: numpy scalars to Python numbers, tuples to lists, callables to their names."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item") and callable(x.item):
        try:
            return x.item()
        except (TypeError, ValueError):
            pass
    if callable(x):
        return getattr(x, "__qualname__", repr(x))
    return str(x)


def _headline(name: str, metrics: dict, config: dict | None, n) -> dict | None:
    """The first metric of the task's metric_list under its first filter, else the first score."""
    keys = [k for k in metrics if "," in k and "_stderr" not in k and isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool)]
    if not keys:
        return None
    key = keys[0]
    if config:
        mlist, flist = config.get("metric_list") or [], config.get("filter_list") or []
        metric = mlist[0].get("metric") if mlist and isinstance(mlist[0], dict) else None
        filt = flist[0].get("name") if flist and isinstance(flist[0], dict) else "none"
        if metric and f"{metric},{filt}" in keys:
            key = f"{metric},{filt}"
    metric, filt = key.split(",", 1)
    stderr = metrics.get(f"{metric}_stderr,{filt}")
    return {"metric": key, "value": metrics[key], "stderr": stderr if isinstance(stderr, float) else None, "n": n}


def _top_level(loaded: dict) -> list[str]:
    children = {c for kids in (loaded.get("group_map") or {}).values() for c in kids}
    names = list(loaded.get("groups") or {}) + list(loaded["tasks"])
    return [n for n in names if n not in children]


def _slim_samples(samples: list[dict]) -> list[dict]:
    """One record per doc (lm-eval logs one per doc and filter, each with the full doc)."""
    by_doc: dict = {}
    for s in samples:
        rec = by_doc.get(s["doc_id"])
        if rec is None:
            args = s.get("arguments") or [[None]]
            resps = s.get("resps") or [[None]]
            rec = by_doc[s["doc_id"]] = {
                "doc_id": s["doc_id"], "prompt": args[0][0], "response": resps[0][0] if resps[0] else None,
                "target": s.get("target"), "filtered": {}, "metrics": {},
            }
        filt = s.get("filter", "none")
        filtered = s.get("filtered_resps") or [None]
        rec["filtered"][filt] = filtered[0]
        for m in s.get("metrics") or []:
            if m in s:
                rec["metrics"][f"{m},{filt}"] = s[m]
    return [_plain(r) for r in by_doc.values()]


#: lm-eval warnings that describe exactly what qcorda intends (an already-loaded model object,
#: bundled data through custom_dataset); other warnings pass through.
_EXPECTED = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model", "Custom kwargs can be passed")


class _DropExpected:
    def filter(self, record) -> bool:
        return not any(e in record.getMessage() for e in _EXPECTED)


@contextmanager
def _quiet_expected_warnings():
    import logging

    loggers = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.api.task")]
    f = _DropExpected()
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)


def run_harness(model, tok, tasks: str | Sequence[str], limit: int | None = None, num_fewshot: int | None = None,
                batch_size: int = 8, loaded: dict | None = None, log_samples: bool = True, gen_kwargs: dict | str | None = None) -> HarnessResult:
    """Run lm-eval ``tasks`` on ``model`` (already loaded, eval mode) with its tokenizer ``tok``.

    ``limit``: the first N docs of each task; ``num_fewshot``: lm-eval's few-shot count (a task
    whose YAML fixes ``num_fewshot: 0`` keeps 0, as in lm-eval). ``loaded``: the result of
    :func:`load_tasks` when the tasks were checked before the model was loaded. ``gen_kwargs``:
    lm-eval's override of the generation settings of every generative task (``{"max_gen_toks": 64}``
    or ``"max_gen_toks=64"``).
    """
    lm_eval = require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = parse_harness_tasks(tasks)
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    loaded = loaded or load_tasks(names)
    from lm_eval.tasks import TaskManager

    # simple_evaluate is given the loaded Task objects: its manager needs no index of lm-eval's tasks
    manager = TaskManager(include_defaults=False)
    t0 = time.perf_counter()
    # The model object itself: HFLM takes its device and config from it and never reloads it.
    with _quiet_expected_warnings():
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        if lm.model is not model:  # pragma: no cover - a guard against a future HFLM that copies
            raise RuntimeError("lm-eval's HFLM did not keep the model object it was given")
        out = simple_evaluate(
            model=lm, tasks=[(loaded.get("groups") or {}).get(n) or loaded["tasks"][n] for n in _top_level(loaded)],
            num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, task_manager=manager, log_samples=log_samples,
            gen_kwargs=gen_kwargs,
        )
    seconds = time.perf_counter() - t0
    configs = out.get("configs", {})
    headline = {}
    for name in _top_level(loaded):
        scores = (out.get("groups") or {}).get(name) or out["results"].get(name) or {}
        n = (out.get("n-samples") or {}).get(name, {}).get("effective")
        h = _headline(name, scores, configs.get(name), n)
        if h is None:  # a group without aggregate: its tasks, one by one
            for child in (out.get("group_subtasks") or {}).get(name, []):
                hc = _headline(child, out["results"].get(child, {}), configs.get(child), (out.get("n-samples") or {}).get(child, {}).get("effective"))
                if hc:
                    headline[child] = hc
        else:
            headline[name] = h
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "n-samples", "higher_is_better", "config")
    samples = {t: _slim_samples(s) for t, s in (out.get("samples") or {}).items()} if log_samples else {}
    return HarnessResult(
        tasks=names, headline=_plain(headline), seconds=seconds, lm_eval_version=lm_eval.__version__,
        settings=_plain({"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "gen_kwargs": gen_kwargs}),
        results=_plain({k: out[k] for k in keep if k in out}), samples=samples,
    )
