"""The bad-input matrix (docs/bad-inputs.md): one clear line on stderr, exit code 2, no partial files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from curvzo.cli import main



@pytest.fixture
def small_data(data_dir, tmp_path) -> Path:
    """A writable copy of two tasks' real files, to be corrupted by each case."""
    root = tmp_path / "data"
    for task in ("sst2", "rte"):
        (root / task).mkdir(parents=True)
        for split in ("train", "validation"):
            lines = (data_dir / task / f"{split}.jsonl").read_text().splitlines()[:40]
            (root / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _edit_line(path: Path, index: int, edit: Callable[[dict], object]) -> None:
    lines = path.read_text().splitlines()
    lines[index] = edit(json.loads(lines[index]))
    path.write_text("\n".join(lines) + "\n")


def _drop_field(doc: dict) -> str:
    doc.pop("sentence")
    return json.dumps(doc)


def _label(doc: dict) -> str:
    return json.dumps({**doc, "label": 5})


def _corrupt_weights(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"not a safetensors file")


def _other_config(run: Path) -> None:
    text = (run / "config.yaml").read_text().replace("seed: 0", "seed: 1")
    (run / "config.yaml").write_text(text)


# (id, setup(model_dir, data_dir, run_dir) -> extra argv, expected message fragment)
CASES = [
    ("unknown-task", lambda m, d, r: ["--task", "sst3"], "Did you mean: sst2"),
    ("unknown-method", lambda m, d, r: ["--method", "mezzo"], "`method` must be one of"),
    ("mistyped-method", lambda m, d, r: ["--method", "curvz"], "got 'curvz' (did you mean: curvzo"),
    ("unknown-option", lambda m, d, r: ["--set", "lerning_rate=1"], "unknown config key(s): lerning_rate"),
    ("unknown-optimizer-option", lambda m, d, r: ["--set", "optimizer_options={beta: 1}"], "unexpected keyword argument 'beta'"),
    ("lr-zero", lambda m, d, r: ["--lr", "0"], "`lr` must be a finite number > 0"),
    ("lr-nan", lambda m, d, r: ["--lr", "nan"], "`lr` must be a finite number > 0"),
    ("eps-negative", lambda m, d, r: ["--eps=-1"], "`eps` must be a finite number > 0"),
    ("steps-zero", lambda m, d, r: ["--steps", "0"], "`steps` must be an integer >= 1"),
    ("checkpoint-every-zero", lambda m, d, r: ["--checkpoint-every", "0"], "`checkpoint_every` must be an integer >= 1"),
    ("checkpoint-minutes-negative", lambda m, d, r: ["--checkpoint-minutes=-1"], "`checkpoint_minutes` must be a finite number > 0"),
    ("keep-trajectory-first-order", lambda m, d, r: ["--keep", "trajectory", "--method", "adamw"], "`keep: trajectory` needs a ZO method"),
    ("steps-not-int", lambda m, d, r: ["--steps", "many"], "invalid int value: 'many'"),
    ("missing-model", lambda m, d, r: ["--model", str(m.parent / "absent")], "absent"),
    ("corrupt-model", lambda m, d, r: (_corrupt_weights(m), [])[1], "Cannot load model"),
    ("missing-data-dir", lambda m, d, r: ["--data-dir", str(d / "absent")], "absent"),
    ("malformed-jsonl", lambda m, d, r: (_edit_line(d / "sst2/train.jsonl", 3, lambda _: "{oops"), [])[1], "line 4"),
    ("missing-field", lambda m, d, r: (_edit_line(d / "sst2/train.jsonl", 0, _drop_field), [])[1], "sentence"),
    ("label-out-of-range", lambda m, d, r: (_edit_line(d / "sst2/train.jsonl", 0, _label), [])[1], "label 5"),
    ("empty-split", lambda m, d, r: ((d / "sst2/validation.jsonl").write_text(""), [])[1], "empty"),
    ("context-too-long", lambda m, d, r: ["--max-length", "4096"], "exceeds the model's context of 128"),
    ("unwritable-output", lambda m, d, r: ((r.parent / "file").write_text(""), ["--output-dir", str(r.parent / "file" / "x")])[1], "not writable"),
    ("bad-config-yaml", lambda m, d, r: ((r.parent / "c.yaml").write_text("steps: [1,"), ["--config", str(r.parent / "c.yaml")])[1], "not valid YAML (line 1, column "),
    ("missing-config", lambda m, d, r: ["--config", str(r.parent / "nope.yaml")], "config file not found"),
    ("unknown-device", lambda m, d, r: ["--device", "tpu"], "`device` must be auto, cpu, cuda or cuda:N"),
    ("absent-gpu", lambda m, d, r: ["--device", "cuda:99"], "is not available on this machine"),
    ("newton-without-loss", lambda m, d, r: ["--objective", "accuracy"], "the Newton step of `curvzo` measures its curvature"),
]


@pytest.mark.parametrize("case_id,setup,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tiny_dir, small_data, tmp_path, capsys, case_id, setup, message):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    run = tmp_path / "runs" / "run"
    run.parent.mkdir()
    extra = setup(model, small_data, run)
    argv = ["train", "--model", str(model), "--task", "sst2", "--data-dir", str(small_data), "--num-train", "16",
            "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--steps", "2", "--output-dir", str(run),
            "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvzo: error:") and err.count("\n") == 1, err
    assert message in err, err
    assert not run.exists(), "nothing may be written for a bad input"


def _train_ok(tiny_dir: Path, data_dir: Path, run: Path, *extra: str) -> None:
    argv = ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "16",
            "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--steps", "2", "--output-dir", str(run),
            "--no-progress", *extra]
    assert main(argv) == 0


def test_resume_from_a_run_of_another_config(tiny_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _train_ok(tiny_dir, data_dir, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    _other_config(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--lr", "0.1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config differs in" in err
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "config.yaml"}
    assert after == {p: t for p, t in before.items() if p.name != "config.yaml"}


def test_resume_from_a_folder_without_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_trajectory_that_is_not_one(tiny_dir, tmp_path, capsys):
    bogus = tmp_path / "t.czt"
    bogus.write_bytes(b"hello")
    assert main(["replay", str(tiny_dir), str(bogus), "--out", str(tmp_path / "out")]) == 2
    assert "not a curvzo trajectory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_trajectory_of_another_noise_version(tiny_dir, tmp_path, capsys):
    old = tmp_path / "old.czt"
    old.write_bytes(b"CURVZO-TRAJECTORY 1\n{}\nS" + bytes(9))
    assert main(["replay", str(tiny_dir), str(old), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written with noise version 1" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_noise_version(tiny_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "16",
            "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--steps", "2", "--eval-every", "2",
            "--method", "mezo", "--output-dir", str(run), "--no-progress"]
    assert main(argv) == 0
    state_file = run / "checkpoint" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    state["optimizer"]["state"][0]["noise_version"] = 1
    torch.save(state, state_file)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer state was written with noise version 1" in err


def test_diverging_lr_stops_with_one_line(tiny_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "16",
            "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--steps", "40", "--eval-every", "40",
            "--method", "mezo", "--lr", "1e38", "--output-dir", str(run), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Step 1 evaluates the start weights (finite losses); its update overflows them, so steps 2-11
    # are the ten non-finite steps in a row that stop the run.
    assert err.count("\n") == 1 and "training diverged at step 11 (10 steps in a row had non-finite losses)" in err
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 11 and results["best_step"] == 0 and results["diverged"] in err


def test_output_folder_of_an_earlier_run(tiny_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _train_ok(tiny_dir, data_dir, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    argv = ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--output-dir", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_overwrite_of_a_folder_that_is_no_run(tiny_dir, data_dir, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    argv = ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--output-dir", str(folder),
            "--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite refuses" in err and "thesis.tex" in err
    assert (folder / "thesis.tex").read_text() == "precious"


def test_resume_and_overwrite_together(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--overwrite"]) == 2
    assert "not allowed with argument --resume" in capsys.readouterr().err


def test_export_of_a_step_the_run_never_reached(tiny_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _train_ok(tiny_dir, data_dir, run)
    capsys.readouterr()
    assert main(["export", str(run), "--step", "99", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--step must be best, last or a step number from 0 to 2" in err
    assert not (tmp_path / "out").exists()


def test_export_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not a run folder" in capsys.readouterr().err
