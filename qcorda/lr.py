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

from .methods import NAMES, TABLE, LrFactor, spec

#: QLoRA's usual learning rate on GPUs (QLoRA paper, 7B–13B: 2e-4); ``base_learning_rate``'s default.
QLORA_LR = 2e-4
#: ``qcorda train`` warns when an explicit learning rate is more than this many times the recommended one.
WARN_ABOVE = 3.0

__all__ = ["LR_FACTORS", "LrFactor", "QLORA_LR", "WARN_ABOVE", "init_key", "lr_factor", "lr_warning", "recommended_lr"]


def init_key(method: str, cal_start: str | None = None) -> str:
    """The :data:`LR_FACTORS` key of an initialization."""
    starts = spec(method).lr_by_start if method in NAMES else ()
    return f"{method}:{cal_start or starts[0][0]}" if starts else method


#: Keyed by :func:`init_key` (the method, and for qcorda-cal its start); read from the method table
#: (:attr:`qcorda.methods.MethodSpec.lr`, ``lr_by_start``).
LR_FACTORS: dict[str, LrFactor] = {
    (f"{s.name}:{start}" if s.lr_by_start else s.name): advice
    for s in TABLE for start, advice in (s.lr_by_start or ((None, s.lr),))
}


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
