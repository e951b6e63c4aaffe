"""The step-cost benchmark's steps run what they name: here the Newton step, on both closures."""

from __future__ import annotations

import argparse

import pytest
import torch
from tiny import tiny_model, tokenizer

from benchmarks import step_cost
from curvzo import scoring
from curvzo.tasks import Example


@pytest.mark.parametrize("name", ["curvzo", "full:curvzo"])
def test_the_newton_measurement_takes_newton_steps_on_its_closure(name):
    model = tiny_model("llama", seed=0)
    examples = [Example(f"review {i}: it was", (" bad", " good"), i % 2) for i in range(4)]
    batch = scoring.encode(tokenizer(), examples, max_length=16)
    args = argparse.Namespace(lr=1e-6, eps=1e-3, seed=0, rounding="nearest")
    step, opt = step_cost.make_step(name, model, batch, args)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    assert opt.newton and opt.param_groups[0]["lr"] == 0.1 and opt.last_step.curvature > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
