"""End-to-end: every method through the real CLI on a tiny model and real data slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curvzo.cli import main
from curvzo.config import METHODS
from tiny import tiny_model, tokenizer



def run_cli(tiny_dir: Path, data_dir: Path, out: Path, *extra: str) -> int:
    argv = ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir),
            "--num-train", "16", "--num-dev", "8", "--num-test", "8", "--batch-size", "4",
            "--steps", "2", "--eval-every", "1", "--output-dir", str(out), "--no-progress", "--keep", "weights", *extra]
    return main(argv)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_all_outputs(tiny_dir, data_dir, tmp_path, method):
    out = tmp_path / method
    assert run_cli(tiny_dir, data_dir, out, "--method", method, "--lr", "1e-3") == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("zero_shot", "best_dev", "test", "forward_passes", "wall_time_s", "method", "task", "model"):
        assert key in results
    assert results["method"] == method and results["task"] == "sst2"
    assert results["forward_passes"] == (2 if method not in ("adamw", "sgd") else 1) * 2 * 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert (out / "config.yaml").exists() and (out / "best" / "model.safetensors").exists()
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"loss.png", "dev.png"} <= plots
    if method in ("curvzo-ref", "curvzo-sparse", "curvzo-fixed", "uniform-sparse"):  # SparseCurvZO's budget and scores
        assert {"budget.png", "scores.png"} <= plots
        assert {"grad", "budget", "blocks", "skipped"} <= set(log[0])
    else:  # dense and first-order methods have no budget to draw
        assert "budget.png" not in plots
    assert all(round(results[k], 6) == results[k] for k in ("zero_shot", "best_dev", "test"))


def test_lora_curvzo_trains_only_the_adapter(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "lora"
    assert run_cli(tiny_dir, data_dir, out, "--peft", "lora") == 0
    saved = load_file(str(out / "best" / "adapter_model.safetensors"))
    assert saved and all("lora" in name for name in saved)


BF16_MASTER = ("--dtype", "bfloat16", "--rounding", "master")


@pytest.mark.parametrize("precision", [(), BF16_MASTER], ids=["fp32", "bf16-master"])
def test_resume_continues_bit_identically(tiny_dir, data_dir, tmp_path, precision):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("--steps", "4", "--eval-every", "2", "--lr", "1e-3", *precision)
    assert run_cli(tiny_dir, data_dir, full, *args) == 0
    assert run_cli(tiny_dir, data_dir, part, "--steps", "2", "--eval-every", "2", "--lr", "1e-3", *precision) == 0
    assert main(["train", "--resume", str(part), "--steps", "4", "--no-progress"]) == 0
    a = load_file(str(full / "checkpoint" / "model.safetensors"))
    b = load_file(str(part / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "log.jsonl").read_text().count("\n") == (part / "log.jsonl").read_text().count("\n") == 4
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in path.read_text().splitlines()]
    assert strip(full / "log.jsonl") == strip(part / "log.jsonl")


def test_cli_equals_api(tiny_dir, data_dir, tmp_path):
    from curvzo import TrainConfig, train

    assert run_cli(tiny_dir, data_dir, tmp_path / "cli", "--lr", "1e-3", "--device", "cpu") == 0
    cfg = TrainConfig(model=str(tiny_dir), task="sst2", data_dir=str(data_dir), num_train=16, num_dev=8,
                      num_test=8, batch_size=4, steps=2, eval_every=1, lr=1e-3, device="cpu", output_dir=str(tmp_path / "api"))
    api = train(cfg, progress=False)
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert {k: v for k, v in api.items() if k != "wall_time_s"} == {k: v for k, v in cli.items() if k != "wall_time_s"}


def test_zo_can_train_on_accuracy_objective(tiny_dir, data_dir, tmp_path):
    assert run_cli(tiny_dir, data_dir, tmp_path / "acc", "--method", "mezo", "--objective", "accuracy") == 0


def test_generation_task_runs(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "squad"
    argv = ["train", "--model", str(tiny_dir), "--task", "squad", "--data-dir", str(data_dir), "--num-train", "4",
            "--num-dev", "2", "--num-test", "2", "--batch-size", "2", "--steps", "1", "--max-length", "96",
            "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["metric"] == "f1"


def test_eval_and_plot_commands(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(tiny_dir, data_dir, out) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"task", "metric", "dev", "test"}
    assert main(["plot", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "dev.png").exists()


BAD = [
    (["--task", "sst3"], "Unknown task 'sst3'. Did you mean: sst2"),
    (["--method", "adam"], "`method` must be one of"),
    (["--lr", "0"], "`lr` must be a finite number > 0"),
    (["--eps=-1e-3"], "`eps` must be a finite number > 0"),
    (["--steps", "0"], "`steps` must be an integer >= 1"),
    (["--peft", "qlora"], "`peft` must be one of"),
    (["--set", "colour=blue"], "unknown config key(s): colour"),
    (["--data-dir", "/nonexistent/data"], "/nonexistent/data"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--objective", "f1", "--method", "adamw"], "not differentiable"),
    (["--set", "optimizer_options={sampling: random}"], "sampling"),
    (["--optimizer-options", "{sampling: random}"], "sampling"),
    (["--embedding-rows", "maybe"], "expected true or false, got 'maybe'"),
    (["--report-to", "tensorbord"], "(did you mean: tensorboard?)"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_dir, data_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert run_cli(tiny_dir, data_dir, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curvzo: error:") and message in err
    assert not out.exists()


def test_unwritable_output_folder(tiny_dir, data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_cli(tiny_dir, data_dir, blocker / "run") == 2
    assert "not writable" in capsys.readouterr().err


def test_resume_refuses_another_config(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(tiny_dir, data_dir, out) == 0
    assert main(["train", "--resume", str(out), "--lr", "0.5", "--no-progress"]) == 2
    assert "config differs in lr" in capsys.readouterr().err


def test_resume_compares_only_settings_that_change_the_run(tiny_dir, data_dir, tmp_path, capsys):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert run_cli(tiny_dir, data_dir, fp32, "--rounding", "stochastic") == 0
    assert main(["train", "--resume", str(fp32), "--steps", "3", "--rounding", "nearest", "--no-progress"]) == 0
    assert run_cli(tiny_dir, data_dir, bf16, "--dtype", "bfloat16", "--rounding", "stochastic") == 0
    assert main(["train", "--resume", str(bf16), "--steps", "3", "--rounding", "master", "--no-progress"]) == 2
    assert "config differs in rounding" in capsys.readouterr().err


@pytest.mark.parametrize("method,peft,precision", [("curvzo", "none", ()), ("curvzo-ref", "none", ()), ("mezo", "lora", ()),
                                                  ("curvzo", "none", BF16_MASTER)])
def test_replay_rebuilds_the_trained_weights(tiny_dir, data_dir, tmp_path, method, peft, precision):
    from curvzo.finetune import replay

    out = tmp_path / "run"
    assert run_cli(tiny_dir, data_dir, out, "--method", method, "--peft", peft, "--steps", "5", "--eval-every", "5",
                   "--lr", "1e-3", *precision) == 0
    trained = load_file(str(out / "checkpoint" / "model.safetensors"))
    rebuilt = dict(replay(str(tiny_dir), out / "trajectory.czt", tmp_path / "rebuilt"))
    assert trained.keys() == rebuilt.keys()
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    assert (tmp_path / "rebuilt").is_dir()


def test_replay_refuses_another_base_model(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(tiny_dir, data_dir, out) == 0
    other = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other)
    tokenizer().save_pretrained(other)
    assert main(["replay", str(other), str(out / "trajectory.czt"), "--out", str(tmp_path / "x")]) == 2
    assert "other base weights" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`curvzo bench --dry-run | head` must end quietly, as other command-line tools do."""
    import subprocess
    import sys

    script = ("import sys, curvzo.cli as c\n"
              "c._COMMANDS['tasks'] = lambda args: [print('x' * 80) for _ in range(100_000)]\n"
              "sys.exit(c.main(['tasks']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err and err == ""


def test_every_config_field_is_a_train_flag_with_its_help_and_default(capsys):
    from dataclasses import fields

    from curvzo.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for spec in fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        assert f"{flag} {spec.name.upper()} {' '.join(spec.metadata['help'].split())}" in text
    assert "--steps STEPS optimizer steps (default: 60)" in text
    assert "--optimizer-options OPTIMIZER_OPTIONS extra ZO optimizer options (default: {})" in text


def test_version_and_a_help_that_needs_no_torch(capsys):
    import subprocess
    import sys
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"curvzo {version('curvzo')}\n"
    script = ("import sys\nfrom curvzo.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "--overwrite" in out and out.splitlines()[-1] == "[]"


def test_warnings_are_one_line_each_and_a_batch_larger_than_the_data_is_one(tiny_dir, data_dir, tmp_path, capsys):
    """16 training examples and a batch of 32: the run goes on, and says so in one line."""
    argv = ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "16",
            "--num-dev", "4", "--num-test", "4", "--batch-size", "32", "--steps", "1", "--no-progress",
            "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["curvzo: warning: batch_size 32 exceeds the 16 training examples of task `sst2`: every batch "
                   "repeats examples; lower batch_size or give the task more data"]


def test_export_and_replay_show_their_progress(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(tiny_dir, data_dir, out, "--steps", "3") == 0
    capsys.readouterr()
    assert main(["export", str(out), "--step", "last", "--out", str(tmp_path / "exported")]) == 0
    err = capsys.readouterr().err
    assert f"loading {tiny_dir}" in err and "replaying steps" in err and "3/3" in err and "saving to" in err
    assert main(["replay", str(tiny_dir), str(out / "trajectory.czt"), "--out", str(tmp_path / "rebuilt")]) == 0
    err = capsys.readouterr().err
    assert "replaying steps" in err and "3/3" in err
    assert main(["export", str(out), "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
