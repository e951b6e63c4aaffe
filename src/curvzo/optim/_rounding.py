"""Stochastic rounding of fp32 results into bf16/fp16 storage.

A ZO update lr * g * z is often far below half a unit in the last place of a bf16 weight
(|w| ~ 0.05 has an ulp of ~2e-4), so round-to-nearest throws it away and training stalls.
Rounding up with probability equal to the remainder's share of the gap keeps every update in
expectation at no memory cost. The random bits come from a generator seeded per (step, block),
so the rounding is as reproducible (and replayable) as the noise itself.
"""

from __future__ import annotations

import torch

__all__ = ["round_stochastic"]

_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``x`` (fp32) rounded to ``dtype`` up or down at random, unbiased: E[result] = x."""
    if dtype == torch.bfloat16:
        # bf16 is the top half of fp32: add 16 random low bits, then truncate them.
        noise = torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int32, device=x.device)
        bits = (x.contiguous().view(torch.int32) + noise) & -65536
        return bits.view(torch.float32).to(torch.bfloat16)
    nearest = x.to(dtype)
    base = nearest.float()
    remainder = x - base
    _, exponent = torch.frexp(base)
    ulp = torch.ldexp(torch.ones_like(base), (exponent - 1 - _MANTISSA_BITS[dtype]).clamp_min(-24))
    move = torch.rand(x.shape, generator=gen, device=x.device) < remainder.abs() / ulp
    return torch.where(move, base + remainder.sign() * ulp, base).to(dtype)
