"""The divergence guard: a loss that climbs and stays up stops the run early (or rolls it back)."""

from __future__ import annotations

import json
import math

import pytest

from curvzo.cli import main
from curvzo.divergence import DivergenceGuard, lower_lr


def _first_alarm(losses: list[float], **options) -> int | None:
    guard = DivergenceGuard(**options)
    return next((step for step, loss in enumerate(losses, 1) if guard.update(loss)), None)


def test_a_loss_that_climbs_and_stays_up_is_caught_within_the_patience():
    # the log-average passes 3 x 0.8 at step 6 (four steps of 40) and stays there: alarm 10 steps later
    assert _first_alarm([0.8, 0.9] + [40.0] * 30) == 15


def test_one_spike_or_a_noisy_descent_is_not_divergence():
    assert _first_alarm([0.8] + [0.7] * 5 + [80.0] + [0.7] * 40) is None
    assert _first_alarm([0.7, 2.0, 0.5, 1.9, 0.4, 1.5] * 10) is None


def test_non_finite_losses_count_as_above():
    assert _first_alarm([0.8] + [math.nan] * 10) == 11
    assert _first_alarm([math.inf] * 3, patience=3) == 3


def test_the_guard_continues_from_its_state():
    losses = [0.8, 0.9] + [40.0] * 30
    guard = DivergenceGuard()
    for loss in losses[:7]:
        guard.update(loss)
    resumed = DivergenceGuard(**guard.state_dict())
    assert next(step for step, loss in enumerate(losses[7:], 8) if resumed.update(loss)) == 15


@pytest.mark.parametrize("lr,expected", [(5e-5, 1e-5), (2e-5, 5e-6), (1e-5, 2e-6), (3e-4, 1e-4), (0.1, 0.02)])
def test_the_lr_to_try_is_a_round_third_or_less(lr, expected):
    assert lower_lr(lr) == expected


def _argv(tiny_dir, data_dir, run, *extra):
    return ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "32",
            "--num-dev", "8", "--num-test", "8", "--batch-size", "8", "--steps", "40", "--method", "mezo",
            "--lr", "0.1", "--output-dir", str(run), "--no-progress", *extra]


def test_a_diverging_run_stops_early_with_results_of_its_best_weights(tiny_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_argv(tiny_dir, data_dir, run, "--eval-every", "5")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged at step" in err and "smoothed training loss" in err
    assert "try --lr 0.02 or `curvzo lr-find`" in err
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] < 40 and results["diverged"] in err
    assert results["best_dev"] == max([results["zero_shot"]] + [e["dev"] for e in results["evals"]])
    assert (run / "plots" / "loss.png").exists()


def test_rollback_halves_the_lr_from_the_last_checkpoint(tiny_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    main(_argv(tiny_dir, data_dir, run, "--eval-every", "2", "--on-divergence", "rollback"))
    results = json.loads((run / "results.json").read_text())
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"event"' in line]
    assert results["rollbacks"] == len(events) >= 1
    assert results["final_lr"] == pytest.approx(0.1 / 2 ** results["rollbacks"])
    assert [e["lr"] for e in events] == pytest.approx([0.1 / 2**k for k in range(1, len(events) + 1)])
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, len(steps) + 1)), "the log holds one line per step of the surviving path"
