"""Accuracy benchmark: a YAML grid of fine-tuning runs, run resumably and aggregated (``curvzo bench``).

    curvzo bench --profile quick                      # < 30 min on 2 CPU cores (sst2, rte; 3 methods)
    curvzo bench --grid benchmarks/grids/cpu.yaml     # the README table (profile cpu, ~4.5 h with --jobs 2)
    curvzo bench --only task=sst2,method=mezo --jobs 2
    curvzo bench --aggregate-only                     # tables and figures from the finished runs
    curvzo bench --dry-run                            # what would run, what is done
    python -m benchmarks.accuracy ...                 # the same command

The package has four parts: :mod:`~curvzo.bench.grid` (the grid file, its profiles and the
runs' configs), :mod:`~curvzo.bench.runs` (run folders, planning, resumable execution),
:mod:`~curvzo.bench.store` (finished runs packed into one ``runs.tar.gz`` per results folder,
with ``pack: true`` in the grid) and :mod:`~curvzo.bench.report` (lr selection on dev,
``accuracy.json``, ``accuracy.md``, figures).
With ``select_seeds`` the grid runs every lr on those seeds only and the selected lr on the
remaining seeds (5 runs instead of 9 for 3 lrs x 3 seeds).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from ..optim._validate import is_int
from .grid import Grid, MethodSpec, format_lr, load_grid, parse_only, run_folder_name, select_lr
from .report import TARGETS, aggregate, forward_to_reach, summarize
from .runs import Report, Run, check_existing, drop_weights, plan, schedule, selected
from .store import ARCHIVE, pack

__all__ = [
    "Grid", "MethodSpec", "Report", "Run", "load_grid", "plan", "run_bench", "aggregate", "summarize",
    "run_folder_name", "format_lr", "parse_only", "forward_to_reach", "select_lr", "pack", "TARGETS",
]


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
    if not is_int(jobs, minimum=1):
        raise ConfigError(f"--jobs must be an integer >= 1, got {jobs!r}")
    only = only or {}
    check_existing(grid)
    report = Report()
    if not aggregate_only:
        runs, waiting = plan(grid)
        chosen = [r for r in runs if selected(r, only)]
        report.skipped = sum(r.done for r in chosen)
        todo = [r for r in chosen if not r.done]
        resumable = sum(r.resumable for r in todo)
        log(f"grid {grid.path} (profile {grid.profile}): {grid.expected_runs()} training runs in all "
            f"(+{len(grid.tasks) * len(grid.seeds) if grid.zero_shot else 0} zero-shot evaluations); "
            f"selected now {len(chosen)}: {report.skipped} finished, {resumable} to resume, "
            f"{len(todo) - resumable} to start; {waiting} wait for an lr selection")
        if dry_run:
            for run in chosen:
                origin = f" (from {run.path.parents[2]})" if run.reused else ""
                log(f"  {'done   ' if run.done else 'resume ' if run.resumable else 'pending'} {run.name}{origin}")
            return report
        for run in chosen:
            if run.done and not grid.keep_weights and not run.reused:
                drop_weights(run.path)
        try:
            schedule(grid, only, jobs, progress, report, log)
        except KeyboardInterrupt:
            raise KeyboardInterrupt("interrupted: finished runs are kept and unfinished ones have their last "
                                    "checkpoint; the same `curvzo bench` command resumes the grid") from None
        _, report.waiting = plan(grid)
        if grid.pack and (packed := pack(grid.out)):
            log(f"packed {len(packed)} finished run(s) into {grid.out / ARCHIVE}")
    report.outputs, report.summary = aggregate(grid, log=log)
    return report
