"""The estimator variants' contracts, read from the step records they write.

Each variant changes only what the update divides g z_b by (``StepRecord.divisor``); these tests
check that divisor against its definition on a real step, and that the plain Horvitz-Thompson
configurations write none (their records, trajectories and replays are unchanged).
"""

from __future__ import annotations

import math

import torch

from curvzo.optim import SparseCurvZO, MeZO


def _params(n: int = 12, size: int = 10, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(size, generator=g)) for _ in range(n)]


def _loss(params: list[torch.nn.Parameter]):
    return lambda: sum((i + 1) * (p**2).sum() for i, p in enumerate(params))


def test_plain_estimators_write_no_divisor():
    for opt in (MeZO(_params(), lr=1e-3), SparseCurvZO(_params(), lr=1e-3), SparseCurvZO(_params(), lr=1e-3, sampling="uniform")):
        for _ in range(3):
            opt.step(_loss(opt.param_groups[0]["params"]))
            assert opt.last_step.record.divisor is None


def test_normalize_divides_by_the_running_scale_of_g():
    params = _params()
    opt = MeZO(params, lr=1e-3, normalize=True)
    scale = None
    for _ in range(20):
        opt.step(_loss(params))
        record = opt.last_step.record
        g = abs(record.grad)
        scale = g if scale is None else 0.9 * scale + 0.1 * g
        assert math.isclose(record.divisor[0], scale, rel_tol=1e-12)
        assert abs(record.grad) / record.divisor[0] <= 10.0 + 1e-9


def test_subspace_divides_every_block_by_the_expected_perturbed_fraction():
    params = [torch.nn.Parameter(torch.randn(s)) for s in (4, 40, 400, 8, 80)]
    opt = SparseCurvZO(params, lr=1e-3, correction="subspace", budget=0.4)
    sizes = torch.tensor([4.0, 40, 400, 8, 80], dtype=torch.float64)
    for _ in range(10):
        pi = opt.inclusion_probabilities()
        opt.step(_loss(params))
        record = opt.last_step.record
        fraction = float((pi * sizes).sum() / sizes.sum())
        assert len(set(record.divisor)) == 1 and math.isclose(record.divisor[0], fraction, rel_tol=1e-12)
