"""The estimator variants' contracts, read from the step records they write.

Each variant changes only what the update divides g z_b by (``StepRecord.divisor``); these tests
check that divisor against its definition on a real step, and that the plain Horvitz-Thompson
configurations write none (their records, trajectories and replays are unchanged).
"""

from __future__ import annotations

import math

import torch

from curvzo.optim import CurvZO, MeZO


def _params(n: int = 12, size: int = 10, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(size, generator=g)) for _ in range(n)]


def _loss(params: list[torch.nn.Parameter]):
    return lambda: sum((i + 1) * (p**2).sum() for i, p in enumerate(params))


def test_plain_estimators_write_no_divisor():
    for opt in (MeZO(_params(), lr=1e-3), CurvZO(_params(), lr=1e-3), CurvZO(_params(), lr=1e-3, sampling="uniform")):
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


def test_multiplier_cap_bounds_every_block_multiplier():
    params = _params(n=30)
    opt = CurvZO(params, lr=1e-3, seed=1, multiplier_cap=2.0, init_fraction=0.2)
    capped = 0
    for _ in range(40):
        opt.step(_loss(params))
        record = opt.last_step.record
        scale = opt._global_state()["grad_scale"]
        divisor = record.divisor or record.pi
        assert all(abs(record.grad) / d <= 2.0 * scale * (1 + 1e-9) for d in divisor)
        assert all(d >= pi for d, pi in zip(divisor, record.pi))  # the cap only ever lowers a multiplier
        capped += record.divisor is not None
    assert capped > 0  # the cap is reached on this problem, so the bound above was tested


def test_subspace_divides_every_block_by_the_expected_perturbed_fraction():
    params = [torch.nn.Parameter(torch.randn(s)) for s in (4, 40, 400, 8, 80)]
    opt = CurvZO(params, lr=1e-3, correction="subspace", budget=0.4)
    sizes = torch.tensor([4.0, 40, 400, 8, 80], dtype=torch.float64)
    for _ in range(10):
        pi = opt.inclusion_probabilities()
        opt.step(_loss(params))
        record = opt.last_step.record
        fraction = float((pi * sizes).sum() / sizes.sum())
        assert len(set(record.divisor)) == 1 and math.isclose(record.divisor[0], fraction, rel_tol=1e-12)


def test_replacement_divisor_is_hansen_hurwitz():
    """A block drawn m_b times in k draws from p is divided by k p_b / m_b; always-perturbed blocks by 1."""
    params = _params(n=20)
    small = [torch.nn.Parameter(torch.randn(2)) for _ in range(3)]
    opt = CurvZO(params + small, lr=1e-3, seed=3, sampling="replacement", dense_below=2, budget=0.25, explore_mix=0.2)
    for _ in range(10):
        p = opt.sampling_distribution(opt._drawable(None))
        k = opt._k_int(opt._drawable(None))
        opt.step(_loss(params + small))
        record = opt.last_step.record
        draws = 0.0
        for block, pi, divisor in zip(record.blocks, record.pi, record.divisor):
            if block >= 20:
                assert divisor == 1.0 and pi == 1.0
                continue
            m = k * float(p[block]) / divisor
            assert abs(m - round(m)) < 1e-9 and m >= 1
            draws += round(m)
            assert math.isclose(pi, 1.0 - (1.0 - float(p[block])) ** k, rel_tol=1e-12)
        assert draws == k
        assert set(range(20, 23)) <= set(record.blocks)
