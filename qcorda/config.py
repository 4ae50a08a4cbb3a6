"""Typed configuration: one frozen dataclass per verb, torch-free.

Every field has one docstring (the CLI's ``--help`` text is generated from it, :mod:`qcorda.commands.flags`),
options are ``Literal``s, and ``__post_init__`` refuses a bad value with a :class:`ConfigError`
that names the field. The name is the field path (``rank``, ``calib.samples``); the CLI shows it as
the flag (``--calib-samples``) and a recipe as its key (``init.calib.samples``).

- :class:`InitConfig` (with :class:`CalibConfig`): ``qcorda prepare`` and a recipe's ``init:``;
- :class:`CompareConfig`: ``qcorda compare``;
- :class:`EvalConfig`: ``qcorda eval``;
- :class:`VerifyConfig`, :class:`MergeConfig`, :class:`ToLoraConfig`: ``qcorda merge`` and ``to-lora``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from .methods import Method, names, spec

METHODS: tuple[str, ...] = get_args(Method)  # the method table's names (qcorda.methods)

#: ``iters="auto"``: the most alternations tried, and which calibration records are held out to choose
#: among them (record i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY − 1, i.e. 1/8 of them).
AUTO_MAX_ITERS = 8
HELDOUT_EVERY = 8
#: Module-name patterns of every Linear in the decoder blocks (lm_head excluded).
DEFAULT_TARGETS: tuple[str, ...] = ("all-linear",)

SvdSolver = Literal["full", "randomized"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
CovDtype = Literal["float32", "float64"]
Template = Literal["alpaca", "plain", "chat"]
MergeDtype = Literal["float16", "bfloat16", "float32"]
ToLoraMode = Literal["exact-delta", "compress", "absorb-quant-error"]
TASKS: tuple[str, ...] = ("gsm8k", "nq", "ppl")


class ConfigError(ValueError):
    """A user-facing configuration error. ``field`` is the path of the field at fault (``rank``,
    ``calib.samples``) or None when the message names what is wrong itself; the message reads
    ``"<field> <detail>"``, and a caller that knows the field by another name (a flag, a recipe
    key) re-raises it with :meth:`renamed`."""

    def __init__(self, message: str, field: str | None = None):
        self.field, self.detail = field, message
        super().__init__(f"{field} {message}" if field else message)

    def renamed(self, name: str) -> "ConfigError":
        return ConfigError(f"{name} {self.detail}")


def one_of(name: str, value, options) -> None:
    if value not in get_args(options):
        raise ConfigError(f"must be one of {', '.join(get_args(options))}; got {value!r}", name)


def positive(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"must be an integer >= {minimum}, got {value!r}" if minimum != 1
                          else f"must be a positive integer, got {value!r}", name)


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration text comes from and how much of it to use."""

    data: str | None = None
    """A local .jsonl/.json/.csv/.parquet/.txt file, a dataset name, or a bundled alias (gsm8k-train, nq-open, ...)."""
    fields: tuple[str, ...] = ()
    """Record fields joined into one text by the prompt template; the last one is the response when
    there are two or more (e.g. question,answer). Empty: ``text`` or the only string field."""
    template: Template = "alpaca"
    """Prompt template, the same one training uses: alpaca, plain or chat."""
    samples: int = 256
    """Number of records to use (the first N)."""
    max_length: int = 512
    """Tokens per record; longer records are truncated."""
    batch_size: int = 8
    """Records per forward pass."""
    split: str = "train"
    """Split name when ``data`` is a dataset name."""

    def __post_init__(self) -> None:
        positive("samples", self.samples)
        positive("max_length", self.max_length, 2)
        positive("batch_size", self.batch_size)
        one_of("template", self.template, Template)


@dataclass(frozen=True)
class InitConfig:
    """How to split each target weight into an NF4 residual and a LoRA adapter."""

    method: Method = "qcorda-ipm"
    """Initialization method."""
    rank: int = 64
    """LoRA rank r."""
    alpha: float | None = None
    """LoRA alpha; the adapter is scaled by s = alpha / r. Default r (s = 1), as in the PiSSA and CorDA recipes."""
    iters: int | Literal["auto"] | None = None
    """Alternations of NF4 quantization and low-rank fit for loftq (default 5), qpissa (default 1, plain
    PiSSA) and qcorda-cal (default 5). auto: per layer, the iterate (up to 8) with the lowest activation
    error on held-out calibration records (every 8th), fitted on the others; needs calibration data."""
    cal_start: Literal["ipm", "zero"] = "ipm"
    """Where qcorda-cal starts: ipm, the CorDA-IPM split (the adapter holds the principal components),
    or zero, B·A = 0 (the activation-norm LoftQ: the adapter holds only the quantization error; its first
    iteration is qera). ipm has the lower held-out error (eval/results/fidelity.md); zero trains at QLoRA's
    rate, tolerates 3x that rate and forgets less (eval/results/finetune.md)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Module-name patterns to adapt: exact names, suffixes (q_proj), globs (*.mlp.*) or regexes (re:...).
    all-linear: every Linear/Conv1D in the decoder blocks, lm_head and routers excluded."""
    keep_full_precision: tuple[str, ...] = ()
    """Module-name patterns (as target_modules) of block weights to keep in full precision. Every other
    block Linear is stored in NF4 (the targets' residuals, the rest as W itself, no adapter); routers
    always stay full precision. prepare refuses to store under 90 % of the block weights' bytes in NF4
    unless what stays in full precision is named here."""
    ridge: float = 0.01
    """Initial damping λ: C + λ·mean(diag C)·I, grown 10x at most max_damping_steps times while C is not
    positive definite."""
    max_damping_steps: int = 6
    """How often λ may grow before a layer is reported as singular."""
    svd: SvdSolver = "randomized"
    """SVD of the top-r methods: randomized (torch.svd_lowrank with oversampling and power iterations,
    within 1 % of the exact split) or full (exact). Bottom-r methods always use the full SVD."""
    svd_oversample: int = 16
    """Extra columns of the randomized SVD."""
    svd_power_iters: int = 4
    """Power iterations of the randomized SVD."""
    cov_dtype: CovDtype = "float32"
    """Accumulation dtype of XᵀX."""
    compute_dtype: ComputeDtype = "auto"
    """Dtype of Linear4bit compute and of the unquantized parameters. auto: bfloat16 on a CUDA GPU that
    supports it, else float32."""
    seed: int = 0
    """Seed of the random parts (qlora's A, the randomized SVD)."""
    device: str | None = None
    """Where the decomposition runs; default CUDA when present, else the CPU."""
    calib: CalibConfig = field(default_factory=CalibConfig)
    """Calibration data of the data-driven methods."""

    def __post_init__(self) -> None:
        one_of("method", self.method, Method)
        positive("rank", self.rank)
        if self.alpha is not None and (isinstance(self.alpha, (str, bool)) or not self.alpha > 0):
            raise ConfigError(f"must be positive, got {self.alpha!r}", "alpha")
        if self.iters == "auto":
            if not spec(self.method).iterative:
                raise ConfigError(f"auto applies to {', '.join(sorted(names(iterative=True)))}; method {self.method!r} does not iterate", "iters")
        elif self.iters is not None:
            if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 1:
                raise ConfigError(f"must be a positive integer or auto, got {self.iters!r}", "iters")
            if self.iters > 1 and not spec(self.method).iterative:
                raise ConfigError(f"applies to {', '.join(sorted(names(iterative=True)))}; method {self.method!r} does not iterate", "iters")
        one_of("cal_start", self.cal_start, Literal["ipm", "zero"])
        if not self.target_modules:
            raise ConfigError("is empty; give patterns such as q_proj,v_proj or all-linear", "target_modules")
        if isinstance(self.keep_full_precision, str) or not all(isinstance(p, str) and p for p in self.keep_full_precision):
            raise ConfigError(f"must be a list of non-empty module-name patterns, got {self.keep_full_precision!r}", "keep_full_precision")
        if not self.ridge > 0:
            raise ConfigError(f"must be positive, got {self.ridge}", "ridge")
        positive("max_damping_steps", self.max_damping_steps, 0)
        one_of("svd", self.svd, SvdSolver)
        positive("svd_oversample", self.svd_oversample, 0)
        positive("svd_power_iters", self.svd_power_iters, 0)
        one_of("cov_dtype", self.cov_dtype, CovDtype)
        one_of("compute_dtype", self.compute_dtype, ComputeDtype)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def scaling(self) -> float:
        """s = alpha / r, the factor PEFT applies to B·A."""
        return self.lora_alpha / self.rank

    @property
    def n_iters(self) -> int:
        """Alternations to run (with ``iters="auto"``: the most that are tried)."""
        if self.iters == "auto":
            return AUTO_MAX_ITERS
        if self.iters is not None:
            return self.iters
        return spec(self.method).default_iters

    @property
    def heldout_every(self) -> int | None:
        """Every how many calibration records one is held out (``iters="auto"``), else None."""
        return HELDOUT_EVERY if self.iters == "auto" else None

    @property
    def needs_covariance(self) -> bool:
        """The split needs the targets' input covariances (CorDA, qcorda-cal, QERA, or ``iters="auto"``)."""
        return spec(self.method).covariance or self.iters == "auto"

    @property
    def needs_calibration(self) -> bool:
        """The init reads calibration text (every covariance method, and EVA)."""
        return spec(self.method).needs_calibration or self.needs_covariance

    def require_calibration(self, covariance: bool = False) -> None:
        """The one "needs calibration data" check (the CLI, :func:`qcorda.prepare.prepare` for both engines,
        compare and calibration call it): an init that reads calibration text (:attr:`needs_calibration`)
        needs ``calib.data``, except that one which needs only covariances (:attr:`needs_covariance`) can
        reuse a saved covariance file instead (``covariance``: one is given). The error names ``calib.data``."""
        if not self.needs_calibration or self.calib.data is not None or (covariance and self.needs_covariance):
            return
        what = f"method {self.method}" + (" with iters=auto" if self.iters == "auto" else "")
        instead = " or a saved covariance file" if self.needs_covariance else ""
        raise ConfigError(f"is needed by {what}: give calibration text (e.g. gsm8k-train with fields question,answer){instead}", "calib.data")


# --------------------------------------------------------------------------- compare


def compare_init() -> InitConfig:
    """``qcorda compare``'s reference setup (issue 3): calibration on the first 64 GSM8K train records
    (question + answer, ≤ 256 tokens), ridge 0.01, α = r."""
    return InitConfig(calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=64, max_length=256))


@dataclass(frozen=True)
class CompareConfig:
    """What ``qcorda compare`` measures."""

    methods: tuple[str, ...] = names(baseline=False)
    """Initializations to compare (any of prepare's methods; also lora, qolora, qdora, qeva)."""
    ranks: tuple[int, ...] = (16, 64)
    """LoRA ranks."""
    init: InitConfig = field(default_factory=compare_init)
    """Everything else of the split (alpha, iters, ridge, SVD solver, calibration data); its method and
    rank are replaced by each entry of methods × ranks."""
    eval_data: tuple[str, ...] = ("gsm8k-test", "wikitext2")
    """Held-out eval sets (bundled alias or file; records with text or question/answer). The first one
    gives the unsuffixed act_err_rel, ppl and kl."""
    eval_samples: int = 32
    """Records per eval set for C_eval (the first N). 32 keeps the default run under 10 minutes on 2 CPU
    cores; the golden figures use 64."""
    eval_max_length: int = 256
    """Tokens per eval record."""
    eval_tokens: int = 512
    """Scored tokens per eval set for perplexity and KL; 0 skips them."""
    eval_batch_size: int = 8
    """Records per forward pass in evaluation."""

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError(f"is empty; choose from {','.join(METHODS)}", "methods")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"has unknown method {', '.join(unknown)}; choose from {','.join(METHODS)}", "methods")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("lists a method twice; name each once", "methods")
        if not self.ranks:
            raise ConfigError("is empty; give positive integers such as 16,64", "ranks")
        bad = [r for r in self.ranks if not isinstance(r, int) or isinstance(r, bool) or r <= 0]
        if bad:
            raise ConfigError(f"must be positive integers, got {', '.join(map(str, bad))}", "ranks")
        if len(set(self.ranks)) != len(self.ranks):
            raise ConfigError("lists a rank twice; name each once", "ranks")
        if not self.eval_data:
            raise ConfigError("is empty; give held-out text such as gsm8k-test,wikitext2", "eval_data")
        positive("eval_samples", self.eval_samples)
        positive("eval_max_length", self.eval_max_length, 2)
        positive("eval_tokens", self.eval_tokens, 0)
        positive("eval_batch_size", self.eval_batch_size)
        if any(spec(m).needs_calibration for m in self.methods) and self.init.calib.data is None:
            raise ConfigError("is needed by the data-driven methods (e.g. gsm8k-train)", "init.calib.data")

    def method_config(self, method: str, rank: int) -> InitConfig:
        """The :class:`InitConfig` of one cell: ``iters`` applies to the iterative methods only."""
        from dataclasses import replace

        return replace(self.init, method=method, rank=rank, iters=self.init.iters if spec(method).iterative else None)


# --------------------------------------------------------------------------- eval


@dataclass(frozen=True)
class EvalConfig:
    """What ``qcorda eval`` runs on a model."""

    tasks: tuple[str, ...] | None = None
    """Built-in tasks: gsm8k, nq, ppl (default all of them; none when harness is given)."""
    limit: int | None = None
    """The first N examples of gsm8k, nq and each harness task (default all)."""
    batch_size: int = 8
    """Sequences per forward / generate call."""
    device: str | None = None
    """cuda or cpu (default cuda when present)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of a plain HF model (a merged export, an original): auto, the dtype it is stored in (one copy of
    it in memory); float32 upcasts it. A prepared directory computes in its own compute dtype."""
    gsm8k_data: str = "gsm8k-test"
    """File or bundled alias with question/answer records."""
    shots: int = 0
    """Solved training examples before each GSM8K question (0: the training prompt)."""
    gsm8k_max_new_tokens: int = 256
    """Generated tokens per GSM8K answer at most."""
    nq_data: str = "nq-open"
    """File or bundled alias with question / answer-list records."""
    nq_max_new_tokens: int = 24
    """Generated tokens per NQ-open answer at most."""
    ppl_data: str = "wikitext2"
    """Text file or bundled alias for perplexity."""
    ppl_tokens: int = 8192
    """Score the first N tokens (0: all)."""
    ppl_window: int = 512
    """Tokens per perplexity window."""
    ppl_stride: int = 256
    """Tokens between window starts (each token is scored once)."""
    harness: tuple[str, ...] = ()
    """lm-evaluation-harness tasks: lm-eval task names (gsm8k; lm-eval fetches the data), task YAML paths,
    or the bundled offline tasks qcorda_gsm8k, qcorda_nq_open (optional extra: pip install -e ".[harness]")."""
    num_fewshot: int | None = None
    """Few-shot examples for the harness tasks (default: each task's own)."""
    gen_kwargs: str | None = None
    """lm-eval generation overrides for the harness tasks, e.g. max_gen_toks=64."""

    def __post_init__(self) -> None:
        if self.tasks is not None:
            unknown = [t for t in self.tasks if t not in TASKS]
            if unknown or not self.tasks:
                raise ConfigError(f"has unknown task {', '.join(unknown) or '(none)'}; choose from {','.join(TASKS)}", "tasks")
        if self.limit is not None:
            positive("limit", self.limit)
        positive("batch_size", self.batch_size)
        one_of("dtype", self.dtype, Literal["auto", "float32", "bfloat16", "float16"])
        positive("shots", self.shots, 0)
        positive("ppl_tokens", self.ppl_tokens, 0)
        positive("ppl_window", self.ppl_window)
        if not isinstance(self.ppl_stride, int) or not 0 < self.ppl_stride <= self.ppl_window:
            raise ConfigError(f"must be in (0, {self.ppl_window}] (the window), got {self.ppl_stride}", "ppl_stride")
        if self.num_fewshot is not None and not self.harness:
            raise ConfigError("applies to harness tasks; the built-in gsm8k takes shots", "num_fewshot")

    @property
    def builtin_tasks(self) -> tuple[str, ...]:
        """The built-in tasks to run: the given ones, else all, or none when only harness tasks are asked for."""
        if self.tasks is not None:
            return tuple(dict.fromkeys(self.tasks))
        return () if self.harness else TASKS


# --------------------------------------------------------------------------- merge / to-lora


@dataclass(frozen=True)
class VerifyConfig:
    """Held-out text on which an export's logits are compared with the trained model's."""

    data: str = "gsm8k-test"
    """Held-out text: bundled alias, file or dataset name."""
    fields: tuple[str, ...] = ("question", "answer")
    """Record fields joined by the template (empty: text)."""
    samples: int = 8
    """Records used."""
    max_length: int = 128
    """Tokens per record."""
    batch_size: int = 2
    """Records per forward pass (Gemma's 262k vocabulary costs ~1 MB per token)."""
    template: Template = "alpaca"
    """Prompt template: alpaca, plain or chat."""

    def __post_init__(self) -> None:
        positive("samples", self.samples)
        positive("batch_size", self.batch_size)
        positive("max_length", self.max_length, 2)
        one_of("template", self.template, Template)


@dataclass(frozen=True)
class MergeConfig:
    """How ``qcorda merge`` writes and checks the merged model."""

    dtype: MergeDtype = "float16"
    """Dtype of the merged weights: float16, bfloat16 (Gemma-3 overflows float16) or float32."""
    device: str | None = None
    """cuda or cpu for the verification (default cuda when present)."""
    verify: bool = True
    """Compare the merged model's logits with the trained 4-bit + adapter model on held-out text."""
    verification: VerifyConfig = field(default_factory=VerifyConfig)
    """The held-out text of the comparison."""

    def __post_init__(self) -> None:
        one_of("dtype", self.dtype, MergeDtype)


@dataclass(frozen=True)
class ToLoraConfig:
    """How ``qcorda to-lora`` turns a trained adapter into a plain LoRA for the original base."""

    mode: ToLoraMode = "exact-delta"
    """exact-delta: rank 2r, exact without quantization; compress: ΔW truncated to rank; absorb-quant-error:
    the best rank-k fit of the trained 4-bit model."""
    rank: int | None = None
    """Rank k of compress / absorb-quant-error (default r of each layer)."""
    dtype: MergeDtype = "float16"
    """Dtype of the merged model the LoRA is verified against (Gemma-3 overflows float16: use bfloat16)."""
    device: str | None = None
    """cuda or cpu for the verification (default cuda when present)."""
    verify: bool = True
    """Compare base + LoRA with the trained model and the merged one on held-out text."""
    verification: VerifyConfig = field(default_factory=VerifyConfig)
    """The held-out text of the comparison."""

    def __post_init__(self) -> None:
        one_of("mode", self.mode, ToLoraMode)
        if self.rank is not None:
            positive("rank", self.rank)
            if self.mode == "exact-delta":
                raise ConfigError("applies to mode compress and absorb-quant-error; exact-delta is always rank 2r", "rank")
        one_of("dtype", self.dtype, MergeDtype)
