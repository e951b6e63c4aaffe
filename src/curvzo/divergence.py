"""Divergence, noticed early: a smoothed training loss that stays far above where it started.

A ZO run at too large a learning rate rarely produces NaN at once: the loss first climbs (0.8 ->
40 in 30 steps is typical) and may go on for hundreds of steps. The guard compares a moving
average of the loss with its start, the first step's loss (taken at the starting weights, so no
learning rate has touched it yet), and calls the run diverged once the average has stayed above
``factor`` times the start for ``patience`` steps in a row; a non-finite loss counts as above.
The average is geometric (an exponential moving average of log-losses), so one spike of a
hundred times the start moves it by a factor of 1.6 while a loss that stays high pulls it up
within a few steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DivergenceGuard", "lower_lr"]

_FLOOR = 1e-8  # losses of 0 (a perfect batch) must not send the log-average to -inf


@dataclass
class DivergenceGuard:
    """Watches one run's training loss; its fields are plain numbers, saved with a checkpoint."""

    factor: float = 3.0
    patience: int = 10
    beta: float = 0.9
    start: float | None = None
    log_smoothed: float | None = None
    above: int = 0

    @property
    def smoothed(self) -> float:
        return math.nan if self.log_smoothed is None else math.exp(self.log_smoothed)

    def update(self, loss: float) -> bool:
        """Take one step's loss; True when the run has diverged."""
        if not math.isfinite(loss):
            self.above += 1
            return self.above >= self.patience
        log_loss = math.log(max(loss, _FLOOR))
        if self.start is None:
            self.start, self.log_smoothed = max(loss, _FLOOR), log_loss
        self.log_smoothed = self.beta * self.log_smoothed + (1 - self.beta) * log_loss
        self.above = self.above + 1 if self.smoothed > self.factor * self.start else 0
        return self.above >= self.patience

    def describe(self) -> str:
        return (f"smoothed training loss {self.smoothed:.3g}, over {self.factor:g} x its start {self.start:.3g} "
                f"for {self.above} steps")

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


def lower_lr(lr: float, by: float = 3.0) -> float:
    """A round learning rate (1, 2 or 5 x 10^k) at most ``lr / by``: what to try after a divergence."""
    target = lr / by
    exponent = math.floor(math.log10(target))
    value = next(m * 10.0**exponent for m in (5, 2, 1) if m * 10.0**exponent <= target * (1 + 1e-9))
    return float(f"{value:.3g}")
