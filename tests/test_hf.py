"""ZOTrainer: curvzo's optimizers inside ``transformers.Trainer``, on tiny Llama and OPT models.

The tiny Llama has an untied input embedding, so the ``curvzo-sparse`` preset's embedding rows
are blocks and each step draws only the batch's rows; the tiny OPT ties it to the LM head, so every
row stays drawable. Batches are random token ids (language-model loss on all of them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from tiny import tiny_model
from transformers import TrainerCallback, TrainingArguments

from curvzo.errors import ConfigError
from curvzo.hf import ZOTrainer, ZOTrainingArguments
from curvzo import hf
from curvzo.optim import CurvZO, MeZO, SparseCurvZO

LENGTH = 16
VOCAB = 2048  # SmolLM2's 49k-row embedding would make every step of these tests 20x slower


def small(arch: str) -> torch.nn.Module:
    return tiny_model(arch, vocab_size=VOCAB)


def token_dataset(n: int, seed: int = 0, tokens: int = VOCAB) -> datasets.Dataset:
    """``n`` random sequences of the first ``tokens`` token ids (few tokens: a loss easy to lower)."""
    ids = torch.randint(0, tokens, (n, LENGTH), generator=torch.Generator().manual_seed(seed)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def arguments(tmp_path: Path, cls: type = ZOTrainingArguments, **overrides: Any) -> TrainingArguments:
    settings = {"report_to": "none", "use_cpu": True, "disable_tqdm": True, "save_strategy": "no",
                "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, **overrides}
    return cls(str(tmp_path / "out"), **settings)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class RecordSteps(TrainerCallback):
    """The ZO optimizer's record of every step, as Trainer's loop saw it."""

    def __init__(self) -> None:
        self.records: list = []

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        from curvzo.hf import unwrap_zo

        self.records.append(unwrap_zo(optimizer).last_step.record)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_loss_decreases_on_a_fixed_batch_with_plain_training_arguments(tmp_path: Path, arch: str) -> None:
    batch = token_dataset(4, tokens=64)
    # lr: half the Newton step, whose decrease per step on this random-token loss is small (the
    # curvature of a 2,048-way softmax along a random z), so 40 steps
    args = arguments(tmp_path, TrainingArguments, max_steps=40, learning_rate=0.5, eval_strategy="steps", eval_steps=20)
    trainer = ZOTrainer(model=small(arch), args=args, train_dataset=batch, eval_dataset=batch)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert isinstance(trainer.zo_optimizer, CurvZO)  # the library's default preset
    assert after < before - 0.1, (before, after)
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) == 40 and len([log for log in trainer.state.log_history if "eval_loss" in log]) >= 2
    assert {"zo_grad_abs", "zo_blocks", "zo_budget", "zo_step_lr"} <= train_logs[-1].keys()
    assert 0 < train_logs[-1]["zo_step_lr"] < 0.5  # the fraction over a curvature that exceeds 1 here
    assert "grad_norm" not in train_logs[-1]  # no .grad exists; the norm Trainer would log is meaningless


@pytest.mark.parametrize(("method", "lr"), [("curvzo", 0.1), ("curvzo-sparse", 1e-3)])
def test_resume_from_checkpoint_continues_bit_identically(tmp_path: Path, method: str, lr: float) -> None:
    data = token_dataset(8)  # 2 steps of 4 per epoch: the resumed epoch must skip its first batch

    def run(out: Path, resume: str | None = None) -> ZOTrainer:
        args = arguments(out, max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear",
                         zo_method=method, learning_rate=lr)
        trainer = ZOTrainer(model=small("llama"), args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "out" / "checkpoint-3"))
    assert resumed.state.global_step == straight.state.global_step == 6
    expected = weights(straight.model)
    for name, value in weights(resumed.model).items():
        assert torch.equal(value, expected[name]), name
    if isinstance(straight.zo_optimizer, SparseCurvZO):
        assert torch.equal(resumed.zo_optimizer.scores, straight.zo_optimizer.scores)
        assert resumed.zo_optimizer.budget_fraction() == straight.zo_optimizer.budget_fraction()
        assert any({"zo_score_eff", "zo_score_top"} <= log.keys() for log in straight.state.log_history)


def test_lora_changes_only_adapter_tensors(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(small("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = weights(model)
    trainer = ZOTrainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=token_dataset(4))
    trainer.train()
    changed = {name for name, value in weights(model).items() if not torch.equal(value, before[name])}
    assert changed and all("lora_" in name for name in changed), changed
    assert {"lora_A", "lora_B"} <= {name.split(".")[-3] for name in changed}


def test_the_scheduler_sets_the_learning_rate_of_each_zo_step(tmp_path: Path) -> None:
    recorder = RecordSteps()
    args = arguments(tmp_path, max_steps=4, learning_rate=1e-3, lr_scheduler_type="linear")
    ZOTrainer(model=small("opt"), args=args, train_dataset=token_dataset(4), callbacks=[recorder]).train()
    used = [record.lr[0] for record in recorder.records]
    assert used == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def test_gradient_accumulation_is_one_zo_step_on_the_accumulated_batch(tmp_path: Path) -> None:
    data = token_dataset(8)
    runs = {}
    for accumulate in (1, 2):
        recorder = RecordSteps()
        args = arguments(tmp_path / str(accumulate), max_steps=3, per_device_train_batch_size=4 // accumulate,
                         gradient_accumulation_steps=accumulate, zo_method="mezo")
        trainer = ZOTrainer(model=small("opt"), args=args, train_dataset=data, callbacks=[recorder])
        trainer.train()
        runs[accumulate] = (recorder.records, weights(trainer.model), trainer.state.log_history)
    (one, w1, logs1), (two, w2, logs2) = runs[1], runs[2]
    assert len(one) == len(two) == 3
    # Same examples per step, same noise: the two-micro-batch mean equals the batch mean up to rounding.
    assert [r.grad for r in two] == pytest.approx([r.grad for r in one], rel=1e-2, abs=1e-3)
    assert [log["loss"] for log in logs2 if "loss" in log] == pytest.approx([log["loss"] for log in logs1 if "loss" in log], rel=1e-5)
    for name, value in w2.items():
        torch.testing.assert_close(value, w1[name], rtol=0, atol=1e-5)


def test_bf16_weights_train_with_fp32_masters(tmp_path: Path) -> None:
    model = small("llama").to(torch.bfloat16)
    before = weights(model)
    trainer = ZOTrainer(model=model, args=arguments(tmp_path, max_steps=3, learning_rate=0.1), train_dataset=token_dataset(4))
    trainer.train()
    after = weights(model)
    assert all(value.dtype == torch.bfloat16 and bool(torch.isfinite(value).all()) for value in after.values())
    assert any(not torch.equal(after[name], before[name]) for name in after)
    assert any("master" in state for state in trainer.zo_optimizer.state.values())  # zo_rounding="master"
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)


def test_bf16_autocast_runs(tmp_path: Path) -> None:
    trainer = ZOTrainer(model=small("opt"), args=arguments(tmp_path, max_steps=2, bf16=True), train_dataset=token_dataset(4))
    trainer.train()
    assert trainer.state.global_step == 2 and all(log["loss"] == log["loss"] for log in trainer.state.log_history if "loss" in log)


def test_an_optimizer_instance_is_used_as_given_with_dropout_off(tmp_path: Path) -> None:
    modes = []

    class Probe(ZOTrainer):
        def compute_loss(self, model: torch.nn.Module, inputs: dict, **kwargs: Any) -> Any:
            modes.append(any(module.training for module in model.modules()))
            return super().compute_loss(model, inputs, **kwargs)

    model = small("opt").train()  # OPT has dropout 0.1: the two perturbed forwards would differ
    optimizer = MeZO(model.parameters(), lr=1e-3, seed=7)
    trainer = Probe(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=token_dataset(4),
                    optimizers=(optimizer, None))
    trainer.train()
    assert trainer.zo_optimizer is optimizer and optimizer.last_step.record.step == 1
    assert modes == [False] * 4  # two steps, two forwards each, all in eval mode


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: arguments(tmp, zo_method="adamw"), "`zo_method` must be one of .*got 'adamw'"),
        (lambda tmp: arguments(tmp, zo_eps=-1.0), "`zo_eps` must be a finite number > 0"),
        (lambda tmp: arguments(tmp, zo_rounding="up"), "`zo_rounding` must be one of"),
        (lambda tmp: arguments(tmp, TrainingArguments, learning_rate=0.0), "`learning_rate` must be"),
        (lambda tmp: arguments(tmp, zo_options="{pi_floor: 0.05}"), "`zo_options` is not valid JSON"),
        (lambda tmp: arguments(tmp, fp16=True), "fp16=True .* needs a backward pass"),
    ],
)
def test_bad_zo_settings_fail_before_training(tmp_path: Path, make: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ZOTrainer(model=small("opt"), args=make(tmp_path), train_dataset=token_dataset(4))


def test_a_first_order_optimizer_is_refused(tmp_path: Path) -> None:
    model = small("opt")
    with pytest.raises(ConfigError, match="needs a curvzo ZO optimizer, got AdamW"):
        ZOTrainer(model=model, args=arguments(tmp_path), train_dataset=token_dataset(4),
                  optimizers=(torch.optim.AdamW(model.parameters()), None))


def test_bad_zo_options_fail_when_the_optimizer_is_built(tmp_path: Path) -> None:
    trainer = ZOTrainer(model=small("opt"), args=arguments(tmp_path, max_steps=1, zo_options='{"pi_floor": 2}'),
                        train_dataset=token_dataset(4))
    with pytest.raises(ConfigError, match="pi_floor"):
        trainer.train()


def test_untied_embedding_rows_are_drawn_only_for_the_batch_tokens(tmp_path: Path) -> None:
    args = arguments(tmp_path, max_steps=2, zo_method="curvzo-sparse")
    trainer = ZOTrainer(model=small("llama"), args=args, train_dataset=token_dataset(4, tokens=64))
    trainer.train()
    zo = trainer.zo_optimizer
    rows = zo.blocks_of(trainer.model.get_input_embeddings().weight)
    assert len(rows) == VOCAB  # the curvzo-sparse preset's one block per embedding row
    drawn = sorted(set(zo.last_step.record.blocks) & set(rows.tolist()))
    assert drawn and all(block - int(rows[0]) < 64 for block in drawn)


def test_a_tied_embedding_is_one_block(tmp_path: Path) -> None:
    trainer = ZOTrainer(model=small("opt"), args=arguments(tmp_path, max_steps=1), train_dataset=token_dataset(4))
    trainer.train()
    assert len(trainer.zo_optimizer.blocks_of(trainer.model.get_input_embeddings().weight)) == 1


def test_a_newton_step_reads_the_logits_of_the_positions_the_loss_scores(tmp_path: Path) -> None:
    from curvzo.optim._newton import gauss_newton_curvature

    model = small("llama")
    trainer = ZOTrainer(model=model, args=arguments(tmp_path, max_steps=2, learning_rate=0.1), train_dataset=token_dataset(4))
    trainer.train()
    step = trainer.zo_optimizer.last_step
    assert step.curvature > 0 and step.record.newton >= step.curvature and not step.skipped
    ids = torch.tensor(token_dataset(4)["input_ids"])
    labels = ids.clone()
    labels[:, :3] = -100  # positions outside the loss leave the curvature's rows
    logits = model(input_ids=ids).logits.detach()
    rows = hf._loss_rows(logits, {"labels": labels})
    assert rows.shape == (4 * (LENGTH - 3), VOCAB) and torch.equal(rows[0], logits[0, 2])
    assert gauss_newton_curvature(rows, rows, 1e-3) == 0.0  # the same logits twice: no slope, no curvature


def test_the_learning_rate_defaults_to_the_zo_methods_own(tmp_path: Path) -> None:
    assert ZOTrainingArguments(str(tmp_path), report_to="none").learning_rate == 0.1  # curvzo: 0.1 of a Newton step
    assert ZOTrainingArguments(str(tmp_path), report_to="none", zo_method="mezo").learning_rate == 5e-5
    with pytest.warns(UserWarning, match="fraction of the Newton step that `curvzo` takes"):
        ZOTrainingArguments(str(tmp_path), report_to="none", learning_rate=5e-5)
