"""Zeroth-order fine-tuning inside an existing ``transformers.Trainer`` script.

    from curvzo.hf import ZOTrainer, ZOTrainingArguments

    args = ZOTrainingArguments("out", max_steps=1000)  # zo_method="curvzo", learning_rate 0.1 of a Newton step
    ZOTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev).train()

``ZOTrainer`` is a ``Trainer`` that overrides two public methods and copies none of Trainer's
loop. How that loop (transformers 5.x) meets a ZO optimizer:

* ``training_step`` takes the ZO step: the model in eval mode (dropout off, so the two perturbed
  forwards evaluate the same function), a closure over ``compute_loss`` (run under no_grad by the
  optimizer), then ``optimizer.step(closure, active=...)``.
* Trainer then runs its gradient bookkeeping for the step: it clips gradients (there are none:
  a no-op), calls ``optimizer.step()`` and ``model.zero_grad()``, and advances the LR scheduler.
  The optimizer it holds is a :class:`TrainerOptimizer`, whose ``step()`` without a closure does
  nothing because the step already ran; its ``param_groups`` are the ZO optimizer's, so the
  scheduler sets the learning rate that the next ZO step uses.
* Gradient accumulation is a larger ZO batch: with ``gradient_accumulation_steps=n`` one ZO step
  runs on the ``n`` micro-batches, and each of its two perturbed losses is the mean of the ``n``
  micro-batch losses (forwards of micro-batch size, so memory as for one micro-batch). Trainer still
  counts one optimizer step per ``n`` micro-batches.
* Checkpoints: ``optimizer.pt`` is the ZO optimizer's ``state_dict`` (block scores, budget,
  generator state), so ``resume_from_checkpoint`` continues bit for bit.

Mixed precision with a loss scaler (``fp16=True``) and multi-device training are refused: a ZO
step has no backward pass to scale, and its processes would draw different losses.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .config import ZO_METHODS, TrainConfig
from .errors import ConfigError
from .finetune import build_training_optimizer
from .models import trainable_named_parameters
from .optim import NEWTON_FRACTION, SparseCurvZO, StepInfo, ZOOptimizer

__all__ = ["ZOTrainer", "ZOTrainingArguments", "ZOStatsCallback", "TrainerOptimizer", "unwrap_zo", "zo_config"]

_HARNESS = {f.name: f for f in fields(TrainConfig)}


def _like(name: str) -> Any:
    """A field with the harness's default and help for the same setting: one owner for both."""
    return field(default=_HARNESS[name].default, metadata=dict(_HARNESS[name].metadata))


@dataclass
class ZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the ZO optimizer's settings (all ``zo_*``).

    ``learning_rate``, ``weight_decay`` and ``seed`` of ``TrainingArguments`` are the optimizer's
    ``lr``, ``weight_decay`` and ``seed``; ``learning_rate`` defaults to the ZO method's own (for
    ``curvzo`` 0.1, the fraction of the Newton step it takes, not a rate). A plain
    ``TrainingArguments`` given to :class:`ZOTrainer` means these defaults, with its own
    ``learning_rate``.

    Args:
        zo_method (str): a ZO preset of :data:`curvzo.optim.PRESETS` (default: ``"curvzo"``).
        zo_eps (float): perturbation scale of the two-point estimate (default: 1e-3).
        zo_rounding (str): how updates of bf16/fp16 weights are stored (default: ``"master"``).
        zo_embedding_rows (bool, optional): one block per row of a trainable input embedding, and
            only the rows of the batch's tokens drawn (default: None, i.e. for ``curvzo-sparse`` when the
            embedding is not tied to the output head; see :meth:`ZOTrainer.active_blocks`).
        zo_options (dict | str, optional): further options of the optimizer class, as a dict or a
            JSON string, e.g. ``{"noise": "rademacher"}``.
    """

    learning_rate: float | None = field(  # type: ignore[assignment]
        default=None, metadata={"help": f"the ZO optimizer's lr (default: the method's; curvzo: {NEWTON_FRACTION} of the Newton step)"}
    )
    zo_method: str = field(default=_HARNESS["method"].default, metadata={"help": f"ZO preset: {' | '.join(ZO_METHODS)}"})
    zo_eps: float = _like("eps")
    zo_rounding: str = _like("rounding")
    zo_embedding_rows: bool | None = _like("embedding_rows")
    zo_options: dict | str | None = field(
        default=None, metadata={"help": 'further ZO optimizer options, a dict or a JSON string such as \'{"noise": "rademacher"}\''}
    )

    def __post_init__(self) -> None:
        if isinstance(self.zo_options, str):
            try:
                self.zo_options = json.loads(self.zo_options)
            except json.JSONDecodeError as err:
                raise ConfigError(f"`zo_options` is not valid JSON ({err.msg}): {self.zo_options!r}") from None
        cfg = zo_config(self)  # bad settings fail here, before a model or dataset is touched
        if self.learning_rate is None:
            self.learning_rate = cfg.resolved_lr()
        super().__post_init__()


def _zo_setting(args: TrainingArguments, name: str) -> Any:
    if isinstance(args, ZOTrainingArguments):
        return getattr(args, name)
    spec = ZOTrainingArguments.__dataclass_fields__[name]
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default


def zo_config(args: TrainingArguments) -> TrainConfig:
    """The harness config that builds the same optimizer as ``curvzo train`` would for these settings."""
    method = _zo_setting(args, "zo_method")
    if method not in ZO_METHODS:
        raise ConfigError(f"`zo_method` must be one of {', '.join(ZO_METHODS)}, got {method!r}")
    try:
        return TrainConfig(
            method=method, lr=args.learning_rate, eps=_zo_setting(args, "zo_eps"), weight_decay=args.weight_decay,
            seed=args.seed, rounding=_zo_setting(args, "zo_rounding"),
            embedding_rows=_zo_setting(args, "zo_embedding_rows"), optimizer_options=_zo_setting(args, "zo_options") or {},
        )
    except ConfigError as err:  # name the TrainingArguments fields, not the harness's
        message = str(err).replace("invalid config: ", "")
        for harness, ours in (("lr", "learning_rate"), ("eps", "zo_eps"), ("rounding", "zo_rounding"),
                              ("optimizer_options", "zo_options")):
            message = message.replace(f"`{harness}`", f"`{ours}`")
        raise ConfigError(f"invalid ZO training arguments: {message}") from None


def unwrap_zo(optimizer: Any) -> ZOOptimizer | None:
    """The ZO optimizer inside Trainer's wrappers (accelerate's, :class:`TrainerOptimizer`), or None."""
    while optimizer is not None and not isinstance(optimizer, ZOOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class TrainerOptimizer(torch.optim.Optimizer):
    """The optimizer Trainer holds: a view of a ZO optimizer whose own step already ran.

    ``param_groups``, ``state`` and ``state_dict`` are the ZO optimizer's (so LR schedulers and
    checkpoints act on it). ``step()`` without a closure does nothing, because
    :meth:`ZOTrainer.training_step` took the step; with a closure it takes one. ``zero_grad`` does
    nothing: ZO steps create no gradients. Like accelerate's ``AcceleratedOptimizer`` it does not
    call ``Optimizer.__init__``: it owns no parameters or state of its own.
    """

    def __init__(self, optimizer: ZOOptimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: ZO steps create no gradients."""

    def step(self, closure: Any = None) -> float | None:  # type: ignore[override]
        """A ZO step when given a closure; otherwise nothing (the step ran in ``training_step``)."""
        return None if closure is None else self.optimizer.step(closure)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` whose steps are zeroth-order: two forwards, no backward.

    The optimizer is built from ``args`` (:class:`ZOTrainingArguments`, or the defaults for a
    plain ``TrainingArguments``: the library's ``curvzo`` preset) over the trainable parameters,
    as ``curvzo train`` builds it, or passed as ``optimizers=(zo_optimizer, scheduler_or_None)``.
    Everything else is Trainer's: ``max_steps``, logging and ``report_to``, evaluation,
    checkpoints and ``resume_from_checkpoint``, LR schedulers, peft models, bf16. See the module
    docstring for how Trainer's gradient bookkeeping is made harmless and for gradient accumulation.

    A :class:`ZOStatsCallback` is added first among the callbacks, so every training log (and the
    reporting integrations) also get the ZO statistics.

    Raises:
        ConfigError: (a ValueError) for bad ``zo_*`` settings, ``fp16=True`` (loss scaling needs
            a backward pass), more than one device or process, or an ``optimizers`` entry that is
            not a curvzo ZO optimizer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ConfigError("ZOTrainer: fp16=True (autocast with a loss scaler) needs a backward pass; "
                              "load the model in float16 or use bf16=True")
        if self.args.world_size > 1 or self.args.n_gpu > 1:
            raise ConfigError("ZOTrainer trains on one device: each process would draw its own losses "
                              f"(world_size={self.args.world_size}, n_gpu={self.args.n_gpu})")
        if self.optimizer is not None and unwrap_zo(self.optimizer) is None:
            raise ConfigError(f"ZOTrainer needs a curvzo ZO optimizer, got {type(self.optimizer).__name__}")
        if self.optimizer_cls_and_kwargs is not None:
            raise ConfigError("ZOTrainer builds its optimizer from the zo_* arguments: drop optimizer_cls_and_kwargs")
        if self.optimizer is None:
            zo_config(self.args)  # fail now, not when train() builds the optimizer
        self._micro_batches: list[dict[str, Any]] = []
        if not any(isinstance(cb, ZOStatsCallback) for cb in self.callback_handler.callbacks):
            self.callback_handler.callbacks.insert(0, ZOStatsCallback())

    @property
    def zo_optimizer(self) -> ZOOptimizer | None:
        """The ZO optimizer (None before training creates it)."""
        return unwrap_zo(self.optimizer)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the ZO optimizer (unless one was passed) and give Trainer its :class:`TrainerOptimizer`."""
        zo = self.zo_optimizer
        if zo is None:
            model = self.model if model is None else model
            cfg = zo_config(self.args)
            if cfg.embedding_rows is None and _tied_head(model):
                # Under a full-vocabulary loss every row of a tied head is active: row blocks would
                # restrict nothing and cost a noise draw per vocabulary row.
                cfg = replace(cfg, embedding_rows=False)
            zo = build_training_optimizer(cfg, model, trainable_named_parameters(model))
        if self.optimizer is None or self.optimizer is zo:
            self.optimizer = TrainerOptimizer(zo)
        return self.optimizer

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Keep the micro-batch; on the last micro-batch of an optimizer step, take the ZO step.

        Returns the step's mean loss on its last micro-batch and 0 on the others, so Trainer's sum
        over micro-batches, divided by the steps since the last log, is the logged mean loss.
        ``num_items_in_batch`` is not used: each micro-batch loss is its own mean.
        """
        self._micro_batches.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []
        model.eval()

        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                # a copy: compute_loss may pop the labels, and the closure runs twice
                return sum(self.compute_loss(model, dict(batch)) for batch in batches) / len(batches)

        def loss_and_logits() -> tuple[torch.Tensor, torch.Tensor]:
            with self.compute_loss_context_manager():
                pairs = [self.compute_loss(model, dict(batch), return_outputs=True) for batch in batches]
            logits = torch.cat([_loss_rows(outputs["logits"], batch) for (_, outputs), batch in zip(pairs, batches)])
            return sum(loss for loss, _ in pairs) / len(pairs), logits

        step_closure = loss_and_logits if self.zo_optimizer.newton else closure
        loss = self.zo_optimizer.step(step_closure, active=self.active_blocks(model, batches))
        return torch.tensor(loss, dtype=torch.float32, device=self.args.device)

    def active_blocks(self, model: torch.nn.Module, batches: list[dict[str, Any]]) -> torch.Tensor | None:
        """Blocks that can change this step's loss, or None for all (``step(active=...)``).

        When the input embedding is trainable with one block per row (``zo_embedding_rows``), only
        the rows of the batches' tokens can change the loss, unless the embedding is also the output
        head: then the softmax over the vocabulary reaches every row. Override to restrict a tied
        head as well when ``compute_loss`` reads a few known output rows (label-only scoring).
        """
        zo = self.zo_optimizer
        weight = model.get_input_embeddings().weight
        rows_are_blocks = any(g.get("block_size") and any(p is weight for p in g["params"]) for g in zo.param_groups)
        if not rows_are_blocks or _tied_head(model) or any("input_ids" not in batch for batch in batches):
            return None
        rows = torch.unique(torch.cat([batch["input_ids"].flatten() for batch in batches]))
        return zo.rows_active(weight, rows.cpu())


def _loss_rows(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The rows of ``logits`` the loss is a cross-entropy of, for the Newton step's curvature: a
    classifier's ``[batch, classes]`` as they are; a causal LM's ``[batch, positions, vocabulary]``
    at the positions that predict a label (labels shifted by one, -100 left out)."""
    labels = batch.get("labels")
    if logits.dim() == 3 and labels is not None and labels.shape == logits.shape[:2]:
        return logits[:, :-1][labels[:, 1:] != -100]
    return logits


def _tied_head(model: torch.nn.Module) -> bool:
    """Whether the output head is the input embedding matrix (most small LMs tie them)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


class ZOStatsCallback(TrainerCallback):
    """Adds ZO statistics over the steps since the previous log to every training log.

    ``zo_grad_abs``: mean |projected gradient|; ``zo_blocks``: mean blocks perturbed per step;
    ``zo_skipped``: non-finite steps skipped; ``zo_budget``: the budget fraction k/d of the last
    step. A Newton step (``curvzo``) adds ``zo_step_lr``, the mean lr its measured curvature gave
    (the fraction ``lr`` over the curvature along z). SparseCurvZO adds its block scores' ``zo_score_eff`` (effective number of blocks,
    (sum s)^2 / sum s^2, as a fraction of all blocks: 1 when flat) and ``zo_score_top`` (the
    largest block's share of the total score). Trainer's ``grad_norm`` is dropped from the log: it
    is the norm of ``.grad``, which ZO training never creates.

    The statistics are added to the ``logs`` dict and to ``state.log_history``; integrations
    placed after this callback (``ZOTrainer`` puts it first) report them.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._steps = 0
        self._skipped = 0
        self._grad_abs = 0.0
        self._blocks = 0
        self._step_lr = 0.0
        self._steps_newton = 0
        self._last: tuple[ZOOptimizer, StepInfo] | None = None

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Add the step just taken (``optimizer.last_step``) to the running sums."""
        zo = unwrap_zo(optimizer)
        if zo is None or zo.last_step is None:
            return
        info = zo.last_step
        self._steps += 1
        self._blocks += info.num_blocks
        if info.skipped or not math.isfinite(info.grad):
            self._skipped += 1
        else:
            self._grad_abs += abs(info.grad)
            if zo.newton:
                self._step_lr += info.record.step_lr(0)
                self._steps_newton += 1
        self._last = (zo, info)

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        """Put the statistics into a training log (and its ``log_history`` entry), then start over."""
        if logs is None or "loss" not in logs or self._last is None:
            return
        stats = self.statistics()
        self._reset()
        targets = [logs] + ([state.log_history[-1]] if state.log_history and "loss" in state.log_history[-1] else [])
        for target in targets:
            target.pop("grad_norm", None)
            target.update(stats)

    def statistics(self) -> dict[str, float]:
        """The statistics of the steps seen since the last log (empty before the first step)."""
        if self._last is None:
            return {}
        zo, info = self._last
        finite = self._steps - self._skipped
        stats = {
            "zo_grad_abs": self._grad_abs / finite if finite else math.nan,
            "zo_blocks": self._blocks / self._steps,
            "zo_skipped": float(self._skipped),
            "zo_budget": info.budget,
        }
        if self._steps_newton:
            stats["zo_step_lr"] = self._step_lr / self._steps_newton
        if isinstance(zo, SparseCurvZO):
            scores = zo.scores
            total = float(scores.sum())
            stats["zo_score_eff"] = total**2 / float((scores**2).sum()) / scores.numel()
            stats["zo_score_top"] = float(scores.max()) / total
        return stats
