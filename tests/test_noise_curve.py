"""The noise-curve benchmark repeats a `long` run exactly: same config, its own folder."""

from __future__ import annotations

import json
import math

import yaml

from benchmarks import noise_curve
from curvzo.config import TrainConfig


def test_a_repeated_run_differs_from_the_long_run_only_in_its_folder_and_what_it_keeps(tmp_path):
    for task in noise_curve.TASKS:
        for seed in (0, 1, 2):
            original = TrainConfig(**yaml.safe_load(noise_curve.long_record(task, seed, "config.yaml")))
            repeat = noise_curve.config(task, seed, tmp_path)
            assert original.lr == noise_curve.selected_lr(task) and original.method == "mezo"
            assert sorted(repeat.differences(original)) == ["keep", "output_dir"]
            assert repeat.output_dir == str(tmp_path / "runs" / task / f"mezo-s{seed}")


def test_the_report_compares_a_finished_run_with_the_long_run_of_its_seed(tmp_path):
    long = noise_curve.long_record("mr", 1, "results.json")
    folder = tmp_path / "runs" / "mr" / "mezo-s1"
    folder.mkdir(parents=True)
    (folder / "results.json").write_bytes(long)
    (folder / "log.jsonl").write_bytes(noise_curve.long_record("mr", 1, "log.jsonl"))
    doc = noise_curve.report(tmp_path)
    (row,) = doc["runs"]
    assert (row["task"], row["seed"]) == ("mr", 1)
    assert row["table_test"] == row["generated_test"] and row["table_curve"] == row["generated_curve"]
    assert row["table_late_loss"] == row["generated_late_loss"] and 0.3 < row["table_late_loss"] < 1.0
    for gap in doc["summary"].values():
        assert (gap["mean"], gap["n"]) == (0.0, 1) and math.isnan(gap["standard_error"])
    assert row["generated_test"] in row["generated_test_seeds"] and len(row["generated_curve"]) == 9
    assert (tmp_path / "noise_curve.png").stat().st_size > 0


def test_the_late_loss_is_the_mean_over_the_second_half_of_the_steps_that_ran():
    log = "\n".join(json.dumps({"step": s, "loss": float(s)}) for s in range(1, 8))
    assert noise_curve.late_loss(log, steps=10) == 6.5  # steps 6 and 7 of 10: a run stopped early
    assert noise_curve.late_loss(log, steps=7) == 5.5
    assert math.isnan(noise_curve.late_loss(log, steps=20))


def test_table_noise_projects_a_gradient_as_generated_gaussian_noise_does():
    """E[(z . grad)^2] = |grad|^2 and a Gaussian kurtosis for both noises, on a gradient with the
    shape of a language model's: a few rows of a large matrix carry most of it."""
    import torch

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(300, 1000)), torch.nn.Parameter(torch.zeros(5000))]
    params[0].grad = torch.zeros(300, 1000)
    params[0].grad[[7, 211]] = torch.randn(2, 1000, generator=gen) * 10
    params[0].grad += torch.randn(300, 1000, generator=gen) * 0.05
    params[1].grad = torch.randn(5000, generator=gen)
    measured = noise_curve.projected_moments(params, samples=2000)
    for m in measured.values():  # standard errors: ~0.03 on the second moment, ~0.4 on the kurtosis
        assert abs(m["second_moment"] - 1.0) < 4 * m["standard_error"] and 2.0 < m["kurtosis"] < 4.5
