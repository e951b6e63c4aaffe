"""The fine-tuning loop behind ``curvzo train``, one function read top to bottom (``train``).

    curvzo train                                  # embedded default: CurvZO, SmolLM2-135M, MR
    curvzo train --task sst2 --data-dir ../shared/data --method mezo --steps 500
    python -c "import curvzo; curvzo.train(curvzo.TrainConfig(steps=20))"

Every method (ZO and first-order) runs through the same loop: draw a batch, take one optimizer
step, log, and every ``eval_every`` steps evaluate on dev, keep the best weights and write a
checkpoint. Forward passes are counted: they are the common budget axis of ZO methods.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import scoring
from .checkpoint import RunDir
from .config import TrainConfig
from .data import load_splits
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .io import write_json
from .models import apply_peft, load_model, save_trainable, trainable_named_parameters
from .optim import CurvZO, ZOOptimizer, build_optimizer, decay_param_groups
from .tasks import Example, TaskConfig, get_task, task_from_dict
from .trajectory import Hyper, TrajectoryWriter, fingerprint, read_trajectory

__all__ = ["train", "evaluate", "evaluate_run", "replay", "setup", "TrainState"]

#: Consecutive skipped (non-finite) steps after which a run stops as diverged.
MAX_SKIPPED_IN_A_ROW = 10


@dataclass
class TrainState:
    """Counters that a checkpoint must restore for a resumed run to continue identically."""

    step: int = 0
    forward_passes: int = 0
    wall_time_s: float = 0.0
    zero_shot: float | None = None
    best_dev: float = -math.inf
    best_step: int = 0
    evals: list[dict[str, float]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    trajectory_bytes: int = 0
    skipped_in_a_row: int = 0


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.task``; returns (and writes) ``results.json``'s content."""
    run = RunDir(cfg.output_dir)
    run.check_writable()
    task, (train_set, dev_set, test_set), model, tokenizer, named = setup(cfg)
    optimizer = build_training_optimizer(cfg, model, named)
    run.prepare(cfg, resume=resume)  # only now: bad inputs above leave nothing behind
    state = _restore(run, named, optimizer) if resume else TrainState()
    trajectory = _open_trajectory(run, cfg, named, optimizer, state, resume)

    def dev_metric() -> float:
        return evaluate(model, tokenizer, task, dev_set, cfg)

    if state.zero_shot is None:
        state.zero_shot = dev_metric()
        state.best_dev = state.zero_shot
        run.save_best(_weights(named))
        _snapshot_scores(state, optimizer, named)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, desc=f"{cfg.method} {task.name}")
    bar.set_postfix(dev=f"{state.best_dev:.3f}")
    clock = time.perf_counter()
    while state.step < cfg.steps:
        batch_examples = train_batch(train_set, state.step, cfg)
        batch = scoring.encode(tokenizer, batch_examples, max_length=cfg.max_length).to(cfg.resolved_device())
        active = _active_blocks(optimizer, model, batch) if isinstance(optimizer, ZOOptimizer) else None
        loss, info = take_step(optimizer, model, task, batch, cfg, active)
        if trajectory is not None:
            trajectory.step(optimizer.last_step.grad, active, _hyper(optimizer))
        _count_skips(state, loss, info, cfg)
        state.step += 1
        state.forward_passes += (2 if isinstance(optimizer, ZOOptimizer) else 1) * len(batch_examples)
        state.wall_time_s += time.perf_counter() - clock
        clock = time.perf_counter()
        run.log({"step": state.step, "loss": loss, **info, "lr": optimizer.param_groups[0]["lr"],
                 "forward_passes": state.forward_passes, "time_s": round(state.wall_time_s, 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", dev=f"{state.best_dev:.3f}")
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            _check_finite(named, state.step)
            dev = dev_metric()
            state.evals.append({"step": state.step, "forward_passes": state.forward_passes, "dev": dev})
            _snapshot_scores(state, optimizer, named)
            if dev > state.best_dev:
                state.best_dev, state.best_step = dev, state.step
                run.save_best(_weights(named))
            state.trajectory_bytes = trajectory.offset if trajectory is not None else 0
            run.save_checkpoint(_weights(named), _checkpoint_state(state, optimizer))
            clock = time.perf_counter()  # evaluation and saving are not training time
    bar.close()
    if trajectory is not None:
        trajectory.close()
    _load_weights(named, run.load_best())
    results = {
        "model": cfg.model, "task": task.name, "method": cfg.method, "peft": cfg.peft,
        "metric": task.metric, "zero_shot": state.zero_shot, "best_dev": state.best_dev,
        "best_step": state.best_step, "test": evaluate(model, tokenizer, task, test_set, cfg),
        "steps": state.step, "forward_passes": state.forward_passes,
        "wall_time_s": round(state.wall_time_s, 2), "lr": cfg.resolved_lr(), "eps": cfg.eps,
        "seed": cfg.seed, "evals": state.evals,
    }
    write_json(run.path / "results.json", results)
    if state.scores:
        write_json(run.path / "scores.json", state.scores)
    from .plots import plot_run  # matplotlib is only needed once the run is done

    plot_run(run.path)
    return results


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Dev and test metric of a run folder's best weights (``curvzo eval``)."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    task, (_, dev_set, test_set), model, tokenizer, named = setup(cfg)
    _load_weights(named, run.load_best())
    return {"task": task.name, "metric": task.metric, "dev": evaluate(model, tokenizer, task, dev_set, cfg),
            "test": evaluate(model, tokenizer, task, test_set, cfg)}


# ---------------------------------------------------------------------- components
def setup(cfg: TrainConfig) -> tuple[TaskConfig, tuple[list[Example], ...], torch.nn.Module, Any, list]:
    """Task, rendered (train, dev, test) examples, model with its adapter, tokenizer, trainables."""
    task = resolve_task(cfg.task)
    splits = load_splits(
        task, data_dir=cfg.data_dir, num_train=cfg.num_train, num_dev=cfg.num_dev,
        num_test=cfg.num_test, seed=cfg.seed,
    )
    sets = tuple([task.render(d) for d in docs] for docs in (splits.train, splits.dev, splits.test))
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, gguf_file=cfg.gguf_file)
    scoring.check_fits(model, cfg.max_length)
    model = apply_peft(model, cfg.peft, seed=cfg.seed).to(cfg.resolved_device())
    return task, sets, model, tokenizer, trainable_named_parameters(model)


def resolve_task(spec: str | dict[str, Any]) -> TaskConfig:
    """A registered task by name, or a user task defined inline in the config."""
    return get_task(spec) if isinstance(spec, str) else task_from_dict(spec)


def build_training_optimizer(
    cfg: TrainConfig, model: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]]
) -> torch.optim.Optimizer:
    """ZO preset or first-order optimizer over the trainable parameters, decay split by shape.

    With ``cfg.embedding_rows`` the input embedding (tied to the LM head in most small LMs) is
    its own group with one block per row, so a step can perturb only the rows it can affect.
    """
    lr = cfg.resolved_lr()
    groups = decay_param_groups(named, cfg.weight_decay)
    if cfg.method == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if cfg.method == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    embedding = _row_param(model, named) if _uses_embedding_rows(cfg) else None
    if embedding is not None:
        for group in groups:
            group["params"] = [p for p in group["params"] if p is not embedding]
        groups = [g for g in groups if g["params"]]
        groups.append({"params": [embedding], "weight_decay": cfg.weight_decay, "block_size": embedding.shape[1]})
    try:
        return build_optimizer(
            cfg.method, groups, lr=lr, eps=cfg.eps, seed=cfg.seed, rounding=cfg.rounding, model=model,
            **cfg.optimizer_options,
        )
    except (TypeError, ValueError) as err:  # the optimizers validate like torch.optim
        raise ConfigError(f"invalid optimizer options for {cfg.method}: {err}") from None


def _uses_embedding_rows(cfg: TrainConfig) -> bool:
    return cfg.embedding_rows if cfg.embedding_rows is not None else cfg.method == "curvzo"


def _row_param(model: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]]) -> torch.nn.Parameter | None:
    weight = model.get_input_embeddings().weight
    return weight if any(p is weight for _, p in named) else None


def train_batch(examples: list[Example], step: int, cfg: TrainConfig) -> list[Example]:
    """The batch of ``step``: epoch-wise shuffles, a pure function of (seed, step) so resume needs no state."""
    n = len(examples)
    start = step * cfg.batch_size
    out = []
    for position in range(start, start + cfg.batch_size):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        out.append(examples[int(order[offset])])
    return out


def objective(model: torch.nn.Module, task: TaskConfig, batch: Any, kind: str) -> torch.Tensor:
    """The quantity a step minimises: the loss, or a non-differentiable metric for ZO methods."""
    if kind == "loss":
        return scoring.lm_loss(model, batch) if task.output_type == "generate_until" else scoring.classification_loss(model, batch)
    return scoring.objective_value(model, batch, kind)


def take_step(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    task: TaskConfig,
    batch: Any,
    cfg: TrainConfig,
    active: torch.Tensor | None = None,
) -> tuple[float, dict[str, Any]]:
    """One optimizer step; returns the loss and the method's per-step facts for the log."""
    if not isinstance(optimizer, ZOOptimizer):
        loss = objective(model, task, batch, "loss")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), {}
    loss = optimizer.step(lambda: objective(model, task, batch, cfg.objective), active=active)
    info = optimizer.last_step
    return loss, {"grad": info.grad, "budget": round(info.budget, 4), "blocks": info.num_blocks, "skipped": info.skipped}


def _active_blocks(optimizer: ZOOptimizer, model: torch.nn.Module, batch: Any) -> torch.Tensor | None:
    """Embedding rows of the batch's tokens and of the scored tokens; None when rows are not blocks."""
    weight = model.get_input_embeddings().weight
    row_groups = [g for g in optimizer.param_groups if g.get("block_size") and any(p is weight for p in g["params"])]
    if not row_groups:
        return None
    rows = [batch.input_ids.flatten()] + ([batch.choice_ids.flatten()] if batch.choice_ids is not None else [])
    return optimizer.rows_active(weight, torch.unique(torch.cat(rows)).cpu())


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: Any, task: TaskConfig, examples: list[Example], cfg: TrainConfig) -> float:
    """Dev/test metric: accuracy for classification, mean F1 of greedy answers for generation."""
    total = 0.0
    for start in range(0, len(examples), cfg.eval_batch_size):
        chunk = examples[start : start + cfg.eval_batch_size]
        if task.output_type == "generate_until":
            predictions = scoring.generate_answers(model, tokenizer, chunk)
            total += sum(scoring.squad_f1(p, e.answers) for p, e in zip(predictions, chunk))
        else:
            batch = scoring.encode(tokenizer, chunk, max_length=cfg.max_length).to(cfg.resolved_device())
            total += scoring.accuracy(model, batch) * len(chunk)
    return total / len(examples)


def _count_skips(state: TrainState, loss: float, info: dict[str, Any], cfg: TrainConfig) -> None:
    """Single non-finite steps are skipped by the optimizer; a run of them means divergence."""
    bad = info.get("skipped", False) or not math.isfinite(loss)
    state.skipped_in_a_row = state.skipped_in_a_row + 1 if bad else 0
    if state.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        raise TrainingDiverged(
            f"training diverged: {state.skipped_in_a_row} steps in a row had non-finite losses "
            f"(step {state.step + 1}, lr {cfg.resolved_lr():g}); lower the learning rate"
        )


def _check_finite(named: list[tuple[str, torch.nn.Parameter]], step: int) -> None:
    """Stop rather than evaluate (and checkpoint) weights that overflowed."""
    for name, p in named:
        if not bool(torch.isfinite(p).all()):
            raise TrainingDiverged(f"training diverged: `{name}` has non-finite values at step {step}; lower the learning rate")


# ---------------------------------------------------------------------- trajectories
TRAJECTORY_FILE = "trajectory.czt"


def _hyper(optimizer: torch.optim.Optimizer) -> Hyper:
    groups = optimizer.param_groups
    return Hyper(*(tuple(float(g[key]) for g in groups) for key in ("lr", "weight_decay", "eps")))


def _open_trajectory(
    run: RunDir, cfg: TrainConfig, named: list, optimizer: torch.optim.Optimizer, state: TrainState, resume: bool
) -> TrajectoryWriter | None:
    """ZO runs log their trajectory; a resumed run cuts it back to its checkpoint."""
    if not isinstance(optimizer, ZOOptimizer):
        return None
    if resume:
        return TrajectoryWriter(run.path / TRAJECTORY_FILE, {}, resume_at=state.trajectory_bytes)
    header = {"config": cfg.to_dict(), "fingerprint": fingerprint(named), "blocks": len(optimizer.blocks)}
    return TrajectoryWriter(run.path / TRAJECTORY_FILE, header)


def replay(base_model: str, trajectory: str | Path, out_dir: str | Path) -> list[tuple[str, torch.nn.Parameter]]:
    """Rebuild a ZO run's final weights from the base model and its trajectory file (``curvzo replay``)."""
    header, records = read_trajectory(trajectory)
    cfg = TrainConfig(**{**header["config"], "model": base_model})
    model, _ = load_model(cfg.model, dtype=cfg.dtype, gguf_file=cfg.gguf_file)
    model = apply_peft(model, cfg.peft, seed=cfg.seed).to(cfg.resolved_device())
    named = trainable_named_parameters(model)
    if fingerprint(named) != header["fingerprint"]:
        raise CheckpointError(f"trajectory {trajectory} was recorded on other base weights than {base_model}")
    optimizer = build_training_optimizer(cfg, model, named)
    for record in records:
        if isinstance(record, Hyper):
            for group, lr, wd, eps in zip(optimizer.param_groups, record.lr, record.weight_decay, record.eps):
                group["lr"], group["weight_decay"], group["eps"] = lr, wd, eps
        else:
            optimizer.replay(record.grad, active=record.active)
    save_trainable(model, out_dir)
    return named


# ---------------------------------------------------------------------- state helpers
def _weights(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """A CPU copy: what safetensors files hold, whatever device the run uses."""
    return {name: p.detach().to("cpu", copy=True) for name, p in named}


@torch.no_grad()
def _load_weights(named: list[tuple[str, torch.nn.Parameter]], weights: dict[str, torch.Tensor]) -> None:
    for name, p in named:
        p.copy_(weights[name])


def _checkpoint_state(state: TrainState, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"train_state": state.__dict__.copy(), "optimizer": optimizer.state_dict()}


def _restore(run: RunDir, named: list, optimizer: torch.optim.Optimizer) -> TrainState:
    weights, saved = run.load_checkpoint()
    _load_weights(named, weights)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except ValueError as err:  # e.g. a state whose noise this engine cannot continue
        raise CheckpointError(f"cannot resume {run.path}: {err}") from None
    state = TrainState(**saved["train_state"])
    run.truncate_log(state.step)
    return state


_LAYER = re.compile(r"(?:layers|h|layer)\.(\d+)\.")


def _snapshot_scores(state: TrainState, optimizer: torch.optim.Optimizer, named: list) -> None:
    """Mean CurvZO block score per layer, for the score heat map."""
    if not isinstance(optimizer, CurvZO):
        return
    names = {id(p): name for name, p in named}
    totals: dict[str, list[float]] = {}
    for block, score in zip(optimizer.blocks, optimizer.scores.tolist()):
        match = _LAYER.search(names[id(block.param)])
        key = f"layer {int(match.group(1)):02d}" if match else names[id(block.param)].rsplit(".", 2)[-2]
        totals.setdefault(key, []).append(score)
    state.scores.append({"step": state.step, "budget": optimizer.budget_fraction(),
                         "layers": {k: sum(v) / len(v) for k, v in sorted(totals.items())}})
