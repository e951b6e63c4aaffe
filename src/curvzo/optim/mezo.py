"""MeZO: dense two-point zeroth-order SGD (Malladi et al., 2023)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from torch import nn

from ._options import Noise, Rounding
from .optimizer import DEFAULT_MAX_CHUNK, ZOOptimizer

__all__ = ["MeZO"]


class MeZO(ZOOptimizer):
    r"""Memory-efficient zeroth-order SGD: every block is perturbed at every step.

    .. math::
        g = \frac{L(\theta + \epsilon z) - L(\theta - \epsilon z)}{2\epsilon},\qquad
        \theta \leftarrow \theta - \eta\,(g\,z + \lambda\,\theta),\qquad z \sim \mathcal N(0, I)

    Args:
        params: iterable of parameters or parameter groups.
        lr (float): learning rate (MeZO full fine-tuning: 1e-6 .. 1e-7; LoRA: 1e-4 .. 5e-5).
        eps (float): perturbation scale (default: 1e-3).
        weight_decay (float): decoupled L2 factor (default: 0).
        seed (int): seed of the optimizer's generators (default: 0).
        block_size (int, optional): noise granularity; results depend on it only through the
            noise streams, since every block is always perturbed.
        rounding (str): ``"stochastic"`` keeps bf16/fp16 updates smaller than half an ulp
            (unbiased, reproducible); ``"master"`` accumulates them in fp32 master copies;
            ``"nearest"`` drops them (default: nearest).
        model (nn.Module, optional): the module the closure runs; with it perturbations are
            streamed module by module, at inference memory (default: None, see ZOOptimizer).
        max_chunk (int): largest piece perturbed, drawn or updated at once (default: 1,048,576).
        noise (str): ``"gaussian"``, ``"generated"`` or ``"rademacher"`` (default: gaussian; see ZOOptimizer).
        normalize (bool): divide g by a running scale of |g| (see ZOOptimizer; default: False).
        newton (bool): the directional Newton step; the closure returns ``(loss, logits)`` and
            ``lr`` is the fraction of the step taken, about 0.1 (see ZOOptimizer; default: False).

    Example:
        >>> opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3, seed=0, model=model)
        >>> loss = opt.step(lambda: loss_fn(model(**batch)))

    .. note:: z is regenerated from (step seed, block id, element) for +eps, -eps and the update
       (3 draws) instead of MeZO reference code's 4, and perturbations never write the stored
       weights (the reference's +eps, -2eps, +eps arithmetic rounds them in bf16/fp16).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        seed: int = 0,
        block_size: int | None = None,
        rounding: Rounding = "nearest",
        model: nn.Module | None = None,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        noise: Noise = "gaussian",
        normalize: bool = False,
        newton: bool = False,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "weight_decay": weight_decay}, eps=eps, seed=seed, block_size=block_size,
            rounding=rounding, model=model, max_chunk=max_chunk, noise=noise, normalize=normalize, newton=newton,
        )

    def _sample(self, state: dict[str, Any], active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.arange(len(self.blocks)) if active is None else active.nonzero().flatten()
        return ids, torch.ones(ids.numel(), dtype=torch.float64)
