"""Forward-only estimates of the oracle's block choice: a bandit over groups, scored by the GSL ratio.

The oracle (``benchmarks.oracle``) chooses the perturbed groups by backprop. This module chooses
them from what the two forwards of a ZO step already compute, at inference memory (a few scalars
per group):

* the per-example losses of both forwards give s_i = (l_i+ - l_i-) / (2 eps) and, from their mean
  s and variance, ``signal = s^2 - var(s_i) / B``: an estimate of (z_S . E g)^2 with no batch-noise
  bias, whose mean over directions is ||E g_S||^2 (the oracle's signal);
* the choice logits of both forwards give the directional Jacobian d_i = (a_i+ - a_i-) / (2 eps) and
  ``curvature = mean_i d_i^T (diag p_i - p_i p_i^T) d_i``: the Gauss-Newton curvature along z,
  non-negative, whose mean over directions is tr(GN_S) (the oracle's trace);
* ``energy = s^2``, whose mean is ||g_S||^2 of a batch gradient.

Each arm of the bandit is one group (a band of ``band`` decoder layers' attention or MLP, or the
tied embedding); a pull perturbs that group alone for ``hold`` steps, so every measurement belongs
to one group. After a sweep over every arm, a hold exploits the arm with the largest predicted
decrease per step under the step rule below, (signal - kappa energy / 2) / curvature of its sums
(old pulls forgotten by ``forget`` per step): the GSL ratio less the batch noise the step pays
for; or, with probability ``explore``, it pulls the arm pulled longest ago. Every pull is also a training step: the
subspace update on the group, no 1/pi.

The step length needs no lr: the directional Newton length along z scaled by ``kappa``,

    lr_t = kappa / max(c_t, c_floor * C_arm),

where c_t is this step's Gauss-Newton curvature along z and C_arm the arm's running mean (a trust
region against directions that happen to see no curvature). With u = s z this is the descent
lemma's optimal step s/(z^T G z) shrunk by kappa, which plays the role of the fraction of the
measured slope that is signal rather than batch noise (MeZO's dev-selected lr is kappa ~ 0.1 on
SST-2 and MR by the oracle's measured traces). The same rule on every group at once (``dense``)
is MeZO with this normalisation, so that a gain of the normalisation alone is not credited to
the choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from curvzo import scoring
from curvzo.optim._newton import bound, gauss_newton_curvature

#: Groups whose statistics say nothing yet get this many holds before any exploitation.
SWEEP = 1


@dataclass
class ProbeStats:
    """What one ZO step's two forwards say about the perturbed set along its direction z."""

    signal: float
    energy: float
    curvature: float

    def as_dict(self) -> dict[str, float]:
        return {"signal": self.signal, "energy": self.energy, "curvature": self.curvature}


def probe_stats(logits_plus: torch.Tensor, logits_minus: torch.Tensor, targets: torch.Tensor,
                eps: float) -> ProbeStats:
    """Signal, energy and Gauss-Newton curvature along z from the choice logits of both forwards."""
    plus, minus = logits_plus.double(), logits_minus.double()
    slopes = (F.cross_entropy(plus, targets, reduction="none")
              - F.cross_entropy(minus, targets, reduction="none")) / (2.0 * eps)
    n = slopes.numel()
    mean = float(slopes.mean())
    noise = float(slopes.var(unbiased=True)) / n if n > 1 else 0.0
    return ProbeStats(signal=mean * mean - noise, energy=mean * mean,
                      curvature=gauss_newton_curvature(logits_plus, logits_minus, eps))


class Probe:
    """The closure of one ZO step: the label-only loss, keeping both forwards' choice logits.

    After the second forward it calls ``after`` with the step's :class:`ProbeStats`, before the
    optimizer applies the update, so the step length can use this step's curvature.
    """

    def __init__(self, model: torch.nn.Module, batch: Any, eps: float,
                 after: Callable[[ProbeStats], None] | None = None) -> None:
        self.model, self.batch, self.eps, self.after = model, batch, eps, after
        self.logits: list[torch.Tensor] = []
        self.stats: ProbeStats | None = None

    def __call__(self) -> torch.Tensor:
        logits = scoring.classification_logits(self.model, self.batch)
        self.logits.append(logits.detach())
        if len(self.logits) == 2:
            self.stats = probe_stats(*self.logits, self.batch.targets, self.eps)
            if self.after is not None:
                self.after(self.stats)
        return F.cross_entropy(logits, self.batch.targets)


def newton_lr(kappa: float, curvature: float, running: float | None) -> float:
    """kappa / max(c_t, FLOOR * running): the directional Newton length shrunk by kappa (the
    engine's rule, ``newton=True``, which takes the same step)."""
    c = bound(curvature, running)
    return kappa / c if c > 0 else 0.0


class Bandit:
    """The online choice: per-arm sums of signal, energy and curvature with forgetting.

    Its state is a plain dict (saved in a run's checkpoint): ``arms`` maps a group to its sums
    and pull count, ``last`` to the step its last pull began.
    """

    def __init__(self, arms: Sequence[str], *, hold: int, explore: float, forget: float, kappa: float,
                 seed: int) -> None:
        self.names = sorted(arms)
        self.hold, self.explore, self.forget, self.kappa, self.seed = hold, explore, forget, kappa, seed

    def new_state(self) -> dict[str, Any]:
        return {"arms": {a: {"signal": 0.0, "energy": 0.0, "curvature": 0.0, "weight": 0.0, "pulls": 0}
                         for a in self.names},
                "last": {a: -1 for a in self.names}, "current": None}

    def score(self, state: dict[str, Any], arm: str) -> float:
        """The arm's predicted decrease per step under the Newton rule, over kappa.

        With u = s z and lr = kappa / T, a step decreases the loss by about
        (kappa / T) (S - kappa E / 2): the GSL ratio S / T less the part of the slope that is
        batch noise, which the step pays for in curvature. Sums are the arm's forgotten sums; an
        arm never pulled scores 0.
        """
        s = state["arms"][arm]
        if s["curvature"] <= 0:
            return 0.0
        return (s["signal"] - 0.5 * self.kappa * s["energy"]) / s["curvature"]

    def scores(self, state: dict[str, Any]) -> dict[str, float]:
        return {a: self.score(state, a) for a in self.names}

    def running_curvature(self, state: dict[str, Any], arm: str) -> float | None:
        s = state["arms"][arm]
        return s["curvature"] / s["weight"] if s["weight"] > 0 else None

    def choose(self, state: dict[str, Any], step: int) -> str:
        """The arm of the hold beginning at ``step`` (a pure function of the state, seed and step)."""
        unswept = [a for a in self.names if state["arms"][a]["pulls"] < SWEEP]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if unswept:
            return unswept[int(torch.randint(len(unswept), (1,), generator=gen))]
        if float(torch.rand((), generator=gen)) < self.explore:
            return min(self.names, key=lambda a: (state["last"][a], a))
        return max(self.names, key=lambda a: (self.score(state, a), a))

    def plan(self, state: dict[str, Any], step: int) -> str:
        """The arm of ``step``: a new choice at the start of each hold, else the current one."""
        if state["current"] is None or step % self.hold == 0:
            arm = self.choose(state, step)
            state["current"] = arm
            state["last"][arm] = step
            state["arms"][arm]["pulls"] += 1
        return state["current"]

    def observe(self, state: dict[str, Any], arm: str, stats: ProbeStats) -> None:
        """Add one step's measurement to its arm; every arm's sums decay by ``forget``."""
        for s in state["arms"].values():
            for key in ("signal", "energy", "curvature", "weight"):
                s[key] *= self.forget
        s = state["arms"][arm]
        s["signal"] += stats.signal
        s["energy"] += stats.energy
        s["curvature"] += stats.curvature
        s["weight"] += 1.0


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than three pairs or a constant side)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    value = float(spearmanr(a, b).statistic)
    return value if math.isfinite(value) else None
