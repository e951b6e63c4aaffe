"""``curvzo lr-find``: a short range test from the same start, stopping at the first divergent lr."""

from __future__ import annotations

import pytest

from curvzo import TrainConfig
from curvzo.cli import main
from curvzo.errors import ConfigError
from curvzo.lrfind import lr_find, lr_grid


def test_grid_is_geometric():
    assert lr_grid(1e-7, 1e-3, 2) == [1e-7, 3.16e-7, 1e-6, 3.16e-6, 1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3]
    with pytest.raises(ConfigError, match="0 < lr_min < lr_max"):
        lr_grid(1e-3, 1e-7, 2)


def test_range_test_finds_the_largest_stable_lr(tiny_dir, data_dir):
    cfg = TrainConfig(model=str(tiny_dir), task="sst2", data_dir=str(data_dir), method="mezo", num_train=32,
                      num_dev=4, num_test=4, batch_size=8, device="cpu")
    result = lr_find(cfg, lrs=lr_grid(1e-4, 1.0, 1), steps=6, progress=False)
    trials = result.trials
    assert trials[-1].diverged and not any(t.diverged for t in trials[:-1]), "the sweep stops at the first divergence"
    assert len({t.losses[0] for t in trials}) == 1, "every lr starts from the same weights and batch"
    assert trials[0].ratio == 1.0
    assert result.largest_stable == trials[-2].lr and result.suggested == trials[-3].lr
    assert result.forward_passes == len(trials) * 6 * 2 * 8


def test_cli_prints_the_table_and_the_suggestion(tiny_dir, data_dir, capsys):
    argv = ["lr-find", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "32",
            "--batch-size", "8", "--method", "mezo", "--lr-min", "1e-3", "--lr-max", "1", "--per-decade", "1",
            "--steps-per-lr", "4", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "diverged" in out and "largest lr that did not diverge:" in out and "suggested: --lr" in out


def test_first_order_methods_are_refused(tiny_dir, data_dir, capsys):
    argv = ["lr-find", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--method", "adamw"]
    assert main(argv) == 2
    assert "lr-find sweeps ZO methods, not adamw" in capsys.readouterr().err
