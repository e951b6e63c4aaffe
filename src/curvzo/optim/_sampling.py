"""Inclusion probabilities and block draws for sparse ZO.

Every function returns the sampled block ids together with the inclusion probability of each,
because the 1/pi (Horvitz-Thompson) correction of the update needs exactly the probability the
draw used.
"""

from __future__ import annotations

import torch

__all__ = ["pps_inclusion", "draw_poisson", "draw_multinomial", "draw_uniform"]


def pps_inclusion(p: torch.Tensor, k: float, iters: int = 40) -> torch.Tensor:
    """pi_b = min(1, c * p_b) with the largest c whose expected sample size sum(pi) stays <= k.

    Bisection on [0, 1/max p] (40 halvings, as the reference): at c = 1/max p the largest block is
    certain, and beyond that sum(pi) only grows by saturating more blocks.
    """
    lo, hi = 0.0, 1.0 / float(p.max())
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(torch.clamp(mid * p, max=1.0).sum()) <= k:
            lo = mid
        else:
            hi = mid
    return torch.clamp(lo * p, max=1.0)


def draw_poisson(pi: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Independent Bernoulli(pi_b) draws; an empty draw falls back to the most probable block."""
    chosen = torch.nonzero(torch.rand(pi.shape, generator=gen, dtype=pi.dtype) < pi).flatten()
    if chosen.numel() == 0:
        chosen = pi.argmax().reshape(1)
    return chosen


def draw_multinomial(p: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k blocks without replacement; pi_b ~= min(1, k p_b) (the reference port's approximation)."""
    chosen = torch.multinomial(p, k, replacement=False, generator=gen).sort().values
    return chosen, torch.clamp(k * p, max=1.0)


def draw_uniform(candidates: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k of the candidate ids uniformly; pi = k/len(candidates) (the "uniform sampling" ablation)."""
    n = candidates.numel()
    chosen = candidates[torch.randperm(n, generator=gen)[:k]].sort().values
    return chosen, torch.full((chosen.numel(),), k / n, dtype=torch.float64)
