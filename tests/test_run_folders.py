"""Run folders: a new named folder per run, never a silent reuse of an old one."""

from __future__ import annotations

import json
import re
from pathlib import Path

from curvzo.cli import main


def _argv(tiny_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "16",
            "--num-dev", "4", "--num-test", "4", "--batch-size", "4", "--steps", "2", "--no-progress", *extra]


def test_default_folder_is_new_and_named_after_the_run(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_argv(tiny_dir, data_dir, "--method", "mezo")) == 0
    assert main(_argv(tiny_dir, data_dir, "--method", "mezo")) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(re.fullmatch(r"sst2-mezo-\d{8}-\d{6}(-\d+)?", name) for name in runs), runs
    out = capsys.readouterr().out
    assert all(f"run folder runs/{name}" in out for name in runs)


def test_progress_names_the_folder_at_start(tiny_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [a for a in _argv(tiny_dir, data_dir, "--output-dir", str(run)) if a != "--no-progress"]
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == [f"loading data and {tiny_dir}", f"run folder {run}"], "named before the first evaluation"


def test_an_existing_run_is_refused_and_left_alone(tiny_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_argv(tiny_dir, data_dir, "--output-dir", str(run))) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    assert main(_argv(tiny_dir, data_dir, "--output-dir", str(run))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume {run}" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_overwrite_leaves_nothing_of_the_old_run(tiny_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(_argv(tiny_dir, data_dir, "--output-dir", str(run), "--method", "curvzo-sparse")) == 0
    assert (run / "scores.json").exists()
    assert main(_argv(tiny_dir, data_dir, "--output-dir", str(run), "--method", "mezo", "--overwrite")) == 0
    assert not (run / "scores.json").exists() and not (run / "plots" / "scores.png").exists()
    assert json.loads((run / "results.json").read_text())["method"] == "mezo"


def test_an_empty_folder_is_used(tiny_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert main(_argv(tiny_dir, data_dir, "--output-dir", str(run))) == 0


def test_every_phase_shows_progress_and_the_summary_says_what_its_time_covers(tiny_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [a for a in _argv(tiny_dir, data_dir, "--output-dir", str(run)) if a != "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    for phase in ("loading data", "zero-shot dev", "curvzo sst2", "saving checkpoint", "test", "drawing plots"):
        assert phase in captured.err, phase
    assert "training steps" in captured.out and "s in all with loading" in captured.out
    assert main(["eval", str(run)]) == 0
    err = capsys.readouterr().err
    assert "loading data" in err and "dev" in err and "test" in err


def test_the_library_call_prints_the_cli_result_line(tiny_dir, data_dir, tmp_path, capsys):
    from curvzo import TrainConfig, train

    assert main(_argv(tiny_dir, data_dir, "--output-dir", str(tmp_path / "cli"))) == 0
    cli_line = capsys.readouterr().out.strip().splitlines()[-1]
    train(TrainConfig(model=str(tiny_dir), task="sst2", data_dir=str(data_dir), num_train=16, num_dev=4, num_test=4,
                      batch_size=4, steps=2, output_dir=str(tmp_path / "lib")), progress=False)
    lib_line = capsys.readouterr().out.strip().splitlines()[-1]
    head = cli_line.split(" (")[0]  # what the run reached; times and folders differ
    assert lib_line.startswith(head + " (2 steps") and lib_line.endswith(f"run folder {tmp_path / 'lib'}")
