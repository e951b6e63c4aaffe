"""Accuracy benchmark: a YAML grid of fine-tuning runs, run resumably and aggregated (``curvzo bench``).

    curvzo bench --profile quick                      # < 30 min on 2 CPU cores (sst2, rte; 3 methods)
    curvzo bench --grid benchmarks/grids/cpu.yaml     # the README table (profile cpu, ~4.5 h with --jobs 2)
    curvzo bench --only task=sst2,method=mezo --jobs 2
    curvzo bench --aggregate-only                     # tables and figures from the finished runs
    curvzo bench --dry-run                            # what would run, what is done
    python -m benchmarks.accuracy ...                 # the same command

A grid (see ``benchmarks/grids/cpu.yaml``) expands into runs, one :func:`curvzo.finetune.train`
call per (task, method, mode, lr, seed), each in its own folder
``<out>/runs/<task>/<method>-<mode>-lr<lr>-s<seed>/``, plus one zero-shot evaluation per
(task, seed) in ``<out>/runs/<task>/zero-shot-s<seed>/``. A run whose ``results.json`` exists is
skipped, an interrupted one resumes from its checkpoint, so a grid can be spread over sittings.
A run that diverges is a result of the lr sweep (scored from the best weights it saved before);
any other failure is written to the run's ``error.txt`` and the grid goes on.

Learning rates are selected on dev: per (task, method, mode) the lr with the best mean dev
accuracy (each run's best dev, the weights its test score comes from) over the seeds that every
lr has, ties to the smaller lr. With ``select_seeds`` the grid runs every lr on those seeds only
and the selected lr on the remaining seeds (5 runs instead of 9 for 3 lrs x 3 seeds).

Aggregation (:func:`aggregate`) reads whichever runs are finished and writes ``accuracy.json``
(``summary`` + per-task rows + the runs used), ``accuracy.md`` and figures into ``<out>``.
"""

from __future__ import annotations

import math
import re
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import RunDir
from .config import FO_METHODS, METHODS, PEFT_MODES, ZO_METHODS, TrainConfig, read_yaml_mapping
from .errors import ConfigError, CurvzoError, TrainingDiverged
from .io import atomic_write, write_json, write_text

__all__ = [
    "Grid", "MethodSpec", "Run", "load_grid", "plan", "run_bench", "aggregate", "summarize",
    "run_folder_name", "format_lr", "parse_only", "forward_to_reach", "TARGETS",
]

#: mode name -> ``TrainConfig.peft``.
MODES = {"full": "none", "lora": "lora", "prefix": "prefix"}
assert set(MODES.values()) == set(PEFT_MODES)

#: The issue's targets for CurvZO against MeZO (reported next to the measured numbers).
TARGETS = {"minus_baseline_points": 3.0, "tasks_won_fraction": 0.8, "forward_ratio": 0.4}

ZERO_SHOT = "zero-shot"
DEFAULT_OUT = "benchmarks/results"

# Keys a grid (or a profile) may hold besides TrainConfig run settings.
_GRID_KEYS = {"tasks", "methods", "modes", "seeds", "select_seeds", "eps", "zero_shot", "keep_weights",
              "compare", "out", "model", "data_dir"}
_TOP_ONLY = {"profiles", "default_profile"}
_METHOD_KEYS = {"method", "lr", "tasks", "modes", "eps", "set"}
# TrainConfig fields the grid sets per run: not allowed as settings or in a method's `set`.
_CONTROLLED = {"task", "method", "peft", "lr", "seed", "output_dir", "eps", "model", "data_dir"}
_SETTINGS = set(TrainConfig.__dataclass_fields__) - _CONTROLLED
# Config keys that may differ between a finished run and the grid (paths, evaluation chunking).
_IGNORED_FOR_DONE = {"output_dir", "eval_batch_size", "data_dir", "keep"}
_IGNORED_FOR_PARTIAL = _IGNORED_FOR_DONE | {"steps", "eval_every"}  # a resume may extend a run
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+]*(?:-[A-Za-z0-9_.+]+)*$")


# ============================================================================ the grid
@dataclass(frozen=True)
class MethodSpec:
    """One method row of a grid: ``label`` (folder and table name) runs TrainConfig ``method``."""

    label: str
    method: str
    lr: dict[str, tuple[float, ...]]  # mode -> learning rates to try
    eps: dict[str, float]  # mode -> perturbation scale
    tasks: tuple[str, ...]
    modes: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig keys (`set:`)

    @property
    def is_zo(self) -> bool:
        return self.method in ZO_METHODS


@dataclass(frozen=True)
class Grid:
    """A validated grid with its profile applied."""

    path: Path
    profile: str
    out: Path
    model: str
    data_dir: str | None
    tasks: tuple[str, ...]
    modes: tuple[str, ...]
    seeds: tuple[int, ...]
    select_seeds: tuple[int, ...]  # seeds every lr runs on (all seeds: the full lr x seed grid)
    methods: tuple[MethodSpec, ...]
    settings: dict[str, Any]  # TrainConfig run settings shared by every run
    zero_shot: bool = True
    keep_weights: bool = False
    compare: tuple[str, str] = ("curvzo", "mezo")  # (method, baseline) labels of the summary

    def selection_seeds(self, lrs: tuple[float, ...]) -> tuple[int, ...]:
        return self.select_seeds if len(lrs) > 1 else self.seeds

    def cells(self) -> Iterator[tuple[str, MethodSpec, str]]:
        """(task, method, mode) in grid order: task-major, so early tasks finish first."""
        for task in self.tasks:
            for spec in self.methods:
                if task in spec.tasks:
                    for mode in spec.modes:
                        yield task, spec, mode

    def expected_runs(self) -> int:
        """Training runs of the complete grid (lr selection included), zero-shot excluded."""
        total = 0
        for _, spec, mode in self.cells():
            lrs = spec.lr[mode]
            chosen = self.selection_seeds(lrs)
            total += len(lrs) * len(chosen) + len(self.seeds) - len(chosen)
        return total


def format_lr(lr: float) -> str:
    """``1e-05`` -> ``"1e-5"``, ``0.00025`` -> ``"2.5e-4"``: short, exact for grid values."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def run_folder_name(label: str, mode: str, lr: float | None, seed: int) -> str:
    """``mezo-full-lr1e-5-s0``; the zero-shot evaluation of a seed is ``zero-shot-s0``."""
    if label == ZERO_SHOT:
        return f"{ZERO_SHOT}-s{seed}"
    return f"{label}-{mode}-lr{format_lr(lr)}-s{seed}"


def load_grid(path: str | Path, profile: str | None = None, out: str | Path | None = None) -> Grid:
    """Read, merge (profile over base) and validate a grid; every problem in one ConfigError."""
    path = Path(path)
    raw = read_yaml_mapping(path, "grid file", "a mapping (tasks, methods, seeds, profiles, ...)")
    problems: list[str] = []
    values, profile = _merge_profile(path, raw, profile, problems)
    grid = _build_grid(path, profile, values, out, problems)
    if problems:
        raise ConfigError(f"invalid grid {path} (profile {profile}): " + "; ".join(problems))
    return grid


def _merge_profile(path: Path, raw: dict[str, Any], profile: str | None, problems: list[str]) -> tuple[dict[str, Any], str]:
    """Profile keys replace base keys; a profile's `methods` picks the methods and merges each entry."""
    unknown = sorted(set(raw) - _GRID_KEYS - _TOP_ONLY - _SETTINGS)
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}")
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        problems.append("`profiles` must map profile names to mappings")
        profiles = {}
    name = profile or raw.get("default_profile") or ("cpu" if "cpu" in profiles else None)
    base = {k: v for k, v in raw.items() if k not in _TOP_ONLY}
    if name is None:
        return base, "(none)"
    if name not in profiles:  # nothing else is worth checking against the wrong profile
        raise ConfigError(f"grid {path}: unknown profile {name!r} (grid defines: {', '.join(profiles) or 'none'})")
    over = profiles[name] or {}
    if not isinstance(over, dict):
        problems.append(f"profile {name!r} must be a mapping")
        return base, name
    unknown = sorted(set(over) - _GRID_KEYS - _SETTINGS)
    if unknown:
        problems.append(f"profile {name!r}: unknown key(s) {', '.join(unknown)}")
    merged = {**base, **{k: v for k, v in over.items() if k != "methods"}}
    if "methods" in over:
        base_methods = base.get("methods") or {}
        chosen = over["methods"]
        if isinstance(chosen, list):  # a list of names: those base entries, in that order
            chosen = {m: None for m in chosen}
        if not isinstance(chosen, dict) or not isinstance(base_methods, dict):
            problems.append("`methods` must map method labels to their settings")
        else:
            merged["methods"] = {
                label: {**(base_methods.get(label) or {}), **(entry or {})} for label, entry in chosen.items()
            }
    return merged, name


def _build_grid(path: Path, profile: str, v: dict[str, Any], out: str | Path | None, problems: list[str]) -> Grid | None:
    from .tasks import get_task

    tasks = _str_list(v.get("tasks"), "tasks", problems)
    for task in tasks:
        try:
            get_task(task)
        except CurvzoError as err:
            problems.append(f"`tasks`: {err}")
    modes = _str_list(v.get("modes", ["full"]), "modes", problems)
    for mode in modes:
        if mode not in MODES:
            problems.append(f"`modes` must be among {', '.join(MODES)}, got {mode!r}")
    seeds = _int_list(v.get("seeds", [0]), "seeds", problems)
    select = _int_list(v["select_seeds"], "select_seeds", problems) if v.get("select_seeds") is not None else seeds
    if not set(select) <= set(seeds):
        problems.append(f"`select_seeds` {list(select)} must be a subset of `seeds` {list(seeds)}")
    settings = {k: v[k] for k in v if k in _SETTINGS}
    for key in ("zero_shot", "keep_weights"):
        if key in v and not isinstance(v[key], bool):
            problems.append(f"`{key}` must be true or false, got {v[key]!r}")
    compare = v.get("compare") or {}
    if not isinstance(compare, dict) or set(compare) - {"method", "baseline"}:
        problems.append("`compare` must be a mapping with `method` and `baseline` labels")
        compare = {}
    base_eps = _eps(v.get("eps"), "eps", modes, problems)
    methods_raw = v.get("methods")
    if not isinstance(methods_raw, dict) or not methods_raw:
        problems.append("`methods` must be a non-empty mapping of method labels to their settings")
        methods_raw = {}
    methods = tuple(
        spec for label, entry in methods_raw.items()
        if (spec := _method_spec(str(label), entry, tasks, modes, base_eps, problems)) is not None
    )
    if problems:
        return None
    grid = Grid(
        path=path, profile=profile, out=Path(out if out is not None else v.get("out", DEFAULT_OUT)),
        model=str(v.get("model", "smollm2-135m")), data_dir=v.get("data_dir", "../shared/data"),
        tasks=tasks, modes=modes, seeds=seeds, select_seeds=select, methods=methods, settings=settings,
        zero_shot=v.get("zero_shot", True), keep_weights=v.get("keep_weights", False),
        compare=(compare.get("method", "curvzo"), compare.get("baseline", "mezo")),
    )
    for spec in methods:  # let TrainConfig validate the run settings, once per (method, mode)
        for mode in spec.modes:
            try:
                _train_config(grid, tasks[0], spec, mode, spec.lr[mode][0], seeds[0], Path("."))
            except ConfigError as err:
                problems.append(f"methods.{spec.label} ({mode}): {str(err).removeprefix('invalid config: ')}")
    return grid


def _method_spec(label: str, entry: Any, tasks: tuple, modes: tuple, base_eps: dict, problems: list[str]) -> MethodSpec | None:
    where = f"methods.{label}"
    entry = entry or {}
    if not isinstance(entry, dict):
        problems.append(f"`{where}` must be a mapping (lr, tasks, modes, eps, set, method)")
        return None
    n = len(problems)
    unknown = sorted(set(entry) - _METHOD_KEYS)
    if unknown:
        problems.append(f"`{where}`: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_METHOD_KEYS))})")
    if not _LABEL.match(label) or label == ZERO_SHOT:
        problems.append(f"`{where}`: a label is letters, digits, '_.+' and single dashes (not {ZERO_SHOT!r})")
    method = entry.get("method", label)
    if method not in METHODS:
        problems.append(f"`{where}`: method must be one of {', '.join(METHODS)}, got {method!r} "
                        "(set `method:` for a custom label)")
    own_tasks = _str_list(entry["tasks"], f"{where}.tasks", problems) if "tasks" in entry else tasks
    own_modes = _str_list(entry["modes"], f"{where}.modes", problems) if "modes" in entry else modes
    run_modes = tuple(m for m in modes if m in own_modes)
    lr_raw = entry.get("lr")
    lr: dict[str, tuple[float, ...]] = {}
    if not isinstance(lr_raw, dict):
        problems.append(f"`{where}.lr` must map each mode ({', '.join(run_modes)}) to a list of learning rates")
    else:
        for mode in run_modes:
            values = lr_raw.get(mode)
            if values is None:
                problems.append(f"`{where}.lr` has no learning rates for mode {mode!r}")
                continue
            values = values if isinstance(values, list) else [values]
            parsed = tuple(_number(x, f"{where}.lr.{mode}", problems) for x in values)
            if not parsed:
                problems.append(f"`{where}.lr.{mode}` is empty")
            elif len(set(parsed)) != len(parsed):
                problems.append(f"`{where}.lr.{mode}` repeats a value: {list(values)}")
            lr[mode] = parsed
    eps = {**base_eps, **_eps(entry.get("eps"), f"{where}.eps", run_modes, problems)}
    settings = entry.get("set") or {}
    if not isinstance(settings, dict):
        problems.append(f"`{where}.set` must be a mapping of TrainConfig keys")
        settings = {}
    bad = sorted(set(settings) - _SETTINGS)
    if bad:
        problems.append(f"`{where}.set`: key(s) {', '.join(bad)} cannot be set per method "
                        f"(the grid sets {', '.join(sorted(_CONTROLLED))}; others are not TrainConfig fields)")
    if len(problems) > n:
        return None
    return MethodSpec(label=label, method=method, lr=lr, eps=eps, tasks=tuple(t for t in tasks if t in own_tasks),
                      modes=run_modes, settings=dict(settings))


def _str_list(value: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        problems.append(f"`{where}` must be a non-empty list of names, got {value!r}")
        return ()
    if len(set(value)) != len(value):
        problems.append(f"`{where}` repeats a name: {value}")
    return tuple(value)


def _int_list(value: Any, where: str, problems: list[str]) -> tuple[int, ...]:
    value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(value, list) or not value or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        problems.append(f"`{where}` must be a non-empty list of integers, got {value!r}")
        return ()
    if len(set(value)) != len(value):
        problems.append(f"`{where}` repeats a value: {value}")
    return tuple(value)


def _number(value: Any, where: str, problems: list[str]) -> float:
    """A positive finite float; YAML reads ``1e-5`` (no dot) as a string, so strings are parsed."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        problems.append(f"`{where}` must hold positive numbers, got {value!r}")
        return math.nan
    return number


def _eps(value: Any, where: str, modes: tuple[str, ...], problems: list[str]) -> dict[str, float]:
    """``eps: 1e-3`` (every mode) or ``eps: {full: 1e-3, lora: 1e-2}``."""
    if value is None:
        return {}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(MODES))
        if unknown:
            problems.append(f"`{where}`: unknown mode(s) {', '.join(unknown)}")
        return {m: _number(x, f"{where}.{m}", problems) for m, x in value.items() if m in MODES}
    number = _number(value, where, problems)
    return {m: number for m in MODES}


# ============================================================================ runs
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
        return (self.path / "results.json").exists()

    @property
    def resumable(self) -> bool:
        return any((self.path / n / "state.pt").exists() for n in ("checkpoint", "checkpoint.old"))

    def results(self) -> dict[str, Any]:
        import json

        return json.loads((self.path / "results.json").read_text())


def _train_config(grid: Grid, task: str, spec: MethodSpec, mode: str, lr: float, seed: int, path: Path) -> TrainConfig:
    values = {**grid.settings, **spec.settings}
    if grid.keep_weights:
        values["keep"] = "weights"
    if mode in spec.eps:
        values["eps"] = spec.eps[mode]
    return TrainConfig(**values, model=grid.model, data_dir=grid.data_dir, task=task, method=spec.method,
                       peft=MODES[mode], lr=lr, seed=seed, output_dir=str(path))


def _run(grid: Grid, task: str, spec: MethodSpec, mode: str, lr: float, seed: int) -> Run:
    path = grid.out / "runs" / task / run_folder_name(spec.label, mode, lr, seed)
    return Run(task, spec.label, mode, lr, seed, path, _train_config(grid, task, spec, mode, lr, seed, path))


def _zero_shot_run(grid: Grid, task: str, seed: int) -> Run:
    path = grid.out / "runs" / task / run_folder_name(ZERO_SHOT, "full", None, seed)
    config = TrainConfig(**grid.settings, model=grid.model, data_dir=grid.data_dir, task=task, method="mezo",
                         seed=seed, output_dir=str(path))
    return Run(task, ZERO_SHOT, "full", None, seed, path, config)


def all_runs(grid: Grid) -> Iterator[Run]:
    """Every run the grid could hold (each lr on each seed), zero-shot first per task."""
    for task in grid.tasks:
        if grid.zero_shot:
            yield from (_zero_shot_run(grid, task, s) for s in grid.seeds)
        for _, spec, mode in (c for c in grid.cells() if c[0] == task):
            for lr in spec.lr[mode]:
                yield from (_run(grid, task, spec, mode, lr, s) for s in grid.seeds)


def plan(grid: Grid) -> tuple[list[Run], int]:
    """Runs that can be scheduled now, in grid order, and how many still wait for an lr selection.

    Per (task, method, mode): every lr on the selection seeds; once those are all finished, the
    dev-selected lr on the other seeds.
    """
    runs: list[Run] = []
    waiting = 0
    for task in grid.tasks:
        if grid.zero_shot:
            runs += [_zero_shot_run(grid, task, s) for s in grid.seeds]
        for _, spec, mode in (c for c in grid.cells() if c[0] == task):
            lrs = spec.lr[mode]
            chosen = grid.selection_seeds(lrs)
            first = [_run(grid, task, spec, mode, lr, s) for lr in lrs for s in chosen]
            runs += first
            rest = [s for s in grid.seeds if s not in chosen]
            if not rest:
                continue
            if all(r.done for r in first):
                best = select_lr({lr: [r.results()["best_dev"] for r in first if r.lr == lr] for lr in lrs})
                runs += [_run(grid, task, spec, mode, best, s) for s in rest]
            else:
                waiting += len(rest)
    return runs, waiting


def select_lr(dev_by_lr: dict[float, list[float]]) -> float:
    """The lr with the best mean dev; ties go to the smaller lr."""
    return max(dev_by_lr, key=lambda lr: (statistics.fmean(dev_by_lr[lr]), -lr))


def parse_only(text: str | None, grid: Grid) -> dict[str, set]:
    """``"task=sst2,method=mezo,method=curvzo"`` -> ``{"task": {"sst2"}, "method": {"mezo", "curvzo"}}``."""
    if not text:
        return {}
    known = {"task": set(grid.tasks), "method": {s.label for s in grid.methods} | {ZERO_SHOT},
             "mode": set(grid.modes), "seed": set(grid.seeds), "lr": None}
    out: dict[str, set] = {}
    problems = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            problems.append(f"{item!r} is not KEY=VALUE with KEY one of {', '.join(known)}")
            continue
        try:
            parsed: Any = int(value) if key == "seed" else float(value) if key == "lr" else value
        except ValueError:
            problems.append(f"{item!r}: {key} must be a number")
            continue
        if known[key] is not None and parsed not in known[key]:
            problems.append(f"{item!r}: not in the grid (choose from {', '.join(map(str, sorted(known[key])))})")
        out.setdefault(key, set()).add(parsed)
    if problems:
        raise ConfigError("invalid --only: " + "; ".join(problems))
    return out


def _selected(run: Run, only: dict[str, set]) -> bool:
    fields = {"task": run.task, "method": run.label, "mode": run.mode, "seed": run.seed, "lr": run.lr}
    return all(fields[key] in values for key, values in only.items())


def check_existing(grid: Grid) -> None:
    """Refuse to mix runs of another config into the grid's folders (e.g. another profile's)."""
    problems = []
    for run in all_runs(grid):
        if run.label == ZERO_SHOT or not (run.path / "config.yaml").exists():
            continue
        saved = RunDir(run.path).read_config()
        changed = saved.differences(run.config, _IGNORED_FOR_DONE if run.done else _IGNORED_FOR_PARTIAL)
        if changed:
            there, here = saved.comparable(), run.config.comparable()
            diff = ", ".join(f"{k}: {there.get(k)!r} there, {here.get(k)!r} in the grid" for k in changed)
            problems.append(f"{run.path} ({diff})")
    if problems:
        raise ConfigError("run folders hold runs of another config; use another --out or remove them: "
                          + "; ".join(problems))


# ============================================================================ execution
@dataclass
class Report:
    """What one ``run_bench`` call did."""

    executed: list[str] = field(default_factory=list)
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    waiting: int = 0
    outputs: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def run_bench(
    grid: Grid,
    *,
    only: dict[str, set] | None = None,
    jobs: int = 1,
    dry_run: bool = False,
    aggregate_only: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Report:
    """Run the grid's pending runs (``jobs`` at a time), then aggregate everything finished."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be an integer >= 1, got {jobs!r}")
    only = only or {}
    check_existing(grid)
    report = Report()
    if not aggregate_only:
        runs, waiting = plan(grid)
        chosen = [r for r in runs if _selected(r, only)]
        report.skipped = sum(r.done for r in chosen)
        todo = [r for r in chosen if not r.done]
        log(f"grid {grid.path} (profile {grid.profile}): {grid.expected_runs()} training runs in all "
            f"(+{len(grid.tasks) * len(grid.seeds) if grid.zero_shot else 0} zero-shot evaluations); "
            f"selected now {len(chosen)}: {report.skipped} finished, {sum(r.resumable for r in todo)} to resume, "
            f"{len(todo)} to run; {waiting} wait for an lr selection")
        if dry_run:
            for run in chosen:
                log(f"  {'done   ' if run.done else 'resume ' if run.resumable else 'pending'} {run.name}")
            return report
        for run in chosen:
            if run.done and not grid.keep_weights:
                _drop_weights(run.path)
        _schedule(grid, only, jobs, progress, report, log)
        _, report.waiting = plan(grid)
    report.outputs, report.summary = aggregate(grid, log=log)
    return report


def _next_runs(grid: Grid, only: dict[str, set], attempted: set) -> Iterator[Run]:
    runs, _ = plan(grid)  # re-planned after every run: a finished lr selection adds runs
    return (r for r in runs if _selected(r, only) and not r.done and r.key not in attempted)


def _schedule(grid: Grid, only: dict[str, set], jobs: int, progress: bool, report: Report, log: Callable) -> None:
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
            from .finetune import train

            try:
                # the grid owns its folders: one without a checkpoint holds at most a failed start
                results = train(run.config, resume=run.resumable, overwrite=not run.resumable, progress=progress)
            except TrainingDiverged as err:  # a too-large lr is a result of the sweep, not a failure
                results = _diverged_results(run, err)
            line = (f"zero-shot dev {results['zero_shot']:.4f} -> best dev {results['best_dev']:.4f}, "
                    f"test {results['test']:.4f}")
            if not keep_weights:
                _drop_weights(run.path)
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

    from .finetune import evaluate_run

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
    from .finetune import evaluate, setup

    cfg = run.config
    task, (_, dev_set, test_set), model, tokenizer, _ = setup(cfg)
    results = {
        "model": cfg.model, "task": task.name, "method": ZERO_SHOT, "metric": task.metric, "seed": cfg.seed,
        "dev": evaluate(model, tokenizer, task, dev_set, cfg), "test": evaluate(model, tokenizer, task, test_set, cfg),
        "num_dev": len(dev_set), "num_test": len(test_set),
    }
    write_json(run.path / "results.json", results)
    return results


def _drop_weights(path: Path) -> None:
    """Weights are regenerable and 0.5 GB per full-parameter copy: a finished run keeps only its records."""
    for name in ("best", "checkpoint", "checkpoint.old", "checkpoint.tmp"):
        shutil.rmtree(path / name, ignore_errors=True)


# ============================================================================ aggregation
def forward_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Forward passes at which ``curve`` ([(forward_passes, dev)], increasing x) first reaches
    ``target``, linearly interpolated between evaluations; None if it never does."""
    previous = None
    for x, y in curve:
        if y >= target - 1e-12:
            if previous is None:
                return float(x)
            x0, y0 = previous
            return x0 + (target - y0) / (y - y0) * (x - x0)
        previous = (x, y)
    return None


def _mean_curve(results: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Seed-averaged dev curve, zero-shot at 0 forward passes, over the evaluations all seeds have."""
    curves = [[(0, r["zero_shot"])] + [(e["forward_passes"], e["dev"]) for e in r.get("evals", [])] for r in results]
    length = min(len(c) for c in curves)
    return [(statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][1] for c in curves)) for i in range(length)]


def _cell(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Dev-selected lr of one (task, method, mode) and its test mean +- std over seeds."""
    by_lr: dict[float, dict[int, dict]] = {}
    for rec in records:
        by_lr.setdefault(rec["lr"], {})[rec["seed"]] = rec["results"]
    common = set.intersection(*(set(seeds) for seeds in by_lr.values()))
    on = {lr: sorted(common) if common else sorted(seeds) for lr, seeds in by_lr.items()}
    dev = {lr: [by_lr[lr][s]["best_dev"] for s in on[lr]] for lr in by_lr}
    best = select_lr(dev)
    chosen = [by_lr[best][s] for s in sorted(by_lr[best])]
    tests = [r["test"] for r in chosen]
    curve = _mean_curve(chosen)
    return {
        "lr": best, "dev_mean": statistics.fmean(dev[best]), "test_mean": statistics.fmean(tests),
        "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "seeds": sorted(by_lr[best]),
        "tests": tests, "forward_passes": curve[-1][0] if curve else None, "curve": [list(p) for p in curve],
        "lr_candidates": [{"lr": lr, "dev_mean": statistics.fmean(dev[lr]), "selection_seeds": on[lr]}
                          for lr in sorted(by_lr)],
    }


def summarize(
    records: list[dict[str, Any]],
    zero_shot: list[dict[str, Any]],
    *,
    tasks: Iterable[str],
    method: str = "curvzo",
    baseline: str = "mezo",
    mode: str = "full",
    zo_labels: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Per-task rows and the summary, from finished runs.

    ``records``: ``{"task", "label", "mode", "lr", "seed", "results"}`` with ``results`` a run's
    results.json; ``zero_shot``: ``{"task", "seed", "results"}``. Differences are in points
    (100 x metric); the forward ratio compares seed-averaged dev curves of the selected lrs.
    """
    zo = set(zo_labels) if zo_labels is not None else {r["label"] for r in records if r["results"]["method"] in ZO_METHODS}
    rows = []
    for task in tasks:
        cells: dict[str, dict[str, dict]] = {}
        grouped: dict[tuple[str, str], list] = {}
        for rec in records:
            if rec["task"] == task:
                grouped.setdefault((rec["label"], rec["mode"]), []).append(rec)
        for (label, m), recs in grouped.items():
            cells.setdefault(label, {})[m] = _cell(recs)
        zs = [{**z["results"], "seed": z["seed"]} for z in zero_shot if z["task"] == task]
        metric = next((r["results"]["metric"] for r in records if r["task"] == task), zs[0]["metric"] if zs else None)
        row: dict[str, Any] = {"task": task, "metric": metric, "methods": cells, "zero_shot": None}
        if zs:
            tests = [z["test"] for z in zs]
            row["zero_shot"] = {
                "dev_mean": statistics.fmean(z["dev"] for z in zs), "test_mean": statistics.fmean(tests),
                "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "seeds": sorted(z["seed"] for z in zs),
            }
        base = cells.get(baseline, {}).get(mode)
        if base and base["curve"]:
            target, budget = base["curve"][-1][1], base["curve"][-1][0]
            row["baseline_final_dev"], row["baseline_forward_passes"] = target, budget
            row["baseline_improved"] = target > base["curve"][0][1]
            row["forward_to_baseline_final"] = {}
            row["forward_ratio_to_baseline_final"] = {}
            # The denominator is where the baseline itself first reaches its final accuracy, not its
            # budget: a baseline curve that peaks early would otherwise make anyone look faster.
            own = forward_to_reach([tuple(p) for p in base["curve"]], target)
            for label, by_mode in cells.items():
                if label in zo and mode in by_mode and by_mode[mode]["curve"]:
                    reach = forward_to_reach([tuple(p) for p in by_mode[mode]["curve"]], target)
                    row["forward_to_baseline_final"][label] = reach
                    if row["baseline_improved"]:
                        row["forward_ratio_to_baseline_final"][label] = None if reach is None else reach / own
        rows.append(row)
    per_method = {}
    for label in dict.fromkeys(r["label"] for r in records):
        if label != baseline:
            per_method[label] = _versus(rows, label, baseline, mode)
    head = per_method.get(method) or _versus(rows, method, baseline, mode)
    diff, total, ratio = head["minus_baseline_mean"], head["tasks_total"], head["forward_ratio_median"]
    summary = {
        "method": method, "baseline": baseline, "mode": mode,
        "curvzo_minus_mezo_mean": head["minus_baseline_mean"], "tasks_won": head["tasks_won"],
        "tasks_total": head["tasks_total"], "forward_ratio_to_mezo_final": head["forward_ratio_median"],
        "forward_ratio_reached": head["forward_ratio_reached"], "forward_ratio_tasks": head["forward_ratio_tasks"],
        "per_task": head["per_task"],
        "methods": per_method, "targets": TARGETS,
        "targets_met": {
            "minus_baseline_points": diff is not None and diff >= TARGETS["minus_baseline_points"],
            "tasks_won_fraction": total > 0 and head["tasks_won"] >= TARGETS["tasks_won_fraction"] * total,
            "forward_ratio": ratio is not None and ratio <= TARGETS["forward_ratio"],
        },
    }
    return {"summary": summary, "tasks": rows}


def _versus(rows: list[dict], label: str, baseline: str, mode: str) -> dict[str, Any]:
    """``label`` against ``baseline`` in ``mode``, over the tasks where both have results."""
    per_task, diffs, ratios = {}, [], []
    for row in rows:
        ours, theirs = row["methods"].get(label, {}).get(mode), row["methods"].get(baseline, {}).get(mode)
        if not ours or not theirs:
            continue
        diff = 100.0 * (ours["test_mean"] - theirs["test_mean"])
        ratio = row.get("forward_ratio_to_baseline_final", {}).get(label, "n/a")
        per_task[row["task"]] = {"minus_baseline": diff, "won": diff > 0, "forward_ratio": None if ratio == "n/a" else ratio,
                                 "reached": None if ratio == "n/a" else ratio is not None,
                                 "baseline_improved": row.get("baseline_improved")}
        diffs.append(diff)
        if ratio != "n/a" and row.get("baseline_improved") is not False:  # else "reaching" it is free: no signal
            ratios.append(math.inf if ratio is None else ratio)
    median = statistics.median(ratios) if ratios else None
    return {
        "minus_baseline_mean": statistics.fmean(diffs) if diffs else None,
        "tasks_won": sum(d > 0 for d in diffs), "tasks_total": len(diffs),
        "forward_ratio_median": None if median is None or math.isinf(median) else median,
        "forward_ratio_reached": sum(math.isfinite(r) for r in ratios), "forward_ratio_tasks": len(ratios),
        "per_task": per_task,
    }


def aggregate(grid: Grid, *, log: Callable[[str], None] = print) -> tuple[list[Path], dict[str, Any]]:
    """accuracy.json, accuracy.md and figures in ``grid.out`` from the finished runs (a partial grid works)."""
    records, zero_shot, used = [], [], []
    for run in all_runs(grid):
        if not run.done:
            continue
        results = run.results()
        if run.label == ZERO_SHOT:
            zero_shot.append({"task": run.task, "seed": run.seed, "results": results})
            continue
        records.append({"task": run.task, "label": run.label, "mode": run.mode, "lr": run.lr, "seed": run.seed,
                        "results": results})
        used.append({"task": run.task, "method": run.label, "mode": run.mode, "lr": run.lr, "seed": run.seed,
                     "path": str(run.path), "best_dev": results["best_dev"], "test": results["test"],
                     "forward_passes": results["forward_passes"], "wall_time_s": results.get("wall_time_s"),
                     "diverged": bool(results.get("diverged"))})
    method, baseline = grid.compare
    data = summarize(records, zero_shot, tasks=grid.tasks, method=method, baseline=baseline,
                     mode=grid.modes[0] if "full" not in grid.modes else "full",
                     zo_labels=[s.label for s in grid.methods if s.is_zo])
    data["summary"].update(runs_used=len(records), runs_expected=grid.expected_runs(), zero_shot_runs_used=len(zero_shot),
                           runs_diverged=sum(u["diverged"] for u in used))
    out = grid.out
    figures = _figures(grid, data)
    document = {
        "grid": str(grid.path), "profile": grid.profile, "model": grid.model,
        "command": _command(grid), "settings": grid.settings, "summary": data["summary"], "tasks": data["tasks"],
        "figures": [p.name for p in figures], "runs": used,
        "zero_shot_runs": [{"task": z["task"], "seed": z["seed"], "dev": z["results"]["dev"], "test": z["results"]["test"]}
                           for z in zero_shot],
    }
    paths = [write_json(out / "accuracy.json", document), write_text(out / "accuracy.md", _markdown(grid, document)), *figures]
    s = data["summary"]
    log(f"aggregated {len(records)} of {grid.expected_runs()} runs (+{len(zero_shot)} zero-shot) into {out}: "
        f"{_headline(s)}")
    return paths, s


def _command(grid: Grid) -> str:
    profile = "" if grid.profile in ("cpu", "(none)") else f" --profile {grid.profile}"
    out = "" if str(grid.out) == DEFAULT_OUT else f" --out {grid.out}"
    return f"curvzo bench --grid {grid.path}{profile}{out}"


def _fmt(value: float | None, spec: str = "+.2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio_text(median: float | None, tasks: int) -> str:
    """The median forward ratio; "not reached" when the median task never reaches the baseline's final."""
    if median is not None:
        return format(median, ".2f")
    return "not reached" if tasks else "n/a"


def _headline(s: dict[str, Any]) -> str:
    return (f"{s['method']} - {s['baseline']} = {_fmt(s['curvzo_minus_mezo_mean'])} points ({s['mode']}), "
            f"wins {s['tasks_won']}/{s['tasks_total']} tasks; forward passes to {s['baseline']}'s final dev: "
            f"median ratio {_ratio_text(s['forward_ratio_to_mezo_final'], s['forward_ratio_tasks'])} ({s['forward_ratio_reached']}/{s['forward_ratio_tasks']} tasks reach it)")


def _pm(cell: dict[str, Any] | None, seeds: int) -> str:
    if not cell:
        return "–"
    n = len(cell["seeds"])
    spread = f" ± {100 * cell['test_std']:.1f}" if n > 1 else ""
    return f"{100 * cell['test_mean']:.1f}{spread}" + ("" if n == seeds else f" (n={n})")


def _markdown(grid: Grid, doc: dict[str, Any]) -> str:
    s, rows = doc["summary"], doc["tasks"]
    tasks = [r["task"] for r in rows]
    nseeds = len(grid.seeds)
    settings = ", ".join(f"{k} {v}" for k, v in grid.settings.items())
    head = "| method | mode | " + " | ".join(tasks) + " | avg |"
    lines = [
        f"# Accuracy: {grid.model}, profile `{grid.profile}`", "",
        f"Regenerate: `{doc['command']}` (resumable; `--aggregate-only` redraws from finished runs).", "",
        f"Runs used: {s['runs_used']} of {s['runs_expected']} training runs ({s['runs_diverged']} diverged: scored from "
        f"their best weights before the divergence), plus {s['zero_shot_runs_used']} zero-shot evaluations. Test {'accuracy' if all(r['metric'] in (None, 'accuracy') for r in rows) else 'metric'} (%), "
        f"mean ± std (sample) over seeds {list(grid.seeds)} of the learning rate selected on dev "
        f"(n = seeds finished when fewer)." + (f" Settings: {settings}." if settings else ""),
        "", head, "|" + " --- |" * (len(tasks) + 3),
    ]

    def avg(cells: list[dict | None]) -> str:
        return f"{100 * statistics.fmean(c['test_mean'] for c in cells):.1f}" if cells and all(cells) else "–"

    zs = [r["zero_shot"] for r in rows]
    lines.append("| zero-shot | – | " + " | ".join(_pm(z, nseeds) for z in zs) + f" | {avg(zs)} |")
    specs = sorted(grid.methods, key=lambda spec: spec.method in FO_METHODS)  # first-order rows last
    for spec in specs:
        for mode in spec.modes:
            cells = [r["methods"].get(spec.label, {}).get(mode) for r in rows]
            name = f"{spec.label} (first-order)" if spec.method in FO_METHODS else spec.label
            lines.append(f"| {name} | {mode} | " + " | ".join(_pm(c, nseeds) for c in cells) + f" | {avg(cells)} |")
    lines += ["", "Selected learning rates (dev):", "", head.replace(" avg |", ""), "|" + " --- |" * (len(tasks) + 2)]
    for spec in specs:
        for mode in spec.modes:
            cells = [r["methods"].get(spec.label, {}).get(mode) for r in rows]
            lines.append(f"| {spec.label} | {mode} | " + " | ".join(format_lr(c["lr"]) if c else "–" for c in cells) + " |")
    per_task = ", ".join(
        f"{t} {'not reached' if v['reached'] is False else _fmt(v['forward_ratio'], '.2f')}"
        + (f" ({s['baseline']} did not improve on zero-shot)" if v["baseline_improved"] is False else "")
        for t, v in s["per_task"].items())
    lines += [
        "", "## Summary", "",
        f"- **{s['method']} − {s['baseline']}** ({s['mode']}, mean over {s['tasks_total']} tasks): "
        f"{_fmt(s['curvzo_minus_mezo_mean'])} points; {s['method']} wins {s['tasks_won']}/{s['tasks_total']} tasks "
        f"(target: ≥ +{TARGETS['minus_baseline_points']} points and ≥ {TARGETS['tasks_won_fraction']:.0%} of tasks).",
        f"- **Forward passes to reach {s['baseline']}'s final dev accuracy**, {s['method']} / {s['baseline']} "
        f"(seed-averaged dev curves, linear interpolation between evaluations; over the "
        f"{s['forward_ratio_tasks']} tasks where {s['baseline']} improved on zero-shot): median "
        f"{_ratio_text(s['forward_ratio_to_mezo_final'], s['forward_ratio_tasks'])} (target ≤ {TARGETS['forward_ratio']}); per task: {per_task or 'n/a'}.",
    ]
    for label, v in s["methods"].items():
        if label != s["method"]:
            lines.append(f"- {label} − {s['baseline']}: {_fmt(v['minus_baseline_mean'])} points, wins "
                         f"{v['tasks_won']}/{v['tasks_total']}, forward ratio median "
                         f"{_ratio_text(v['forward_ratio_median'], v['forward_ratio_tasks'])}.")
    if doc["figures"]:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in doc["figures"]]
    return "\n".join(lines) + "\n"


# ============================================================================ figures
def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _figures(grid: Grid, data: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, paths = grid.out, []
    summary = data["summary"]
    for row in data["tasks"]:
        if not row["methods"]:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for spec in grid.methods:
            for mode in spec.modes:
                cell = row["methods"].get(spec.label, {}).get(mode)
                if cell and cell["curve"]:
                    xs, ys = zip(*cell["curve"])
                    ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, linestyle="-" if mode == "full" else "--",
                            label=f"{spec.label} {mode} (lr {format_lr(cell['lr'])}, n={len(cell['seeds'])})")
        if row.get("baseline_final_dev") is not None:
            ax.axhline(100 * row["baseline_final_dev"], color="grey", linewidth=0.8, linestyle=":",
                       label=f"{summary['baseline']} final dev")
        ax.set(xlabel="forward passes (examples; first-order: forwards only)", ylabel="dev accuracy (%), seed mean",
               title=f"{row['task']}: dev accuracy vs forward passes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / f"accuracy_{row['task']}.png"))
    paths += _forward_figure(grid, data, plt)
    paths += _heatmap_figures(grid, data)
    return paths


def _forward_figure(grid: Grid, data: dict[str, Any], plt: Any) -> list[Path]:
    rows = [r for r in data["tasks"] if r.get("forward_to_baseline_final")]
    if not rows:
        return []
    summary = data["summary"]
    labels = [s.label for s in grid.methods if s.is_zo and any(s.label in r["forward_to_baseline_final"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 2 + 0.5 * len(rows) * len(labels)), 4))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        for j, row in enumerate(rows):
            x = j + (i - (len(labels) - 1) / 2) * width
            reach = row["forward_to_baseline_final"].get(label, "n/a")
            if reach == "n/a":
                continue
            if reach is None:  # never reached: a hatched bar at the run's budget
                ax.bar(x, row["baseline_forward_passes"], width, color=f"C{i}", alpha=0.25, hatch="//")
                ax.text(x, row["baseline_forward_passes"], "×", ha="center", va="bottom", fontsize=8)
            else:
                ax.bar(x, reach, width, color=f"C{i}")
        ax.bar(0, 0, 0, color=f"C{i}", label=label)
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows])
    ax.set(ylabel="forward passes (examples)",
           title=f"Forward passes to reach {summary['baseline']}'s final dev accuracy (hatched ×: not reached)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, grid.out / "forward_ratio.png")]


def _heatmap_figures(grid: Grid, data: dict[str, Any]) -> list[Path]:
    """CurvZO's budget and block-score heat map of one run (headline method, first task, selected lr, first seed)."""
    from .plots import plot_run

    method = grid.compare[0]
    for row in data["tasks"]:
        cell = row["methods"].get(method, {}).get("full") or next(iter(row["methods"].get(method, {}).values()), None)
        if not cell:
            continue
        mode = next(m for m, c in row["methods"][method].items() if c is cell)
        spec = next(s for s in grid.methods if s.label == method)
        run = _run(grid, row["task"], spec, mode, cell["lr"], cell["seeds"][0])
        if not (run.path / "log.jsonl").exists() or not (run.path / "scores.json").exists():
            continue
        plot_run(run.path)
        paths = []
        for name in ("budget.png", "scores.png"):
            source = run.path / "plots" / name
            if source.exists():
                paths.append(atomic_write(grid.out / f"{method}_{name}", lambda tmp, s=source: shutil.copyfile(s, tmp)))
        data["summary"]["heatmap_run"] = str(run.path)
        return paths
    return []
