"""The directional Newton step (``newton=True``): its curvature is the Gauss-Newton one, its step
is lr / curvature, and it keeps the engine's guarantees (lr=0, replay, resume)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from curvzo.optim import CurvZO, MeZO, SparseCurvZO
from curvzo.optim._newton import FLOOR, MOMENTUM, gauss_newton_curvature


def classifier(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)


def closure_of(model, x, y):
    def closure():
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    return closure


def test_the_curvature_of_two_forwards_is_the_gauss_newton_curvature_along_z():
    model, x, y = classifier()
    params = dict(model.named_parameters())
    z = {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for k, p in params.items()}
    eps = 1e-3

    def logits_at(shift):
        return torch.func.functional_call(model, {k: p + shift * z[k] for k, p in params.items()}, (x,))

    with torch.no_grad():
        measured = gauss_newton_curvature(logits_at(eps), logits_at(-eps), eps)
    logits, jz = torch.func.jvp(lambda t: logits_at(t), (torch.tensor(0.0),), (torch.tensor(1.0),))
    p = logits.softmax(-1)
    exact = ((p * jz.square()).sum(-1) - (p * jz).sum(-1).square()).mean().item()
    assert measured == pytest.approx(exact, rel=1e-4) and exact > 0


def test_a_newton_step_is_the_plain_step_at_lr_over_the_curvature():
    model, x, y = classifier()
    twin = copy.deepcopy(model)
    newton = MeZO(model.parameters(), lr=0.1, seed=3, model=model, newton=True)
    newton.step(closure_of(model, x, y))
    curvature = newton.last_step.curvature
    assert newton.last_step.record.newton == curvature > 0  # the first step has no running curvature
    plain = MeZO(twin.parameters(), lr=0.1 / curvature, seed=3, model=twin)
    plain.step(lambda: F.cross_entropy(twin(x), y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_the_step_divides_by_at_least_half_the_running_curvature():
    model, x, y = classifier()
    opt = MeZO(model.parameters(), lr=0.1, seed=0, model=model, newton=True)
    running = None
    for _ in range(12):
        opt.step(closure_of(model, x, y))
        c = opt.last_step.curvature
        assert opt.last_step.record.newton == (c if running is None else max(c, FLOOR * running))
        running = c if running is None else MOMENTUM * running + (1 - MOMENTUM) * c
    assert opt.state_dict()["state"][0]["curvature"] == running


@pytest.mark.parametrize("cls", [MeZO, SparseCurvZO])
def test_newton_steps_descend_replay_resume_and_stay_exact_at_lr_zero(cls):
    model, x, y = classifier()
    start = copy.deepcopy(model)
    opt = cls(model.parameters(), lr=0.1, seed=7, model=model, newton=True)
    first = F.cross_entropy(model(x), y).item()
    log = []
    for _ in range(40):
        opt.step(closure_of(model, x, y))
        log.append((opt.last_step.grad, opt.last_step.curvature))
    assert F.cross_entropy(model(x), y).item() < first
    again = cls(start.parameters(), lr=0.1, seed=7, model=start, newton=True)
    for grad, curvature in log[:20]:
        again.replay(grad, curvature=curvature)
    resumed = cls(start.parameters(), lr=0.1, seed=7, model=start, newton=True)
    resumed.load_state_dict(again.state_dict())
    for grad, curvature in log[20:]:
        resumed.replay(grad, curvature=curvature)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters()))
    with pytest.raises(ValueError, match="replays from its projected gradient and its curvature"):
        resumed.replay(0.5)
    frozen = [p.detach().clone() for p in model.parameters()]
    still = cls(model.parameters(), lr=0.0, seed=7, model=model, newton=True)
    still.step(closure_of(model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))


def test_curvzo_is_mezo_with_the_newton_step_bit_for_bit():
    model, x, y = classifier()
    twin = copy.deepcopy(model)
    flagship = CurvZO(model.parameters(), seed=3, model=model)
    reference = MeZO(twin.parameters(), lr=0.1, seed=3, model=twin, newton=True)
    for _ in range(5):
        assert flagship.step(closure_of(model, x, y)) == reference.step(closure_of(twin, x, y))
        assert flagship.last_step.record == reference.last_step.record
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    with pytest.raises(TypeError, match="newton"):
        CurvZO(model.parameters(), newton=False)


def test_a_newton_step_needs_a_closure_with_logits():
    model, x, y = classifier()
    opt = MeZO(model.parameters(), lr=0.1, model=model, newton=True)
    with pytest.raises(TypeError, match=r"newton=True needs a closure that returns \(loss, logits\)"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(TypeError, match="newton must be a bool"):
        MeZO(model.parameters(), model=model, newton=1)
