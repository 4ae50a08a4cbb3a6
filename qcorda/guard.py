"""The divergence guard: stop a fine-tune whose loss blows up, and say where it was last good.

Fed one training loss per logging step (the Trainer's loss is already the mean over the
steps since the last log), it smooths the losses with an exponential moving average and
reports divergence when a loss is NaN/Inf, or when the smoothed loss stays above
``start × (1 + margin)`` for ``patience`` logging steps in a row, ``start`` being the mean
of the first ``start_window`` logged losses. ``qcorda train`` uses the first logged loss alone
(``start_window`` 1): it is already a mean over ``logging_steps × grad_accum × batch_size``
sequences, and a longer window absorbs an early blow-up into the reference (Gemma-3-270M at
100× its recommended lr logged 2.07, 21.9, 7.3: a 3-loss start of 10.4 never stopped the run).
The fine-tuning study logs single batches and averages its first ``patience`` of them.
``last_good`` is the last step whose smoothed loss was within the limit: the adapter of that
step is the one to keep.

Pure Python (no torch): ``qcorda train`` wraps it in a Trainer callback, and the fine-tuning
study feeds it from its own loop, so both stop by the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class DivergenceGuard:
    """Watches a stream of (step, loss); :meth:`update` returns why training diverged, or None."""

    margin: float = 0.25
    """Allowed rise of the smoothed loss above the starting loss, as a fraction of it."""
    patience: int = 3
    """Logging steps in a row above the limit before the run is stopped."""
    smoothing: float = 0.5
    """EMA weight of the previous smoothed value (0: no smoothing)."""
    start_window: int = 1
    """Logged losses averaged into ``start``; only NaN/Inf stops the run before they are in."""
    start: float | None = None
    """The mean of the first ``start_window`` logged losses."""
    first: list | None = None
    smoothed: float | None = None
    streak: int = 0
    """Consecutive logging steps above the limit."""
    last_good: int | None = None
    """The last step whose smoothed loss was finite and within the limit."""

    @property
    def limit(self) -> float | None:
        return None if self.start is None else self.start * (1 + self.margin)

    def update(self, step: int, loss: float) -> str | None:
        """Record the loss logged at ``step``; a sentence saying what happened when the run diverged."""
        if not math.isfinite(loss):
            return f"the training loss is {loss} at step {step}"
        self.smoothed = loss if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        if self.start is None:
            self.first = (self.first or []) + [loss]
            if len(self.first) >= self.start_window:
                self.start = sum(self.first) / len(self.first)
            self.last_good = step
            return None
        if self.smoothed <= self.limit:
            self.streak, self.last_good = 0, step
            return None
        self.streak += 1
        if self.streak < self.patience:
            return None
        return (f"the smoothed training loss stayed above {self.limit:.3f} (the starting loss {self.start:.3f} "
                f"+ {self.margin:.0%}) for {self.streak} logging steps; {loss:.3f} at step {step}")
