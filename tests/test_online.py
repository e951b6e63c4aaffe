"""The forward-only statistics of benchmarks.online against their backprop definitions, and the bandit."""

from __future__ import annotations

import math

import torch
from test_oracle import _exact_gn_trace, _setup

from benchmarks.online import Bandit, Probe, ProbeStats, newton_lr, probe_stats
from curvzo import scoring

EPS = 1e-3


def _perturbed_logits(model: torch.nn.Module, params: list, batch: scoring.Batch, z: list[torch.Tensor],
                      scale: float) -> torch.Tensor:
    with torch.no_grad():
        for p, d in zip(params, z):
            p.add_(d, alpha=scale)
        logits = scoring.classification_logits(model, batch).detach()
        for p, d in zip(params, z):
            p.sub_(d, alpha=scale)
    return logits


def test_the_slope_terms_are_the_exact_directional_derivatives_of_the_per_example_losses() -> None:
    model, params, batch = _setup()
    gen = torch.Generator().manual_seed(0)
    z = [torch.randn(p.shape, generator=gen) for p in params]
    stats = probe_stats(_perturbed_logits(model, params, batch, z, EPS),
                        _perturbed_logits(model, params, batch, z, -EPS), batch.targets, EPS)
    with torch.enable_grad():
        losses = torch.nn.functional.cross_entropy(scoring.classification_logits(model, batch), batch.targets,
                                                   reduction="none")
        slopes = torch.stack([sum((g * d).sum() for g, d in zip(torch.autograd.grad(loss, params, retain_graph=True), z))
                              for loss in losses]).double()
    mean, noise = float(slopes.mean()), float(slopes.var()) / slopes.numel()
    # central differences of fp32 losses: exact to a small fraction of the per-example slopes' size
    tol = 1e-2 * float(slopes.abs().max()) ** 2 / slopes.numel()
    assert abs(stats.energy - mean * mean) <= tol
    assert abs(stats.signal - (mean * mean - noise)) <= tol
    assert stats.signal < 0 < stats.energy  # this batch's slopes disagree: more noise than signal


def test_the_curvature_along_z_averages_to_the_gauss_newton_trace() -> None:
    model, params, batch = _setup()
    exact = sum(_exact_gn_trace(model, params, batch))
    gen = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(200):
        z = [torch.randn(p.shape, generator=gen) for p in params]
        stats = probe_stats(_perturbed_logits(model, params, batch, z, EPS),
                            _perturbed_logits(model, params, batch, z, -EPS), batch.targets, EPS)
        samples.append(stats.curvature)
    mean = sum(samples) / len(samples)
    se = math.sqrt(sum((s - mean) ** 2 for s in samples) / (len(samples) - 1) / len(samples))
    assert abs(mean - exact) <= 4 * se, (mean, se, exact)
    assert min(samples) >= 0.0


def test_the_probe_closure_reports_after_the_second_forward_and_returns_the_mean_loss() -> None:
    model, _, batch = _setup()
    seen: list[ProbeStats] = []
    probe = Probe(model, batch, EPS, after=seen.append)
    first = probe()
    assert not seen and probe.stats is None
    second = probe()
    assert seen == [probe.stats]
    expected = torch.nn.functional.cross_entropy(scoring.classification_logits(model, batch), batch.targets)
    assert torch.equal(first, second) and torch.allclose(first, expected)
    assert probe.stats.curvature == 0.0 and probe.stats.signal <= 0.0  # same weights twice: no slope, no curvature


def test_the_newton_length_is_floored_by_the_running_curvature() -> None:
    assert newton_lr(0.1, 2.0, None) == 0.05
    assert newton_lr(0.1, 0.1, 4.0) == 0.05  # a direction seeing no curvature takes no huge step
    assert newton_lr(0.1, 8.0, 4.0) == 0.0125
    assert newton_lr(0.1, 0.0, None) == 0.0


def _fed(bandit: Bandit, measurements: dict[str, ProbeStats]) -> dict:
    state = bandit.new_state()
    for step in range(len(bandit.names) * bandit.hold):
        arm = bandit.plan(state, step)
        bandit.observe(state, arm, measurements[arm])
    return state


def test_the_bandit_sweeps_every_arm_then_exploits_the_largest_noise_corrected_ratio() -> None:
    measurements = {"a": ProbeStats(signal=1.0, energy=1.0, curvature=1.0),
                    "b": ProbeStats(signal=2.0, energy=2.0, curvature=1.0),   # best ratio
                    "c": ProbeStats(signal=2.0, energy=40.0, curvature=1.0),  # same signal, noise-dominated
                    "d": ProbeStats(signal=-1.0, energy=1.0, curvature=1.0)}
    bandit = Bandit(measurements, hold=3, explore=0.0, forget=1.0, kappa=0.1, seed=0)
    state = _fed(bandit, measurements)
    assert all(state["arms"][a]["pulls"] == 1 for a in measurements)
    assert bandit.score(state, "c") < bandit.score(state, "a") < bandit.score(state, "b")
    assert math.isclose(bandit.score(state, "b"), (6.0 - 0.05 * 6.0) / 3.0)
    step = 4 * 3
    assert bandit.plan(state, step) == "b"
    assert all(bandit.plan(state, s) == "b" for s in range(step + 1, step + 3))  # held for `hold` steps


def test_the_bandit_explores_the_stalest_arm_and_forgets_old_pulls() -> None:
    measurements = {a: ProbeStats(signal=1.0, energy=1.0, curvature=1.0) for a in "abc"}
    bandit = Bandit(measurements, hold=1, explore=1.0, forget=0.5, kappa=0.1, seed=0)
    state = _fed(bandit, measurements)
    stalest = min(measurements, key=lambda a: state["last"][a])
    assert bandit.plan(state, 3) == stalest
    # the arm pulled first was decayed twice since: 1 + ... weights 0.25 after two later steps
    assert math.isclose(state["arms"][stalest]["weight"], 0.25)


def test_the_bandit_choice_is_a_function_of_seed_and_step() -> None:
    measurements = {a: ProbeStats(signal=1.0, energy=1.0, curvature=1.0) for a in "abcdef"}
    order = [[Bandit(measurements, hold=1, explore=0.3, forget=1.0, kappa=0.1, seed=seed).plan(
        Bandit(measurements, hold=1, explore=0.3, forget=1.0, kappa=0.1, seed=seed).new_state(), 0)
        for _ in range(2)] for seed in (0, 1, 2, 3)]
    assert all(a == b for a, b in order)
    assert len({a for a, _ in order}) > 1
