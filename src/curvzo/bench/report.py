"""Aggregation of a grid's finished runs: ``accuracy.json``, ``accuracy.md`` and figures.

Learning rates are selected on dev: per (task, method, mode) the lr with the best mean dev
accuracy (each run's best dev, the weights its test score comes from) over the seeds that every
lr has, ties to the smaller lr. Differences are in points (100 x metric); the forward ratio
compares seed-averaged dev curves of the selected lrs. A partial grid aggregates what is finished;
a cell whose lr sweep is unfinished shows its best finished lr, which is not yet a selection, so
it stays out of every comparison.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import FO_METHODS, ZO_METHODS
from ..io import atomic_write, write_json, write_text
from .grid import ZERO_SHOT, Grid, format_lr, select_lr
from .runs import Run, all_runs, plan, selection, training_run, zero_shot_run
from .store import RECORDS

__all__ = ["TARGETS", "WIN_TOLERANCE", "aggregate", "forward_to_reach", "majority_baseline", "summarize", "win_tolerance"]

#: The project's targets for CurvZO against MeZO: points gained, share of tasks won, forward passes
#: and wall-clock to reach MeZO's final dev accuracy, and the test points the method's default lr
#: may give up against its dev-selected lr on any task (reported next to the measured numbers).
TARGETS = {"minus_baseline_points": 3.0, "tasks_won_fraction": 0.8, "forward_ratio": 0.4, "wall_ratio": 0.3,
           "default_lr_gap_points": 1.0}

#: The ``benchmarks.step_cost`` measurement that times a harness run of each ZO method (the
#: ``curvzo-sparse`` preset runs with embedding rows as blocks, restricted to the batch's rows);
#: others are timed under their method's name.
STEP_COST_NAME = {"curvzo-sparse": "curvzo-sparse+rows-active"}
#: The measurement of a method run with ``optimizer_options: {newton: true}``: MeZO's Newton step
#: is the ``curvzo`` preset's, bit for bit; other methods' Newton steps are not timed.
NEWTON_STEP_COST_NAME = {"mezo": "curvzo"}

#: A task is won (or lost) only when the test difference exceeds the larger of a floor in points
#: and a multiple of its standard error over seeds, sqrt(sd_a^2 / n_a + sd_b^2 / n_b): a difference
#: within seed noise is a tie, whatever its sign.
WIN_TOLERANCE = {"points": 1.0, "standard_errors": 2.0}

#: Marks a cell whose lr sweep is unfinished: its lr is the best finished one, not a selection.
UNSWEPT = "†"


def win_tolerance(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[float, float]:
    """(standard error of the difference of two cells' test means, the tolerance), in points."""
    se = 100.0 * math.sqrt(ours["test_std"] ** 2 / len(ours["tests"]) + theirs["test_std"] ** 2 / len(theirs["tests"]))
    return se, max(WIN_TOLERANCE["points"], WIN_TOLERANCE["standard_errors"] * se)


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


def _sample_std(values: list[float]) -> float:
    """Sample standard deviation over seeds; 0 for a single seed (shown as n=1, never judged on)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curve(results: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Seed-averaged dev curve, zero-shot at 0 forward passes, over the evaluations all seeds have."""
    curves = [[(0, r["zero_shot"])] + [(e["forward_passes"], e["dev"]) for e in r.get("evals", [])] for r in results]
    length = min(len(c) for c in curves)
    return [(statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][1] for c in curves)) for i in range(length)]


def _cell(records: list[dict[str, Any]], fixed: float | None = None) -> dict[str, Any]:
    """The lr of one (task, method, mode), ``fixed`` once it has run or else the dev selection, and
    its test mean +- std over seeds."""
    by_lr: dict[float, dict[int, dict]] = {}
    for rec in records:
        by_lr.setdefault(rec["lr"], {})[rec["seed"]] = rec["results"]
    common = set.intersection(*(set(seeds) for seeds in by_lr.values()))
    on = {lr: sorted(common) if common else sorted(seeds) for lr, seeds in by_lr.items()}
    dev = {lr: [by_lr[lr][s]["best_dev"] for s in on[lr]] for lr in by_lr}
    selected = select_lr(dev)
    best = fixed if fixed in by_lr else selected
    chosen = [by_lr[best][s] for s in sorted(by_lr[best])]
    tests = [r["test"] for r in chosen]
    curve = mean_curve(chosen)
    return {
        "lr": best, "dev_selected_lr": selected, "fixed": best == fixed,
        "dev_mean": statistics.fmean(dev[best]), "test_mean": statistics.fmean(tests),
        "test_std": _sample_std(tests), "seeds": sorted(by_lr[best]),
        "tests": tests, "forward_passes": curve[-1][0] if curve else None, "curve": [list(p) for p in curve],
        "lr_candidates": [{"lr": lr, "dev_mean": statistics.fmean(dev[lr]), "selection_seeds": on[lr],
                           "test_mean": statistics.fmean(by_lr[lr][s]["test"] for s in on[lr]),
                           "diverged_at": [by_lr[lr][s]["steps"] for s in on[lr] if by_lr[lr][s].get("diverged")]}
                          for lr in sorted(by_lr)],
    }


def summarize(
    records: list[dict[str, Any]],
    zero_shot: list[dict[str, Any]],
    *,
    tasks: Iterable[str],
    method: str = "curvzo-sparse",
    baseline: str = "mezo",
    mode: str = "full",
    zo_labels: Iterable[str] | None = None,
    unfinished_sweeps: Iterable[tuple[str, str, str]] = (),
    step_seconds: dict[str, list[float]] | None = None,
    default_lrs: dict[str, float] | None = None,
    fixed_lrs: dict[tuple[str, str], float] | None = None,
) -> dict[str, Any]:
    """Per-task rows and the summary, from finished runs.

    ``records``: ``{"task", "label", "mode", "lr", "seed", "results"}`` with ``results`` a run's
    results.json; ``zero_shot``: ``{"task", "seed", "results"}``. Differences are in points
    (100 x metric); the forward ratio compares seed-averaged dev curves of the selected lrs.
    ``unfinished_sweeps``: the (task, label, mode) cells whose lr sweep has runs still to finish;
    they are shown (``sweep_finished`` false) but neither compared nor compared against.
    ``step_seconds``: a step's time per label on a quiet machine, one per round of measurements
    taken side by side; the wall-clock ratio to reach the baseline's final dev accuracy is the
    forward ratio times the median over rounds of the two labels' step-time ratio (logged step
    times of runs that shared a machine do not time honestly; a round's load hits both labels).
    ``default_lrs``: the lr each label runs at when none is given; where ``method``'s is in its
    sweep, its test on the selection seeds is set against the dev-selected lr's. ``fixed_lrs``:
    (label, mode) -> the lr its row reports in place of the dev selection (a grid's ``fixed_lr``).
    """
    zo = set(zo_labels) if zo_labels is not None else {r["label"] for r in records if r["results"]["method"] in ZO_METHODS}
    unfinished = set(unfinished_sweeps)
    rows = []
    for task in tasks:
        cells: dict[str, dict[str, dict]] = {}
        grouped: dict[tuple[str, str], list] = {}
        for rec in records:
            if rec["task"] == task:
                grouped.setdefault((rec["label"], rec["mode"]), []).append(rec)
        for (label, m), recs in grouped.items():
            cells.setdefault(label, {})[m] = {**_cell(recs, (fixed_lrs or {}).get((label, m))),
                                              "sweep_finished": (task, label, m) not in unfinished}
        zs = [{**z["results"], "seed": z["seed"]} for z in zero_shot if z["task"] == task]
        metric = next((r["results"]["metric"] for r in records if r["task"] == task), zs[0]["metric"] if zs else None)
        row: dict[str, Any] = {"task": task, "metric": metric, "methods": cells, "zero_shot": None}
        if zs:
            tests = [z["test"] for z in zs]
            row["zero_shot"] = {
                "dev_mean": statistics.fmean(z["dev"] for z in zs), "test_mean": statistics.fmean(tests),
                "test_std": _sample_std(tests), "seeds": sorted(z["seed"] for z in zs),
            }
        base = cells.get(baseline, {}).get(mode)
        if _comparable(base) and base["curve"]:
            row["baseline_final_dev"], row["baseline_forward_passes"] = base["curve"][-1][1], base["curve"][-1][0]
            row["baseline_improved"] = _improved(base)
            row["forward_to_baseline_final"] = {}
            row["forward_ratio_to_baseline_final"] = {}
            for label, by_mode in cells.items():
                if label in zo and _comparable(by_mode.get(mode)) and by_mode[mode]["curve"]:
                    reach, ratio = _forward_reach(by_mode[mode], base)
                    row["forward_to_baseline_final"][label] = reach
                    if row["baseline_improved"]:
                        row["forward_ratio_to_baseline_final"][label] = ratio
        rows.append(row)
    per_method = {}
    for label in dict.fromkeys(r["label"] for r in records):
        versus, in_mode = _counterpart(records, label, baseline, mode)
        if label != versus:
            per_method[label] = {**_versus(rows, label, versus, in_mode, zo, step_seconds), "baseline": versus,
                                 "mode": in_mode}
    head = per_method.get(method) or _versus(rows, method, baseline, mode, zo, step_seconds)
    diff, total, ratio = head["minus_baseline_mean"], head["tasks_total"], head["forward_ratio_median"]
    summary = {
        "method": method, "baseline": baseline, "mode": mode,
        "curvzo_minus_mezo_mean": head["minus_baseline_mean"], "tasks_won": head["tasks_won"],
        "tasks_total": head["tasks_total"], "tasks_lost": head["tasks_lost"], "win_tolerance": WIN_TOLERANCE,
        "forward_ratio_to_mezo_final": head["forward_ratio_median"],
        "forward_ratio_reached": head["forward_ratio_reached"], "forward_ratio_tasks": head["forward_ratio_tasks"],
        "wall_ratio_to_mezo_final": head["wall_ratio_median"], "step_time_ratio": head["step_time_ratio"],
        "per_task": head["per_task"],
        "default_lr": _default_lr(rows, method, mode, (default_lrs or {}).get(method)),
        "methods": per_method, "targets": TARGETS,
        "targets_met": {
            "minus_baseline_points": diff is not None and diff >= TARGETS["minus_baseline_points"],
            "tasks_won_fraction": total > 0 and head["tasks_won"] >= TARGETS["tasks_won_fraction"] * total,
            "forward_ratio": ratio is not None and ratio <= TARGETS["forward_ratio"],
            "wall_ratio": head["wall_ratio_median"] is not None and head["wall_ratio_median"] <= TARGETS["wall_ratio"],
        },
    }
    default = summary["default_lr"]
    summary["targets_met"]["default_lr_gap_points"] = (
        default["max_gap_points"] is not None and len(default["per_task"]) == len(rows)
        and default["max_gap_points"] <= TARGETS["default_lr_gap_points"])
    return {"summary": summary, "tasks": rows}


def _default_lr(rows: list[dict[str, Any]], label: str, mode: str, lr: float | None) -> dict[str, Any]:
    """Per task where ``label``'s sweep is finished and holds its default ``lr``: the dev-selected lr
    and the test points the default gives up against it, both on the selection seeds."""
    per_task = {}
    for row in rows:
        cell = row["methods"].get(label, {}).get(mode)
        if lr is None or not _comparable(cell):
            continue
        test = {c["lr"]: c["test_mean"] for c in cell["lr_candidates"]}
        if lr in test:
            selected = cell["dev_selected_lr"]
            per_task[row["task"]] = {"selected_lr": selected, "gap_points": 100 * (test[selected] - test[lr])}
    gaps = [v["gap_points"] for v in per_task.values()]
    return {"lr": lr, "per_task": per_task, "max_gap_points": max(gaps) if gaps else None}


def _counterpart(records: list[dict[str, Any]], label: str, baseline: str, mode: str) -> tuple[str, str]:
    """What ``label`` is compared against, and in which mode: ``baseline`` in ``mode``, or, for a
    label trained only in another mode (a LoRA column), the label running the baseline's method in
    that mode, so that adapters are compared with adapters."""
    modes = {r["mode"] for r in records if r["label"] == label}
    if mode in modes or len(modes) != 1:
        return baseline, mode
    (other,) = modes
    method = next((r["results"]["method"] for r in records if r["label"] == baseline), baseline)
    twin = next((r["label"] for r in records if r["mode"] == other and r["results"]["method"] == method), None)
    return (baseline, mode) if twin is None else (twin, other)


def _comparable(cell: dict[str, Any] | None) -> bool:
    """Whether a cell holds a dev selection, that is a finished lr sweep, to compare."""
    return bool(cell) and cell["sweep_finished"]


def _improved(cell: dict[str, Any]) -> bool:
    """Whether a cell's seed-averaged dev curve ends above its zero-shot start."""
    return cell["curve"][-1][1] > cell["curve"][0][1]


def _forward_reach(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[float | None, float | None]:
    """Forward passes for ``ours`` to reach ``theirs``' final dev accuracy (None: never), and that
    over the forwards ``theirs`` needs to first reach it itself (meaningful when ``theirs`` improved).

    The denominator is where the baseline first reaches its final accuracy, not its budget: a
    baseline curve that peaks early would otherwise make anyone look faster.
    """
    target = theirs["curve"][-1][1]
    reach = forward_to_reach([tuple(p) for p in ours["curve"]], target)
    own = forward_to_reach([tuple(p) for p in theirs["curve"]], target)
    return reach, None if reach is None or not own else reach / own


def _versus(rows: list[dict], label: str, baseline: str, mode: str, zo: set[str],
            step_seconds: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """``label`` against ``baseline`` in ``mode``, over the tasks where both have results; the
    forward ratio for ZO labels only (a first-order step is not two forwards), and the wall-clock
    ratio where ``step_seconds`` times both labels (see :func:`summarize`)."""
    per_task, diffs, ratios = {}, [], []
    for row in rows:
        ours, theirs = row["methods"].get(label, {}).get(mode), row["methods"].get(baseline, {}).get(mode)
        if not (_comparable(ours) and _comparable(theirs)):
            continue
        diff = 100.0 * (ours["test_mean"] - theirs["test_mean"])
        se, tolerance = win_tolerance(ours, theirs)
        if min(len(ours["tests"]), len(theirs["tests"])) < 2:
            outcome = "one seed"  # no spread to judge the difference against: neither won nor lost
        else:
            outcome = "won" if diff > tolerance else "lost" if diff < -tolerance else "tie"
        improved = _improved(theirs) if theirs["curve"] else None
        ratio = _forward_reach(ours, theirs)[1] if improved and label in zo and ours["curve"] else "n/a"
        per_task[row["task"]] = {"minus_baseline": diff, "standard_error": se, "tolerance": tolerance,
                                 "outcome": outcome, "won": outcome == "won", "forward_ratio": None if ratio == "n/a" else ratio,
                                 "reached": None if ratio == "n/a" else ratio is not None,
                                 "baseline_improved": improved}
        diffs.append(diff)
        if ratio != "n/a":  # a baseline that never improved is "reached" for free: no signal
            ratios.append(math.inf if ratio is None else ratio)
    median = statistics.median(ratios) if ratios else None
    median = None if median is None or math.isinf(median) else median
    seconds = step_seconds or {}
    time_ratio = _time_ratio(seconds[label], seconds[baseline]) if label in seconds and baseline in seconds else None
    return {
        "minus_baseline_mean": statistics.fmean(diffs) if diffs else None,
        "tasks_won": sum(t["won"] for t in per_task.values()),
        "tasks_lost": sum(t["outcome"] == "lost" for t in per_task.values()), "tasks_total": len(diffs),
        "forward_ratio_median": median,
        "step_time_ratio": time_ratio,
        "wall_ratio_median": None if median is None or time_ratio is None else median * time_ratio,
        "forward_ratio_reached": sum(math.isfinite(r) for r in ratios), "forward_ratio_tasks": len(ratios),
        "per_task": per_task,
    }


def _time_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of ours / theirs where both were timed in the same rounds, else the ratio
    of their medians."""
    if len(ours) == len(theirs):
        return statistics.median(a / b for a, b in zip(ours, theirs))
    return statistics.median(ours) / statistics.median(theirs)


def majority_baseline(grid: Grid, task: str) -> dict[str, Any] | None:
    """Dev and test accuracy of always answering the train set's most frequent gold choice, over the
    grid's seeds (each seed draws its own splits): the label-prior floor a trained row should clear.

    None for generation tasks, or when the task's data cannot be read here (an ``--aggregate-only``
    away from the data): the table then shows no floor rather than failing.
    """
    from ..data import load_run_examples
    from ..errors import CurvzoError, CurvzoWarning
    from ..scoring import majority_accuracy
    from ..tasks import get_task

    config = get_task(task)
    scores: dict[str, list[float]] = {"dev": [], "test": []}
    for seed in grid.seeds:
        try:
            with warnings.catch_warnings():  # a short train split's size warning was given by the runs
                warnings.simplefilter("ignore", CurvzoWarning)
                train, dev, test = load_run_examples(config, zero_shot_run(grid, task, seed).config)
        except CurvzoError:
            return None
        for part, examples in (("dev", dev), ("test", test)):
            score = majority_accuracy(train, examples)
            if score is None:
                return None
            scores[part].append(score)
    return {"dev_mean": statistics.fmean(scores["dev"]), "test_mean": statistics.fmean(scores["test"]),
            "test_std": _sample_std(scores["test"]), "seeds": list(grid.seeds), "tests": scores["test"]}


def step_seconds(grid: Grid) -> dict[str, list[float]] | None:
    """Each ZO label's step times in ``grid.step_cost``, one per round: its method's step with the
    label-only closure (a label is timed only as it runs: a Newton step by
    :data:`NEWTON_STEP_COST_NAME`), or None without a file."""
    if grid.step_cost is None or not grid.step_cost.is_file():
        return None
    result = json.loads(grid.step_cost.read_text())
    timings, rounds = result["timings"], result.get("timings_per_round", {})
    seconds = {}
    for spec in grid.methods:
        name = STEP_COST_NAME.get(spec.method, spec.method)
        if spec.settings.get("optimizer_options", {}).get("newton") is True:
            name = NEWTON_STEP_COST_NAME.get(spec.method)
        if spec.is_zo and name in timings:
            seconds[spec.label] = rounds.get(name) or [timings[name]["median"]]
    return seconds


def default_lrs(grid: Grid) -> dict[str, float]:
    """The full-parameter lr each ZO label's runs would use without one (its method's default)."""
    out = {}
    for spec in grid.methods:
        if spec.is_zo and "full" in spec.modes and spec.lr.get("full"):
            run = training_run(grid, spec.tasks[0], spec, "full", spec.lr["full"][0], spec.seeds[0])
            out[spec.label] = replace(run.config, lr=None).resolved_lr()
    return out


def aggregate(grid: Grid, *, log: Callable[[str], None] = print) -> tuple[list[Path], dict[str, Any]]:
    """accuracy.json, accuracy.md and figures in ``grid.out`` from the finished runs (a partial grid works)."""
    # A seed run at an lr that is no longer its cell's selection (the lr grid grew after it ran)
    # stays on disk and in accuracy.json, but no table or count of the grid uses it.
    planned_runs = plan(grid)[0]
    planned = {run.path for run in planned_runs}
    records, zero_shot, used = [], [], []
    for run in all_runs(grid):
        if not run.done:
            continue
        results = run.results()
        if run.label == ZERO_SHOT:
            zero_shot.append({"task": run.task, "seed": run.seed, "results": results})
            continue
        in_plan = run.path in planned
        if in_plan:
            records.append({"task": run.task, "label": run.label, "mode": run.mode, "lr": run.lr, "seed": run.seed,
                            "results": results})
        used.append({"task": run.task, "method": run.label, "mode": run.mode, "lr": run.lr, "seed": run.seed,
                     "path": str(run.path), "best_dev": results["best_dev"], "test": results["test"],
                     "forward_passes": results["forward_passes"], "wall_time_s": results.get("wall_time_s"),
                     "diverged": bool(results.get("diverged")), "in_plan": in_plan})
    method, baseline = grid.compare
    unfinished = [(task, spec.label, mode) for task, spec, mode in grid.cells()
                  if selection(grid, task, spec, mode) is None]
    data = summarize(records, zero_shot, tasks=grid.tasks, method=method, baseline=baseline,
                     mode=grid.modes[0] if "full" not in grid.modes else "full",
                     zo_labels=[s.label for s in grid.methods if s.is_zo], unfinished_sweeps=unfinished,
                     step_seconds=step_seconds(grid), default_lrs=default_lrs(grid),
                     fixed_lrs={(s.label, m): lr for s in grid.methods for m, lr in s.fixed_lr.items()})
    data["summary"].update(runs_used=len(records), runs_expected=grid.expected_runs(), zero_shot_runs_used=len(zero_shot),
                           runs_diverged=sum(u["diverged"] for u in used if u["in_plan"]),
                           runs_off_selection=len(used) - len(records))
    for row in data["tasks"]:
        row["majority"] = majority_baseline(grid, row["task"])
    out = grid.out
    figures = _figures(grid, data)
    document = {
        "grid": str(grid.path), "profile": grid.profile, "model": grid.model,
        "command": _command(grid), "settings": grid.settings, "summary": data["summary"], "tasks": data["tasks"],
        "figures": [p.name for p in figures], "runs": used, "newton_step_lrs": newton_step_lrs(planned_runs),
        "zero_shot_runs": [{"task": z["task"], "seed": z["seed"], "dev": z["results"]["dev"], "test": z["results"]["test"]}
                           for z in zero_shot],
    }
    paths = [write_json(out / "accuracy.json", document), write_text(out / "accuracy.md", _markdown(grid, document)), *figures]
    s = data["summary"]
    log(f"aggregated {len(records)} of {grid.expected_runs()} runs (+{len(zero_shot)} zero-shot) into {out}: "
        f"{_headline(s)}")
    return paths, s


def newton_step_lrs(planned: Iterable[Run]) -> list[dict[str, Any]]:
    """Where the Newton step's curvature put each finished Newton run of the grid's plan: the lr of the
    plain ZO update that each of its steps equals (fraction / curvature along z), as the median and
    the 10th and 90th percentiles over the run's steps. Set beside the baseline's swept lrs, it
    shows what the fraction replaces."""
    rows = []
    for run in planned:
        if run.label == ZERO_SHOT or not run.config.newton or not run.done or (log := run.record("log.jsonl")) is None:
            continue
        entries = (json.loads(line) for line in log.decode().splitlines() if line.strip())
        lrs = [e["step_lr"] for e in entries if "step_lr" in e and not e.get("skipped")]
        if len(lrs) < 2:
            continue
        deciles = statistics.quantiles(lrs, n=10)
        rows.append({"task": run.task, "method": run.label, "mode": run.mode, "lr": run.lr, "seed": run.seed,
                     "step_lr_median": statistics.median(lrs), "step_lr_p10": deciles[0], "step_lr_p90": deciles[-1]})
    return rows


def _command(grid: Grid) -> str:
    profile = "" if grid.profile in ("cpu", "(none)") else f" --profile {grid.profile}"
    out = "" if grid.out == grid.base_out else f" --out {grid.out}"
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


def _outcomes(per_task: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{t} {v['minus_baseline']:+.2f} ± {v['standard_error']:.2f} (tol. {v['tolerance']:.2f}, {v['outcome']})"
                     for t, v in per_task.items())


def _pm(cell: dict[str, Any] | None, seeds: int) -> str:
    if not cell:
        return "–"
    n = len(cell["seeds"])
    spread = f" ± {100 * cell['test_std']:.1f}" if n > 1 else ""
    mark = "" if cell.get("sweep_finished", True) else UNSWEPT
    return f"{100 * cell['test_mean']:.1f}{spread}" + ("" if n == seeds else f" (n={n})") + mark


def _lr_text(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "–"
    return format_lr(cell["lr"]) + (" (fixed)" if cell["fixed"] else "") + ("" if cell["sweep_finished"] else UNSWEPT)


def _off_selection_text(count: int) -> str:
    if not count:
        return ""
    return f"; not counted: {count} finished seed run{'' if count == 1 else 's'} at an lr that is no longer the dev selection"


def _markdown(grid: Grid, doc: dict[str, Any]) -> str:
    s, rows = doc["summary"], doc["tasks"]
    tasks = [r["task"] for r in rows]
    nseeds = len(grid.seeds)
    settings = ", ".join(f"{k} {v}" for k, v in grid.settings.items())
    own = "; ".join(f"{spec.label} on seeds {list(spec.seeds)}" for spec in grid.methods if spec.seeds != grid.seeds)
    head = "| method | mode | " + " | ".join(tasks) + " | avg |"
    lines = [
        f"# Accuracy: {grid.model}, profile `{grid.profile}`", "",
        f"Regenerate: `{doc['command']}` (resumable; `--aggregate-only` redraws from finished runs).", "",
        f"Runs used: {s['runs_used']} of {s['runs_expected']} training runs ({s['runs_diverged']} diverged: scored from "
        f"their best weights before the divergence), plus {s['zero_shot_runs_used']} zero-shot evaluations"
        f"{_off_selection_text(s['runs_off_selection'])}. Test {'accuracy' if all(r['metric'] in (None, 'accuracy') for r in rows) else 'metric'} (%), "
        f"mean ± std (sample) over seeds {list(grid.seeds)} of the learning rate selected on dev "
        f"(n = seeds finished when fewer)." + (f" Run on fewer seeds (the method's `seeds`): {own}." if own else "")
        + (f" Settings: {settings}." if settings else ""),
        "", head, "|" + " --- |" * (len(tasks) + 3),
    ]

    def avg(cells: list[dict | None]) -> str:
        complete = cells and all(c and c.get("sweep_finished", True) for c in cells)
        return f"{100 * statistics.fmean(c['test_mean'] for c in cells):.1f}" if complete else "–"

    zs = [r["zero_shot"] for r in rows]
    if any(zs):  # a profile without zero-shot evaluations points to the table that has them
        lines.append("| zero-shot | – | " + " | ".join(_pm(z, nseeds) for z in zs) + f" | {avg(zs)} |")
    floors = [r.get("majority") for r in rows]
    if any(floors):
        lines.append("| majority label | – | " + " | ".join(_pm(f, nseeds) for f in floors) + f" | {avg(floors)} |")
    specs = sorted(grid.methods, key=lambda spec: spec.method in FO_METHODS)  # first-order rows last
    for spec in specs:
        for mode in spec.modes:
            cells = [r["methods"].get(spec.label, {}).get(mode) for r in rows]
            name = f"{spec.label} (first-order)" if spec.method in FO_METHODS else spec.label
            lines.append(f"| {name} | {mode} | " + " | ".join(_pm(c, nseeds) for c in cells) + f" | {avg(cells)} |")
    if any(floors):
        lines += ["", "Majority label: always the train sample's most frequent gold answer, scored on each seed's "
                      "test draw; a row near it has learned the label prior rather than the task."]
    lines += ["", "Selected learning rates (dev):", "", head.replace(" avg |", ""), "|" + " --- |" * (len(tasks) + 2)]
    for spec in specs:
        for mode in spec.modes:
            cells = [r["methods"].get(spec.label, {}).get(mode) for r in rows]
            lines.append(f"| {spec.label} | {mode} | " + " | ".join(_lr_text(c) for c in cells) + " |")
    if any(not c["sweep_finished"] for r in rows for by_mode in r["methods"].values() for c in by_mode.values()):
        lines += ["", f"{UNSWEPT} lr sweep unfinished on the selection seeds: the best finished lr, not yet a dev "
                      "selection; left out of the averages and of every comparison below."]
    if any(c["fixed"] for r in rows for by_mode in r["methods"].values() for c in by_mode.values()):
        lines += ["", "(fixed): the method's own lr (the grid's `fixed_lr`), run on every seed and reported whatever "
                      "the dev selection; its sweep measures only how far a selection would move it."]
    lines += _sweep_table(grid, rows)
    lines += _newton_lr_table(grid, doc)
    per_task = ", ".join(
        f"{t} {'not reached' if v['reached'] is False else _fmt(v['forward_ratio'], '.2f')}"
        + (f" ({s['baseline']} did not improve on zero-shot)" if v["baseline_improved"] is False else "")
        for t, v in s["per_task"].items())
    lines += [
        "", "## Summary", "",
        f"- **{s['method']} − {s['baseline']}** ({s['mode']}, mean over {s['tasks_total']} tasks): "
        f"{_fmt(s['curvzo_minus_mezo_mean'])} points; {s['method']} wins {s['tasks_won']}/{s['tasks_total']} tasks "
        f"and loses {s['tasks_lost']} beyond the tolerance (target: ≥ +{TARGETS['minus_baseline_points']} points and "
        f"≥ {TARGETS['tasks_won_fraction']:.0%} of tasks won). A task counts only when both have two or more seeds and the difference exceeds "
        f"max({WIN_TOLERANCE['points']:g} point, {WIN_TOLERANCE['standard_errors']:g} standard errors over seeds); "
        f"per task (difference ± standard error, tolerance, outcome): {_outcomes(s['per_task']) or 'n/a'}.",
        f"- **Forward passes to reach {s['baseline']}'s final dev accuracy**, {s['method']} / {s['baseline']} "
        f"(seed-averaged dev curves, linear interpolation between evaluations; over the "
        f"{s['forward_ratio_tasks']} tasks where {s['baseline']} improved on zero-shot): median "
        f"{_ratio_text(s['forward_ratio_to_mezo_final'], s['forward_ratio_tasks'])} (target ≤ {TARGETS['forward_ratio']}); per task: {per_task or 'n/a'}.",
        f"- **Wall-clock to reach it**, {s['method']} / {s['baseline']}: "
        + (f"median {_fmt(s['wall_ratio_to_mezo_final'], '.2f')} (target ≤ {TARGETS['wall_ratio']}): the forward ratio times "
           f"the step-time ratio {_fmt(s['step_time_ratio'], '.2f')} (median over rounds) measured side by side on a quiet machine by "
           f"`benchmarks.step_cost` ({grid.step_cost}), not the runs' logged times (they shared the machine)."
           if s["step_time_ratio"] is not None else "n/a (`benchmarks.step_cost` has not timed both methods' steps on a quiet machine for this profile)."),
        _default_lr_text(s),
    ]
    for label, v in s["methods"].items():
        if label == s["method"]:
            continue
        versus = v["baseline"] + ("" if v["mode"] == s["mode"] else f" ({v['mode']})")
        if not v["tasks_total"]:
            lines.append(f"- {label} − {versus}: no task to compare yet.")
        else:
            lines.append(f"- {label} − {versus}: {_fmt(v['minus_baseline_mean'])} points, wins "
                         f"{v['tasks_won']}/{v['tasks_total']} ({_outcomes(v['per_task'])}), forward ratio median "
                         f"{_ratio_text(v['forward_ratio_median'], v['forward_ratio_tasks'])}.")
    if doc["figures"]:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in doc["figures"]]
    return "\n".join(lines) + "\n"


def _default_lr_text(s: dict[str, Any]) -> str:
    d = s["default_lr"]
    head = f"- **Default lr against the dev-selected one**, {s['method']}"
    if d["lr"] is None or not d["per_task"]:
        return head + ": n/a (its default lr is not in a finished sweep)."
    per_task = ", ".join(f"{t} {_fmt(round(v['gap_points'], 2) + 0.0)} (selected {format_lr(v['selected_lr'])})"
                         for t, v in d["per_task"].items())
    return (head + f" at lr {format_lr(d['lr'])}: test points the default gives up on the selection seeds, per task: "
            f"{per_task}; largest {_fmt(d['max_gap_points'])} (target ≤ {TARGETS['default_lr_gap_points']:g} on every task).")


def _sweep_table(grid: Grid, rows: list[dict[str, Any]]) -> list[str]:
    """Every lr of the grid, its dev score on the selection seeds and where it diverged: why each lr was selected."""
    lrs = sorted({lr for spec in grid.methods for mode in spec.modes for lr in spec.lr[mode]})
    by_task = {row["task"]: row for row in rows}
    lines = ["", "Learning-rate sweep: best dev score on the selection seeds at each lr of the grid (the selection "
                 "in bold; div. N: diverged at step N, scored from its best weights before; –: not finished yet):",
             "", "| task | method | mode | " + " | ".join(format_lr(lr) for lr in lrs) + " |",
             "|" + " --- |" * (len(lrs) + 3)]
    for task, spec, mode in grid.cells():
        cell = by_task[task]["methods"].get(spec.label, {}).get(mode)
        tried = {c["lr"]: c for c in cell["lr_candidates"]} if cell else {}
        selected = cell["lr"] if _comparable(cell) else None
        texts = [_sweep_text(tried.get(lr), lr == selected) if lr in spec.lr[mode] else "" for lr in lrs]
        lines.append(f"| {task} | {spec.label} | {mode} | " + " | ".join(texts) + " |")
    return lines


def _newton_lr_table(grid: Grid, doc: dict[str, Any]) -> list[str]:
    """The Newton runs' step lrs on their selection seeds, per fraction, beside the baseline's selected lr."""
    runs = doc["newton_step_lrs"]
    if not runs:
        return []
    baseline = grid.compare[1]
    by_task = {row["task"]: row for row in doc["tasks"]}
    cells = sorted({(r["task"], r["method"], r["mode"]) for r in runs}, key=lambda c: grid.tasks.index(c[0]))
    fractions = sorted({r["lr"] for r in runs})
    lines = ["", f"Newton step's lr: the {baseline} lr that each update equals (fraction / curvature along z), median over "
                 "the run's steps (10th-90th percentile), on the selection seeds, beside the lr that "
                 f"{baseline}'s sweep selected:",
             "", "| task | method | mode | " + " | ".join(format_lr(f) for f in fractions) + f" | {baseline} (selected) |",
             "|" + " --- |" * (len(fractions) + 4)]
    for task, label, mode in cells:
        spec = next(s for s in grid.methods if s.label == label)
        seeds = grid.selection_seeds(spec, spec.lr[mode])
        texts = []
        for fraction in fractions:
            on = [r for r in runs if (r["task"], r["method"], r["mode"], r["lr"]) == (task, label, mode, fraction)
                  and r["seed"] in seeds]
            texts.append("; ".join(f"{_two_digits(r['step_lr_median'])} ({_two_digits(r['step_lr_p10'])}-"
                                   f"{_two_digits(r['step_lr_p90'])})" for r in sorted(on, key=lambda r: r["seed"])) or "–")
        cell = by_task[task]["methods"].get(baseline, {}).get(mode)
        lines.append(f"| {task} | {label} | {mode} | " + " | ".join(texts)
                     + f" | {format_lr(cell['lr']) if _comparable(cell) else '–'} |")
    return lines


def _two_digits(lr: float) -> str:
    return format_lr(float(f"{lr:.1e}"))


def _sweep_text(candidate: dict[str, Any] | None, selected: bool) -> str:
    if candidate is None:
        return "–"
    text = f"{candidate['dev_mean']:.2f}" + "".join(f" (div. {step})" for step in candidate["diverged_at"])
    return f"**{text}**" if selected else text


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
                            label=f"{spec.label} {mode} (lr {_lr_text(cell)}, n={len(cell['seeds'])})")
        if row.get("majority"):
            ax.axhline(100 * row["majority"]["dev_mean"], color="black", linewidth=0.8, linestyle="--",
                       label="majority label (dev)")
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
    from ..plots import plot_run

    method = grid.compare[0]
    for row in data["tasks"]:
        cell = row["methods"].get(method, {}).get("full") or next(iter(row["methods"].get(method, {}).values()), None)
        if not cell:
            continue
        mode = next(m for m, c in row["methods"][method].items() if c is cell)
        spec = next(s for s in grid.methods if s.label == method)
        run = training_run(grid, row["task"], spec, mode, cell["lr"], cell["seeds"][0])
        records = {name: run.record(name) for name in RECORDS}
        if records["log.jsonl"] is None or records["scores.json"] is None:
            continue
        paths = []
        with tempfile.TemporaryDirectory() as tmp:  # the run's records, from its folder or the archive
            copy = Path(tmp) / run.path.name
            copy.mkdir()
            for name, content in records.items():
                if content is not None:
                    (copy / name).write_bytes(content)
            plot_run(copy)
            for name in ("budget.png", "scores.png"):
                source = copy / "plots" / name
                if source.exists():
                    paths.append(atomic_write(grid.out / f"{method}_{name}", lambda out, s=source: shutil.copyfile(s, out)))
        data["summary"]["heatmap_run"] = str(run.path)
        return paths
    return []
