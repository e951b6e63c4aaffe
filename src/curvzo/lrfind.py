"""``curvzo lr-find``: a short learning-rate range test from a run's starting weights.

    curvzo lr-find --task sst2 --data-dir ../shared/data --method mezo --steps-per-lr 10

The stable learning rate of ZO fine-tuning depends strongly on the model (SmolLM2-135M trains at
5e-5 where MeZO's OPT settings are 1e-6 to 1e-7), so a guess costs a diverged run. The range test
takes a few steps at each learning rate of a geometric grid, smallest first, each from the same
starting weights, with the same optimizer seed and on the same batches. The smallest learning rate
barely moves the weights, so its losses are the batches' own; a learning rate has diverged when its
losses over the last third of its steps average more than ``factor`` times the smallest one's on
the same batches (or any is not finite). The sweep stops at the first divergent learning rate.

Short tests overestimate what stays stable over a long run (an lr that survives 60 steps can
diverge within 300), so the suggestion is one grid step below the largest learning rate that
did not diverge.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from . import scoring
from .config import LR_FIND_RANGE, TrainConfig
from .errors import ConfigError
from .finetune import active_blocks, build_training_optimizer, load_weights, setup, take_step, train_batch, weights_on_cpu
from .optim import ZOOptimizer

__all__ = ["Trial", "LrFindResult", "default_range", "lr_grid", "lr_find"]


def default_range(cfg: TrainConfig) -> tuple[float, float]:
    """The grid's default (smallest, largest) lr for ``cfg``'s method (:data:`LR_FIND_RANGE`)."""
    return LR_FIND_RANGE["newton" if cfg.is_zo and cfg.newton else "rate"]


@dataclass(frozen=True)
class Trial:
    """One learning rate's steps: its losses and their ratio to the smallest learning rate's."""

    lr: float
    losses: tuple[float, ...]
    tail: float  # mean loss over the last third of the steps
    ratio: float
    diverged: bool


@dataclass(frozen=True)
class LrFindResult:
    trials: tuple[Trial, ...]
    largest_stable: float | None
    suggested: float | None
    forward_passes: int
    seconds: float


def lr_grid(lr_min: float, lr_max: float, per_decade: int) -> list[float]:
    """Geometric grid from ``lr_min`` to ``lr_max`` with ``per_decade`` values per factor of ten."""
    if not (0 < lr_min < lr_max and math.isfinite(lr_max)):
        raise ConfigError(f"the lr range needs 0 < lr_min < lr_max, got {lr_min:g} and {lr_max:g}")
    if not isinstance(per_decade, int) or per_decade < 1:
        raise ConfigError(f"--per-decade must be an integer >= 1, got {per_decade!r}")
    count = round(math.log10(lr_max / lr_min) * per_decade)
    return [float(f"{lr_min * 10 ** (i / per_decade):.3g}") for i in range(count + 1)]


def _tail(losses: list[float]) -> float:
    """Mean over the last third: what the steps led to, less noisy than the last batch alone."""
    third = max(1, len(losses) // 3)
    return sum(losses[-third:]) / third


def lr_find(
    cfg: TrainConfig, *, lrs: list[float], steps: int = 10, factor: float = 2.0, progress: bool = True
) -> LrFindResult:
    """Run ``steps`` steps at each of ``lrs`` (ascending) from ``cfg``'s starting weights."""
    if not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"--steps-per-lr must be an integer >= 2, got {steps!r}")
    if not cfg.is_zo:
        raise ConfigError(f"lr-find sweeps ZO methods, not {cfg.method}")
    clock = time.perf_counter()
    task, (train_set, _, _), model, tokenizer, named = setup(cfg)
    start = weights_on_cpu(named)
    bar = tqdm(total=steps * len(lrs), disable=not progress, desc="lr-find")
    trials: list[Trial] = []
    reference: float | None = None
    forward_passes = 0
    for lr in lrs:
        load_weights(named, start)
        run_cfg = replace(cfg, lr=lr)
        optimizer = build_training_optimizer(run_cfg, model, named)
        bar.set_description(f"lr-find {lr:.3g}")
        losses = []
        for step in range(steps):
            batch = scoring.encode(tokenizer, train_batch(train_set, step, run_cfg), max_length=cfg.max_length)
            batch = batch.to(cfg.resolved_device())
            active = active_blocks(optimizer, model, batch) if isinstance(optimizer, ZOOptimizer) else None
            loss, _ = take_step(optimizer, model, task, batch, run_cfg, active)
            losses.append(loss)
            forward_passes += 2 * cfg.batch_size
            bar.update(1)
        tail = _tail(losses)
        reference = tail if reference is None else reference
        ratio = tail / reference
        diverged = not all(math.isfinite(x) for x in losses) or ratio > factor
        trials.append(Trial(lr, tuple(losses), tail, ratio, diverged))
        if diverged:
            break
    bar.close()
    load_weights(named, start)
    stable = [t.lr for t in trials if not t.diverged]
    largest = stable[-1] if stable else None
    suggested = stable[-2] if len(stable) >= 2 else largest
    return LrFindResult(tuple(trials), largest, suggested, forward_passes, time.perf_counter() - clock)
