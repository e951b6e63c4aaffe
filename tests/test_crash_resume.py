"""Crash safety: a run killed with SIGKILL at any step resumes to bit-identical weights.

Every run here, in this process or a child, uses the same thread count (``threads.THREADS``), so
the bit-identity claimed does not depend on how a CPU's kernels split their sums by thread.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curvzo.cli import main
from threads import pinned_threads, thread_env

STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def _same_threads() -> Iterator[None]:
    """The runs of this process (the reference, every resume) at the count the children get."""
    with pinned_threads():
        yield


def _argv(tiny_dir: Path, data_dir: Path, out: Path, *schedule: str) -> list[str]:
    return ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "16",
            "--num-dev", "4", "--num-test", "4", "--batch-size", "4", "--steps", str(STEPS), "--lr", "1e-3",
            "--output-dir", str(out), "--no-progress", "--keep", "weights", *(schedule or ("--eval-every", "1"))]


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**thread_env(), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    return subprocess.Popen([sys.executable, "-m", "curvzo.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc: subprocess.Popen, run: Path, steps: int) -> None:
    deadline = time.monotonic() + 120
    while _logged_steps(run) < steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tiny_dir, data_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_argv(tiny_dir, data_dir, out)) == 0
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def _logged_steps(run: Path) -> int:
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return len(lines)


def _assert_same(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights)


# Checkpoint schedules: at each evaluation, every N steps (evaluating only at the end), by wall time.
SCHEDULES = {"eval": ("--eval-every", "1"), "steps": ("--eval-every", "100", "--checkpoint-every", "2"),
             "minutes": ("--eval-every", "100", "--checkpoint-minutes", "1e-6")}


@pytest.mark.parametrize("kill_after,schedule", [(2, "eval"), (5, "steps"), (3, "minutes")])
def test_sigkill_then_resume_is_bit_identical(tiny_dir, data_dir, tmp_path, reference, kill_after, schedule):
    run = tmp_path / "run"
    proc = _start(_argv(tiny_dir, data_dir, run, *SCHEDULES[schedule]))
    _wait_for_steps(proc, run, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same(load_file(str(run / "checkpoint" / "model.safetensors")), reference)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))


def test_crash_between_checkpoint_renames_keeps_the_previous_one(tiny_dir, data_dir, tmp_path, reference):
    """The states a kill inside ``save_checkpoint`` can leave: a torn new copy, the old one set aside."""
    run = tmp_path / "run"
    argv = _argv(tiny_dir, data_dir, run)
    argv[argv.index("--steps") + 1] = "4"
    assert main(argv) == 0
    (run / "checkpoint").rename(run / "checkpoint.old")
    (run / "checkpoint.tmp").mkdir()
    (run / "checkpoint.tmp" / "model.safetensors").write_bytes(b"torn")
    assert main(["train", "--resume", str(run), "--steps", str(STEPS), "--no-progress"]) == 0
    _assert_same(load_file(str(run / "checkpoint" / "model.safetensors")), reference)
    assert not (run / "checkpoint.tmp").exists() and not (run / "checkpoint.old").exists()
    shutil.rmtree(run)


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_dir, data_dir, tmp_path, reference, capsys):
    """A real SIGINT between evaluations and checkpoints: the run saves where it is and exits 130;
    the resumed run's result line tells its training time over every sitting from this sitting's."""
    run = tmp_path / "run"
    proc = _start(_argv(tiny_dir, data_dir, run, "--eval-every", "100"))
    _wait_for_steps(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("curvzo: interrupted at step ") and f"curvzo train --resume {run}" in err
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert re.search(r"training steps \d+ s over every sitting, \d+ s in this resumed sitting with loading",
                     capsys.readouterr().out)
    _assert_same(load_file(str(run / "checkpoint" / "model.safetensors")), reference)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))


def test_ctrl_c_before_the_first_step_leaves_a_resumable_run(tiny_dir, data_dir, tmp_path, reference, monkeypatch, capsys):
    """Ctrl-C during the zero-shot evaluation: the start is checkpointed and the resumed run is the same run."""
    import curvzo.finetune

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    real = curvzo.finetune.evaluate
    monkeypatch.setattr(curvzo.finetune, "evaluate", interrupted)
    assert main(_argv(tiny_dir, data_dir, run)) == 130
    assert capsys.readouterr().err == f"curvzo: interrupted at step 0: checkpoint at step 0; continue with `curvzo train --resume {run}`\n"
    monkeypatch.setattr(curvzo.finetune, "evaluate", real)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same(load_file(str(run / "checkpoint" / "model.safetensors")), reference)
