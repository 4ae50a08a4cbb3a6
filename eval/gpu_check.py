"""GPU check (issues 17, 24): everything qcorda does on one CUDA GPU, in one command of at most 5 minutes, with no download.

    python -m eval.gpu_bundle                           # here: the wheels the GPU machine lacks, and the command to run there
    python -m eval.gpu_check --out $OUT/gpu_check.md    # there: one CUDA GPU, real shapes, <= 5 minutes (--budget)
    python -m eval.gpu_check --dry-run                  # here: the same code at toy sizes on the CPU, <= 2 minutes
    python -m eval.gpu_check --parts prepare,train      # a subset; --model DIR adds the real-model golden comparisons

The lent GPU machine reaches no registry and carries at most 64 MiB, so no model is downloaded: the parts run on
real-shape models with seeded random weights built from the configs in ``eval/configs/`` (Gemma-3-270M's own
``config.json`` with a 4096-token BPE tokenizer trained here on the bundled data, for prepare / compare / train /
merge; Llama-3-8B's published numbers for the memory and speed parts). Correctness on the GPU is agreement with the
CPU on the same weights, computed in the same run (the device's CPU cores): the error figures, the stored NF4 codes
(byte-equal where the residual is the weight itself: bitsandbytes' quantizer is deterministic), the logits, the
merged tensors. ``--model DIR`` (a real Gemma-3-270M directory) adds the golden figures of
``eval/results/compare_golden.json``.

Parts (:data:`PARTS`), in order:

1. ``prepare``    every method at r = 64, bf16 compute, on the device: time, peak GPU memory, the error figure; for
                  :data:`CPU_METHODS` the same prepare on the CPU from the same covariance file: error figures, NF4
                  codes, logits of the two prepared directories.
2. ``compare``    the default ``qcorda compare`` timed on the device against its CPU time (the first "Measured"
                  section of eval/results/compare_default.md, with its thread count); with ``--model``, the golden
                  settings against the golden file, every golden method or the part fails.
3. ``train``      the smoke recipe with ``paged_adamw_8bit`` and bf16: loss, steps/s, peak GPU memory against
                  ``qcorda plan --device cuda``; interrupted half-way and resumed; one paged-optimizer step.
4. ``merge_eval`` merge to bf16 on the device and on the CPU (the merged tensors compared), the verification, a
                  perplexity and GSM8K pass (timings: the weights are random).
5. ``precision``  a few training steps of qlora and qpissa in fp32 and under bf16 autocast (PEFT then computes the
                  LoRA product in bf16): whether the CPU-measured learning-rate factors carry over to a GPU.
6. ``decompose``  qcorda's CorDA-IPM and PiSSA splits against PEFT's at Llama-3-8B layer shapes, fp32, on the device.
7. ``synthetic``  streamed prepare of a Llama-3-8B-shaped checkpoint with a few of its 32 layers: wall time, peak
                  GPU memory (one layer at a time: the 8B figure), peak host RSS, extrapolated to 32 layers.
8. ``families``   tiny random models of a Llama, GPT-2 (Conv1D) and every mixture of experts (Mixtral, Qwen3-MoE,
                  Qwen2-MoE, GPT-OSS) prepared on the device and on the CPU (qlora's NF4 codes byte-equal, qcorda-cal's
                  error figure and experts' routed tokens from one covariance file), then trained, merged and exported
                  on the device (:func:`eval.families.on_device`).

Time: one deadline (``--budget``, 275 s on a GPU: with the last part's grace period at most 295 s, 110 s in the dry run) for the whole run, setup included. Each part
gets a share of the time left (:data:`WEIGHTS`: time a part leaves unused goes to the next) and checks it between
items; a part still running at its share plus a grace period is interrupted by an alarm. A part that runs out
records what it measured and its status says ``cut``. Setup (libraries, models) happens when a part first needs
it; a failure there is recorded and skips only the parts that need it. The markdown and the JSON beside it are
rewritten (atomically) after every part. FSDP needs several GPUs and is not part of this check
(eval/results/fsdp_cpu.md ran it on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from eval.lib.measure import environment as machine_environment
from eval.lib.measure import machine, peak_rss_mb, reset_peak_rss, rss_mb
from eval.lib.tensors import equal_fraction, prepared_tensors
from qcorda.io import write_text_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "eval" / "configs"
GEMMA_CONFIG = CONFIGS / "gemma3-270m"
LLAMA8B_CONFIG = CONFIGS / "llama3-8b"
RESULTS = ROOT / "eval" / "results"
GOLDEN = RESULTS / "compare_golden.json"
COMPARE_CPU = RESULTS / "compare_default.md"
GB = 1024**3
#: The methods prepared on the CPU too: NF4 alone (its codes must be byte-equal), an SVD init, a calibrated one.
CPU_METHODS = ("qlora", "qpissa", "qcorda-ipm")
#: An error figure (error / qlora's) on the device against the CPU's, same weights and covariance: fp32 splits
#: differ in rounding only (the randomized SVD draws its sketch on the CPU for every device: decompose.svd_lowrank).
CPU_TOLERANCE = 5e-3
#: The issue's tolerance for every golden figure against its CPU value.
GOLDEN_TOLERANCE = 0.02
#: ``qcorda plan --device cuda`` against ``max_memory_allocated``: the issue's target, as a ratio.
PLAN_TOLERANCE = 0.15
#: bitsandbytes pages an optimizer state only for parameters of at least this many values (get_state_buffer).
PAGED_MIN_NUMEL = 100_000
#: Loss under bf16 autocast against fp32 at the same step: below this relative difference, a run's trajectory (and so
#: its best learning rate) is taken as unchanged.
AUTOCAST_TOLERANCE = 0.01
#: Seconds past its share after which a part is interrupted (it checks its share between items before that).
GRACE = {"gpu": 20.0, "toy": 8.0}
#: Each part's share of the time left when it starts, relative to the parts still to run (first estimates of their
#: GPU time: no GPU run yet).
WEIGHTS = dict(prepare=70, compare=40, train=45, merge_eval=30, precision=30, decompose=25, synthetic=40, families=30)

SIZES = {
    "gpu": dict(
        budget=275.0, gemma={}, methods=None, compare={}, rank=64, compute_dtype="bfloat16", reload_records=4, calib_samples=32, calib_max_length=256,
        train_steps=30, resume_at=15, precision_steps=10, gsm8k_limit=16, gsm8k_new_tokens=64, ppl_tokens=4096,
        ppl_window=512, ppl_stride=256, llama={}, llama_layers=2, families=None,
    ),
    # the same code at toy size: two of Gemma's layers at their real width, the tokenizer's vocabulary; a narrow Llama
    "toy": dict(
        budget=110.0, gemma=dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], vocab_size=4096),
        methods=CPU_METHODS + ("qcorda-cal", "qeva"),
        compare=dict(methods=("qlora", "qpissa", "qcorda-ipm"), ranks=(16,), eval_samples=8, eval_max_length=64, eval_tokens=128),
        rank=16, compute_dtype="bfloat16", reload_records=2, calib_samples=8, calib_max_length=64,
        train_steps=2, resume_at=1, precision_steps=2, gsm8k_limit=2, gsm8k_new_tokens=8, ppl_tokens=256, ppl_window=128,
        ppl_stride=64, llama=dict(hidden_size=256, intermediate_size=896, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=128, vocab_size=4096), llama_layers=2, families=("gpt2", "qwen2-moe"),
    ),
}


class Cut(BaseException):
    """The running part reached its share of the deadline. A BaseException: no ``except Exception`` in a library swallows it."""


class Skipped(Exception):
    """A part needs a setup step that failed."""


@dataclass
class Context:
    """What every part reads: the mode's sizes, the device, the scratch directory, the deadline, what setup made."""

    sizes: dict
    device: str
    work: Path
    toy: bool
    deadline: float
    model: str | None = None
    """``--model``: a real Gemma-3-270M directory for the golden comparisons."""
    inject: frozenset = frozenset()
    overrun: frozenset = frozenset()
    setup: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    part: str = ""
    part_end: float = 0.0
    checked: int = 0

    def left(self) -> float:
        return self.part_end - time.perf_counter()

    def check(self, what: str = "") -> None:
        """Between two items of a part: raise :class:`Cut` once the part's share is spent."""
        self.checked += 1
        if time.perf_counter() > self.part_end:
            raise Cut(f"share of the deadline spent before {what or 'the next item'}")
        if self.part in self.overrun and self.checked > 1:  # --inject-overrun: hang past the share, checking nothing
            while True:
                time.sleep(1.0)

    def need(self, name: str):
        """The product of setup step ``name`` (made on first use, recorded in ``setup``), or :class:`Skipped`."""
        if name not in self.setup:
            t0 = time.perf_counter()
            try:
                if name in self.inject:
                    raise RuntimeError(f"failure injected by --inject-failure {name}")
                value = SETUP[name](self)
                self.setup[name] = {"status": "ok", "seconds": time.perf_counter() - t0, "value": value}
            except Exception as e:  # noqa: BLE001  (recorded; only the parts that need it are skipped)
                self.setup[name] = {"status": "error", "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc()[-3000:]}
        s = self.setup[name]
        if s["status"] != "ok":
            raise Skipped(f"setup '{name}' failed: {s['error']}")
        return s["value"]


# --------------------------------------------------------------------------- setup


def setup_libs(ctx: Context) -> dict:
    """bitsandbytes, TRL, datasets importable, and bitsandbytes' kernels working on the device (one NF4 round trip)."""
    import bitsandbytes
    import bitsandbytes.functional as F
    import datasets
    import torch
    import trl

    w = torch.randn(256, 64, device=ctx.device)
    q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    err = (F.dequantize_4bit(q, state, quant_type="nf4") - w).abs().max().item()
    if not err < 1.0:
        raise RuntimeError(f"bitsandbytes NF4 round trip on {ctx.device}: max error {err}")
    return {"bitsandbytes": bitsandbytes.__version__, "trl": trl.__version__, "datasets": datasets.__version__}


def setup_gemma(ctx: Context) -> str:
    """A Gemma-3-270M directory with seeded random weights from ``eval/configs/gemma3-270m`` (fp32, as the converted
    real one), its tokenizer beside it; in the dry run two layers and the tokenizer's vocabulary."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = ctx.work / "gemma3-270m-random"
    config = AutoConfig.from_pretrained(GEMMA_CONFIG)
    for k, v in ctx.sizes["gemma"].items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(GEMMA_CONFIG).save_pretrained(out)
    del model
    return str(out)


def setup_real(ctx: Context) -> str:
    """``--model``: a directory with Gemma-3-270M's weights."""
    if ctx.model is None:
        raise FileNotFoundError("no --model DIR given: the golden figures need the real Gemma-3-270M")
    path = Path(ctx.model)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--model {path}: no config.json there")
    return str(path)


def setup_llama(ctx: Context) -> dict:
    """The Llama-3-8B numbers of ``eval/configs/llama3-8b`` (in the dry run, narrowed)."""
    config = json.loads((LLAMA8B_CONFIG / "config.json").read_text())
    return {**config, **ctx.sizes["llama"]}


def write_tokenizer(out: Path = GEMMA_CONFIG, vocab: int = 4096) -> None:
    """Train the check's tokenizer (``eval/configs/README.md``): byte-level BPE on the bundled data, Gemma's special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from qcorda.data import BUNDLED

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0-4, as Gemma-3's config.json expects
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for k in ("gsm8k-train", "nq-open", "wikitext2") for line in BUNDLED[k].read_text().splitlines()], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                                   mask_token="<mask>")
    fast.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5.17 (the device's) knows this name
    write_text_atomic(out / "tokenizer_config.json", json.dumps(cfg, indent=2))


SETUP = {"libs": setup_libs, "gemma": setup_gemma, "real": setup_real, "llama": setup_llama}


# --------------------------------------------------------------------------- measuring


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def measured(device: str, into: dict):
    """Wall time, peak GPU memory (``max_memory_allocated``, GB) and peak host RSS (``VmHWM`` reset at the start, GB)
    of the block into ``into``, with the RSS at its start: what the block added is the difference."""
    import torch

    free(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    into["host_start_gb"] = rss_mb() / 1024
    t0 = time.perf_counter()
    try:
        yield into
    finally:
        sync(device)
        into["seconds"] = time.perf_counter() - t0
        into["host_peak_gb"] = peak_rss_mb() / 1024
        into["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / GB if device == "cuda" else None


def check(name: str, value, target: str, passed: bool | None) -> dict:
    """One verdict of a part; ``passed`` None: not applicable here (``target`` says why)."""
    return {"check": name, "value": value, "target": target, "pass": passed}


def new_result(summary: str = "") -> dict:
    """What a part fills in as it measures, so that a cut part still shows what it got."""
    return {"summary": summary, "tables": [], "checks": [], "notes": [], "figures": {}}


def table(r: dict, title: str, head: list[str]) -> list:
    """A new table of ``r``; returns its row list, to append to as rows are measured."""
    rows: list = []
    r["tables"].append({"title": title, "head": head, "rows": rows})
    return rows


def held_out(tok, records: int):
    from qcorda.scoring import held_out_batches

    return list(held_out_batches(tok, "gsm8k-test", ("question", "answer"), records, 128, 2)[0])


# --------------------------------------------------------------------------- 1. prepare


def prepare_config(ctx: Context, method: str, device: str):
    from qcorda.config import CalibConfig, InitConfig

    s = ctx.sizes
    calib = CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=s["calib_samples"], max_length=s["calib_max_length"])
    return InitConfig(method=method, rank=s["rank"], device=device, compute_dtype=s["compute_dtype"], calib=calib)


def part_prepare(ctx: Context, r: dict) -> None:
    """Every method streamed from the random Gemma on the device; :data:`CPU_METHODS` also on the CPU, compared."""
    from qcorda.config import METHODS
    from qcorda.models import load_model
    from qcorda.prepare import prepare
    from qcorda.prepared import load_prepared
    from qcorda.scoring import logit_agreement

    ctx.need("libs")
    model_dir = ctx.need("gemma")
    dev, s = ctx.device, ctx.sizes
    _, tok = load_model(model_dir)
    batches = held_out(tok, s["reload_records"])
    cov = ctx.work / "prepare-covariance.safetensors"  # collected once on the device; every other run reads it
    order = list(CPU_METHODS) + [m for m in (s["methods"] or METHODS) if m not in CPU_METHODS]
    rows = table(r, "On the device", ["method", "prepare s", "peak GPU GB", "peak host RSS GB", "weight err / qlora", "calibration"])
    cpu_rows = table(r, "Device against the CPU, same weights and covariance",
                     ["method", "CPU s", "err / qlora (device)", "(CPU)", "difference", "NF4 codes equal", "absmax bytes equal",
                      "max |Δlogit|", "top-1"])
    r["figures"] = {"device": {}, "cpu": {}, "not_run": list(order)}
    for method in order:
        ctx.check(f"prepare {method}")
        r["figures"]["not_run"].remove(method)
        cfg = prepare_config(ctx, method, dev)
        reuse = cfg.needs_covariance and cov.exists()
        out = ctx.work / f"prepared-{method}"
        fig: dict = {}
        try:  # one method's failure is recorded, the others still run
            with measured(dev, fig):
                p = prepare(model_dir, cfg, out, calib=cov if reuse else None, overwrite=True, progress=False,
                            save_covariance=cov if cfg.needs_covariance and not reuse else None)
        except Exception as e:  # noqa: BLE001
            r["figures"]["device"][method] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            rows.append([method, f"error: {type(e).__name__}: {str(e)[:160]}", None, None, None, None])
            r["checks"].append(check(f"{method}: prepared on {dev}", type(e).__name__, "no exception", False))
            free(dev)
            continue
        rel = p.report.err / p.report.qlora_err
        calibration = "read the file" if reuse else ("collected" if cfg.needs_calibration else "none")
        r["figures"]["device"][method] = dict(fig, weight_err_rel=rel, calibration=calibration)
        rows.append([method, fig["seconds"], fig["gpu_peak_gb"], fig["host_peak_gb"], rel, calibration])
        if method not in CPU_METHODS:
            continue
        ctx.check(f"prepare {method} on the CPU")
        cpu_out = ctx.work / f"prepared-{method}-cpu"
        t0 = time.perf_counter()
        q = prepare(model_dir, prepare_config(ctx, method, "cpu"), cpu_out, calib=cov if cfg.needs_covariance else None,
                    overwrite=True, progress=False)
        cpu_s = time.perf_counter() - t0
        cpu_rel = q.report.err / q.report.qlora_err
        a, b = prepared_tensors(out), prepared_tensors(cpu_out)
        codes = [k for k in a if k.endswith(".weight") and a[k].dtype.is_floating_point is False]
        absmax = [k for k in a if "absmax" in k or "quant_map" in k]
        codes_eq, n_codes = equal_fraction(a, b, codes)
        absmax_eq, _ = equal_fraction(a, b, absmax)
        ctx.check(f"logits of {method}")
        on_dev, on_cpu = load_prepared(out, is_trainable=False, device=dev), load_prepared(cpu_out, is_trainable=False, device="cpu")
        agree = logit_agreement({"cpu": on_cpu, dev: on_dev}, [("cpu", dev)], batches, progress=False)[0]
        where = {str(p.device) for p in on_cpu.parameters()}
        r["checks"].append(check(f"{method}: load_prepared(device='cpu') is on the CPU", ", ".join(sorted(where)), "cpu",
                                 where == {"cpu"}))
        del on_dev, on_cpu
        r["figures"]["cpu"][method] = {"seconds": cpu_s, "weight_err_rel": cpu_rel, "codes_equal": codes_eq, "codes": n_codes,
                                       "absmax_equal": absmax_eq, "max_abs_diff": agree.max_abs_diff, "top1": agree.top1,
                                       "mean_kl": agree.mean_kl}
        cpu_rows.append([method, cpu_s, rel, cpu_rel, rel - cpu_rel, codes_eq, absmax_eq, agree.max_abs_diff, agree.top1])
        r["checks"].append(check(f"{method}: error figure, device vs CPU", rel - cpu_rel, f"within ±{CPU_TOLERANCE}",
                                 abs(rel - cpu_rel) <= CPU_TOLERANCE))
        if method == "qlora":  # the residual is W itself: the same input to a deterministic quantizer
            r["checks"].append(check("qlora: NF4 codes and absmax, device vs CPU", min(codes_eq, absmax_eq), "byte-equal (1.0)",
                                     codes_eq == 1.0 and absmax_eq == 1.0))
        r["checks"].append(check(f"{method}: logits of the two prepared models, top-1", agree.top1, ">= 0.99 (bf16 compute)",
                                 agree.top1 >= 0.99))
        free(dev)
    r["notes"].append(f"Random Gemma-3-270M ({'2 layers, ' if ctx.toy else ''}seeded, eval/configs/gemma3-270m), streamed "
                      f"prepare at r = {s['rank']}, {s['compute_dtype']} compute. Calibration: {s['calib_samples']} GSM8K train "
                      "records, collected on the device by the first data-driven method and read from its file by every other "
                      "run, the CPU ones included, so device and CPU split the same weights with the same covariance. 'NF4 codes "
                      "equal': the fraction of equal bytes of the stored 4-bit weights; only qlora's must be 1 (the others "
                      "quantize W − s·B·A, whose last bits differ between the devices' fp32 arithmetic). Logits: held-out GSM8K "
                      "test text through each prepared directory loaded on its own device.")
    r["summary"] = (f"{len(r['figures']['device'])} methods at r={s['rank']} on {dev}, "
                    f"{len(r['figures']['cpu'])} of them against the CPU")


# --------------------------------------------------------------------------- 2. compare


def cpu_compare_baseline(text: str | None = None) -> tuple[float, str]:
    """``(seconds, where)``: compare's own timer in the newest measured section of eval/results/compare_default.md
    (``text``; the first ``## Measured`` heading: the file puts the newest first), with the thread count that heading
    states (the old check searched the whole file and called the figure a two-core one; it is a one-thread one)."""
    text = COMPARE_CPU.read_text() if text is None else text
    m = re.search(r"^## Measured[^\n]*?on (one core|\d+ cores|an idle \d-core machine)[^\n]*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    t = m and re.search(r"compare's own timer: (\d+(?:\.\d+)?) s", m.group(2))
    if t is None:
        raise ValueError(f"{COMPARE_CPU.relative_to(ROOT)}: its first '## Measured ... on N cores' section no longer states "
                         "\"compare's own timer: N s\"")
    return float(t.group(1)), f"{COMPARE_CPU.name}, section '{m.group(0).splitlines()[0][3:]}' (real Gemma-3-270M)"


def part_compare(ctx: Context, r: dict) -> None:
    """The default ``qcorda compare`` timed on the device; with ``--model``, the golden settings against the golden file."""
    from qcorda.compare import compare
    from qcorda.config import CompareConfig
    from qcorda.models import load_model

    ctx.need("libs")
    model_dir = ctx.need("gemma")
    dev = ctx.device
    model, tok = load_model(model_dir)
    model.to(dev)
    cfg = CompareConfig(**ctx.sizes["compare"])
    calib = cfg.init.calib if not ctx.toy else replace(cfg.init.calib, samples=ctx.sizes["calib_samples"],
                                                          max_length=ctx.sizes["calib_max_length"])
    cfg = replace(cfg, init=replace(cfg.init, device=dev, calib=calib))
    timing = table(r, "Default compare: time" + (" (dry run: 3 methods, r = 16, short eval)" if ctx.toy else ""), ["run", "methods", "ranks", f"{dev} s", "CPU s", "speedup", "peak GPU GB",
                                                "peak host RSS GB"])
    ctx.check("the default compare")
    fig: dict = {}
    with measured(dev, fig):
        report = compare(model, tok, cfg, "gemma-3-270m (random weights)", progress=False)
    cpu_s, source = (None, "") if ctx.toy else cpu_compare_baseline()
    timing.append(["default compare", ", ".join(cfg.methods), ", ".join(map(str, cfg.ranks)), report.seconds, cpu_s,
                   None if cpu_s is None else cpu_s / report.seconds, fig["gpu_peak_gb"], fig["host_peak_gb"]])
    r["figures"].update(compare_seconds=report.seconds, timings=report.timings, cpu_seconds=cpu_s, cpu_source=source)
    r["notes"].append(f"CPU time: {source}: the same shapes and settings on the real weights; the work does not depend on the "
                      "weights' values except --iters auto's per-layer choice." if cpu_s else
                      "Dry run: the CPU time of the default compare is a real-size figure, not comparable at toy size.")
    r["summary"] = f"default compare {report.seconds:.1f} s on {dev}" + (f" (CPU {cpu_s:.0f} s: {cpu_s / report.seconds:.1f}x)" if cpu_s else "")
    del model
    free(dev)
    if ctx.model is None:
        r["notes"].append("No --model: the golden figures (real weights) were not compared; the prepare part compares the "
                          "device with the CPU on the same random weights instead.")
        return
    from eval import golden_compare

    real = ctx.need("real")
    methods = tuple(golden_compare.REFERENCE) + tuple(golden_compare.EXPECTED_FROM_MEASURED)
    ref = json.loads(GOLDEN.read_text())["measured"]
    rows = table(r, "Golden settings on the device against the CPU golden file", ["method", "metric", dev, "golden (CPU)", "difference"])
    r["checks"].append(check("golden methods compared", 0, f"all {len(methods)}", False))  # replaced once they are
    ctx.check("the golden compare")
    model, tok = load_model(real)
    gcfg = golden_compare.golden_config(methods)
    gcfg = replace(gcfg, init=replace(gcfg.init, device=dev))
    golden = compare(model.to(dev), tok, gcfg, "golden", progress=False)
    got = {row["method"]: {k: row[k] for k in golden_compare.METRICS} for row in golden.totals()}
    r["checks"][-1] = check("golden methods compared", len(got), f"all {len(methods)}", set(methods) <= set(got))
    for method, metrics in got.items():
        for k, v in metrics.items():
            rows.append([method, k, v, ref[method][k], v - ref[method][k]])
            r["checks"].append(check(f"{method} {k}", v - ref[method][k], f"within ±{GOLDEN_TOLERANCE} of {ref[method][k]:.4f}",
                                     abs(v - ref[method][k]) <= GOLDEN_TOLERANCE))
    r["figures"]["golden"], r["figures"]["golden_seconds"] = got, golden.seconds
    r["summary"] += f"; golden settings {golden.seconds:.1f} s, {len(got)} of {len(methods)} methods"


# --------------------------------------------------------------------------- 3. train


def smoke_path() -> Path:
    """The CPU smoke recipe (qcorda/recipes/ since issue 23, recipes/ before)."""
    for p in (ROOT / "qcorda" / "recipes" / "gemma3-270m-cpu.yaml", ROOT / "recipes" / "gemma3-270m-cpu.yaml"):
        if p.exists():
            return p
    raise FileNotFoundError("gemma3-270m-cpu.yaml is in neither qcorda/recipes/ nor recipes/")


def smoke_recipe(ctx: Context, run: str, steps: int, *extra: str):
    """The smoke recipe on the random Gemma with the check's overrides (its ``arch:`` from the model's config)."""
    from qcorda.plan import ARCH_KEYS
    from qcorda.recipe import load_recipe

    model_dir = ctx.need("gemma")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    over = [f"output_dir={ctx.work / run}", f"model={model_dir}", f"train.max_steps={steps}", f"train.save_steps={steps}",
            "train.optim=paged_adamw_8bit", "train.bf16=true", f"init.calib.samples={ctx.sizes['calib_samples']}"]
    over += [f"arch.{k}={json.dumps(config[ck])}" for k, ck in ARCH_KEYS.items() if ck in config]
    return load_recipe(smoke_path(), over + list(extra))


def paged_probe(device: str) -> dict:
    """One step of bitsandbytes' ``PagedAdamW8bit`` on a parameter big enough to be paged, against ``AdamW8bit``'s:
    the paged buffers it added (2 on a GPU, 0 on a CPU, where bitsandbytes falls back) and the largest difference of
    the two updated parameters (0: paging moves the states, not the arithmetic)."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import GlobalPageManager

    g = torch.Generator().manual_seed(0)
    init, grad = torch.randn(512, 256, generator=g), torch.randn(512, 256, generator=g)
    pages = GlobalPageManager.get_instance().paged_tensors
    out = {}
    for cls in (bnb.optim.PagedAdamW8bit, bnb.optim.AdamW8bit):
        p = torch.nn.Parameter(init.to(device, copy=True))
        p.grad = grad.to(device, copy=True)
        before = len(pages)
        opt = cls([p], lr=1e-3)
        opt.step()
        sync(device)
        out[cls.__name__] = (p.detach().cpu(), len(pages) - before)
        del opt
    (paged, added), (plain, _) = out["PagedAdamW8bit"], out["AdamW8bit"]
    return {"paged_buffers": added, "max_diff_vs_unpaged": (paged - plain).abs().max().item(), "moved": (paged - init).abs().max().item()}


def train_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def part_train(ctx: Context, r: dict) -> None:
    """The smoke recipe for ``train_steps`` steps (measured against the plan), a paged-optimizer step, then the same run
    interrupted half-way and resumed."""
    from bitsandbytes.functional import GlobalPageManager

    from qcorda.plan import plan_recipe
    from qcorda.train import train

    ctx.need("libs")
    s, dev = ctx.sizes, ctx.device
    rows = table(r, "Smoke recipe on the random Gemma", ["figure", "value"])
    recipe = smoke_recipe(ctx, "train", s["train_steps"])
    pages = GlobalPageManager.get_instance().paged_tensors
    before = len(pages)
    ctx.check("training")
    fig: dict = {}
    with measured(dev, fig):
        res = train(recipe, progress=False)
    ctx.cache["trained"] = (res.prepared, res.adapter)
    final = next((h for h in reversed(train_log(Path(recipe.output_dir))) if "train_runtime" in h), {})
    plan = plan_recipe(recipe, "cuda").plan
    planned = (plan.total - plan.cuda_context) / GB
    ratio = None if fig["gpu_peak_gb"] is None else planned / fig["gpu_peak_gb"]
    rows += [["train wall s (prepare + load + steps + save)", fig["seconds"]], ["steps", res.global_step],
             ["steps/s (Trainer)", final.get("train_steps_per_second")], ["loss first -> last", f"{res.first_loss:.4f} -> {res.last_loss:.4f}"],
             ["peak GPU GB (max_memory_allocated)", fig["gpu_peak_gb"]], ["plan GB (--device cuda, without the CUDA context)", planned],
             ["plan / measured", ratio], ["peak host RSS GB", fig["host_peak_gb"]],
             ["paged optimizer buffers in training", len(pages) - before]]
    r["checks"] += [check("steps trained", res.global_step, str(s["train_steps"]), res.global_step == s["train_steps"]),
                    check("plan / measured peak GPU memory", ratio, f"1 ± {PLAN_TOLERANCE}",
                          None if ratio is None else abs(ratio - 1) <= PLAN_TOLERANCE)]
    r["figures"].update(train=fig, log=final, plan_gb=planned, plan_ratio=ratio, first_loss=res.first_loss, last_loss=res.last_loss)
    r["summary"] = f"{res.global_step} steps, loss {res.first_loss:.3f} -> {res.last_loss:.3f}" + (
        f", peak {fig['gpu_peak_gb']:.2f} GB vs plan {planned:.2f} GB" if ratio else "")
    ctx.check("the paged probe")
    probe = paged_probe(dev)
    rows.append(["paged probe: paged buffers, max |Δ| vs AdamW8bit", f"{probe['paged_buffers']}, {probe['max_diff_vs_unpaged']:.3g}"])
    r["checks"] += [check("paged probe: paged buffers", probe["paged_buffers"], "2 on CUDA, 0 on the CPU",
                          probe["paged_buffers"] == (2 if dev == "cuda" else 0)),
                    check("paged probe: same update as AdamW8bit", probe["max_diff_vs_unpaged"], "0 (and the parameter moved)",
                          probe["max_diff_vs_unpaged"] == 0 and probe["moved"] > 0)]
    r["figures"]["probe"] = probe
    resume = [f"prepared={res.prepared}", "init=null"]
    ctx.check("the interrupted run")
    part1 = train(smoke_recipe(ctx, "resume", s["resume_at"], *resume), progress=False)
    ctx.check("the resumed run")
    part2 = train(smoke_recipe(ctx, "resume", s["train_steps"], *resume), progress=False)
    diff = abs(part2.last_loss - res.last_loss) / abs(res.last_loss)
    rows += [[f"resumed run: steps 0-{part1.global_step}, then from", part2.resumed_from and Path(part2.resumed_from).name],
             ["resumed run: last loss (relative difference)", f"{part2.last_loss:.4f} ({diff:.2e})"]]
    r["checks"] += [check("resumed from the checkpoint", part2.resumed_from, f"checkpoint-{s['resume_at']}",
                          bool(part2.resumed_from) and Path(part2.resumed_from).name == f"checkpoint-{s['resume_at']}"),
                    check("resumed run's last loss vs the uninterrupted run", diff, "relative difference <= 1e-2", diff <= 1e-2)]
    r["notes"] += [f"bitsandbytes pages an optimizer state only for tensors of >= {PAGED_MIN_NUMEL} values; the smoke "
                   f"recipe's adapter tensors (r = {recipe.init.rank}) are smaller, so its run pages none; the paged probe "
                   "steps PagedAdamW8bit on a 512 × 256 parameter instead.",
                   "Plan: `qcorda plan --device cuda` of the same recipe without its CUDA-context allowance, against "
                   "torch.cuda.max_memory_allocated over train() (prepare, loading, the steps, saving the adapter)."]


# --------------------------------------------------------------------------- 4. merge + eval


def part_merge_eval(ctx: Context, r: dict) -> None:
    """The trained adapter (else the init adapter) merged to bf16 on the device, verified, the same merge on the CPU
    compared tensor by tensor, then perplexity and GSM8K on the merged model."""
    from qcorda.config import EvalConfig, MergeConfig
    from qcorda.evaluate import evaluate, load_for_eval
    from qcorda.merge import merge

    ctx.need("libs")
    s, dev = ctx.sizes, ctx.device
    rows = table(r, "Merged (bf16) model", ["figure", "value"])
    if "trained" in ctx.cache:
        prepared, adapter = ctx.cache["trained"]
    else:
        prepared = ctx.work / "merge-prepared"
        if not (prepared / "qcorda.json").exists():
            from qcorda.prepare import prepare

            prepare(ctx.need("gemma"), prepare_config(ctx, "qpissa", dev), prepared, progress=False)
        adapter = prepared / "adapter_init"
        r["notes"].append("Part train left no adapter: the init adapter of a qpissa prepare is merged instead.")
    ctx.check("the merge")
    fig: dict = {}
    with measured(dev, fig):
        m = merge(prepared, ctx.work / "merged", MergeConfig(dtype="bfloat16", device=dev), adapter=adapter, overwrite=True, progress=False)
    a = m.agreement[0]
    rows += [["merge + verify s", fig["seconds"]], ["peak GPU GB (merge + verify)", fig["gpu_peak_gb"]],
             ["peak host RSS GB", fig["host_peak_gb"]], ["verify tokens", a.n_tokens], ["top-1 agreement", a.top1],
             ["max |Δlogit|", a.max_abs_diff], ["mean KL (nats)", a.mean_kl], ["non-finite tokens", a.nonfinite]]
    r["checks"].append(check("non-finite logits", a.nonfinite, "0", a.nonfinite == 0))
    r["figures"].update(merge=fig, agreement=vars(a))
    r["summary"] = f"merged: top-1 {a.top1:.4f}, mean KL {a.mean_kl:.2e}"
    ctx.check("the merge on the CPU")
    t0 = time.perf_counter()
    merge(prepared, ctx.work / "merged-cpu", MergeConfig(dtype="bfloat16", device="cpu", verify=False), adapter=adapter, overwrite=True,
          progress=False)
    cpu_s = time.perf_counter() - t0
    a_dev, a_cpu = prepared_tensors(ctx.work / "merged"), prepared_tensors(ctx.work / "merged-cpu")
    same, n = equal_fraction(a_dev, a_cpu, sorted(a_dev))
    worst = max(((a_dev[k].float() - a_cpu[k].float()).abs().max().item() for k in a_dev), default=0.0)
    rows += [["CPU merge s", cpu_s], ["merged tensors: bf16 values equal, device vs CPU", same], ["max |Δ| of a merged weight", worst]]
    r["checks"].append(check("merged tensors, device vs CPU", same, ">= 0.999 of the bf16 values equal (fp32 s·B·A rounds the same)",
                             same >= 0.999))
    r["figures"].update(cpu_merge_seconds=cpu_s, merged_equal=same, merged_values=n // 2, merged_max_diff=worst)
    ctx.check("the evaluation")
    model, tok, _ = load_for_eval(ctx.work / "merged", device=dev)
    res = evaluate(model, tok, EvalConfig(tasks=("ppl", "gsm8k"), limit=s["gsm8k_limit"], gsm8k_max_new_tokens=s["gsm8k_new_tokens"],
                                          ppl_tokens=s["ppl_tokens"], ppl_window=s["ppl_window"], ppl_stride=s["ppl_stride"]), progress=False)
    ppl, gsm = res["ppl"], res["gsm8k"]
    rows += [[f"perplexity wikitext-2 ({ppl.n} tokens), s", f"{ppl.metrics['ppl']:.1f}, {ppl.seconds:.1f}"],
             [f"GSM8K ({gsm.n} questions, {s['gsm8k_new_tokens']} new tokens), s", f"{gsm.metrics['accuracy']:.3f}, {gsm.seconds:.1f}"]]
    r["figures"].update(ppl=ppl.metrics, gsm8k=gsm.metrics, eval_seconds=[ppl.seconds, gsm.seconds])
    r["notes"].append("Random weights: the merged model's top-1 agreement with the 4-bit + adapter model is near-tie noise "
                      "(a random model's logits are nearly flat), so it is reported, not checked; the tensor-by-tensor "
                      "comparison with the CPU merge is the correctness check, perplexity and GSM8K are timings.")


# --------------------------------------------------------------------------- 5. precision


def part_precision(ctx: Context, r: dict) -> None:
    """qlora and qpissa (lr factors 1 and 1/6) trained a few steps in fp32 and under bf16 autocast, same data and seed."""
    from qcorda.train import logged_losses, train

    ctx.need("libs")
    steps = ctx.sizes["precision_steps"]
    rows = table(r, f"Loss per step, {steps} steps", ["init", "lr", "fp32 losses", "bf16 autocast losses", "max relative difference"])
    worst = {}
    for method in ("qlora", "qpissa"):
        losses, lr, prepared = {}, None, []
        for bf16 in (False, True):
            ctx.check(f"{method} {'bf16' if bf16 else 'fp32'}")
            run = f"precision-{method}-{'bf16' if bf16 else 'fp32'}"
            source = [f"prepared={prepared[0]}", "init=null"] if prepared else [f"init.method={method}", "init.compute_dtype=float32"]
            res = train(smoke_recipe(ctx, run, steps, *source, f"train.bf16={str(bf16).lower()}", "train.logging_steps=1",
                                     "train.optim=adamw_torch"), progress=False)
            prepared.append(res.prepared)  # the bf16 run trains from the fp32 run's prepared directory
            losses[bf16] = [loss for _, loss in logged_losses(train_log(ctx.work / run))]
            lr = res.learning_rate
        rel = [abs(b - a) / abs(a) for a, b in zip(losses[False], losses[True], strict=True)]
        worst[method] = max(rel)
        rows.append([method, lr, " ".join(f"{x:.4f}" for x in losses[False]), " ".join(f"{x:.4f}" for x in losses[True]), worst[method]])
        r["checks"].append(check(f"{method}: bf16 autocast vs fp32 loss", worst[method], f"<= {AUTOCAST_TOLERANCE} relative",
                                 worst[method] <= AUTOCAST_TOLERANCE))
    r["figures"]["max_relative_difference"] = worst
    same = all(v <= AUTOCAST_TOLERANCE for v in worst.values())
    r["summary"] = ("the lr factors carry over: bf16 autocast changes no init's first losses by more than "
                    f"{AUTOCAST_TOLERANCE:.0%}" if same else
                    "bf16 autocast changes the first losses by more than "
                    f"{AUTOCAST_TOLERANCE:.0%}: the CPU-measured lr factors need remeasuring on a GPU")
    r["notes"].append("The prepared model computes in fp32 (init.compute_dtype=float32) in both runs, so the only difference is "
                      "the Trainer's bf16 autocast, under which PEFT computes the LoRA product in bf16 on CUDA (fp32 on the CPU). "
                      "Both inits at their recommended lr (qcorda.lr): if neither run's trajectory moves, neither does its best "
                      "lr, and the ratio of the two (the factor) transfers. A few steps show the dynamics, not the end loss.")


# --------------------------------------------------------------------------- 6. decomposition


def part_decompose(ctx: Context, r: dict) -> None:
    """The per-layer comparison with PEFT (:mod:`eval.lib.peft_decompose`) at Llama-3-8B's projection shapes, shape by shape."""
    from eval.lib import peft_decompose

    c = ctx.need("llama")
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = list(dict.fromkeys((f"{h}x{h}", f"{kv}x{h}", f"{inter}x{h}", f"{h}x{inter}")))
    drows: list = []
    res = table(r, f"Per layer, fp32, r = {ctx.sizes['rank']}", list(peft_decompose.DECOMPOSE_HEAD))
    r["figures"] = {"rows": drows, "not_run": list(shapes)}
    for shape in shapes:
        ctx.check(shape)
        r["figures"]["not_run"].remove(shape)
        try:
            got = peft_decompose.bench_decompose(ctx.sizes["rank"], shape, device=ctx.device, log=False)
        except Exception as e:  # noqa: BLE001  (one shape's failure is recorded, the next still runs)
            r["checks"].append(check(f"{shape}: decomposed", f"{type(e).__name__}: {str(e)[:200]}", "no exception", False))
            free(ctx.device)
            continue
        drows += got
        res.extend(peft_decompose.decompose_table(got)[1])
        for d in got:
            diff = 100 * (d["rand_err"] - d["peft_err"]) / d["peft_err"]
            r["checks"].append(check(f"{shape} {d['method']}: qcorda randomized error vs PEFT's", diff, "<= +1 %", diff <= 1.0))
        free(ctx.device)
    r["summary"] = f"{len(drows) // 2} Llama-3-8B shapes at r={ctx.sizes['rank']} on {ctx.device}"
    r["notes"].append("Synthetic weights with a decaying spectrum (eval.lib.synthetic); CorDA error ‖(W − s·B·A)·C‖_F, PiSSA "
                      "error ‖W − s·B·A‖_F; speedup = PEFT s / qcorda s; timings synchronize the device.")


# --------------------------------------------------------------------------- 7. synthetic 8B-shaped checkpoint


def part_synthetic(ctx: Context, r: dict) -> None:
    """A Llama-3-8B-shaped bf16 checkpoint with ``llama_layers`` of its layers (seeded random weights, written by
    transformers), stream-prepared on the device; per-layer time and memory, extrapolated to the 32 layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcorda.config import InitConfig
    from qcorda.prepare import prepare

    ctx.need("libs")
    c, dev, n = ctx.need("llama"), ctx.device, ctx.sizes["llama_layers"]
    full_layers = c["num_hidden_layers"]
    config = LlamaConfig(**{**c, "num_hidden_layers": n})
    src = ctx.work / "llama3-8b-shaped"
    rows = table(r, "Streamed prepare (qpissa, randomized SVD, bf16 compute)", ["figure", f"measured ({n} layers)",
                                                                                 f"extrapolated ({full_layers} layers)"])
    ctx.check("writing the checkpoint")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):  # random init is the slow part of writing: let the device do it
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(src)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(GEMMA_CONFIG).save_pretrained(src)  # a tokenizer for the directory; prepare reads none
    del model
    free(dev)
    write_s = time.perf_counter() - t0
    bf16_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / GB
    ctx.check("the streamed prepare")
    cfg = InitConfig(method="qpissa", rank=ctx.sizes["rank"], svd="randomized", compute_dtype="bfloat16", device=dev)
    fig: dict = {}
    with measured(dev, fig):
        report = prepare(str(src), cfg, ctx.work / "llama3-8b-prepared", progress=False).report
    layer_s = sum(layer.seconds for layer in report.layers)
    fixed = fig["seconds"] - layer_s
    est = fixed + layer_s * full_layers / n
    rows += [["bf16 checkpoint GB (written in s)", f"{bf16_gb:.2f} ({write_s:.1f} s)", None],
             ["targets", len(report.targets), len(report.targets) * full_layers // n],
             ["prepare wall s (layers' own s)", f"{fig['seconds']:.1f} ({layer_s:.1f})", est],
             ["peak GPU GB (max_memory_allocated)", fig["gpu_peak_gb"], fig["gpu_peak_gb"]],
             ["peak host RSS GB (RSS at start)", f"{fig['host_peak_gb']:.2f} ({fig['host_start_gb']:.2f})", fig["host_peak_gb"]]]
    r["figures"] = dict(fig, write_seconds=write_s, bf16_gb=bf16_gb, layer_seconds=layer_s, extrapolated_seconds=est, layers=n)
    r["summary"] = (f"{n} of {full_layers} Llama-3-8B layers: prepare {fig['seconds']:.1f} s, est. {est:.0f} s for {full_layers}"
                    + (f", peak GPU {fig['gpu_peak_gb']:.2f} GB" if fig["gpu_peak_gb"] is not None else ""))
    r["notes"].append(f"Architecture: eval/configs/llama3-8b{' (narrowed for the dry run)' if ctx.toy else ''}, {n} layers, the "
                      "embedding and head in full. The extrapolated column is not a measurement: the fixed part (reading the "
                      "embedding and head, writing, the CUDA workspaces) plus the layers' own seconds scaled to all layers; the "
                      "streamed engine holds one layer at a time, so the peaks are the full model's.")


# --------------------------------------------------------------------------- 8. families


def part_families(ctx: Context, r: dict) -> None:
    """Tiny random models of every family the GPU has not otherwise seen, each on the device against the CPU
    (:func:`eval.families.on_device`; the dry run takes two of them)."""
    from eval.families import ON_DEVICE, on_device

    ctx.need("libs")
    dev = ctx.device
    families = ctx.sizes["families"] or ON_DEVICE
    rows = table(r, "Tiny families on the device against the CPU", ["family", "seconds", "checks passed", "failed"])
    r["figures"] = {"not_run": list(families)}
    for family in families:
        ctx.check(f"family {family}")
        r["figures"]["not_run"].remove(family)
        t0 = time.perf_counter()
        try:  # one family's failure is recorded, the others still run
            res = on_device(family, dev, ctx.work / f"family-{family}")
        except Exception as e:  # noqa: BLE001
            r["figures"][family] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            rows.append([family, time.perf_counter() - t0, None, f"error: {type(e).__name__}: {str(e)[:160]}"])
            r["checks"].append(check(f"{family}: on {dev}", type(e).__name__, "no exception", False))
            free(dev)
            continue
        r["figures"][family] = {k: v for k, v in res.items() if k != "checks"}
        for what, value, target, passed in res["checks"]:
            r["checks"].append(check(f"{family}: {what}", value, target, passed))
        rows.append([family, time.perf_counter() - t0, sum(c[3] for c in res["checks"]),
                     ", ".join(c[0] for c in res["checks"] if not c[3]) or "-"])
        free(dev)
    r["notes"].append("Seeded tiny models (hidden 64, 2 blocks; qcorda.testing.families), r = 4, fp32 compute (a random "
                      "model's logits are nearly flat: under bf16 the merged model's top-1 agreement would be a coin toss). "
                      "The covariance is collected once on the device and read by the CPU prepare, so both split the same "
                      "weights with the same covariance; qlora's codes must be byte-equal (the residual is W itself).")
    done = [f for f in families if f in r["figures"] and "error" not in r["figures"][f]]
    r["summary"] = f"{len(done)} of {len(families)} families prepared, trained, merged and exported on {dev}"


PARTS = {"prepare": part_prepare, "compare": part_compare, "train": part_train, "merge_eval": part_merge_eval,
         "precision": part_precision, "decompose": part_decompose, "synthetic": part_synthetic, "families": part_families}


# --------------------------------------------------------------------------- running and writing


def _legacy(read):
    """A legacy TF32 flag, or what torch says instead once the environment used its newer per-backend API."""
    try:
        return read()
    except RuntimeError as e:
        return f"unreadable ({str(e)[:60]})"


def environment(ctx: Context) -> dict:
    """Versions, the device and torch's fp32 matmul precision (TF32 or not): the device's figures depend on it."""
    import accelerate
    import peft
    import torch
    import transformers

    from qcorda.decompose import matmul_precision

    cuda = torch.cuda.is_available()
    env = {"device": ctx.device, "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / GB if cuda else None,
           "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                        "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__},
           "float32_matmul_precision": matmul_precision(),
           "cuda_matmul_allow_tf32": _legacy(lambda: torch.backends.cuda.matmul.allow_tf32),
           "cudnn_allow_tf32": _legacy(lambda: torch.backends.cudnn.allow_tf32),
           "machine": machine(machine_environment())}
    return env


def _alarm(signum, frame):
    raise Cut("interrupted at its share of the deadline plus the grace period")


def run_part(ctx: Context, name: str, remaining: list[str], deadline: float) -> dict:
    """One part, whatever happens: its result, its status (ok, check failed, cut, skipped, error) and its time."""
    now = time.perf_counter()
    weights = sum(WEIGHTS[n] for n in remaining)
    ctx.part, ctx.checked = name, 0
    ctx.part_end = now + max(0.0, deadline - now) * WEIGHTS[name] / weights
    grace = GRACE["toy" if ctx.toy else "gpu"]
    entry: dict = {"part": name, "share_seconds": ctx.part_end - now}
    r = new_result()
    hard = signal.getsignal(signal.SIGALRM)
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, ctx.part_end - now + grace))
    try:
        if name in ctx.inject:
            raise RuntimeError(f"failure injected by --inject-failure {name}")
        PARTS[name](ctx, r)
        failed = [c for c in r["checks"] if c["pass"] is False]
        entry["status"] = "check failed" if failed else "ok"
    except Cut as e:
        entry.update(status="cut", error=f"cut: {e}")
        r["notes"].append(f"Cut after {time.perf_counter() - now:.1f} s ({e}); what it measured before is above.")
    except Skipped as e:
        entry.update(status="skipped", error=str(e))
    except Exception as e:  # noqa: BLE001  (the point: record it and go on with the next part)
        entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, hard)
    entry["result"] = r
    entry["seconds"] = time.perf_counter() - now
    try:
        free(ctx.device)
    except Exception:  # noqa: BLE001  (a broken CUDA context is the next part's error to record)
        pass
    return entry


def render(doc: dict) -> str:
    from qcorda.table import fmt, markdown_table

    env = doc.get("environment") or {}
    lines = [f"# qcorda GPU check{' (dry run: toy sizes, not GPU figures)' if doc['dry_run'] else ''}", "",
             f"Command: `{doc['command']}`. Started {doc['started']}; {doc['seconds']:.0f} s of a {doc['budget']:.0f} s budget"
             + (" (finished)" if doc["finished"] else " (running or cut short)") + ".", ""]
    if env:
        lines += [f"Device: {env['device']}" + (f", {env['gpu']} ({env['gpu_memory_gb']:.0f} GB)" if env.get("gpu") else "") + ". "
                  + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ". fp32 matmul precision: "
                  f"{env['float32_matmul_precision']} (cuda.matmul.allow_tf32 {env['cuda_matmul_allow_tf32']}, cudnn.allow_tf32 "
                  f"{env['cudnn_allow_tf32']}). Machine: {env['machine']}.", ""]
    if doc["dry_run"]:
        lines += ["A dry run runs every part at toy size so that the script cannot rot between GPU runs; its figures say "
                  "nothing about a GPU.", ""]
    lines += ["Setup:", "", markdown_table(["step", "status", "seconds", "detail"], [
        [k, v["status"], v["seconds"], v.get("error") or (json.dumps(v["value"], default=str)[:120])] for k, v in doc["setup"].items()]), ""]
    lines += [markdown_table(["part", "status", "seconds", "share s", "summary"],
                             [[p["part"], p["status"], p["seconds"], p["share_seconds"], p["result"]["summary"] or p.get("error", "")]
                              for p in doc["parts"]]), ""]
    lines += ["FSDP needs a machine with several GPUs and is not part of this check: eval/results/fsdp_cpu.md.", ""]
    for i, p in enumerate(doc["parts"], 1):
        lines += [f"## {i}. {p['part']}: {p['status']} ({p['seconds']:.1f} s)", ""]
        if "error" in p:
            lines += [f"{p['error']}", ""]
        if "traceback" in p:
            lines += ["```", p["traceback"].rstrip(), "```", ""]
        r = p["result"]
        if r["summary"]:
            lines += [r["summary"] + ".", ""]
        for t in r["tables"]:
            if t["rows"]:
                lines += [f"{t['title']}:", "", markdown_table(t["head"], t["rows"]), ""]
        if r["checks"]:
            verdict = {True: "pass", False: "**FAIL**", None: "n/a"}
            lines += [markdown_table(["check", "value", "target", "verdict"],
                                     [[c["check"], fmt(c["value"]), c["target"], verdict[c["pass"]]] for c in r["checks"]]), ""]
        lines += [n for note in r["notes"] for n in (note, "")]
    return "\n".join(lines)


def write(doc: dict, out: Path) -> None:
    """The markdown at ``out`` and the same content as JSON beside it, each replaced atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(doc, indent=1, default=str))
    write_text_atomic(out, render(doc))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes; on the CPU it finishes in under 2 minutes")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--out", default=None, help="results markdown; the JSON goes beside it (default: eval/results/gpu_check.md, "
                                                "for --dry-run eval/results/gpu_check_dryrun.md)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts to run, by name or number (1-{len(PARTS)}), in order (default: all of {','.join(PARTS)})")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run, setup included (default: 275 on a GPU, "
                                                               "110 for --dry-run)")
    ap.add_argument("--model", default=None, help="a real Gemma-3-270M directory: adds the golden comparisons")
    ap.add_argument("--workdir", default=None, help="scratch space (models, runs, checkpoints); default: system temp")
    ap.add_argument("--inject-failure", default="", help="comma list of parts (or setup steps: libs, gemma, real, llama) made to raise at their start (tests the recording)")
    ap.add_argument("--write-tokenizer", action="store_true", help="retrain eval/configs/gemma3-270m's tokenizer and exit")
    ap.add_argument("--inject-overrun", default="", help="comma list of parts made to hang after their first item (tests the cut)")
    args = ap.parse_args(argv)
    if args.write_tokenizer:
        write_tokenizer()
        return 0
    t0 = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        ap.error("--device cuda: no CUDA device here; run the toy check with --dry-run")
    if device == "cpu" and cuda:  # the Trainer and every default device would still use the GPU
        ap.error("--device cpu: qcorda uses a visible GPU by default; hide it (CUDA_VISIBLE_DEVICES=) for a run on the CPU")
    if not args.dry_run and device != "cuda":
        ap.error("real shapes need a CUDA GPU; use --dry-run on the CPU")
    order = list(PARTS)  # a part by name or by its number (--parts 1,3)
    names = [order[int(n) - 1] if n.isdigit() and 1 <= int(n) <= len(order) else n for n in args.parts.split(",") if n]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}; choose from {','.join(PARTS)}")
    sizes = SIZES["toy" if args.dry_run else "gpu"]
    budget = args.budget if args.budget is not None else sizes["budget"]
    deadline = t0 + budget
    out = Path(args.out or RESULTS / ("gpu_check_dryrun.md" if args.dry_run else "gpu_check.md"))
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="gpu-check-") as work:
        ctx = Context(sizes, device, Path(work), args.dry_run, deadline, args.model,
                      frozenset(filter(None, args.inject_failure.split(","))), frozenset(filter(None, args.inject_overrun.split(","))))
        doc = {"format": "qcorda.gpu_check/2", "dry_run": args.dry_run, "budget": budget,
               "command": " ".join(["python -m eval.gpu_check", *(sys.argv[1:] if argv is None else argv)]),
               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": None, "sizes": sizes,
               "setup": ctx.setup, "parts": [], "seconds": 0.0, "finished": False}
        try:
            if device == "cuda":  # the CUDA context and cuBLAS, before any part's timer
                torch.ones(8, 8, device="cuda").matmul(torch.ones(8, 8, device="cuda"))
                torch.cuda.synchronize()
            doc["environment"] = environment(ctx)
        except Exception as e:  # noqa: BLE001  (recorded; the parts then say what they can)
            ctx.setup["environment"] = {"status": "error", "seconds": 0.0, "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()[-3000:]}
        write(doc, out)
        for i, name in enumerate(names):
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            entry = run_part(ctx, name, names[i:], deadline)
            doc["parts"].append(entry)
            doc["seconds"] = time.perf_counter() - t0
            write(doc, out)
            print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']:.1f} s"
                  + (f" ({entry['error'][:300]})" if "error" in entry else ""), file=sys.stderr, flush=True)
        doc["seconds"], doc["finished"] = time.perf_counter() - t0, True
        write(doc, out)
    print(f"wrote {out} and {out.with_suffix('.json')} ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
