"""Each ZO configuration fine-tunes real architectures (tiny Llama and OPT from configs)."""

from __future__ import annotations

import pytest
import torch

from curvzo import scoring
from curvzo.optim import NEWTON_FRACTION, PRESETS, build_optimizer, takes_newton_step
from curvzo.tasks import Example
from tiny import tiny_model, tokenizer

EXAMPLES = [
    Example("a gorgeous, witty, seductive movie. It was", (" terrible", " great"), 1),
    Example("the plot is nothing but boilerplate clichés. It was", (" terrible", " great"), 0),
    Example("an utterly charming and hilarious film. It was", (" terrible", " great"), 1),
    Example("it's a bad sign when you're rooting for the villain. It was", (" terrible", " great"), 0),
]


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("method", sorted(PRESETS))
def test_loss_goes_down_on_a_fixed_batch(arch, method):
    # The median of three optimizer seeds: at this lr one run in a few dozen of the 1/pi-scaled
    # presets has a tail step that undoes the descent (curvzo-ref on tiny Llama ends above 0.9x
    # its start in 8 of 48 seeds with generator noise and 9 of 48 with table noise), and which
    # seed it is changes with the kernels' thread count.
    # A Newton step (the curvzo preset) takes its default fraction of the measured step.
    newton = takes_newton_step(method, {})
    batch = scoring.encode(tokenizer(), EXAMPLES, max_length=32)
    ratios = []
    for seed in range(3):
        model = tiny_model(arch, seed=0)
        loss = lambda: scoring.classification_loss(model, batch)

        def loss_and_logits():
            logits = scoring.classification_logits(model, batch)
            return torch.nn.functional.cross_entropy(logits, batch.targets), logits

        with torch.no_grad():
            start = float(loss())
        opt = build_optimizer(method, [p for p in model.parameters() if p.requires_grad],
                              lr=NEWTON_FRACTION if newton else 3e-3, eps=1e-3, seed=seed, model=model)
        for _ in range(40):
            opt.step(loss_and_logits if newton else loss)
        with torch.no_grad():
            ratios.append(float(loss()) / start)
    assert sorted(ratios)[1] < 0.9, ratios
