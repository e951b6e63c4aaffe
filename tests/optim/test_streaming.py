"""Streaming perturbation (``model=``): same estimate as perturbing the stored weights, exact
restoration, and a step that never allocates more than one chunk or one module's weights."""

from __future__ import annotations

import pytest
import torch

from benchmarks._common import LargestAllocation
from curvzo import scoring
from curvzo.optim import MeZO, build_optimizer
from curvzo.tasks import Example
from tiny import tiny_model, tokenizer

EXAMPLES = [
    Example("a gorgeous, witty, seductive movie. It was", (" terrible", " great"), 1),
    Example("the plot is nothing but boilerplate clichés. It was", (" terrible", " great"), 0),
    Example("an utterly charming and hilarious film. It was", (" terrible", " great"), 1),
    Example("it's a bad sign when you're rooting for the villain. It was", (" terrible", " great"), 0),
]
CHUNK = 1 << 14  # one CPU noise unit: far below the tiny models' 1.6M-element embedding


def _batch():
    return scoring.encode(tokenizer(), EXAMPLES, max_length=32)


def _label_loss(model, batch):
    return lambda: scoring.classification_loss(model, batch)


def _full_logits_loss(model, batch):
    """Every vocabulary row of the LM head is read: the chunked-output path."""
    def loss():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return logits.float().log_softmax(-1)[..., :50].mean()
    return loss


def _active(opt, model, batch):
    weight = model.get_input_embeddings().weight
    rows = torch.unique(torch.cat([batch.input_ids.flatten(), batch.choice_ids.flatten()]))
    return opt.rows_active(weight, rows)


def _optimizer(method, model, streamed, row_blocks):
    params = [p for p in model.parameters() if p.requires_grad]
    if row_blocks:
        embedding = model.get_input_embeddings().weight
        params = [{"params": [p for p in params if p is not embedding]},
                  {"params": [embedding], "block_size": embedding.shape[1]}]
    return build_optimizer(method, params, lr=1e-3, eps=1e-2, seed=3, model=model if streamed else None, max_chunk=CHUNK)


CASES = [
    ("llama", {}, "mezo", False, _label_loss),
    ("llama", {"tie_word_embeddings": True}, "mezo", False, _label_loss),
    ("llama", {"tie_word_embeddings": True}, "curvzo-sparse", True, _label_loss),
    ("opt", {}, "curvzo-ref", False, _label_loss),
    ("llama", {}, "mezo", False, _full_logits_loss),
    ("gpt2", {}, "uniform-sparse", False, _full_logits_loss),
]


@pytest.mark.parametrize("arch,overrides,method,row_blocks,make_loss", CASES)
def test_streamed_steps_equal_steps_on_perturbed_stored_weights(arch, overrides, method, row_blocks, make_loss):
    """Module-by-module perturbation sees the same theta +- eps z as writing it into the weights
    (tied embeddings included: the head's rows carry the embedding's noise), so losses, projected
    gradients and updated weights agree to float rounding, step after step."""
    batch = _batch()
    runs = []
    for streamed in (True, False):
        model = tiny_model(arch, seed=0, **overrides)
        opt = _optimizer(method, model, streamed, row_blocks)
        loss = make_loss(model, batch)
        infos = []
        for _ in range(3):
            opt.step(loss, active=_active(opt, model, batch) if row_blocks else None)
            infos.append(opt.last_step)
        runs.append((infos, [p.detach().clone() for p in model.parameters()]))
    (streamed_infos, streamed_weights), (stored_infos, stored_weights) = runs
    for a, b in zip(streamed_infos, stored_infos):
        assert a.record.blocks == b.record.blocks
        assert a.loss_plus == pytest.approx(b.loss_plus, rel=1e-5) and a.loss_minus == pytest.approx(b.loss_minus, rel=1e-5)
        assert a.grad == pytest.approx(b.grad, rel=1e-3, abs=1e-4)
        assert a.loss_plus != a.loss_minus  # the perturbation reached the loss
    for a, b in zip(streamed_weights, stored_weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make_loss", [_label_loss, _full_logits_loss])
def test_streamed_lr_zero_leaves_every_bit(dtype, make_loss):
    model = tiny_model("llama", seed=0, tie_word_embeddings=True).to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.parameters(), lr=0.0, eps=1e-2, seed=0, model=model, max_chunk=CHUNK)
    for _ in range(2):
        opt.step(make_loss(model, _batch()))
    assert opt.last_step.loss_plus != opt.last_step.loss_minus
    for b, p in zip(before, model.parameters()):
        assert type(p) is torch.nn.Parameter and torch.equal(b.view(torch.uint8), p.detach().view(torch.uint8))


def test_a_closure_that_raises_leaves_the_model_as_it_was():
    model = tiny_model("llama", seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = MeZO(model.parameters(), lr=1e-3, seed=0, model=model, max_chunk=CHUNK)
    calls = []

    def closure():
        calls.append(1)
        model(input_ids=_batch().input_ids[:, :4])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert calls == [1]
    for name, p in model.named_parameters():
        assert type(p) is torch.nn.Parameter and torch.equal(p.detach(), before[name])
    for module in model.modules():
        assert "forward" not in module.__dict__ and not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("method,row_blocks", [("mezo", False), ("curvzo-ref", False), ("curvzo-sparse", True)])
@pytest.mark.parametrize("tied", [False, True])
def test_a_step_allocates_at_most_one_chunk_or_one_module(method, row_blocks, tied):
    """No tensor made during a step (forwards included) is larger than the chunk bound or the
    largest non-embedding module's weights: the 1.6M-element embedding and LM head are never
    copied, and nothing is cloned wholesale."""
    model = tiny_model("llama", seed=0, tie_word_embeddings=tied)
    batch = _batch()
    opt = _optimizer(method, model, True, row_blocks)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    module_bound = max(
        sum(p.numel() for p in m.parameters(recurse=False))
        for m in model.modules()
        if not any(p is embedding or p is head for p in m.parameters(recurse=False))
    )
    bound = max(CHUNK, module_bound)
    assert embedding.numel() > 50 * bound
    loss = _label_loss(model, batch)
    for _ in range(3):
        active = _active(opt, model, batch) if row_blocks else None
        with LargestAllocation(skip_shape=(len(opt.blocks),)) as seen:
            opt.step(loss, active=active)
        assert 0 < seen.largest_numel <= bound, (seen.largest_numel, seen.op, bound)
