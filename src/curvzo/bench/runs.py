"""The runs of a grid: their folders, what can run now, and running them (resumably, in parallel).

Each (task, method, mode, lr, seed) is one :func:`curvzo.finetune.train` call in its own folder
``<out>/runs/<task>/<method>-<mode>-lr<lr>-s<seed>/``, plus one zero-shot evaluation per
(task, seed) in ``<out>/runs/<task>/zero-shot-s<seed>/``. A run whose ``results.json`` exists is
skipped, an interrupted one resumes from its checkpoint. A run that diverges is a result of the
lr sweep (scored from the best weights it saved before); any other failure is written to the
run's ``error.txt`` and the grid goes on.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import TrainConfig
from ..errors import ConfigError, TrainingDiverged
from ..io import write_json, write_text
from .grid import ZERO_SHOT, Grid, MethodSpec, run_config, run_folder_name, select_lr
from .store import read_record

__all__ = [
    "Report", "Run", "all_runs", "check_existing", "drop_weights", "execute", "plan", "schedule", "selected", "selection", "sweep",
    "training_run", "zero_shot_run",
]

# Config keys that may differ between a finished run and the grid (paths, evaluation chunking).
_IGNORED_FOR_DONE = {"output_dir", "eval_batch_size", "data_dir", "keep"}
_IGNORED_FOR_PARTIAL = _IGNORED_FOR_DONE | {"steps", "eval_every"}  # a resume may extend a run


@dataclass(frozen=True)
class Run:
    """One unit of work: a training run, or the zero-shot evaluation of a (task, seed)."""

    task: str
    label: str
    mode: str
    lr: float | None
    seed: int
    path: Path
    config: TrainConfig = field(compare=False, hash=False, repr=False)

    @property
    def key(self) -> tuple:
        return (self.task, self.label, self.mode, self.lr, self.seed)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.path.name}"

    @property
    def done(self) -> bool:
        return self.record("results.json") is not None

    @property
    def resumable(self) -> bool:
        return any((self.path / n / "state.pt").exists() for n in ("checkpoint", "checkpoint.old"))

    def record(self, name: str) -> bytes | None:
        """The run's file ``name``, from its folder or, once packed, from the results archive."""
        return read_record(self.path, name)

    def results(self) -> dict[str, Any]:
        return json.loads(self.record("results.json") or b"")

    @property
    def reused(self) -> bool:
        """Read from another profile's results folder (see ``Grid.reuse``), never written here."""
        return self.path != Path(self.config.output_dir)

    def saved_config(self) -> TrainConfig | None:
        """The config the run was started with; None before it started."""
        return _saved_config(self.path)


def training_run(grid: Grid, task: str, spec: MethodSpec, mode: str, lr: float, seed: int) -> Run:
    path = grid.out / "runs" / task / run_folder_name(spec.label, mode, lr, seed)
    config = run_config(grid, task, spec, mode, lr, seed, path)
    return Run(task, spec.label, mode, lr, seed, _reused(grid, path, config) or path, config)


def _reused(grid: Grid, path: Path, config: TrainConfig) -> Path | None:
    """The same run finished in one of the grid's `reuse` folders, when this folder has not started it.

    Identical configs give bit-identical runs, so such a run is read where it was made and its
    records keep one owner. Zero-shot evaluations save no config to compare and are not reused.
    """
    if not grid.reuse or path.exists() or read_record(path, "config.yaml") is not None:
        return None
    for folder in grid.reuse:
        other = folder / "runs" / path.parent.name / path.name
        saved = _saved_config(other) if read_record(other, "results.json") is not None else None
        if saved is not None and not saved.differences(config, _IGNORED_FOR_DONE):
            return other
    return None


def _saved_config(path: Path) -> TrainConfig | None:
    text = read_record(path, "config.yaml")
    return None if text is None else TrainConfig(**(yaml.safe_load(text) or {}))  # as RunDir.read_config


def zero_shot_run(grid: Grid, task: str, seed: int) -> Run:
    path = grid.out / "runs" / task / run_folder_name(ZERO_SHOT, "full", None, seed)
    config = TrainConfig(**grid.settings, model=grid.model, data_dir=grid.data_dir, task=task, method="mezo",
                         seed=seed, output_dir=str(path))
    return Run(task, ZERO_SHOT, "full", None, seed, path, config)


def all_runs(grid: Grid) -> Iterator[Run]:
    """Every run the grid could hold (each lr on each seed), zero-shot first per task."""
    for task in grid.tasks:
        if grid.zero_shot:
            yield from (zero_shot_run(grid, task, s) for s in grid.seeds)
        for _, spec, mode in (c for c in grid.cells() if c[0] == task):
            for lr in spec.lr[mode]:
                yield from (training_run(grid, task, spec, mode, lr, s) for s in spec.seeds)


def plan(grid: Grid) -> tuple[list[Run], int]:
    """Runs that can be scheduled now, in grid order, and how many still wait for an lr selection.

    Per (task, method, mode): every lr on the selection seeds; once those are all finished, the
    dev-selected lr on the other seeds.
    """
    runs: list[Run] = []
    waiting = 0
    for task in grid.tasks:
        if grid.zero_shot:
            runs += [zero_shot_run(grid, task, s) for s in grid.seeds]
        for _, spec, mode in (c for c in grid.cells() if c[0] == task):
            runs += sweep(grid, task, spec, mode)
            rest = [s for s in spec.seeds if s not in grid.selection_seeds(spec, spec.lr[mode])]
            if not rest:
                continue
            best = selection(grid, task, spec, mode)
            if best is None:
                waiting += len(rest)
            else:
                runs += [training_run(grid, task, spec, mode, best, s) for s in rest]
    return runs, waiting


def sweep(grid: Grid, task: str, spec: MethodSpec, mode: str) -> list[Run]:
    """One (task, method, mode)'s lr sweep: every lr on the selection seeds. Its dev selection
    exists only once all of them are finished."""
    lrs = spec.lr[mode]
    return [training_run(grid, task, spec, mode, lr, s) for lr in lrs for s in grid.selection_seeds(spec, lrs)]


def selection(grid: Grid, task: str, spec: MethodSpec, mode: str) -> float | None:
    """The lr the other seeds of one (task, method, mode) run once its sweep is finished, else
    None: the dev selection, or the method's ``fixed_lr``; a single lr is its own selection."""
    lrs = spec.lr[mode]
    if len(lrs) == 1:
        return lrs[0]
    first = sweep(grid, task, spec, mode)
    if not all(r.done for r in first):
        return None
    if mode in spec.fixed_lr:
        return spec.fixed_lr[mode]
    return select_lr({lr: [r.results()["best_dev"] for r in first if r.lr == lr] for lr in lrs})


def selected(run: Run, only: dict[str, set]) -> bool:
    fields = {"task": run.task, "method": run.label, "mode": run.mode, "seed": run.seed, "lr": run.lr}
    return all(fields[key] in values for key, values in only.items())


def check_existing(grid: Grid) -> None:
    """Refuse to mix runs of another config into the grid's folders (e.g. another profile's)."""
    problems = []
    for run in all_runs(grid):
        saved = None if run.label == ZERO_SHOT else run.saved_config()
        if saved is None:
            continue
        changed = saved.differences(run.config, _IGNORED_FOR_DONE if run.done else _IGNORED_FOR_PARTIAL)
        if changed:
            there, here = saved.comparable(), run.config.comparable()
            diff = ", ".join(f"{k}: {there.get(k)!r} there, {here.get(k)!r} in the grid" for k in changed)
            problems.append(f"{run.path} ({diff})")
    if problems:
        raise ConfigError("run folders hold runs of another config; use another --out or remove them: "
                          + "; ".join(problems))


def _next_runs(grid: Grid, only: dict[str, set], attempted: set) -> Iterator[Run]:
    runs, _ = plan(grid)  # re-planned after every run: a finished lr selection adds runs
    return (r for r in runs if selected(r, only) and not r.done and r.key not in attempted)


def schedule(grid: Grid, only: dict[str, set], jobs: int, progress: bool, report: Report, log: Callable) -> None:
    attempted: set = set()

    def record(run: Run, outcome: dict[str, Any]) -> None:
        if outcome["error"]:
            report.failed.append(run.name)
            log(f"FAILED {run.name} after {outcome['seconds']:.0f} s (traceback in {run.path / 'error.txt'}): "
                f"{outcome['error']}")
        else:
            report.executed.append(run.name)
            log(f"done {run.name} in {outcome['seconds']:.0f} s: {outcome['line']}")

    if jobs == 1:
        while (run := next(_next_runs(grid, only, attempted), None)) is not None:
            attempted.add(run.key)
            log(f"start {run.name}{' (resuming)' if run.resumable else ''}")
            record(run, execute(run, keep_weights=grid.keep_weights, progress=progress))
        return
    import multiprocessing
    import os
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
        futures: dict[Any, Run] = {}
        while True:
            for run in _next_runs(grid, only, attempted):
                if len(futures) >= jobs:
                    break
                attempted.add(run.key)
                log(f"start {run.name}{' (resuming)' if run.resumable else ''}")
                futures[pool.submit(execute, run, keep_weights=grid.keep_weights, progress=False)] = run
            if not futures:
                return
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                record(futures.pop(future), future.result())


def _worker_init(threads: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def execute(run: Run, *, keep_weights: bool = False, progress: bool = True) -> dict[str, Any]:
    """Do one run (resuming it if it has a checkpoint); a failure is recorded, not raised."""
    start = time.perf_counter()
    try:
        if run.label == ZERO_SHOT:
            results = _zero_shot(run)
            line = f"dev {results['dev']:.4f}, test {results['test']:.4f}"
        else:
            from ..finetune import train

            try:
                # the grid owns its folders: one without a checkpoint holds at most a failed start
                results = train(run.config, resume=run.resumable, overwrite=not run.resumable, progress=progress)
            except TrainingDiverged as err:  # a too-large lr is a result of the sweep, not a failure
                results = _diverged_results(run, err)
            line = (f"zero-shot dev {results['zero_shot']:.4f} -> best dev {results['best_dev']:.4f}, "
                    f"test {results['test']:.4f}")
            if not keep_weights:
                drop_weights(run.path)
        (run.path / "error.txt").unlink(missing_ok=True)
        return {"error": None, "line": line, "seconds": time.perf_counter() - start}
    except Exception as err:  # one broken run must not stop a grid of hours; KeyboardInterrupt still does
        run.path.mkdir(parents=True, exist_ok=True)
        write_text(run.path / "error.txt", traceback.format_exc())
        return {"error": f"{type(err).__name__}: {err}", "line": "", "seconds": time.perf_counter() - start}


def _diverged_results(run: Run, err: TrainingDiverged) -> dict[str, Any]:
    """results.json of a diverged run: its best weights (saved before the divergence) on dev and test,
    and the evaluations of its last checkpoint."""
    import torch

    from ..finetune import evaluate_run

    scores = evaluate_run(run.path)
    state: dict[str, Any] = {}
    for name in ("checkpoint", "checkpoint.old"):
        if (run.path / name / "state.pt").exists():
            state = torch.load(run.path / name / "state.pt", weights_only=False)["train_state"]
            break
    cfg = run.config
    evals = state.get("evals", [])
    results = {
        "model": cfg.model, "task": scores["task"], "method": cfg.method, "peft": cfg.peft, "metric": scores["metric"],
        "zero_shot": state.get("zero_shot", scores["dev"]), "best_dev": scores["dev"], "best_step": state.get("best_step", 0),
        "test": scores["test"], "steps": state.get("step", 0), "forward_passes": state.get("forward_passes", 0),
        "wall_time_s": round(state.get("wall_time_s", 0.0), 2), "lr": cfg.lr, "eps": cfg.eps, "seed": cfg.seed,
        "evals": evals, "diverged": str(err),
    }
    write_json(run.path / "results.json", results)
    return results


def _zero_shot(run: Run) -> dict[str, Any]:
    from ..finetune import evaluate, setup

    cfg = run.config
    task, (_, dev_set, test_set), model, tokenizer, _ = setup(cfg)
    results = {
        "model": cfg.model, "task": task.name, "method": ZERO_SHOT, "metric": task.metric, "seed": cfg.seed,
        "dev": evaluate(model, tokenizer, task, dev_set, cfg), "test": evaluate(model, tokenizer, task, test_set, cfg),
        "num_dev": len(dev_set), "num_test": len(test_set),
    }
    write_json(run.path / "results.json", results)
    return results


def drop_weights(path: Path) -> None:
    """Weights are regenerable and 0.5 GB per full-parameter copy: a finished run keeps only its records."""
    for name in ("best", "checkpoint", "checkpoint.old", "checkpoint.tmp"):
        shutil.rmtree(path / name, ignore_errors=True)


@dataclass
class Report:
    """What one ``run_bench`` call did."""

    executed: list[str] = field(default_factory=list)
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    waiting: int = 0
    outputs: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
