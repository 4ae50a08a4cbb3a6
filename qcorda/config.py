"""Typed configuration for adapter initialization.

Every field has one docstring; options are ``Literal``s; ``__post_init__`` names the
CLI flag to fix when a value is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Method = Literal[
    "qlora", "loftq", "qpissa", "qmilora", "qcorda-ipm", "qcorda-kpm", "qcorda-cal", "qera",
    "lora", "qdora", "qeva", "qolora",
]
METHODS: tuple[str, ...] = get_args(Method)

#: Methods whose adapter init needs the input covariances C of the targets.
COVARIANCE: frozenset[str] = frozenset({"qcorda-ipm", "qcorda-kpm", "qcorda-cal", "qera"})
#: Methods whose adapter init reads calibration text: the covariance methods, and EVA (which
#: reads activations itself through PEFT and needs no covariance).
CALIBRATED: frozenset[str] = COVARIANCE | {"qeva"}
#: Baselines whose adapter init PEFT computes (:mod:`qcorda.baselines`): 16-bit LoRA, DoRA,
#: EVA, OLoRA. ``qeva`` reads activations itself (PEFT's EVA), it needs no covariance file.
BASELINES: frozenset[str] = frozenset({"lora", "qdora", "qeva", "qolora"})
#: Methods that iterate quantization and a low-rank fit; ``iters`` applies to them.
ITERATIVE: frozenset[str] = frozenset({"loftq", "qpissa", "qcorda-cal"})
#: ``iters="auto"``: the most alternations tried, and which calibration records are held out to choose
#: among them (record i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY − 1, i.e. 1/8 of them).
AUTO_MAX_ITERS = 8
HELDOUT_EVERY = 8

SvdSolver = Literal["full", "randomized"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
CovDtype = Literal["float32", "float64"]

#: Module-name patterns of every Linear in the decoder blocks (lm_head excluded).
DEFAULT_TARGETS: tuple[str, ...] = ("all-linear",)


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the flag and the fix."""


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration text comes from and how much of it to use."""

    data: str | None = None
    """A local .jsonl/.json/.csv/.parquet/.txt file, a dataset name, or a bundled alias
    (``gsm8k-train``, ``nq-open``, ...). CLI: ``--calib-data``."""
    fields: tuple[str, ...] = ()
    """Record fields joined into one text by the prompt template; the last one is the
    response when there are two or more. Empty: ``text`` or the only string field.
    CLI: ``--calib-fields question,answer``."""
    template: Literal["alpaca", "plain", "chat"] = "alpaca"
    """Prompt template, the same one training uses. CLI: ``--template``."""
    samples: int = 256
    """Number of records to use (the first N). CLI: ``--calib-samples``."""
    max_length: int = 512
    """Tokens per record; longer records are truncated. CLI: ``--calib-max-length``."""
    batch_size: int = 8
    """Records per forward pass. CLI: ``--calib-batch-size``."""
    split: str = "train"
    """Split name when ``data`` is a dataset name. CLI: ``--calib-split``."""

    def __post_init__(self) -> None:
        if self.samples <= 0:
            raise ConfigError(f"--calib-samples must be positive, got {self.samples}")
        if self.max_length <= 1:
            raise ConfigError(f"--calib-max-length must be at least 2, got {self.max_length}")
        if self.batch_size <= 0:
            raise ConfigError(f"--calib-batch-size must be positive, got {self.batch_size}")
        if self.template not in ("alpaca", "plain", "chat"):
            raise ConfigError(f"--template must be one of alpaca, plain, chat; got {self.template!r}")


@dataclass(frozen=True)
class InitConfig:
    """How to split each target weight into an NF4 residual and a LoRA adapter."""

    method: Method = "qcorda-ipm"
    """Initialization method. CLI: ``--method``."""
    rank: int = 64
    """LoRA rank r. CLI: ``--rank``."""
    alpha: float | None = None
    """LoRA alpha; the adapter is scaled by s = alpha / r. Default r (s = 1), as in the
    PiSSA and CorDA recipes. CLI: ``--alpha``."""
    iters: int | Literal["auto"] | None = None
    """Alternations of NF4 quantization and low-rank fit for ``loftq`` (default 5),
    ``qpissa`` (default 1, plain PiSSA) and ``qcorda-cal`` (default 5). ``auto``: per layer, the
    iterate (up to ``AUTO_MAX_ITERS``) with the lowest activation error on held-out calibration
    records (every ``HELDOUT_EVERY``-th), fitted on the others; needs calibration data. CLI: ``--iters``."""
    cal_start: Literal["ipm", "zero"] = "ipm"
    """Where ``qcorda-cal`` starts: ``ipm``, the CorDA-IPM split (the adapter holds the principal
    components, large B and A), or ``zero``, B·A = 0 (the activation-norm LoftQ: the adapter holds
    only the quantization error, small as in QLoRA; its first iteration is ``qera``). CLI: ``--cal-start``."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Module-name patterns to adapt: exact names, suffixes (``q_proj``), globs
    (``*.mlp.*``) or regexes (``re:...``). ``all-linear``: every Linear/Conv1D in the
    decoder blocks, lm_head excluded. CLI: ``--target-modules q_proj,v_proj``."""
    ridge: float = 0.01
    """Initial damping λ: C + λ·mean(diag C)·I. Grown 10x at most ``max_damping_steps``
    times while C is not positive definite. CLI: ``--ridge``."""
    max_damping_steps: int = 6
    """How often λ may grow before a layer is reported as singular. CLI: ``--max-damping-steps``."""
    svd: SvdSolver = "full"
    """SVD for the top-r methods: ``full`` (exact) or ``randomized`` (torch.svd_lowrank with
    oversampling and power iterations). Bottom-r methods always use the full SVD. CLI: ``--svd``."""
    svd_oversample: int = 16
    """Extra columns for the randomized SVD. CLI: ``--svd-oversample``."""
    svd_power_iters: int = 4
    """Power iterations for the randomized SVD. CLI: ``--svd-power-iters``."""
    cov_dtype: CovDtype = "float32"
    """Accumulation dtype of XᵀX. CLI: ``--cov-dtype``."""
    compute_dtype: ComputeDtype = "auto"
    """Dtype of Linear4bit compute and of the unquantized parameters. ``auto``: bfloat16 on a
    CUDA GPU that supports it, else float32. CLI: ``--compute-dtype``."""
    seed: int = 0
    """Seed of the random parts (qlora's A, randomized SVD). CLI: ``--seed``."""
    device: str | None = None
    """Where the decomposition runs; default CUDA when present, else CPU. CLI: ``--device``."""
    calib: CalibConfig = field(default_factory=CalibConfig)
    """Calibration data for the ``qcorda-*`` methods."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"--rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"--alpha must be positive, got {self.alpha!r}")
        if self.iters == "auto":
            if self.method not in ITERATIVE:
                raise ConfigError(f"--iters auto applies to {', '.join(sorted(ITERATIVE))}; method {self.method!r} does not iterate")
        elif self.iters is not None and (not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 1):
            raise ConfigError(f"--iters must be a positive integer or auto, got {self.iters!r}")
        elif self.iters is not None and self.iters > 1 and self.method not in ITERATIVE:
            raise ConfigError(
                f"--iters applies to {', '.join(sorted(ITERATIVE))}; method {self.method!r} does not iterate"
            )
        if self.cal_start not in ("ipm", "zero"):
            raise ConfigError(f"--cal-start must be ipm or zero, got {self.cal_start!r}")
        if not self.target_modules:
            raise ConfigError("--target-modules is empty; give patterns such as q_proj,v_proj or all-linear")
        if not self.ridge > 0:
            raise ConfigError(f"--ridge must be positive, got {self.ridge}")
        if self.max_damping_steps < 0:
            raise ConfigError(f"--max-damping-steps must be >= 0, got {self.max_damping_steps}")
        if self.svd not in ("full", "randomized"):
            raise ConfigError(f"--svd must be full or randomized, got {self.svd!r}")
        if self.svd_oversample < 0 or self.svd_power_iters < 0:
            raise ConfigError("--svd-oversample and --svd-power-iters must be >= 0")
        if self.cov_dtype not in ("float32", "float64"):
            raise ConfigError(f"--cov-dtype must be float32 or float64, got {self.cov_dtype!r}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--compute-dtype must be auto, float32, bfloat16 or float16; got {self.compute_dtype!r}")

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
        return {"loftq": 5, "qcorda-cal": 5}.get(self.method, 1)

    @property
    def heldout_every(self) -> int | None:
        """Every how many calibration records one is held out (``iters="auto"``), else None."""
        return HELDOUT_EVERY if self.iters == "auto" else None

    @property
    def needs_covariance(self) -> bool:
        """The split needs the targets' input covariances (CorDA, qcorda-cal, QERA, or ``iters="auto"``)."""
        return self.method in COVARIANCE or self.iters == "auto"

    @property
    def needs_calibration(self) -> bool:
        """The init reads calibration text (every covariance method, and EVA)."""
        return self.method in CALIBRATED or self.needs_covariance
