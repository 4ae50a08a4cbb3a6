"""Per-method learning rates: how far below QLoRA's each initialization should train.

An adapter that starts holding the principal components of W (PiSSA, CorDA-IPM, qcorda-cal
from IPM) has large B and A; the loss is far more curved along them, and QLoRA's best learning
rate hurts them. ``eval/results/finetune.md`` measures it on Gemma-3-270M (r 16, 60 steps, 3
seeds at the best lr): qpissa, qcorda-ipm and qcorda-cal from IPM do best at 2e-4, 1/6 of qlora's
best (1.2e-3), and lose 0.11-0.17 nats of held-out loss and double their perplexity at 6e-4, while
loftq, qera and qcorda-kpm do best at 6e-4. The factors are relative to QLoRA's *tuned* rate for
the setup (``base_learning_rate``): at a base below it every init trains too slowly, and the
principal-component inits ten times more so. "Learning Rate Matters" (Lee et al.
2026) finds PiSSA's best rate ~10x below LoRA's on 7B models, and the PiSSA and LoftQ trackers
report NaNs at 1e-4 to 2e-4. Adapters that hold only the quantization error, the smallest
components or nothing at all are small and train at QLoRA's rates. :data:`LR_FACTORS` gives
each initialization its learning rate as a factor of QLoRA's, with the source of the figure; a
recipe with ``learning_rate: auto`` trains at ``factor × base_learning_rate``.

Torch-free: the CLI and the recipe reader import it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: QLoRA's usual learning rate on GPUs (QLoRA paper, 7B–13B: 2e-4); ``base_learning_rate``'s default.
QLORA_LR = 2e-4
#: ``qcorda train`` warns when an explicit learning rate is more than this many times the recommended one.
WARN_ABOVE = 3.0


@dataclass(frozen=True)
class LrFactor:
    """A method's learning rate relative to QLoRA's, and where the figure comes from."""

    factor: float
    """Recommended lr = factor × QLoRA's (``base_learning_rate``)."""
    source: str
    """A measured figure of this repository (``eval/results/...``) or a paper."""


_STUDY = ("eval/results/finetune.md (Gemma-3-270M, r 16, 60 steps x 4, held-out GSM8K loss; seed-0 grid, "
          "mean ± half-range of 3 seeds at the best lr; qlora 0.941 ± 0.006 at 1.2e-3)")
_LEE = "'Learning Rate Matters' (Lee et al. 2026): PiSSA's best lr ~10x below LoRA's"
_SMALL = "best at 6e-4 (of 2e-5 to 1.2e-3), never at 2e-4 or below, as qlora"

#: Keyed by :func:`init_key` (the method, and for qcorda-cal its start).
LR_FACTORS: dict[str, LrFactor] = {
    "qlora": LrFactor(1.0, "QLoRA (Dettmers et al. 2023): the reference, 2e-4 for 7B-13B"),
    "lora": LrFactor(1.0, "LoRA init (B = 0), as QLoRA"),
    "qdora": LrFactor(1.0, "DoRA (Liu et al. 2024) trains at LoRA's learning rate"),
    "qeva": LrFactor(1.0, "EVA (Paischer et al. 2024): B = 0, LoRA's learning rate"),
    "loftq": LrFactor(1.0, f"{_STUDY}: {_SMALL} (0.946 ± 0.008 at 6e-4, 0.960 at 1.2e-3); LoftQ (Li et al. 2023) trains at QLoRA-like rates"),
    "qera": LrFactor(1.0, f"{_STUDY}: {_SMALL} (0.936 ± 0.013 at 6e-4; 0.973 at 1.2e-3)"),
    "qcorda-cal:zero": LrFactor(1.0, f"{_STUDY}: best at 2e-4 (0.944 ± 0.003; 1.026 at 6e-5, 0.963 at 6e-4), B·A starts at 0 and holds "
                                     "only the quantization error, as LoftQ and QERA"),
    "qcorda-kpm": LrFactor(1.0, f"{_STUDY}: {_SMALL} (0.953 ± 0.010 at 6e-4, 0.992 at 1.2e-3, 1.003 at 2e-4, 1.474 at "
                                "2e-5, as qlora's 1.542): the smallest components of W·C make small factors. CorDA's 2e-5 was every "
                                "method's rate, LoRA's too, so it sets no ratio"),
    "qmilora": LrFactor(1.0, "MiLoRA (Wang et al. 2024): the smallest singular components, trained at LoRA's rate"),
    "qpissa": LrFactor(0.1, f"{_STUDY}: best at 2e-4 of 2e-5 to 6e-4 (0.964 ± 0.014; 1.004 at 6e-5, 1.088 at "
                            f"6e-4) while qlora's is 1.2e-3, a ratio of 1/6; {_LEE}"),
    "qolora": LrFactor(0.1, "OLoRA's factors are Q, R of W (principal-component size): by analogy with PiSSA"),
    "qcorda-ipm": LrFactor(0.1, f"{_STUDY}: 0.976 at 6e-5, 0.964 ± 0.014 at 2e-4, 1.143 at 6e-4 while qlora's "
                                f"best is 1.2e-3, a ratio of 1/6; {_LEE}"),
    "qcorda-cal:ipm": LrFactor(0.1, f"{_STUDY}: best at 2e-4 (0.949 ± 0.014; 0.958 at 6e-5, 1.120 at 6e-4), 1/6 of qlora's; starts from the CorDA-IPM "
                                    "split, as qcorda-ipm"),
}


def init_key(method: str, cal_start: str | None = None) -> str:
    """The :data:`LR_FACTORS` key of an initialization."""
    return f"{method}:{cal_start or 'ipm'}" if method == "qcorda-cal" else method


def lr_factor(method: str, cal_start: str | None = None) -> LrFactor:
    """The recommended factor of ``method`` (``cal_start`` for qcorda-cal)."""
    key = init_key(method, cal_start)
    if key not in LR_FACTORS:
        raise KeyError(f"no learning-rate advice for {key!r}")
    return LR_FACTORS[key]


def recommended_lr(method: str, base_lr: float = QLORA_LR, cal_start: str | None = None) -> float:
    """factor × ``base_lr``: the learning rate ``learning_rate: auto`` trains ``method`` at."""
    return lr_factor(method, cal_start).factor * base_lr


def lr_warning(method: str, lr: float, base_lr: float = QLORA_LR, cal_start: str | None = None) -> str | None:
    """A warning when ``lr`` is more than :data:`WARN_ABOVE` times ``method``'s recommended learning rate."""
    advice = lr_factor(method, cal_start)
    rec = advice.factor * base_lr
    if lr <= WARN_ABOVE * rec:
        return None
    return (f"train.learning_rate {lr:g} is {lr / rec:.0f}x the recommended {rec:g} for {init_key(method, cal_start)} "
            f"({advice.factor:g} x base_learning_rate {base_lr:g}; {advice.source}); such adapters tend to diverge: "
            "set train.learning_rate: auto")
