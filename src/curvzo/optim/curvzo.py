"""CurvZO: zeroth-order SGD whose step length is the curvature that its two forwards measure.

MeZO's direction (every block perturbed, no 1/pi) with the directional Newton step of
``curvzo.optim._newton``: the update g z is divided by the Gauss-Newton curvature along z, read
from the logits of the two forwards a step already runs. The accuracy profiles chose it over the
sparse sampler of the paper (:class:`curvzo.optim.SparseCurvZO`): choosing which blocks to perturb
from forwards alone gained nothing at 400 steps, while the measured step length matches MeZO at
its dev-selected learning rate with one default and no sweep (docs/results.md).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ._options import NEWTON_FRACTION, Noise, Rounding
from .mezo import MeZO
from .optimizer import DEFAULT_MAX_CHUNK

__all__ = ["CurvZO"]


class CurvZO(MeZO):
    r"""Two-point ZO with the directional Newton step: ``lr`` is a fraction of a measured step.

    .. math::
        \begin{aligned}
        &g = \frac{L(\theta + \epsilon z) - L(\theta - \epsilon z)}{2\epsilon},\qquad
          c = \tfrac1n \textstyle\sum_i d_i^\top(\operatorname{diag} p_i - p_i p_i^\top)\, d_i,\quad
          d_i = \frac{a_i^+ - a_i^-}{2\epsilon} \\
        &\theta \leftarrow \theta - \frac{\kappa}{\max(c,\ C/2)}\,(g\,z + \lambda\theta),\qquad
          C \leftarrow 0.9\,C + 0.1\,c
        \end{aligned}

    where :math:`a^\pm` are the closure's logits at :math:`\theta \pm \epsilon z` and :math:`p_i`
    the softmax of row i at their midpoint: :math:`c = z^\top G z`, the Gauss-Newton curvature of
    the cross-entropy along z, non-negative and free (no third forward).

    The closure returns ``(loss, logits)``: the loss a mean cross-entropy of ``softmax(logits)``
    over the last dimension (a classifier's ``[batch, classes]``, or a language model's logits at
    the positions that predict a label). The logits are held from the first forward to the second.

    Args:
        params: iterable of parameters or parameter groups.
        lr (float): κ, the fraction of the Newton step taken (default: 0.1, one value for every
            task; on SmolLM2-135M 0.05-0.1 is the useful range and 0.2 too long a step).
        eps (float): perturbation scale (default: 1e-3).
        weight_decay (float): decoupled L2 factor, taken with the same step (default: 0).
        seed (int): seed of the optimizer's generators (default: 0).
        rounding (str), model (nn.Module, optional), max_chunk (int), noise (str): as for
            :class:`MeZO` (defaults: ``"nearest"``, None, 1,048,576, ``"gaussian"``); pass ``model``
            to stream the perturbations module by module, at inference memory.

    Example:
        >>> opt = CurvZO(model.parameters(), seed=0, model=model)
        >>> def closure():
        ...     logits = model(**batch).logits[:, -1, label_tokens]
        ...     return F.cross_entropy(logits, targets), logits
        >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = NEWTON_FRACTION,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        seed: int = 0,
        rounding: Rounding = "nearest",
        model: nn.Module | None = None,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        noise: Noise = "gaussian",
    ) -> None:
        super().__init__(
            params, lr, eps, weight_decay, seed=seed, rounding=rounding, model=model, max_chunk=max_chunk,
            noise=noise, newton=True,
        )
