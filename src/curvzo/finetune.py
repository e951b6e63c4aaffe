"""The fine-tuning loop behind ``curvzo train``, one function read top to bottom (``train``).

    curvzo train                                  # embedded default: CurvZO, SmolLM2-135M, MR
    curvzo train --task sst2 --data-dir ../shared/data --method mezo --steps 500
    python -c "import curvzo; curvzo.train(curvzo.TrainConfig(steps=20))"

Every method (ZO and first-order) runs through the same loop: draw a batch, take one optimizer
step, log, check for divergence, every ``eval_every`` steps evaluate on dev and keep the best
weights, and write a checkpoint at each evaluation and on the checkpoint schedule (steps and/or
minutes). Forward passes are counted: they are the common budget axis of ZO methods. A ZO run's
trajectory rebuilds the weights of any of its steps (``rebuild``, ``export``), which is what lets
a finished run keep only its trajectory.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import scoring
from .cache import announce
from .checkpoint import RunDir, with_run_folder
from .config import TrainConfig
from .data import load_run_examples
from .errors import CheckpointError, ConfigError, RankFailed, RunInterrupted
from .divergence import DivergenceGuard, lower_lr
from .interrupt import StepGuard
from .io import write_json
from .models import (
    apply_peft, load_model, load_trainable, read_saved_weights, save_trainable, trainable_named_parameters,
)
from .optim import DistributedZO, SparseCurvZO, ZOOptimizer, build_optimizer, decay_param_groups
from .optim.distributed import replay_queries
from .parallel import Ranks, full_weights, load_local, reshard, shard_model, start
from .tasks import Example, TaskConfig, get_task, task_from_dict
from .tracking import Tracker
from .trajectory import Hyper, Queries, Step, TrajectoryWriter, fingerprint, read_trajectory

__all__ = [
    "train", "result_line", "evaluate", "evaluate_run", "replay", "rebuild", "export", "setup", "active_blocks", "load_weights",
    "weights_on_cpu", "TrainState",
]

#: Consecutive skipped (non-finite) steps after which a run stops as diverged.
MAX_SKIPPED_IN_A_ROW = 10
#: Roll-backs (``on_divergence: rollback``) after which a diverging run stops.
MAX_ROLLBACKS = 3


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
    divergence: dict[str, Any] = field(default_factory=dict)  # DivergenceGuard.state_dict()
    rollbacks: int = 0


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.task``; returns (and writes) ``results.json``'s content.

    Without ``cfg.output_dir`` the run gets a new folder; an existing folder that holds files is
    refused unless ``resume`` (continue its run) or ``overwrite`` (replace it). Under torchrun
    with ``cfg.parallel`` set, every process calls this (see :mod:`curvzo.parallel`).
    """
    if resume and cfg.output_dir is None:
        raise ConfigError("resume needs the run folder (`output_dir`)")
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: choose one")
    started = time.perf_counter()
    cfg = with_run_folder(cfg)
    ranks = start(cfg)
    try:
        cfg = ranks.agree(cfg)  # rank 0's run folder from here on
        results = _train(cfg, ranks, resume=resume, overwrite=overwrite, progress=progress and ranks.writes)
        ranks.barrier()  # no rank tears the group down while another may still be finishing a collective
        if ranks.writes and "diverged" not in results:  # a diverged run's line is the caller's to raise
            print(result_line(results, time.perf_counter() - started, cfg.output_dir, resumed=resume))
        return results
    except (RankFailed, RuntimeError) as err:
        failure = _rank_failure(ranks, err)
        if failure is None:
            raise
        saved = RunDir(cfg.output_dir).checkpoint_step() if cfg.output_dir else None
        where = (f"the last checkpoint is at step {saved}: continue with `curvzo train --resume {cfg.output_dir}` "
                 "(under torchrun or in one process)" if saved is not None else "no checkpoint was written yet")
        raise RankFailed(f"{failure}; {where}") from None
    finally:
        ranks.close()


def result_line(results: dict[str, Any], seconds: float, run_dir: str | Path, *, resumed: bool = False) -> str:
    """The one line a finished run ends with: what it reached, what it cost, where it is.

    ``seconds`` is this command's time; the training steps' time counts every sitting of a run,
    so a resumed run says which is which.
    """
    steps_span, command_span = (" over every sitting", "in this resumed sitting") if resumed else ("", "in all")
    return (f"{results['task']} {results['metric']}: zero-shot {results['zero_shot']:.4f} -> best dev "
            f"{results['best_dev']:.4f}, test {results['test']:.4f} ({results['steps']} steps, "
            f"{results['forward_passes']} forward passes; training steps {results['wall_time_s']:.0f} s{steps_span}, "
            f"{seconds:.0f} s {command_span} with loading, evaluation, saving and plots); run folder {run_dir}")


def _rank_failure(ranks: Ranks, err: BaseException) -> RankFailed | None:
    """The failure of another rank behind ``err``, if that is what it is (None: a failure of this rank)."""
    if not ranks.distributed:
        return None
    if isinstance(err, RankFailed):
        return err
    import torch.distributed as dist

    if isinstance(err, dist.DistError) or ranks.dead():
        return ranks.failure(f"a collective failed ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    return None


def _train(cfg: TrainConfig, ranks: Ranks, *, resume: bool, overwrite: bool, progress: bool) -> dict[str, Any]:
    """:func:`train` once the ranks (one, without torchrun) agree on ``cfg``."""
    run = RunDir(cfg.output_dir, writes=ranks.writes)
    with ranks.together():
        if ranks.writes:
            run.check_writable()
            if not resume:
                run.check_unused(overwrite=overwrite)
        _say(progress, f"loading data and {cfg.model}")
        task, (train_set, dev_set, test_set), model, tokenizer, named = setup(cfg)
        optimizer = build_training_optimizer(cfg, model, named)
    with ranks.together():  # only now, every rank ready: bad inputs above leave nothing behind
        run.prepare(cfg, resume=resume)
        state = _restore(run, named, optimizer) if resume else TrainState()
    _say(progress, f"run folder {run.path}")
    trajectory = _open_trajectory(run, cfg, named, optimizer, state, resume) if ranks.writes else None
    if ranks.sharded:  # only now: restoring and the trajectory's fingerprint need the whole model
        named, optimizer = _shard(cfg, model, optimizer)
    zo = DistributedZO(optimizer, ranks.step_mode) if ranks.step_mode is not None else None
    step_guard = StepGuard()
    saved_step = state.step if resume else None  # the step whose weights the checkpoint holds
    loss_guard = _divergence_guard(cfg, state)
    stopped: str | None = None  # why the run stopped early
    tracker = Tracker(cfg, run.path, model, writes=ranks.writes)

    def dev_metric(desc: str) -> float:
        metric = evaluate(model, tokenizer, task, dev_set, cfg, progress=desc if progress else None)
        if ranks.sharded:
            reshard(model)  # the step reads the embedding's sharded parameter for its active rows
        return metric

    def checkpoint() -> None:
        nonlocal saved_step
        state.divergence = loss_guard.state_dict() if loss_guard is not None else {}
        state.trajectory_bytes = trajectory.offset if trajectory is not None else 0
        weights = weights_on_cpu(named) if ranks.writes or ranks.sharded else {}  # every rank gathers shards
        if ranks.writes:
            run.save_checkpoint(weights, _checkpoint_state(state, optimizer))
        saved_step = state.step

    try:
        if state.zero_shot is None:
            state.zero_shot = dev_metric("zero-shot dev")
            tracker.log(0, {f"eval_{task.metric}": state.zero_shot})
            state.best_dev = state.zero_shot
            _save_best(run, model, tokenizer, ranks)
            _snapshot_scores(state, optimizer, named)
        if cfg.on_divergence == "rollback" and saved_step is None:
            checkpoint()  # something to roll back to before the first evaluation
        bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, desc=f"{cfg.method} {task.name}")
        bar.set_postfix(dev=f"{state.best_dev:.3f}")
        clock = last_save = time.perf_counter()
        while state.step < cfg.steps:
            with step_guard:  # Ctrl-C waits for the step to end: weights are mid-update inside it
                batch_examples = train_batch(train_set, state.step, cfg)
                batch = scoring.encode(tokenizer, batch_examples, max_length=cfg.max_length).to(cfg.resolved_device())
                active = active_blocks(optimizer, model, batch) if isinstance(optimizer, ZOOptimizer) else None
                if zo is None:
                    loss, info = take_step(optimizer, model, task, batch, cfg, active)
                    steps = [optimizer.last_step] if isinstance(optimizer, ZOOptimizer) else []
                else:
                    loss, info = take_parallel_step(zo, model, tokenizer, task, batch_examples, batch, cfg, active)
                    steps = zo.last_steps
                if trajectory is not None:
                    for taken in steps:
                        trajectory.step(taken.grad, active, _hyper(optimizer), queries=len(steps),
                                        curvature=taken.curvature)
                state.step += 1
                state.forward_passes += (2 * len(steps) if steps else 1) * len(batch_examples)
                state.wall_time_s += time.perf_counter() - clock
                run.log({"step": state.step, "loss": loss, **info, "lr": optimizer.param_groups[0]["lr"],
                         "forward_passes": state.forward_passes, "time_s": round(state.wall_time_s, 3)})
                tracker.log(state.step, {"loss": loss, "learning_rate": optimizer.param_groups[0]["lr"],
                                         "forward_passes": state.forward_passes, **_tracked(info)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", dev=f"{state.best_dev:.3f}")
            evaluate_now = state.step % cfg.eval_every == 0 or state.step == cfg.steps
            diverged = _divergence(state, loss_guard, loss, info) or (evaluate_now and _nonfinite_weights(named))
            if diverged and _can_roll_back(cfg, run, state):
                at = state.step
                state, trajectory = _roll_back(run, named, optimizer, trajectory, state.rollbacks + 1)
                loss_guard, saved_step = _divergence_guard(cfg, state), state.step
                _say(progress, f"step {at}: {diverged}; rolled back to step {state.step} with lr "
                               f"{optimizer.param_groups[0]['lr']:g}")
                bar.reset(total=cfg.steps)
                bar.update(state.step)
                clock = last_save = time.perf_counter()
                continue
            if diverged:
                stopped = _stop_message(state, diverged, task.metric, optimizer.param_groups[0]["lr"])
                break
            if evaluate_now:
                dev = dev_metric("dev")
                tracker.log(state.step, {f"eval_{task.metric}": dev})
                state.evals.append({"step": state.step, "forward_passes": state.forward_passes, "dev": dev})
                _snapshot_scores(state, optimizer, named)
                if not ranks.sharded:  # shards differ by design
                    ranks.same_weights(fingerprint(named))
                if dev > state.best_dev:
                    bar.set_postfix_str("saving best weights")
                    _save_best(run, model, tokenizer, ranks)
                    state.best_dev, state.best_step = dev, state.step
            if evaluate_now or ranks.decide(checkpoint_due(cfg, state.step, time.perf_counter() - last_save)):
                bar.set_postfix_str("saving checkpoint")
                checkpoint()
                last_save = time.perf_counter()
            clock = time.perf_counter()  # evaluation and saving are not training time
        bar.close()
        saved_step = state.step  # from here on the weights are not the step's: Ctrl-C saves nothing more
        if trajectory is not None:
            trajectory.close()
        ranks.barrier()  # rank 0 has written the best weights the others read
        _load_best(run, model, named, state.best_step, progress)
        test = evaluate(model, tokenizer, task, test_set, cfg, progress="test" if progress else None)
        tracker.log(state.step, {f"test_{task.metric}": test})
    except KeyboardInterrupt:
        raise _interrupted(run, state, None if step_guard.torn or saved_step == state.step else checkpoint) from None
    finally:
        tracker.close()
    results = {
        "model": cfg.model, "task": task.name, "method": cfg.method, "peft": cfg.peft,
        "metric": task.metric, "zero_shot": _round(state.zero_shot), "best_dev": _round(state.best_dev),
        "best_step": state.best_step, "test": _round(test),
        "steps": state.step, "forward_passes": state.forward_passes,
        "wall_time_s": round(state.wall_time_s, 2), "lr": cfg.resolved_lr(), "eps": cfg.eps,
        "seed": cfg.seed, "evals": [{**e, "dev": _round(e["dev"])} for e in state.evals],
        "rollbacks": state.rollbacks, "final_lr": float(optimizer.param_groups[0]["lr"]),
        **({"diverged": stopped} if stopped else {}),
        **({"parallel": ranks.mode, "processes": ranks.world} if ranks.mode else {}),
    }
    if not ranks.writes:
        return results
    write_json(run.path / "results.json", results)
    if state.scores:
        write_json(run.path / "scores.json", state.scores)
    from .plots import plot_run  # matplotlib is only needed once the run is done

    _say(progress, "drawing plots")
    plot_run(run.path)
    if cfg.resolved_keep() == "trajectory":
        run.drop_weights()
    return results


def _tracked(info: dict[str, Any]) -> dict[str, float]:
    """A step's ZO facts for the trackers (projected gradient, budget, blocks, skipped as 0/1), named ``zo_*`` as
    ZOTrainer's are."""
    return {f"zo_{key}": float(value) for key, value in info.items() if isinstance(value, (int, float))}


def checkpoint_due(cfg: TrainConfig, step: int, seconds_since_last: float) -> bool:
    """Whether the schedule asks for a checkpoint now (evaluations write one as well)."""
    by_steps = cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0
    return by_steps or seconds_since_last >= 60.0 * cfg.checkpoint_minutes


def _interrupted(run: RunDir, state: TrainState, save: Callable[[], None] | None) -> RunInterrupted:
    """Save what Ctrl-C left (unless the checkpoint is current or the step was torn) and say how to go on."""
    if save is not None:
        save()
    saved = run.checkpoint_step()
    where = f"checkpoint at step {saved}" if saved is not None else "no checkpoint yet"
    hint = f"; continue with `curvzo train --resume {run.path}`" if saved is not None else ""
    return RunInterrupted(f"interrupted at step {state.step}: {where}{hint}")


def evaluate_run(run_dir: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """Dev and test metric of a run folder's best weights (``curvzo eval``)."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    _say(progress, f"loading data and {cfg.model}")
    task, (_, dev_set, test_set), model, tokenizer, named = setup(cfg)
    _load_best(run, model, named, run.train_state()["best_step"], progress)
    bars = ("dev", "test") if progress else (None, None)
    return {"task": task.name, "metric": task.metric,
            "dev": _round(evaluate(model, tokenizer, task, dev_set, cfg, progress=bars[0])),
            "test": _round(evaluate(model, tokenizer, task, test_set, cfg, progress=bars[1]))}


# ---------------------------------------------------------------------- components
def _say(progress: bool, text: str) -> None:
    """A status line on stderr, beside the progress bars (which ``progress=False`` silences too)."""
    if progress:
        tqdm.write(text, file=sys.stderr)


def setup(cfg: TrainConfig) -> tuple[TaskConfig, tuple[list[Example], ...], torch.nn.Module, Any, list]:
    """Task, rendered (train, dev, test) examples, model with its adapter, tokenizer, trainables."""
    task = resolve_task(cfg.task)
    with announce():  # a first run fetches its data, then its model: one notice for the cache
        sets = load_run_examples(task, cfg)
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


def _shard(
    cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[list[tuple[str, torch.nn.Parameter]], torch.optim.Optimizer]:
    """Shard ``model`` with FSDP2 and rebuild ``optimizer`` over the sharded parameters with the
    same state (blocks and statistics are those of the full tensors, whatever the sharding)."""
    saved = optimizer.state_dict()
    shard_model(model)
    named = trainable_named_parameters(model)
    optimizer = build_training_optimizer(cfg, model, named)
    optimizer.load_state_dict(saved)
    return named, optimizer


def _uses_embedding_rows(cfg: TrainConfig) -> bool:
    return cfg.embedding_rows if cfg.embedding_rows is not None else cfg.method == "curvzo-sparse"


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
    loss = optimizer.step(_zo_closure(optimizer, model, task, batch, cfg), active=active)
    info = optimizer.last_step
    newton = {"curvature": info.curvature, "step_lr": info.record.step_lr(0)} if optimizer.newton else {}
    return loss, {"grad": info.grad, "budget": round(info.budget, 4), "blocks": info.num_blocks, "skipped": info.skipped,
                  **newton}


def _zo_closure(optimizer: ZOOptimizer, model: torch.nn.Module, task: TaskConfig, batch: Any,
                cfg: TrainConfig) -> Callable[[], Any]:
    """The closure of a ZO step: the objective, or for a Newton step (loss, logits): the choice
    logits of a classification task, the answer tokens' vocabulary logits of a generation task."""
    if not optimizer.newton:
        return lambda: objective(model, task, batch, cfg.objective)

    def loss_and_logits() -> tuple[torch.Tensor, torch.Tensor]:
        if task.output_type == "generate_until":
            logits, targets = scoring.answer_logits(model, batch)
        else:
            logits, targets = scoring.classification_logits(model, batch), batch.targets
        return torch.nn.functional.cross_entropy(logits.float(), targets), logits

    return loss_and_logits


def take_parallel_step(
    zo: DistributedZO,
    model: torch.nn.Module,
    tokenizer: Any,
    task: TaskConfig,
    examples: list[Example],
    batch: Any,
    cfg: TrainConfig,
    active: torch.Tensor | None,
) -> tuple[float, dict[str, Any]]:
    """One distributed ZO step: data and shard modes evaluate this rank's equal share of the global
    batch (``examples``, encoded as ``batch``), query mode the whole batch along this rank's
    direction; the log line sums or averages over the step's queries.

    The shares' losses are averaged with the weights the global loss gives them: their numbers of
    examples, or of answer tokens for the LM loss (a mean over tokens).
    """
    weight = 1.0
    if zo.mode != "query" and zo.world > 1:
        share = len(examples) // zo.world
        mine = examples[zo.rank * share : (zo.rank + 1) * share]
        batch = scoring.encode(tokenizer, mine, max_length=cfg.max_length).to(cfg.resolved_device())
        per_token = task.output_type == "generate_until" and cfg.objective == "loss"
        weight = float(batch.label_mask.sum()) if per_token else float(share)
    loss = zo.step(_zo_closure(zo.optimizer, model, task, batch, cfg), active=active, weight=weight)
    steps = zo.last_steps
    newton = {}
    if zo.optimizer.newton:
        newton = {"curvature": _mean([s.curvature for s in steps]),
                  "step_lr": sum(s.record.step_lr(0) for s in steps) / len(steps)}
    return loss, {"grad": sum(s.grad for s in steps) / len(steps), "budget": round(steps[0].budget, 4),
                  "blocks": sum(s.num_blocks for s in steps), "skipped": any(s.skipped for s in steps), **newton}


def _mean(values: list[float | None]) -> float | None:
    """The mean of a step's per-query values (None where a skipped query measured none)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def active_blocks(optimizer: ZOOptimizer, model: torch.nn.Module, batch: Any) -> torch.Tensor | None:
    """The ``active`` mask of a ZO step on ``batch``: every block except the embedding rows of tokens
    that are neither in the batch nor scored (those rows cannot change the loss, so perturbing them
    only adds noise). None when embedding rows are not blocks (everything is active)."""
    weight = model.get_input_embeddings().weight
    row_groups = [g for g in optimizer.param_groups if g.get("block_size") and any(p is weight for p in g["params"])]
    if not row_groups:
        return None
    rows = [batch.input_ids.flatten()] + ([batch.choice_ids.flatten()] if batch.choice_ids is not None else [])
    return optimizer.rows_active(weight, torch.unique(torch.cat(rows)).cpu())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, tokenizer: Any, task: TaskConfig, examples: list[Example], cfg: TrainConfig,
    *, progress: str | None = None,
) -> float:
    """Dev/test metric: accuracy for classification, mean F1 of greedy answers for generation.

    ``progress`` names a progress bar over the examples (None: silent).
    """
    total = 0.0
    bar = tqdm(total=len(examples), desc=progress, unit="ex", leave=False, disable=progress is None)
    for start in range(0, len(examples), cfg.eval_batch_size):
        chunk = examples[start : start + cfg.eval_batch_size]
        if task.output_type == "generate_until":
            predictions = scoring.generate_answers(model, tokenizer, chunk)
            total += sum(scoring.squad_f1(p, e.answers) for p, e in zip(predictions, chunk))
        else:
            batch = scoring.encode(tokenizer, chunk, max_length=cfg.max_length).to(cfg.resolved_device())
            total += scoring.accuracy(model, batch) * len(chunk)
        bar.update(len(chunk))
    bar.close()
    return total / len(examples)


def _round(metric: float) -> float:
    """Metrics to 6 decimals: float32 means carry noise (0.6300000009536744) that no reader needs."""
    return round(metric, 6)


def _divergence_guard(cfg: TrainConfig, state: TrainState) -> DivergenceGuard | None:
    """The run's guard, continued from the state a checkpoint saved (None: the guard is off)."""
    if cfg.divergence_factor is None:
        return None
    return DivergenceGuard(**state.divergence) if state.divergence else DivergenceGuard(
        factor=cfg.divergence_factor, patience=cfg.divergence_patience)


def _divergence(state: TrainState, loss_guard: DivergenceGuard | None, loss: float, info: dict[str, Any]) -> str | None:
    """Why the run has diverged, if it has: a run of skipped (non-finite) steps or the loss guard."""
    bad = info.get("skipped", False) or not math.isfinite(loss)
    state.skipped_in_a_row = state.skipped_in_a_row + 1 if bad else 0
    if state.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        return f"{state.skipped_in_a_row} steps in a row had non-finite losses"
    if loss_guard is not None and loss_guard.update(loss):
        return loss_guard.describe()
    return None


def _nonfinite_weights(named: list[tuple[str, torch.nn.Parameter]]) -> str | None:
    """Weights that overflowed are not evaluated (nor checkpointed)."""
    for name, p in named:
        if not bool(torch.isfinite(p).all()):
            return f"`{name}` has non-finite values"
    return None


def _stop_message(state: TrainState, reason: str, metric: str, lr: float) -> str:
    return (f"training diverged at step {state.step} ({reason}) and stopped early; results.json scores the best "
            f"weights so far (step {state.best_step}, dev {metric} {state.best_dev:.4f}); try --lr {lower_lr(lr):g} "
            "or `curvzo lr-find`")


def _can_roll_back(cfg: TrainConfig, run: RunDir, state: TrainState) -> bool:
    return cfg.on_divergence == "rollback" and state.rollbacks < MAX_ROLLBACKS and run.checkpoint_has_weights()


def _roll_back(
    run: RunDir, named: list, optimizer: torch.optim.Optimizer, trajectory: TrajectoryWriter | None, rollbacks: int
) -> tuple[TrainState, TrajectoryWriter | None]:
    """Back to the last checkpoint with half the current learning rate; the log and trajectory are cut back to it."""
    halved = [group["lr"] / 2 for group in optimizer.param_groups]  # the checkpoint's may predate a roll-back
    weights, saved = run.load_checkpoint()
    load_weights(named, weights)
    optimizer.load_state_dict(saved["optimizer"])
    for group, lr in zip(optimizer.param_groups, halved):
        group["lr"] = lr
    state = TrainState(**saved["train_state"])
    state.rollbacks = rollbacks
    run.truncate_log(state.step)
    run.log({"step": state.step, "event": "rollback", "lr": optimizer.param_groups[0]["lr"]})
    if trajectory is not None:
        trajectory.close()
        trajectory = TrajectoryWriter(trajectory.path, {}, resume_at=state.trajectory_bytes)
    return state, trajectory


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


def rebuild(
    trajectory: str | Path, *, base_model: str | None = None, steps: int | None = None, progress: bool = False
) -> tuple[torch.nn.Module, Any, list[tuple[str, torch.nn.Parameter]]]:
    """Model (with its tokenizer and trainables) after the first ``steps`` steps of a trajectory (all: None).

    The base model is the run's own unless ``base_model`` names another copy of it; other base
    weights are refused, since replaying on them would build a model no run produced. Each step
    replayed regenerates its noise over the sampled weights (about a second per step for
    SmolLM2-135M on 2 cores), so ``progress`` shows a bar over them.
    """
    header, records = read_trajectory(trajectory)
    cfg = TrainConfig(**{**header["config"], **({"model": base_model} if base_model else {})})
    _say(progress, f"loading {cfg.model}")
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, gguf_file=cfg.gguf_file)
    model = apply_peft(model, cfg.peft, seed=cfg.seed).to(cfg.resolved_device())
    named = trainable_named_parameters(model)
    if fingerprint(named) != header["fingerprint"]:
        raise CheckpointError(f"trajectory {trajectory} was recorded on other base weights than {cfg.model}")
    held = sum(1 for item in _step_groups(read_trajectory(trajectory)[1]) if isinstance(item, list))
    wanted = held if steps is None else min(steps, held)
    with tqdm(total=wanted, desc="replaying steps", unit="step", disable=not progress) as bar:
        done = _replay_records(build_training_optimizer(cfg, model, named), records, steps, bar.update)
    if steps is not None and done < steps:
        raise CheckpointError(f"trajectory {trajectory} holds {done} steps, not {steps}")
    return model, tokenizer, named


def _step_groups(records: Iterable[Step | Hyper | Queries]) -> Iterator[Hyper | list[Step]]:
    """The records as the optimizer replays them: ``Hyper`` changes, and each step's records.

    A query-parallel step (q records after a ``Queries`` record) is one list of q records.
    """
    queries, pending = 1, []
    for record in records:
        if isinstance(record, Queries):
            queries = record.q
        elif isinstance(record, Hyper):
            yield record
        else:
            pending.append(record)
            if len(pending) == queries:
                yield pending
                pending = []


def _replay_records(
    optimizer: torch.optim.Optimizer, records: Iterable[Step | Hyper | Queries], steps: int | None,
    on_step: Callable[[int], Any] = lambda n: None,
) -> int:
    """Redo up to ``steps`` logged steps (all: None) on ``optimizer``'s weights; returns how many."""
    done = 0
    for item in _step_groups(records):
        if isinstance(item, Hyper):
            for group, lr, wd, eps in zip(optimizer.param_groups, item.lr, item.weight_decay, item.eps):
                group["lr"], group["weight_decay"], group["eps"] = lr, wd, eps
            continue
        if steps is not None and done == steps:
            break
        if len(item) == 1:
            optimizer.replay(item[0].grad, active=item[0].active, curvature=item[0].curvature)
        else:
            replay_queries(optimizer, [r.grad for r in item], active=item[0].active,
                           curvatures=[r.curvature for r in item])
        done += 1
        on_step(1)
    return done


def replay(
    base_model: str, trajectory: str | Path, out_dir: str | Path, *, progress: bool = False
) -> list[tuple[str, torch.nn.Parameter]]:
    """Rebuild a ZO run's final weights from the base model and its trajectory file (``curvzo replay``)."""
    model, tokenizer, named = rebuild(trajectory, base_model=base_model, progress=progress)
    _say(progress, f"saving to {out_dir}")
    save_trainable(model, out_dir, tokenizer)
    return named


def export(run_dir: str | Path, step: str | int, out_dir: str | Path, *, progress: bool = False) -> Path:
    """Write a run's weights at ``step`` (``best``, ``last`` or a step number) as a Hugging Face folder.

    ZO runs are rebuilt from their trajectory, whatever they kept; first-order runs have no
    trajectory and export the ``best/`` folder they keep.
    """
    run = RunDir(run_dir)
    run.read_config()  # a clear error for a folder that is not a run
    if isinstance(step, str) and step.isdigit():
        step = int(step)
    counters = run.train_state()
    number = {"best": counters["best_step"], "last": counters["step"]}.get(step, step)
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= counters["step"]:
        raise ConfigError(f"--step must be best, last or a step number from 0 to {counters['step']}, got {step!r}")
    if not (run.path / TRAJECTORY_FILE).exists():
        if step != "best" or not (run.path / BEST).is_dir():
            raise CheckpointError(f"{run.path} has no trajectory to rebuild step {step} from (a first-order run keeps only best/)")
        _say(progress, f"copying {run.path / BEST} to {out_dir}")
        shutil.copytree(run.path / BEST, out_dir)
        return Path(out_dir)
    model, tokenizer, _ = rebuild(run.path / TRAJECTORY_FILE, steps=number, progress=progress)
    _say(progress, f"saving to {out_dir}")
    return save_trainable(model, out_dir, tokenizer)


# ---------------------------------------------------------------------- state helpers
#: Folder of a run's best-dev weights: a ``save_pretrained`` folder (a PEFT adapter folder for adapters).
BEST = "best"


def _save_best(run: RunDir, model: torch.nn.Module, tokenizer: Any, ranks: Ranks) -> None:
    """Rank 0 writes best/; in shard mode every rank first helps gather the full weights."""
    weights = full_weights(model) if ranks.sharded else None
    if ranks.writes:
        save_trainable(model, run.path / BEST, tokenizer, state_dict=weights)


def _load_best(run: RunDir, model: torch.nn.Module, named: list, best_step: int, progress: bool = False) -> None:
    """Put the best-dev weights into ``model``: from best/, or rebuilt from the trajectory when not kept."""
    if (run.path / BEST).is_dir():
        if any(hasattr(p, "full_tensor") for _, p in named):  # sharded: each rank loads its rows
            weights = read_saved_weights(run.path / BEST)
            load_weights(named, {name: weights[name] for name, _ in named})
        else:
            load_trainable(model, run.path / BEST)
        return
    _, _, rebuilt = rebuild(run.path / TRAJECTORY_FILE, steps=best_step, progress=progress)
    load_weights(named, {name: p.detach() for name, p in rebuilt})


def weights_on_cpu(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """A CPU copy: what safetensors files hold, whatever device the run uses (sharded
    parameters gathered: a collective in shard mode)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to("cpu", copy=True) for name, p in named}


@torch.no_grad()
def load_weights(named: list[tuple[str, torch.nn.Parameter]], weights: dict[str, torch.Tensor]) -> None:
    """Full weights into the parameters (a sharded one takes its own rows)."""
    for name, p in named:
        load_local(p, weights[name])


def _checkpoint_state(state: TrainState, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"train_state": state.__dict__.copy(), "optimizer": optimizer.state_dict()}


def _restore(run: RunDir, named: list, optimizer: torch.optim.Optimizer) -> TrainState:
    weights, saved = run.load_checkpoint()
    state = TrainState(**saved["train_state"])
    if weights is None:  # the run kept its trajectory, not its weights: replay it from the start weights
        header, records = read_trajectory(run.path / TRAJECTORY_FILE, end=state.trajectory_bytes)
        if fingerprint(named) != header["fingerprint"]:
            raise CheckpointError(f"cannot resume {run.path}: its trajectory was recorded on other base weights")
        _replay_records(optimizer, records, state.step)
    else:
        load_weights(named, weights)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except ValueError as err:  # e.g. a state whose noise this engine cannot continue
        raise CheckpointError(f"cannot resume {run.path}: {err}") from None
    run.truncate_log(state.step)
    return state


_LAYER = re.compile(r"(?:layers|h|layer)\.(\d+)\.")


def _snapshot_scores(state: TrainState, optimizer: torch.optim.Optimizer, named: list) -> None:
    """Mean SparseCurvZO block score per layer, for the score heat map."""
    if not isinstance(optimizer, SparseCurvZO):
        return
    names = {id(p): name for name, p in named}
    totals: dict[str, list[float]] = {}
    for block, score in zip(optimizer.blocks, optimizer.scores.tolist()):
        match = _LAYER.search(names[id(block.param)])
        key = f"layer {int(match.group(1)):02d}" if match else names[id(block.param)].rsplit(".", 2)[-2]
        totals.setdefault(key, []).append(score)
    state.scores.append({"step": state.step, "budget": optimizer.budget_fraction(),
                         "layers": {k: sum(v) / len(v) for k, v in sorted(totals.items())}})
