"""``curvzo bench``: grid validation, run folders, resumability and the aggregation arithmetic."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml

from curvzo.bench import forward_to_reach, format_lr, load_grid, parse_only, plan, run_bench, run_folder_name, summarize
from curvzo.bench.runs import training_run
from curvzo.bench.report import default_lrs, step_seconds
from curvzo.cli import main
from curvzo.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "benchmarks" / "grids" / "cpu.yaml"


def write_grid(tmp_path: Path, **values) -> Path:
    base = {"model": "unused", "data_dir": None, "out": str(tmp_path / "out"), "tasks": ["sst2"], "seeds": [0],
            "methods": {"mezo": {"lr": {"full": [1e-3]}}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**base, **values}, sort_keys=False))
    return path


# ---------------------------------------------------------------------- the grid file
@pytest.mark.parametrize(("profile", "runs", "tasks"), [("quick", 6, 2), ("cpu", 72, 4), ("paper", None, 11),
                                                       ("long", 112, 4), ("paper-1b", 64, 4)])
def test_shipped_grid_profiles_are_valid(profile, runs, tasks):
    grid = load_grid(SHIPPED, profile)
    assert len(grid.tasks) == tasks and {"mezo", "curvzo-sparse", "curvzo-ref"} <= {s.label for s in grid.methods}
    if runs is not None:
        assert grid.expected_runs() == runs
    assert load_grid(SHIPPED).profile == "cpu"  # the grid's default profile


def test_quick_profile_picks_and_merges_methods():
    grid = load_grid(SHIPPED, "quick")
    assert [s.label for s in grid.methods] == ["mezo", "curvzo-ref", "curvzo-sparse"]
    assert all(s.lr == {"full": (1e-5,)} and s.eps["full"] == 1e-3 for s in grid.methods)
    assert grid.settings["steps"] == 60 and grid.out == Path("benchmarks/results/quick")


BAD_GRIDS = [
    ({"colour": "red"}, r"unknown key\(s\) colour"),
    ({"tasks": ["sst2", "sst5"]}, r"`tasks`: .*sst5"),
    ({"modes": ["full", "qlora"]}, r"`modes` must be among"),
    ({"seeds": [0, 0]}, r"`seeds` repeats"),
    ({"select_seeds": [3]}, r"`select_seeds` \[3\] must be a subset"),
    ({"methods": {"sgdx": {"lr": {"full": [1e-3]}}}}, r"method must be one of"),
    ({"methods": {"mezo": {"lr": {"lora": [1e-3]}}}}, r"methods.mezo.lr` has no learning rates for mode 'full'"),
    ({"methods": {"mezo": {"lr": {"full": [0, "x"]}}}}, r"methods.mezo.lr.full` must hold positive numbers"),
    ({"methods": {"mezo": {"lr": {"full": [1e-3]}, "set": {"seed": 3}}}}, r"key\(s\) seed cannot be set per method"),
    ({"methods": {"mezo": {"lr": {"full": [1e-3]}, "colour": 1}}}, r"methods.mezo`: unknown key\(s\) colour"),
    ({"methods": {"mezo": {"lr": {"full": [1e-3]}, "seeds": [5]}}}, r"`methods.mezo.seeds` \[5\] must be a subset"),
    ({"steps": 0}, r"methods.mezo \(full\): `steps` must be an integer >= 1"),
    ({"methods": {}}, r"`methods` must be a non-empty mapping"),
    ({"out": None}, r"no results folder: set `out` in the grid or pass one"),
    ({"reuse": ["no/such/folder"]}, r"`reuse` folder\(s\) not found: no/such/folder"),
]


@pytest.mark.parametrize(("change", "message"), BAD_GRIDS, ids=[m for _, m in BAD_GRIDS])
def test_invalid_grid_raises_one_config_error(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_grid(write_grid(tmp_path, **change))


def test_the_library_has_no_repository_paths_as_defaults(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"tasks": ["sst2"], "methods": {"mezo": {"lr": {"full": [1e-3]}}}}))
    grid = load_grid(path, out=tmp_path / "results")
    assert grid.out == tmp_path / "results" and grid.data_dir is None and grid.model == "smollm2-135m"
    assert load_grid(SHIPPED).out == Path("benchmarks/results")  # the repository's folder comes from its grid


def test_all_problems_are_reported_at_once(tmp_path):
    path = write_grid(tmp_path, colour=1, modes=["qlora"], seeds=[0, 0])
    with pytest.raises(ConfigError) as info:
        load_grid(path)
    assert all(s in str(info.value) for s in ("colour", "qlora", "repeats"))


def test_a_profile_undoes_a_method_subset_with_null(tmp_path):
    base = {"mezo": {"lr": {"full": [1e-3]}, "tasks": ["sst2"]}}
    path = write_grid(tmp_path, tasks=["sst2", "mr"], methods=base,
                      profiles={"all": {"methods": {"mezo": {"tasks": None}}}})
    assert load_grid(path).methods[0].tasks == ("sst2",)
    assert load_grid(path, "all").methods[0].tasks == ("sst2", "mr")


def test_profile_errors(tmp_path):
    path = write_grid(tmp_path, profiles={"fast": {"steps": 2, "colour": 1}})
    with pytest.raises(ConfigError, match=r"unknown profile 'slow' \(grid defines: fast\)"):
        load_grid(path, "slow")
    with pytest.raises(ConfigError, match=r"profile 'fast': unknown key\(s\) colour"):
        load_grid(path, "fast")


def test_missing_grid_file_is_one_line_exit_2(tmp_path, capsys):
    assert main(["bench", "--grid", str(tmp_path / "nope.yaml")]) == 2
    assert "grid file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------- runs and folders
@pytest.mark.parametrize(("lr", "text"), [(1e-5, "1e-5"), (2.5e-4, "2.5e-4"), (0.001, "1e-3"), (1.0, "1e0"), (3e-7, "3e-7")])
def test_format_lr(lr, text):
    assert format_lr(lr) == text


def test_run_folder_names(tmp_path):
    assert run_folder_name("curvzo-sparse", "full", 1e-5, 2) == "curvzo-sparse-full-lr1e-5-s2"
    assert run_folder_name("zero-shot", "full", None, 0) == "zero-shot-s0"
    grid = load_grid(write_grid(tmp_path, seeds=[0, 1], methods={"mezo": {"lr": {"full": [1e-5, 1e-4]}}}))
    runs, waiting = plan(grid)
    assert waiting == 0 and [r.path.relative_to(grid.out).as_posix() for r in runs] == [
        "runs/sst2/zero-shot-s0", "runs/sst2/zero-shot-s1",
        "runs/sst2/mezo-full-lr1e-5-s0", "runs/sst2/mezo-full-lr1e-5-s1",
        "runs/sst2/mezo-full-lr1e-4-s0", "runs/sst2/mezo-full-lr1e-4-s1",
    ]
    assert runs[2].config.lr == 1e-5 and runs[2].config.seed == 0 and runs[2].config.output_dir == str(runs[2].path)


def fake_results(path: Path, *, best_dev: float, test: float, evals=(), zero_shot: float = 0.5, method: str = "mezo",
                 diverged_at: int | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    evals = [{"step": i + 1, "forward_passes": fp, "dev": dev} for i, (fp, dev) in enumerate(evals)]
    (path / "results.json").write_text(json.dumps({
        "task": "sst2", "method": method, "metric": "accuracy", "zero_shot": zero_shot, "best_dev": best_dev,
        "test": test, "forward_passes": evals[-1]["forward_passes"] if evals else 0, "evals": evals,
        "steps": diverged_at or 10, "diverged": diverged_at and f"training diverged at step {diverged_at}"}))


def test_select_seeds_runs_every_lr_on_seed_0_then_the_dev_selected_lr(tmp_path):
    grid = load_grid(write_grid(tmp_path, seeds=[0, 1, 2], select_seeds=[0],
                                methods={"mezo": {"lr": {"full": [1e-5, 1e-4, 1e-3]}}}, zero_shot=False))
    runs, waiting = plan(grid)
    assert [(r.lr, r.seed) for r in runs] == [(1e-5, 0), (1e-4, 0), (1e-3, 0)] and waiting == 2
    assert grid.expected_runs() == 5
    for run, dev in zip(runs, (0.6, 0.7, 0.7)):  # tie between 1e-4 and 1e-3: the smaller lr
        fake_results(run.path, best_dev=dev, test=dev)
    runs, waiting = plan(grid)
    assert [(r.lr, r.seed) for r in runs[3:]] == [(1e-4, 1), (1e-4, 2)] and waiting == 0


def test_a_method_with_its_own_seeds_runs_its_sweep_and_selection_on_those_only(tmp_path):
    grid = load_grid(write_grid(tmp_path, seeds=[0, 1, 2], select_seeds=[1], zero_shot=False, methods={
        "mezo": {"lr": {"full": [1e-5, 1e-4]}}, "adamw": {"lr": {"full": [1e-5, 1e-4]}, "seeds": [0, 2]}}))
    assert grid.expected_runs() == (2 + 2) + (2 * 2)  # adamw: no selection seed of its own, so both sweep
    adamw = [r for r in plan(grid)[0] if r.label == "adamw"]
    assert [(r.lr, r.seed) for r in adamw] == [(1e-5, 0), (1e-5, 2), (1e-4, 0), (1e-4, 2)]
    for run in adamw:
        fake_results(run.path, best_dev=0.9, test=0.9, evals=[(100, 0.9)])
    assert [r for r in plan(grid)[0] if r.label == "adamw"] == adamw and plan(grid)[1] == 2  # mezo's seeds wait
    run_bench(grid, aggregate_only=True, log=lambda line: None)
    assert "Run on fewer seeds (the method's `seeds`): adamw on seeds [0, 2]." in (grid.out / "accuracy.md").read_text()


def test_a_fixed_lr_runs_the_other_seeds_and_is_reported_whatever_the_dev_selection(tmp_path):
    grid = load_grid(write_grid(tmp_path, seeds=[0, 1, 2], select_seeds=[0], zero_shot=False, methods={
        "mezo": {"lr": {"full": [1e-5]}}, "newton": {"method": "mezo", "lr": {"full": [0.05, 0.1, 0.2]}, "fixed_lr": {"full": 0.1}}}))
    sweep = [r for r in plan(grid)[0] if r.label == "newton"]
    assert [(r.lr, r.seed) for r in sweep] == [(0.05, 0), (0.1, 0), (0.2, 0)]
    for run, dev in zip(sweep, (0.8, 0.6, 0.7)):  # the dev selection would be 0.05
        fake_results(run.path, best_dev=dev, test=dev, evals=[(100, dev)])
    assert [(r.lr, r.seed) for r in plan(grid)[0] if r.label == "newton"][3:] == [(0.1, 1), (0.1, 2)]
    for seed in (1, 2):
        fake_results(training_run(grid, "sst2", grid.methods[1], "full", 0.1, seed).path, best_dev=0.6, test=0.62,
                     evals=[(100, 0.6)])
    run_bench(grid, aggregate_only=True, log=lambda line: None)
    doc = json.loads((grid.out / "accuracy.json").read_text())
    cell = doc["tasks"][0]["methods"]["newton"]["full"]
    assert (cell["lr"], cell["dev_selected_lr"], cell["fixed"], cell["seeds"]) == (0.1, 0.05, True, [0, 1, 2])
    assert cell["test_mean"] == pytest.approx((0.6 + 0.62 + 0.62) / 3)
    assert "| newton | full | 1e-1 (fixed) |" in (grid.out / "accuracy.md").read_text()


@pytest.mark.parametrize(("fixed", "message"), [({"full": 0.3}, r"0\.3 is not one of the mode's learning rates"),
                                                ({"lora": 0.1}, r"fixed_lr\.lora`: 0\.1 is not one"),
                                                (0.1, r"must map a mode"), ({"full": -1}, r"positive numbers")])
def test_a_fixed_lr_must_be_one_of_its_modes_learning_rates(tmp_path, fixed, message):
    path = write_grid(tmp_path, methods={"mezo": {"lr": {"full": [0.05, 0.1]}, "fixed_lr": fixed}})
    with pytest.raises(ConfigError, match=message):
        load_grid(path)


def test_parse_only(tmp_path):
    grid = load_grid(write_grid(tmp_path, tasks=["sst2", "rte"]))
    assert parse_only("task=sst2,method=mezo,method=zero-shot,seed=0,lr=1e-3", grid) == {
        "task": {"sst2"}, "method": {"mezo", "zero-shot"}, "seed": {0}, "lr": {1e-3}}
    with pytest.raises(ConfigError, match=r"'task=sst5': not in the grid.*'colour=1' is not KEY=VALUE"):
        parse_only("task=sst5,colour=1", grid)


def test_runs_of_another_config_are_refused(tmp_path):
    grid = load_grid(write_grid(tmp_path, steps=10))
    run = plan(grid)[0][1]
    run.path.mkdir(parents=True)
    other = {**run.config.to_dict(), "steps": 60}
    (run.path / "config.yaml").write_text(yaml.safe_dump(other))
    fake_results(run.path, best_dev=0.5, test=0.5)
    with pytest.raises(ConfigError, match=r"another config.*steps: 60 there, 10 in the grid"):
        run_bench(grid, log=lambda line: None)


# ---------------------------------------------------------------------- aggregation arithmetic
def test_forward_to_reach_interpolates_between_evaluations():
    curve = [(0, 0.5), (100, 0.6), (200, 0.8)]
    assert forward_to_reach(curve, 0.7) == pytest.approx(150.0)
    assert forward_to_reach(curve, 0.6) == 100.0
    assert forward_to_reach(curve, 0.4) == 0.0
    assert forward_to_reach(curve, 0.81) is None


def rec(task, label, lr, seed, best_dev, test, curve, method=None):
    zero, *evals = curve
    return {"task": task, "label": label, "mode": "full", "lr": lr, "seed": seed, "results": {
        "method": method or ("adamw" if label == "adamw" else "mezo"), "metric": "accuracy", "zero_shot": zero[1],
        "best_dev": best_dev, "test": test, "evals": [{"forward_passes": fp, "dev": d} for fp, d in evals]}}


def test_summary_arithmetic():
    flat = [(0, 0.5), (100, 0.5), (200, 0.5)]
    records = [
        # sst2: mezo lr 1e-5 wins dev on average (0.70 vs 0.65); its curve ends at 0.7 after 200 passes
        rec("sst2", "mezo", 1e-5, 0, 0.72, 0.70, [(0, 0.5), (100, 0.6), (200, 0.7)]),
        rec("sst2", "mezo", 1e-5, 1, 0.68, 0.74, [(0, 0.5), (100, 0.6), (200, 0.7)]),
        rec("sst2", "mezo", 1e-4, 0, 0.80, 0.90, flat),
        rec("sst2", "mezo", 1e-4, 1, 0.50, 0.90, flat),
        # curvzo seeds average to (0.5, 0.8, 0.8): 0.7 reached at 50 + ... = 66.67 passes -> ratio 1/3
        rec("sst2", "curvzo-sparse", 1e-5, 0, 0.80, 0.80, [(0, 0.5), (100, 0.9), (200, 0.8)]),
        rec("sst2", "curvzo-sparse", 1e-5, 1, 0.80, 0.76, [(0, 0.5), (100, 0.7), (200, 0.8)]),
        # rte (one seed: neither won nor lost): curvzo is behind and never reaches mezo's final dev
        rec("rte", "mezo", 1e-5, 0, 0.6, 0.60, [(0, 0.5), (100, 0.55), (200, 0.6)]),
        rec("rte", "curvzo-sparse", 1e-5, 0, 0.55, 0.56, [(0, 0.5), (100, 0.55), (200, 0.55)]),
        rec("rte", "adamw", 1e-4, 0, 0.9, 0.88, [(0, 0.5), (100, 0.9)]),
    ]
    zero = [{"task": "sst2", "seed": s, "results": {"dev": 0.5, "test": t, "metric": "accuracy"}} for s, t in ((0, 0.5), (1, 0.6))]
    data = summarize(records, zero, tasks=["sst2", "rte"], zo_labels=["mezo", "curvzo-sparse"])
    sst2, rte = data["tasks"]
    mezo = sst2["methods"]["mezo"]["full"]
    assert mezo["lr"] == 1e-5 and mezo["dev_mean"] == pytest.approx(0.70)
    assert mezo["test_mean"] == pytest.approx(0.72) and mezo["test_std"] == pytest.approx(math.sqrt(2 * 0.02**2))
    assert sst2["zero_shot"]["test_mean"] == pytest.approx(0.55)
    assert sst2["forward_ratio_to_baseline_final"]["curvzo-sparse"] == pytest.approx((200 / 3) / 200)
    assert sst2["forward_ratio_to_baseline_final"]["mezo"] == pytest.approx(1.0)
    assert rte["forward_ratio_to_baseline_final"]["curvzo-sparse"] is None and "adamw" not in rte["forward_ratio_to_baseline_final"]
    s = data["summary"]
    assert s["curvzo_minus_mezo_mean"] == pytest.approx((100 * (0.78 - 0.72) + 100 * (0.56 - 0.60)) / 2)
    assert (s["tasks_won"], s["tasks_total"]) == (1, 2)
    assert s["forward_ratio_to_mezo_final"] is None and s["forward_ratio_reached"] == 1  # median of (1/3, inf)
    assert s["forward_ratio_tasks"] == 2
    assert s["per_task"]["rte"] == {"minus_baseline": pytest.approx(-4.0), "standard_error": 0.0, "tolerance": 1.0,
                                   "outcome": "one seed", "won": False, "forward_ratio": None, "reached": False,
                                   "baseline_improved": True}
    # sst2: +6 points against a standard error of sqrt(2 x 0.0283^2 / 2) = 2.83 points: beyond 2 of them
    assert s["per_task"]["sst2"]["standard_error"] == pytest.approx(100 * 0.02 * 2 ** 0.5)
    assert s["per_task"]["sst2"]["outcome"] == "won" and s["tasks_lost"] == 0
    assert s["methods"]["adamw"]["tasks_total"] == 1 and s["methods"]["adamw"]["minus_baseline_mean"] == pytest.approx(28.0)
    assert s["targets_met"] == {"minus_baseline_points": False, "tasks_won_fraction": False, "forward_ratio": False,
                                "wall_ratio": False, "default_lr_gap_points": False}
    assert s["default_lr"] == {"lr": None, "per_task": {}, "max_gap_points": None}


def test_the_default_lr_is_judged_against_the_dev_selected_lr_on_the_selection_seeds(tmp_path):
    curve = [(0, 0.5), (100, 0.6)]
    records = [rec(t, "mezo", 1e-5, 0, 0.6, 0.6, curve) for t in ("sst2", "rte")]
    records += [rec("sst2", "mezo-newton", lr, 0, dev, test, curve) for lr, dev, test in
                ((0.05, 0.70, 0.66), (0.1, 0.68, 0.655), (0.2, 0.60, 0.70))]  # 0.05 selected: 0.5 points above 0.1
    records += [rec("rte", "mezo-newton", lr, 0, dev, test, curve) for lr, dev, test in ((0.1, 0.7, 0.60), (0.2, 0.8, 0.64))]
    s = summarize(records, [], tasks=["sst2", "rte"], method="mezo-newton", zo_labels=["mezo", "mezo-newton"],
                  default_lrs={"mezo-newton": 0.1})["summary"]
    assert s["default_lr"]["per_task"] == {"sst2": {"selected_lr": 0.05, "gap_points": pytest.approx(0.5)},
                                           "rte": {"selected_lr": 0.2, "gap_points": pytest.approx(4.0)}}
    assert s["default_lr"]["max_gap_points"] == pytest.approx(4.0) and not s["targets_met"]["default_lr_gap_points"]
    near = summarize([r for r in records if r["task"] == "sst2"], [], tasks=["sst2"], method="mezo-newton",
                     zo_labels=["mezo", "mezo-newton"], default_lrs={"mezo-newton": 0.1})["summary"]
    assert near["targets_met"]["default_lr_gap_points"]
    grid = load_grid(write_grid(tmp_path, methods={
        "mezo": {"lr": {"full": [1e-5]}},
        "mezo-newton": {"method": "mezo", "lr": {"full": [0.05, 0.1]}, "set": {"optimizer_options": {"newton": True}}}}))
    assert default_lrs(grid) == {"mezo": 5e-5, "mezo-newton": 0.1}


def test_a_lora_column_is_compared_with_the_baselines_method_in_lora():
    curve = [(0, 0.5), (100, 0.6)]
    records = [rec("sst2", "mezo", 1e-5, s, 0.6, 0.70, curve) for s in (0, 1)]
    faster = [(0, 0.5), (50, 0.6), (100, 0.6)]  # reaches mezo-lora's final 0.6 in half its forwards
    for label, method, tests, dev in (("mezo-lora", "mezo", (0.60, 0.62), curve), ("curvzo-lora", "curvzo-sparse", (0.66, 0.68), faster)):
        records += [{**rec("sst2", label, 1e-3, s, 0.6, t, dev, method=method), "mode": "lora"} for s, t in enumerate(tests)]
    records += [{**rec("sst2", "adamw-lora", 1e-4, 0, 0.6, 0.9, curve, method="adamw"), "mode": "lora"}]
    s = summarize(records, [], tasks=["sst2"], zo_labels=["mezo", "mezo-lora", "curvzo-lora"])["summary"]
    lora = s["methods"]["curvzo-lora"]
    assert (lora["baseline"], lora["mode"]) == ("mezo-lora", "lora") and "mezo-lora" not in s["methods"]
    assert lora["minus_baseline_mean"] == pytest.approx(6.0) and lora["per_task"]["sst2"]["outcome"] == "won"
    assert lora["forward_ratio_median"] == pytest.approx(0.5) and s["methods"]["adamw-lora"]["forward_ratio_median"] is None
    assert (s["methods"]["adamw-lora"]["baseline"], s["methods"]["adamw-lora"]["minus_baseline_mean"]) == ("mezo-lora", pytest.approx(29.0))
    alone = summarize([r for r in records if r["label"] != "mezo-lora"], [], tasks=["sst2"])["summary"]["methods"]
    assert (alone["curvzo-lora"]["baseline"], alone["curvzo-lora"]["tasks_total"]) == ("mezo", 0)  # nothing to compare with


def test_a_difference_within_seed_noise_is_a_tie_whatever_its_sign():
    curve = [(0, 0.5), (100, 0.6)]
    records = [rec("sst2", "mezo", 1e-5, s, 0.6, t, curve) for s, t in ((0, 0.60), (1, 0.70), (2, 0.65))]
    records += [rec("sst2", "curvzo-sparse", 1e-5, s, 0.6, t, curve) for s, t in ((0, 0.64), (1, 0.74), (2, 0.69))]
    records += [rec("rte", label, 1e-5, s, 0.6, 0.6 + bump, curve) for label, bump in (("mezo", 0), ("curvzo-sparse", 1e-7)) for s in (0, 1)]
    s = summarize(records, [], tasks=["sst2", "rte"], zo_labels=["mezo", "curvzo-sparse"])["summary"]
    assert s["per_task"]["sst2"]["minus_baseline"] == pytest.approx(4.0)  # 4 points, standard error 4.08
    assert s["per_task"]["sst2"]["outcome"] == "tie" and s["per_task"]["rte"]["outcome"] == "tie"
    assert (s["tasks_won"], s["tasks_lost"], s["tasks_total"]) == (0, 0, 2)


def test_tasks_where_the_baseline_did_not_improve_carry_no_forward_ratio():
    records = [rec("sst2", "mezo", 1e-5, 0, 0.5, 0.5, [(0, 0.5), (100, 0.5)]),  # flat: reached at 0 by anyone
               rec("sst2", "curvzo-sparse", 1e-5, 0, 0.6, 0.6, [(0, 0.5), (100, 0.6)]),
               rec("rte", "mezo", 1e-5, 0, 0.6, 0.6, [(0, 0.5), (100, 0.6)]),
               rec("rte", "curvzo-sparse", 1e-5, 0, 0.6, 0.6, [(0, 0.5), (100, 0.7)])]
    s = summarize(records, [], tasks=["sst2", "rte"], zo_labels=["mezo", "curvzo-sparse"])["summary"]
    assert s["per_task"]["sst2"]["forward_ratio"] is None and s["per_task"]["sst2"]["baseline_improved"] is False
    assert s["forward_ratio_tasks"] == 1 and s["forward_ratio_to_mezo_final"] == pytest.approx(0.5)


def test_forward_ratio_divides_by_where_the_baseline_first_reaches_its_final():
    # mezo peaks at 100 passes and ends at 0.65, first reached at 75: curvzo reaching 0.65 at 75 is no speed-up
    records = [rec("sst2", "mezo", 1e-5, 0, 0.7, 0.7, [(0, 0.5), (100, 0.7), (200, 0.65)]),
               rec("sst2", "curvzo-sparse", 1e-5, 0, 0.7, 0.7, [(0, 0.5), (100, 0.7), (200, 0.7)])]
    data = summarize(records, [], tasks=["sst2"], zo_labels=["mezo", "curvzo-sparse"])
    ratios = data["tasks"][0]["forward_ratio_to_baseline_final"]
    assert ratios["mezo"] == pytest.approx(1.0) and ratios["curvzo-sparse"] == pytest.approx(1.0)
    assert data["summary"]["forward_ratio_to_mezo_final"] == pytest.approx(1.0)


def test_the_wall_clock_ratio_is_the_forward_ratio_times_the_quiet_machine_step_time_ratio(tmp_path):
    records = [rec("sst2", "mezo", 1e-5, 0, 0.7, 0.7, [(0, 0.5), (100, 0.7)]),
               rec("sst2", "curvzo-sparse", 1e-5, 0, 0.7, 0.7, [(0, 0.5), (50, 0.7)])]
    timed = summarize(records, [], tasks=["sst2"], zo_labels=["mezo", "curvzo-sparse"], step_seconds={"mezo": [2.0, 4.0], "curvzo-sparse": [0.5, 1.0]})
    s = timed["summary"]
    assert s["forward_ratio_to_mezo_final"] == pytest.approx(0.5) and s["step_time_ratio"] == 0.25
    assert s["wall_ratio_to_mezo_final"] == pytest.approx(0.125) and s["targets_met"]["wall_ratio"]
    untimed = summarize(records, [], tasks=["sst2"], zo_labels=["mezo", "curvzo-sparse"])["summary"]
    assert untimed["wall_ratio_to_mezo_final"] is None and not untimed["targets_met"]["wall_ratio"]
    (tmp_path / "step_cost.json").write_text(json.dumps({"timings": {"mezo": {"median": 2.0},
                                                                     "curvzo-sparse+rows-active": {"median": 1.0}}}))
    grid = load_grid(write_grid(tmp_path, step_cost=str(tmp_path / "step_cost.json"),
                                methods={"mezo": {"lr": {"full": [1e-5]}}, "curvzo-sparse": {"lr": {"full": [1e-5]}},
                                         "adamw": {"lr": {"full": [1e-5]}}}))
    assert step_seconds(grid) == {"mezo": [2.0], "curvzo-sparse": [1.0]}  # the harness's curvzo-sparse runs restrict rows
    newton = {"method": "mezo", "lr": {"full": [0.1]}, "set": {"optimizer_options": {"newton": True}}}
    grid = load_grid(write_grid(tmp_path, step_cost=str(tmp_path / "step_cost.json"),
                                methods={"mezo": {"lr": {"full": [1e-5]}}, "mezo-newton": newton}))
    assert step_seconds(grid) == {"mezo": [2.0]}  # a Newton step is not timed by MeZO's plain step
    (tmp_path / "step_cost.json").write_text(json.dumps({"timings": {"mezo": {"median": 2.0}, "curvzo": {"median": 2.2}},
                                                         "timings_per_round": {"mezo": [2.0, 3.0, 1.0], "curvzo": [2.2, 2.7, 1.1]}}))
    assert step_seconds(grid) == {"mezo": [2.0, 3.0, 1.0], "mezo-newton": [2.2, 2.7, 1.1]}  # the curvzo preset's step
    records = [rec("sst2", "mezo", 0.1, 0, 0.7, 0.7, [(0, 0.5), (100, 0.7)]),
               rec("sst2", "mezo-newton", 0.1, 0, 0.7, 0.7, [(0, 0.5), (50, 0.7)])]
    paired = summarize(records, [], tasks=["sst2"], method="mezo-newton", zo_labels=["mezo", "mezo-newton"],
                       step_seconds=step_seconds(grid))["summary"]
    assert paired["step_time_ratio"] == pytest.approx(1.1)  # rounds' ratios 1.1, 0.9, 1.1: their median


def test_lr_selection_uses_seeds_every_lr_has():
    # 1e-4 looks better on seed 1, which 1e-5 lacks: only seed 0 counts for the selection
    records = [rec("sst2", "mezo", 1e-5, 0, 0.7, 0.7, [(0, 0.5), (10, 0.7)]),
               rec("sst2", "mezo", 1e-4, 0, 0.6, 0.6, [(0, 0.5), (10, 0.6)]),
               rec("sst2", "mezo", 1e-4, 1, 1.0, 1.0, [(0, 0.5), (10, 1.0)])]
    cell = summarize(records, [], tasks=["sst2"])["tasks"][0]["methods"]["mezo"]["full"]
    assert cell["lr"] == 1e-5 and cell["seeds"] == [0]


def test_aggregate_writes_json_md_and_figures_from_a_partial_grid(tmp_path):
    grid = load_grid(write_grid(tmp_path, tasks=["sst2", "rte"], seeds=[0, 1],
                                methods={"mezo": {"lr": {"full": [1e-5]}}, "curvzo-sparse": {"lr": {"full": [1e-5]}}}))
    runs = {(r.task, r.label, r.seed): r for r in plan(grid)[0]}
    curve = [(100, 0.6), (200, 0.7)]
    fake_results(runs["sst2", "mezo", 0].path, best_dev=0.7, test=0.70, evals=curve)
    fake_results(runs["sst2", "curvzo-sparse", 0].path, best_dev=0.8, test=0.75, evals=[(100, 0.8), (200, 0.8)], method="curvzo-sparse")
    runs["sst2", "zero-shot", 0].path.mkdir(parents=True)
    (runs["sst2", "zero-shot", 0].path / "results.json").write_text(json.dumps(
        {"task": "sst2", "method": "zero-shot", "metric": "accuracy", "seed": 0, "dev": 0.5, "test": 0.5}))
    report = run_bench(grid, aggregate_only=True, log=lambda line: None)
    doc = json.loads((grid.out / "accuracy.json").read_text())
    s = doc["summary"]
    assert (s["runs_used"], s["runs_expected"], s["zero_shot_runs_used"]) == (2, 8, 1)
    assert s["curvzo_minus_mezo_mean"] == pytest.approx(5.0) and (s["tasks_won"], s["tasks_total"]) == (0, 1)
    assert s["per_task"]["sst2"]["outcome"] == "one seed"  # no spread to judge +5 points against
    assert s["forward_ratio_to_mezo_final"] == pytest.approx((100 * 0.2 / 0.3) / 200)
    assert len(doc["runs"]) == 2 and report.summary == s
    md = (grid.out / "accuracy.md").read_text()
    assert "| zero-shot | – | 50.0 (n=1) | – | – |" in md and "| curvzo-sparse | full | 75.0 (n=1) | – | – |" in md
    assert "Runs used: 2 of 8" in md
    assert {"accuracy_sst2.png", "forward_ratio.png"} <= {p.name for p in grid.out.glob("*.png")}


def test_a_cell_with_an_unfinished_lr_sweep_is_shown_but_never_compared(tmp_path):
    grid = load_grid(write_grid(tmp_path, seeds=[0, 1], select_seeds=[0], zero_shot=False,
                                methods={"mezo": {"lr": {"full": [1e-5, 1e-4]}}, "curvzo-sparse": {"lr": {"full": [1e-5, 1e-4]}}}))
    runs = {(r.label, r.lr): r for r in plan(grid)[0]}
    fake_results(runs["mezo", 1e-5].path, best_dev=0.7, test=0.70, evals=[(100, 0.7)])
    fake_results(runs["mezo", 1e-4].path, best_dev=0.6, test=0.60, evals=[(100, 0.6)])
    fake_results(runs["curvzo-sparse", 1e-4].path, best_dev=0.9, test=0.90, evals=[(100, 0.9)], method="curvzo-sparse")
    run_bench(grid, aggregate_only=True, log=lambda line: None)
    doc = json.loads((grid.out / "accuracy.json").read_text())
    cells = doc["tasks"][0]["methods"]
    assert cells["mezo"]["full"]["sweep_finished"] and not cells["curvzo-sparse"]["full"]["sweep_finished"]
    s = doc["summary"]  # curvzo's 1e-4 is only the best of what finished: +20 points on it would be no result
    assert s["tasks_total"] == 0 and s["curvzo_minus_mezo_mean"] is None and s["per_task"] == {}
    assert s["methods"] == {"curvzo-sparse": s["methods"]["curvzo-sparse"]} and s["methods"]["curvzo-sparse"]["tasks_total"] == 0
    assert doc["tasks"][0]["forward_to_baseline_final"] == {"mezo": 100.0}
    md = (grid.out / "accuracy.md").read_text()
    assert "| curvzo-sparse | full | 90.0 (n=1)† | – |" in md and "| curvzo-sparse | full | 1e-4† |" in md
    assert "| mezo | full | 70.0 (n=1) | 70.0 |" in md and "† lr sweep unfinished" in md  # curvzo: no average
    assert "| zero-shot |" not in md  # the grid ran no zero-shot evaluation: no row of dashes
    fake_results(runs["curvzo-sparse", 1e-5].path, best_dev=0.5, test=0.50, evals=[(100, 0.5)], method="curvzo-sparse")
    run_bench(grid, aggregate_only=True, log=lambda line: None)
    s = json.loads((grid.out / "accuracy.json").read_text())["summary"]
    assert s["tasks_total"] == 1 and s["curvzo_minus_mezo_mean"] == pytest.approx(20.0)


def test_the_sweep_table_shows_every_lr_tried_the_selection_and_where_runs_diverged(tmp_path):
    grid = load_grid(write_grid(tmp_path, seeds=[0, 1], select_seeds=[0], zero_shot=False,
                                methods={"mezo": {"lr": {"full": [1e-5, 1e-4]}}, "curvzo-sparse": {"lr": {"full": [1e-4, 1e-3]}}}))
    runs = {(r.label, r.lr): r for r in plan(grid)[0]}
    fake_results(runs["mezo", 1e-5].path, best_dev=0.61, test=0.6, evals=[(100, 0.6)])
    fake_results(runs["mezo", 1e-4].path, best_dev=0.72, test=0.7, evals=[(100, 0.7)], diverged_at=37)
    fake_results(runs["curvzo-sparse", 1e-4].path, best_dev=0.55, test=0.5, evals=[(100, 0.5)], method="curvzo-sparse")
    run_bench(grid, aggregate_only=True, log=lambda line: None)
    md = (grid.out / "accuracy.md").read_text()
    assert "| task | method | mode | 1e-5 | 1e-4 | 1e-3 |" in md
    assert "| sst2 | mezo | full | 0.61 | **0.72 (div. 37)** |  |" in md  # 1e-3 is not in mezo's grid
    assert "| sst2 | curvzo-sparse | full |  | 0.55 | – |" in md  # its sweep is unfinished: nothing selected yet
    fake_results(runs["curvzo-sparse", 1e-3].path, best_dev=0.4, test=0.4, evals=[(100, 0.4)], method="curvzo-sparse", diverged_at=5)
    run_bench(grid, aggregate_only=True, log=lambda line: None)
    assert "| sst2 | curvzo-sparse | full |  | **0.55** | 0.40 (div. 5) |" in (grid.out / "accuracy.md").read_text()


def test_the_report_shows_the_majority_label_floor_of_each_seeds_draw(data_dir, tmp_path):
    from curvzo.data import load_splits

    grid = load_grid(write_grid(tmp_path, data_dir=str(data_dir), tasks=["boolq"], seeds=[0, 1],
                                num_train=200, num_dev=50, num_test=100))
    runs = {(r.label, r.seed): r for r in plan(grid)[0]}
    fake_results(runs["mezo", 0].path, best_dev=0.7, test=0.70, evals=[(100, 0.7)])
    run_bench(grid, aggregate_only=True, log=lambda line: None)
    expected = []
    for seed in (0, 1):  # BoolQ's gold is its `label` field (1 = "Yes"); the train sample's majority answers all
        splits = load_splits("boolq", data_dir=data_dir, num_train=200, num_dev=50, num_test=100, seed=seed)
        labels = [d["label"] for d in splits.train]
        constant = max((0, 1), key=lambda v: (labels.count(v), -v))
        expected.append(sum(d["label"] == constant for d in splits.test) / 100)
    floor = json.loads((grid.out / "accuracy.json").read_text())["tasks"][0]["majority"]
    assert floor["tests"] == pytest.approx(expected) and floor["seeds"] == [0, 1]
    assert 0.55 < floor["test_mean"] < 0.7  # BoolQ's validation split is 62% "yes"
    spread = 100 * (expected[0] - expected[1]) / math.sqrt(2)
    assert f"| majority label | – | {100 * sum(expected) / 2:.1f} ± {abs(spread):.1f} | " in (grid.out / "accuracy.md").read_text()


# ---------------------------------------------------------------------- end to end on a tiny model
def tiny_grid(tmp_path: Path, tiny_dir: Path, data_dir: Path, **values) -> Path:
    settings = {"model": str(tiny_dir), "data_dir": str(data_dir), "steps": 1, "batch_size": 4, "max_length": 64,
                "num_train": 16, "num_dev": 8, "num_test": 8, "eval_every": 1,
                "methods": {"mezo": {"lr": {"full": [1e-3]}}, "curvzo-sparse": {"lr": {"full": [1e-3]}}}}
    return write_grid(tmp_path, **{**settings, **values})


def test_a_finished_grid_is_skipped_when_run_again(tiny_dir, data_dir, tmp_path, capsys):
    path = tiny_grid(tmp_path, tiny_dir, data_dir)
    assert main(["bench", "--grid", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    finished = sorted(out.glob("runs/sst2/*/results.json"))
    assert [p.parent.name for p in finished] == ["curvzo-sparse-full-lr1e-3-s0", "mezo-full-lr1e-3-s0", "zero-shot-s0"]
    assert not list(out.glob("runs/**/best")) and not list(out.glob("runs/**/checkpoint"))  # keep_weights: false
    assert {"accuracy.json", "accuracy.md", "curvzo-sparse_budget.png", "curvzo-sparse_scores.png"} <= {p.name for p in out.iterdir()}
    stamps = {p: p.stat().st_mtime_ns for p in finished}
    grid = load_grid(path)
    report = run_bench(grid, log=lambda line: None)
    assert report.executed == [] and report.skipped == 3 and report.failed == []
    assert {p: p.stat().st_mtime_ns for p in finished} == stamps


def test_reuse_reads_finished_runs_of_the_same_config_from_another_results_folder(tiny_dir, data_dir, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    source = load_grid(tiny_grid(first, tiny_dir, data_dir, pack=True, zero_shot=False,
                                 methods={"mezo": {"lr": {"full": [1e-3]}}}))
    run_bench(source, log=lambda line: None)
    archive = (source.out / "runs.tar.gz").read_bytes()
    grid = load_grid(tiny_grid(tmp_path, tiny_dir, data_dir, reuse=[str(source.out)], zero_shot=False,
                               methods={"mezo": {"lr": {"full": [1e-3, 2e-3]}}}))
    lines: list[str] = []
    report = run_bench(grid, dry_run=True, log=lines.append)
    assert f"  done    sst2/mezo-full-lr1e-3-s0 (from {source.out})" in lines
    assert "  pending sst2/mezo-full-lr2e-3-s0" in lines
    report = run_bench(grid, log=lambda line: None)
    assert report.executed == ["sst2/mezo-full-lr2e-3-s0"] and report.skipped == 1
    assert not (grid.out / "runs" / "sst2" / "mezo-full-lr1e-3-s0").exists()
    assert (source.out / "runs.tar.gz").read_bytes() == archive  # read, never written
    used = json.loads((grid.out / "accuracy.json").read_text())["runs"]
    assert {r["lr"]: Path(r["path"]).parents[2] for r in used} == {1e-3: source.out, 2e-3: grid.out}
    other = load_grid(tiny_grid(tmp_path, tiny_dir, data_dir, reuse=[str(source.out)], zero_shot=False, steps=2,
                                methods={"mezo": {"lr": {"full": [1e-3]}}}))
    assert not plan(other)[0][0].reused  # another config: run here, not read from there


def test_an_interrupted_run_resumes_from_its_checkpoint(tiny_dir, data_dir, tmp_path, monkeypatch):
    import curvzo.finetune

    grid = load_grid(tiny_grid(tmp_path, tiny_dir, data_dir, steps=2, keep_weights=True, zero_shot=False,
                               methods={"mezo": {"lr": {"full": [1e-3]}}}))
    run_bench(grid, log=lambda line: None)
    run = plan(grid)[0][0]
    (run.path / "results.json").unlink()  # as if the run stopped after its last checkpoint
    calls = []
    real = curvzo.finetune.train
    monkeypatch.setattr(curvzo.finetune, "train", lambda cfg, **kw: calls.append(kw) or real(cfg, **kw))
    lines: list[str] = []
    report = run_bench(grid, only=parse_only("method=mezo", grid), log=lines.append)
    assert calls == [{"resume": True, "overwrite": False, "progress": True}] and report.executed == [run.name]
    assert "selected now 1: 0 finished, 1 to resume, 0 to start;" in lines[0]
    assert json.loads((run.path / "results.json").read_text())["steps"] == 2


def test_ctrl_c_during_a_grid_is_one_line_that_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import curvzo.bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(curvzo.bench, "schedule", interrupted)
    assert main(["bench", "--grid", str(write_grid(tmp_path)), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curvzo: interrupted: ") and "resumes the grid" in err


def test_a_diverged_run_is_a_result_scored_from_its_best_weights(tiny_dir, data_dir, tmp_path, monkeypatch):
    import curvzo.finetune
    from curvzo.errors import TrainingDiverged

    grid = load_grid(tiny_grid(tmp_path, tiny_dir, data_dir, steps=2, zero_shot=False,
                               methods={"mezo": {"lr": {"full": [1e-3]}}}))
    real = curvzo.finetune.train

    def diverging(cfg, **kw):  # the real run, then "diverged" after its checkpoint at step 2
        real(cfg, **kw)
        (Path(cfg.output_dir) / "results.json").unlink()
        raise TrainingDiverged("training diverged: 10 steps in a row had non-finite losses")

    monkeypatch.setattr(curvzo.finetune, "train", diverging)
    report = run_bench(grid, log=lambda line: None)
    results = plan(grid)[0][0].results()
    assert report.executed == ["sst2/mezo-full-lr1e-3-s0"] and report.failed == []
    assert results["diverged"].startswith("training diverged") and [e["step"] for e in results["evals"]] == [1, 2]
    assert {"best_dev", "test", "zero_shot", "forward_passes"} <= set(results)


def test_a_failing_run_is_recorded_and_the_grid_goes_on(tiny_dir, data_dir, tmp_path, monkeypatch):
    import curvzo.finetune

    grid = load_grid(tiny_grid(tmp_path, tiny_dir, data_dir, zero_shot=False))

    def broken(cfg, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(curvzo.finetune, "train", broken)
    report = run_bench(grid, log=lambda line: None)
    assert report.failed == ["sst2/mezo-full-lr1e-3-s0", "sst2/curvzo-sparse-full-lr1e-3-s0"]
    assert "RuntimeError: boom" in (plan(grid)[0][0].path / "error.txt").read_text()


def test_the_report_shows_the_lr_the_newton_steps_curvature_gave_beside_the_baselines_selection(tiny_dir, data_dir, tmp_path):
    grid = load_grid(tiny_grid(tmp_path, tiny_dir, data_dir, steps=3, eval_every=3, zero_shot=False,
                               compare={"method": "curvzo", "baseline": "mezo"},
                               methods={"mezo": {"lr": {"full": [1e-3]}}, "curvzo": {"lr": {"full": [0.05, 0.1]}}}))
    run_bench(grid, log=lambda line: None)
    doc = json.loads((grid.out / "accuracy.json").read_text())
    rows = {r["lr"]: r for r in doc["newton_step_lrs"]}
    assert set(rows) == {0.05, 0.1} and {r["method"] for r in rows.values()} == {"curvzo"}  # mezo takes no Newton step
    run = next(r for r in plan(grid)[0] if r.label == "curvzo" and r.lr == 0.1)
    log = [json.loads(line) for line in run.record("log.jsonl").decode().splitlines() if "step_lr" in line]
    taken = [e["step_lr"] for e in log if not e["skipped"]]
    assert all(e["step_lr"] == pytest.approx(0.1 / e["curvature"]) for e in log if not e["skipped"])
    assert rows[0.1]["step_lr_median"] == pytest.approx(statistics.median(taken))
    assert rows[0.1]["step_lr_p10"] <= rows[0.1]["step_lr_median"] <= rows[0.1]["step_lr_p90"]
    md = (grid.out / "accuracy.md").read_text()
    assert "| task | method | mode | 5e-2 | 1e-1 | mezo (selected) |" in md
    assert re.search(r"\| sst2 \| curvzo \| full \| [0-9.e-]+ \([0-9.e-]+-[0-9.e-]+\) \| [0-9.e-]+ \(.*\) \| 1e-3 \|", md)


# ---------------------------------------------------------------------- finished runs packed into runs.tar.gz
def test_packed_runs_aggregate_exactly_as_their_folders(tmp_path):
    from curvzo.bench import aggregate, pack

    grid = load_grid(write_grid(tmp_path, seeds=[0, 1], methods={"mezo": {"lr": {"full": [1e-5]}},
                                                                 "curvzo-sparse": {"lr": {"full": [1e-5]}}}))
    runs = {(r.task, r.label, r.seed): r for r in plan(grid)[0]}
    fake_results(runs["sst2", "mezo", 0].path, best_dev=0.7, test=0.70, evals=[(100, 0.6), (200, 0.7)])
    fake_results(runs["sst2", "curvzo-sparse", 0].path, best_dev=0.8, test=0.75, evals=[(100, 0.8)], method="curvzo-sparse")
    (runs["sst2", "curvzo-sparse", 0].path / "log.jsonl").write_text('{"step": 1, "loss": 0.7, "forward_passes": 8}\n')
    unfinished = runs["sst2", "mezo", 1].path
    (unfinished / "checkpoint").mkdir(parents=True)
    aggregate(grid, log=lambda line: None)
    before = {name: (grid.out / name).read_bytes() for name in ("accuracy.json", "accuracy.md")}

    packed = pack(grid.out)
    assert sorted(p.name for p in packed) == ["curvzo-sparse-full-lr1e-5-s0", "mezo-full-lr1e-5-s0"]
    assert not runs["sst2", "mezo", 0].path.exists() and (unfinished / "checkpoint").is_dir()  # a run to resume stays
    assert runs["sst2", "mezo", 0].done and not runs["sst2", "mezo", 1].done
    assert runs["sst2", "curvzo-sparse", 0].record("log.jsonl") == b'{"step": 1, "loss": 0.7, "forward_passes": 8}\n'
    aggregate(grid, log=lambda line: None)
    assert {name: (grid.out / name).read_bytes() for name in before} == before
    archive = (grid.out / "runs.tar.gz").read_bytes()
    fake_results(runs["sst2", "mezo", 0].path, best_dev=0.7, test=0.70, evals=[(100, 0.6), (200, 0.7)])  # rerun
    assert len(pack(grid.out)) == 1 and (grid.out / "runs.tar.gz").read_bytes() == archive  # deterministic bytes


def test_a_packed_run_of_another_config_is_refused(tmp_path):
    from curvzo.bench import pack

    grid = load_grid(write_grid(tmp_path, steps=10))
    run = plan(grid)[0][1]
    fake_results(run.path, best_dev=0.5, test=0.5)
    (run.path / "config.yaml").write_text(yaml.safe_dump({**run.config.to_dict(), "steps": 20}))
    pack(grid.out)
    with pytest.raises(ConfigError, match=r"steps: 20 there, 10 in the grid"):
        run_bench(grid, aggregate_only=True, log=lambda line: None)


def test_a_grid_with_pack_runs_resumes_and_skips_from_its_archive(tiny_dir, data_dir, tmp_path):
    grid = load_grid(tiny_grid(tmp_path, tiny_dir, data_dir, pack=True, zero_shot=False,
                               methods={"mezo": {"lr": {"full": [1e-3]}}}))
    report = run_bench(grid, progress=False, log=lambda line: None)
    assert report.executed == ["sst2/mezo-full-lr1e-3-s0"] and not (grid.out / "runs").exists()
    again = run_bench(grid, log=lambda line: None)
    assert again.executed == [] and again.skipped == 1 and again.summary["runs_used"] == 1


@pytest.mark.parametrize("profile", ["cpu", "gpu", "quick"])
@pytest.mark.usefixtures("data_dir")  # the tables' majority-label row reads the task data
def test_the_committed_tables_regenerate_from_the_committed_archive(tmp_path, profile):
    """`curvzo bench --aggregate-only` from the repository root, run on a copy in a temporary folder."""
    import shutil

    committed = load_grid(SHIPPED, profile).out  # relative to the repository root
    out = tmp_path / "results"
    out.mkdir()
    shutil.copyfile(REPO / committed / "runs.tar.gz", out / "runs.tar.gz")
    run_bench(load_grid(SHIPPED, profile, out), aggregate_only=True, log=lambda line: None)
    for name in ("accuracy.md", "accuracy.json"):
        text = (out / name).read_text(encoding="utf-8")
        text = text.replace(f" --out {out}", "" if profile == "cpu" else f" --out {committed}")
        text = text.replace(str(out), str(committed)).replace(str(SHIPPED), "benchmarks/grids/cpu.yaml")
        assert text == (REPO / committed / name).read_text(encoding="utf-8"), f"{committed / name} differs"


def test_a_seed_run_at_an_lr_that_is_no_longer_the_selection_enters_no_table_or_count(tmp_path):
    grid = load_grid(write_grid(tmp_path, seeds=[0, 1], select_seeds=[0], zero_shot=False,
                                methods={"mezo": {"lr": {"full": [1e-5, 1e-4]}}}))
    spec = grid.methods[0]
    at = {(lr, seed): training_run(grid, "sst2", spec, "full", lr, seed).path for lr in (1e-5, 1e-4) for seed in (0, 1)}
    fake_results(at[1e-5, 0], best_dev=0.7, test=0.70, evals=[(100, 0.7)])
    fake_results(at[1e-4, 0], best_dev=0.6, test=0.60, evals=[(100, 0.6)])
    fake_results(at[1e-5, 1], best_dev=0.7, test=0.72, evals=[(100, 0.7)])
    # ran while 1e-4 was the selection, before 1e-5 joined the grid
    fake_results(at[1e-4, 1], best_dev=0.9, test=0.90, evals=[(100, 0.9)])
    run_bench(grid, aggregate_only=True, log=lambda line: None)
    doc = json.loads((grid.out / "accuracy.json").read_text())
    assert (doc["summary"]["runs_used"], doc["summary"]["runs_expected"], doc["summary"]["runs_off_selection"]) == (3, 3, 1)
    cell = doc["tasks"][0]["methods"]["mezo"]["full"]
    assert cell["lr"] == 1e-5 and cell["tests"] == [0.70, 0.72]
    assert [r["in_plan"] for r in doc["runs"] if r["lr"] == 1e-4] == [True, False]
    md = (grid.out / "accuracy.md").read_text()
    assert "Runs used: 3 of 3" in md and "not counted: 1 finished seed run at an lr that is no longer" in md
