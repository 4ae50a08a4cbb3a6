"""The method table: one :class:`MethodSpec` per initialization, the only place that lists methods.

Every module asks the table what a method needs and how it runs (:func:`spec`, :func:`names`):
the config's ``Method`` options, which methods need calibration text or covariances, which the
streamed engine can prepare, which iterate (and their default alternations), which PEFT computes
(:mod:`qcorda.baselines`), which keep a 16-bit base, whose initialized model does not depend on
the rank, the learning-rate advice (:mod:`qcorda.lr`), and the decomposition
:func:`qcorda.decompose.decompose` dispatches to (by name, :data:`qcorda.decompose.DECOMPOSITIONS`,
so the table stays torch-free). Adding a method is one entry here and one function there.

Torch-free: the config, the CLI and the recipe reader import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Calibration = Literal["none", "task", "knowledge"]


@dataclass(frozen=True)
class LrFactor:
    """A method's learning rate relative to QLoRA's, and where the figure comes from."""

    factor: float
    """Recommended lr = factor × QLoRA's (``base_learning_rate``)."""
    source: str
    """A measured figure of this repository (``eval/results/...``) or a paper."""


@dataclass(frozen=True)
class Trained:
    """What fine-tuning an init showed against plain QLoRA in :data:`STUDY`: the init's held-out GSM8K loss minus
    qlora's, in nats, paired by seed, as (mean, half the range) over 3 seeds; negative: the init did better.
    Recomputed from ``eval/results/finetune.json`` by ``tests/test_methods.py``."""

    auto: tuple[float, float]
    """Both at ``learning_rate: auto`` with base 2e-4 (QLoRA's usual rate; qlora at 2e-4)."""
    tuned: tuple[float, float]
    """Each at its best learning rate of the study's grid (qlora's: 1.2e-3)."""


@dataclass(frozen=True)
class MethodSpec:
    """What one initialization method needs and how qcorda runs it."""

    name: str
    """The method's name (``--method``, ``init.method``)."""
    summary: str
    """The adapter init in one line."""
    lr: LrFactor
    """Recommended learning rate as a factor of QLoRA's, with its source (qcorda-cal: from its default start, ipm)."""
    calibration: Calibration = "none"
    """Calibration text the init reads: none; task (the fine-tuning task's instructions and responses);
    knowledge (questions of the knowledge to keep frozen, e.g. nq-open)."""
    covariance: bool = False
    """The split needs the targets' input covariances C = XᵀX/n (:mod:`qcorda.covariance`)."""
    streamable: bool = True
    """The output is an NF4 residual plus a plain LoRA A/B split layer by layer, so the streamed engine
    (:mod:`qcorda.stream`) can prepare it; the others go through the in-memory engine."""
    iterative: bool = False
    """Alternates NF4 quantization and a low-rank fit; ``iters`` (and ``iters="auto"``) applies."""
    default_iters: int = 1
    """Alternations when ``iters`` is not given (qpissa: 1 + alternations, so 1 is plain PiSSA)."""
    baseline: bool = False
    """PEFT computes the init (:mod:`qcorda.baselines`), not :mod:`qcorda.decompose`."""
    quantized: bool = True
    """The base is NF4; False: it stays 16-bit (``compute_dtype``)."""
    rank_free: bool = False
    """The initialized model (W_eff) does not depend on the rank (B = 0 at init): ``compare`` scores it once."""
    decomposition: str | None = None
    """Key of :data:`qcorda.decompose.DECOMPOSITIONS` (the function that splits W); None for the baselines."""
    lr_by_start: tuple[tuple[str, LrFactor], ...] = ()
    """Learning-rate advice per ``cal_start`` where the start changes it (qcorda-cal)."""
    trained: Trained | None = None
    """How the init trained against plain QLoRA in :data:`STUDY`; None: not in the study."""
    trained_by_start: tuple[tuple[str, Trained], ...] = ()
    """:attr:`trained` per ``cal_start`` (qcorda-cal)."""

    def __post_init__(self) -> None:
        if self.covariance and self.calibration == "none":
            raise ValueError(f"{self.name}: a covariance method reads calibration text")
        if self.baseline != (self.decomposition is None):
            raise ValueError(f"{self.name}: exactly the baselines (PEFT's init) have no decomposition")
        if not self.iterative and self.default_iters != 1:
            raise ValueError(f"{self.name}: default_iters applies to iterative methods")
        if not self.quantized and self.streamable:
            raise ValueError(f"{self.name}: the streamed engine stores NF4 residuals only")

    def lr_for(self, cal_start: str | None = None) -> LrFactor:
        """The learning-rate advice, for ``cal_start`` (default: the method's default start) where it matters."""
        return _for_start(self.lr_by_start, cal_start, self.lr)

    def trained_for(self, cal_start: str | None = None) -> Trained | None:
        """:attr:`trained`, for ``cal_start`` (default: the method's default start) where it matters."""
        return _for_start(self.trained_by_start, cal_start, self.trained)

    @property
    def needs_calibration(self) -> bool:
        """The init reads calibration text (every covariance method, and EVA)."""
        return self.calibration != "none"


def _for_start(by_start: tuple, cal_start: str | None, default):
    """The entry of ``by_start`` (``((start, value), ...)``, the default start first) for ``cal_start``, or ``default``
    for a method whose start does not matter."""
    return dict(by_start)[cal_start or by_start[0][0]] if by_start else default


#: Where :class:`Trained` comes from.
STUDY = "eval/results/finetune.md: Gemma-3-270M, r 16, 60 steps, 3 seeds, held-out GSM8K loss"
_STUDY = ("eval/results/finetune.md (Gemma-3-270M, r 16, 60 steps x 4, held-out GSM8K loss; seed-0 grid, "
          "mean ± half-range of 3 seeds at the best lr; qlora 0.941 ± 0.006 at 1.2e-3)")
_LEE = "'Learning Rate Matters' (Lee et al. 2026): PiSSA's best lr ~10x below LoRA's"
_SMALL = "best at 6e-4 (of 2e-5 to 1.2e-3), never at 2e-4 or below, as qlora"

_CAL_IPM = LrFactor(0.1, f"{_STUDY}: best at 2e-4 (0.949 ± 0.014; 0.958 at 6e-5, 1.120 at 6e-4), 1/6 of qlora's; starts from the CorDA-IPM "
                         "split, as qcorda-ipm")
_CAL_ZERO = LrFactor(1.0, f"{_STUDY}: best at 2e-4 (0.944 ± 0.003; 1.026 at 6e-5, 0.963 at 6e-4), B·A starts at 0 and holds "
                          "only the quantization error, as LoftQ and QERA")

#: The methods, in the order ``compare`` reports them: qcorda's decompositions, then PEFT's baselines.
TABLE: tuple[MethodSpec, ...] = (
    MethodSpec(
        "qlora", "PEFT default: A random, B = 0; residual = W", rank_free=True, decomposition="random-a",
        lr=LrFactor(1.0, "QLoRA (Dettmers et al. 2023): the reference, 2e-4 for 7B-13B"),
        trained=Trained(auto=(0.0, 0.0), tuned=(0.0, 0.0)),
    ),
    MethodSpec(
        "loftq", "alternate Q = NF4(W − s·BA) and BA = best rank-r fit of W − deq(Q)", iterative=True, default_iters=5,
        decomposition="svd-alternation",
        lr=LrFactor(1.0, f"{_STUDY}: {_SMALL} (0.946 ± 0.008 at 6e-4, 0.960 at 1.2e-3); LoftQ (Li et al. 2023) trains at QLoRA-like rates"),
        trained=Trained(auto=(-0.033, 0.003), tuned=(0.004, 0.002)),
    ),
    MethodSpec(
        "qpissa", "top-r SVD of W: B = U_r√Σ_r, A = √Σ_r V_rᵀ (iters > 1 refines like LoftQ)", iterative=True,
        decomposition="svd-top",
        lr=LrFactor(0.1, f"{_STUDY}: best at 2e-4 of 2e-5 to 6e-4 (0.964 ± 0.014; 1.004 at 6e-5, 1.088 at "
                         f"6e-4) while qlora's is 1.2e-3, a ratio of 1/6; {_LEE}"),
        trained=Trained(auto=(0.125, 0.005), tuned=(0.023, 0.013)),
    ),
    MethodSpec(
        "qmilora", "bottom-r SVD of W", decomposition="svd-bottom",
        lr=LrFactor(1.0, "MiLoRA (Wang et al. 2024): the smallest singular components, trained at LoRA's rate"),
    ),
    MethodSpec(
        "qcorda-ipm", "top-r of SVD(W·C), A = √Σ_r (VᵀC⁻¹)_r, C = XᵀX/n of the layer's inputs", calibration="task",
        covariance=True, decomposition="corda-top",
        lr=LrFactor(0.1, f"{_STUDY}: 0.976 at 6e-5, 0.964 ± 0.014 at 2e-4, 1.143 at 6e-4 while qlora's "
                         f"best is 1.2e-3, a ratio of 1/6; {_LEE}"),
        trained=Trained(auto=(0.074, 0.005), tuned=(0.023, 0.013)),
    ),
    MethodSpec(
        "qcorda-kpm", "bottom-r of SVD(W·C): keeps world knowledge frozen", calibration="knowledge", covariance=True,
        decomposition="corda-bottom",
        lr=LrFactor(1.0, f"{_STUDY}: {_SMALL} (0.953 ± 0.010 at 6e-4, 0.992 at 1.2e-3, 1.003 at 2e-4, 1.474 at "
                         "2e-5, as qlora's 1.542): the smallest components of W·C make small factors. CorDA's 2e-5 was every "
                         "method's rate, LoRA's too, so it sets no ratio"),
        trained=Trained(auto=(-0.031, 0.005), tuned=(0.012, 0.004)),
    ),
    MethodSpec(
        "qcorda-cal", "IPM or zero start, then LoftQ-style alternation fitted in the activation norm ‖(·)L‖, C = LLᵀ",
        calibration="task", covariance=True, iterative=True, default_iters=5, decomposition="activation-alternation",
        lr=_CAL_IPM, lr_by_start=(("ipm", _CAL_IPM), ("zero", _CAL_ZERO)),
        trained_by_start=(("ipm", Trained(auto=(0.028, 0.006), tuned=(0.008, 0.008))),
                          ("zero", Trained(auto=(-0.087, 0.001), tuned=(0.003, 0.003)))),
    ),
    MethodSpec(
        "qera", "Q = NF4(W), s·BA = best rank-r fit of W − deq(Q) in ‖(·)L‖ (QERA-exact, CLoQ, EoRA)", calibration="task",
        covariance=True, decomposition="activation-fit",
        lr=LrFactor(1.0, f"{_STUDY}: {_SMALL} (0.936 ± 0.013 at 6e-4; 0.973 at 1.2e-3)"),
        trained=Trained(auto=(-0.077, 0.008), tuned=(-0.005, 0.007)),
    ),
    MethodSpec(
        "lora", "16-bit base, PEFT's default init (A Kaiming-uniform, B = 0)", baseline=True, quantized=False,
        streamable=False, rank_free=True,
        lr=LrFactor(1.0, "LoRA init (B = 0), as QLoRA"),
    ),
    MethodSpec(
        "qdora", "NF4 base, DoRA (PEFT use_dora): magnitude m = ‖deq(Q(W)) + s·B·A‖ per output row", baseline=True,
        streamable=False, rank_free=True,
        lr=LrFactor(1.0, "DoRA (Liu et al. 2024) trains at LoRA's learning rate"),
    ),
    MethodSpec(
        "qeva", "NF4 base, EVA (PEFT): A = top-r right singular vectors of the inputs, B = 0", baseline=True,
        calibration="task", streamable=False,
        lr=LrFactor(1.0, "EVA (Paischer et al. 2024): B = 0, LoRA's learning rate"),
    ),
    MethodSpec(
        "qolora", "OLoRA (PEFT): W = Q·R, B = Q[:, :r], A = R[:r], residual W − s·B·A quantized", baseline=True,
        lr=LrFactor(0.1, "OLoRA's factors are Q, R of W (principal-component size): by analogy with PiSSA"),
    ),
)

#: Method names in table order.
NAMES: tuple[str, ...] = tuple(s.name for s in TABLE)
#: ``InitConfig.method``'s options, derived from the table.
Method = Literal[NAMES]  # type: ignore[valid-type]
_BY_NAME: dict[str, MethodSpec] = {s.name: s for s in TABLE}
assert len(_BY_NAME) == len(TABLE), "a method is listed twice"


def spec(method: str) -> MethodSpec:
    """The table entry of ``method``; KeyError naming the choices for an unknown one."""
    try:
        return _BY_NAME[method]
    except KeyError:
        raise KeyError(f"unknown method {method!r}; choose from {', '.join(NAMES)}") from None


def _versus(d: tuple[float, float]) -> str:
    mean, half = d
    if mean - half > 0:
        return f"{mean:.3f} ± {half:.3f} nats behind plain QLoRA"
    if mean + half < 0:
        return f"{-mean:.3f} ± {half:.3f} nats ahead of plain QLoRA"
    return f"level with plain QLoRA ({mean:+.3f} ± {half:.3f} nats)"


def _label(s: MethodSpec, start: str | None) -> str:
    return s.name + (f" --cal-start {start or s.trained_by_start[0][0]}" if s.trained_by_start else "")


def training_evidence(method: str, cal_start: str | None = None) -> str:
    """What fine-tuning showed for ``method`` against plain QLoRA (:class:`Trained`), in words: ahead, level or
    behind (the seed spread decides level), at ``learning_rate: auto`` and with each lr tuned; says so when the
    init was not in the study. ``prepare`` and ``train`` print it, so a user who picks an init is told."""
    s = spec(method)
    t = s.trained_for(cal_start)
    if t is None:
        return (f"{_label(s, cal_start)}: not in the fine-tuning study ({STUDY}); nothing measured here shows that it "
                "trains better than plain QLoRA.")
    ahead = [_label(o, st) for o in TABLE for st in ([x for x, _ in o.trained_by_start] or [None])
             if o.trained_for(st) is not None and sum(o.trained_for(st).auto) < 0 and _label(o, st) != _label(s, cal_start)]
    if s.name == "qlora":
        return (f"qlora is the reference of the fine-tuning study ({STUDY}): at base 2e-4 {', '.join(ahead)} ended ahead "
                "of it; with each init's lr tuned, none was ahead by more than the seed spread.")
    text = (f"{_label(s, cal_start)} in the fine-tuning study ({STUDY}): at learning_rate auto (base 2e-4) "
            f"{_versus(t.auto)}; each at its tuned lr, {_versus(t.tuned)}.")
    behind = [what for what, d in (("at auto", t.auto), ("tuned", t.tuned)) if d[0] - d[1] > 0]
    if behind:
        text += f" Plain QLoRA did better there ({' and '.join(behind)}); ahead at auto: {', '.join(ahead)}."
    return text + " A small model and a short run: a direction, not a guarantee."


def names(**where) -> tuple[str, ...]:
    """The methods (table order) whose fields equal ``where``: ``names(iterative=True)``, ``names(baseline=False)``."""
    unknown = [k for k in where if k not in MethodSpec.__dataclass_fields__ and k != "needs_calibration"]
    if unknown:
        raise TypeError(f"MethodSpec has no field {', '.join(unknown)}")
    return tuple(s.name for s in TABLE if all(getattr(s, k) == v for k, v in where.items()))
