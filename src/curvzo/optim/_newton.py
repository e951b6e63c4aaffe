"""The directional Newton step: a step length from the curvature that the two forwards measure.

Along a direction z the descent lemma's best step for the update u = g z is 1 / (z^T H z). When
the loss is a cross-entropy of softmax(logits), the Gauss-Newton part of z^T H z comes for free
from the two forwards a ZO step already runs: d = (a+ - a-) / (2 eps) is the directional
derivative of the logits along z, and with p the softmax at the midpoint,

    c = mean over rows of d^T (diag p - p p^T) d  >= 0.

The step then takes ``lr / max(c, FLOOR * C)``, with C a running mean of c: ``lr`` is the fraction
of the Newton step taken (about 0.1, the share of the measured slope that is signal rather than
batch noise), the same number for any model size or subspace, and the floor keeps a direction that
happens to see little curvature from taking a step the running curvature would not allow.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: The step's curvature is at least this fraction of the running curvature.
FLOOR = 0.5
#: Weight of the previous running curvature in its update.
MOMENTUM = 0.9

_CLOSURE_ERROR = (
    "newton=True needs a closure that returns (loss, logits): the loss a cross-entropy of "
    "softmax(logits) over the last dimension (e.g. a classifier's [batch, classes] logits)"
)


def loss_and_logits(output: Any) -> tuple[Any, torch.Tensor]:
    """The closure's (loss, logits) pair, the logits detached; anything else is refused."""
    if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], torch.Tensor)):
        raise TypeError(_CLOSURE_ERROR)
    loss, logits = output
    return loss, logits.detach()


def gauss_newton_curvature(logits_plus: torch.Tensor, logits_minus: torch.Tensor, eps: float) -> float:
    """z^T G z of the mean cross-entropy, from the logits at theta + eps z and theta - eps z."""
    if logits_plus.dim() == 0:
        raise ValueError("the closure's logits need a class dimension, got a scalar")
    if logits_plus.shape != logits_minus.shape:
        raise ValueError(f"the two forwards' logits differ in shape: {tuple(logits_plus.shape)} and "
                         f"{tuple(logits_minus.shape)}")
    plus = logits_plus.double().flatten(0, -2) if logits_plus.dim() > 1 else logits_plus.double()[None]
    minus = logits_minus.double().reshape(plus.shape)
    slope = (plus - minus) / (2.0 * eps)
    p = torch.softmax(0.5 * (plus + minus), dim=-1)
    per_row = (p * slope.square()).sum(-1) - (p * slope).sum(-1).square()
    return float(per_row.mean().clamp_min(0.0))


def bound(curvature: float, running: float | None) -> float:
    """The curvature the step divides by: this step's, at least ``FLOOR`` times the running one."""
    return curvature if running is None else max(curvature, FLOOR * running)


def updated(running: float | None, curvature: float) -> float:
    """The running curvature after a step that measured ``curvature`` (started at the first one)."""
    if running is None or not math.isfinite(running):
        return curvature
    return MOMENTUM * running + (1.0 - MOMENTUM) * curvature
