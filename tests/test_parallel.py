"""``curvzo train --parallel`` under torchrun (2 gloo processes on CPU) against one process.

Each torchrun launch costs seconds (two interpreters import torch and transformers), so each
launch serves several checks; the equivalences at the level of the optimizer are in
tests/optim/test_distributed.py. The ranks and every run of this process (the one-process
reference, the replays compared bit for bit) use the same thread count (``threads.THREADS``).
"""

from __future__ import annotations

import json
import os
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

STEPS = 4


def _argv(tiny_dir: Path, data_dir: Path, out: Path, *extra: str, steps: int = STEPS, lr: str = "1e-3") -> list[str]:
    return ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "16",
            "--num-dev", "4", "--num-test", "4", "--batch-size", "4", "--steps", str(steps), "--lr", lr,
            "--eval-every", "2", "--output-dir", str(out), "--no-progress", "--keep", "weights", *extra]


@pytest.fixture(scope="module", autouse=True)
def _same_threads() -> Iterator[None]:
    with pinned_threads():
        yield


def _env() -> dict[str, str]:
    # One thread per process: two processes on two cores, and oversubscription costs 15x.
    return {**thread_env(), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}


def _torchrun(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tiny_dir, data_dir, tmp_path_factory) -> Path:
    """The one-process run every distributed run is compared with."""
    run = tmp_path_factory.mktemp("single") / "run"
    assert main(_argv(tiny_dir, data_dir, run)) == 0
    return run


def _follows(run: Path, single: Path, mode: str, tiny_dir: Path, data_dir: Path) -> None:
    """A 2-process ``mode`` run draws the one-process run's blocks and budgets, and its losses and
    weights match up to the order in which the ranks' losses were summed."""
    code, err = _finish(_torchrun("-m", "curvzo", *_argv(tiny_dir, data_dir, run, "--parallel", mode)))
    assert code == 0, err
    mine, theirs = _log(run), _log(single)
    assert [r["blocks"] for r in mine] == [r["blocks"] for r in theirs]
    assert [r["budget"] for r in mine] == [r["budget"] for r in theirs]
    assert [r["loss"] for r in mine] == pytest.approx([r["loss"] for r in theirs], rel=1e-5)
    expected = _weights(single)  # in shard mode, the shards rank 0 gathered
    for name, tensor in _weights(run).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5)


def test_data_mode_follows_one_process(tiny_dir, data_dir, tmp_path, single):
    run = tmp_path / "data"
    _follows(run, single, "data", tiny_dir, data_dir)
    results = json.loads((run / "results.json").read_text())
    # Rank 0 alone wrote the folder; the ranks' weights were compared at every evaluation.
    assert results["processes"] == 2 and results["parallel"] == "data"


def test_a_single_process_run_continues_in_query_mode_and_replays(tiny_dir, data_dir, tmp_path, single):
    run = tmp_path / "query"
    shutil.copytree(single, run)  # a one-process checkpoint, resumed by 2 processes
    proc = _torchrun("-m", "curvzo", "train", "--resume", str(run), "--parallel", "query", "--steps", str(2 * STEPS),
                     "--no-progress")
    code, err = _finish(proc)
    assert code == 0, err
    log = _log(run)
    assert [r["step"] for r in log] == list(range(1, 2 * STEPS + 1))
    assert log[-1]["forward_passes"] - log[STEPS - 1]["forward_passes"] == STEPS * 2 * 2 * 4  # 2 queries a step
    # The trajectory holds 1-query steps, then 2-query steps: one process rebuilds the weights.
    assert main(["replay", str(tiny_dir), str(run / "trajectory.czt"), "--out", str(tmp_path / "rebuilt")]) == 0
    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    final = _weights(run)
    assert all(torch.equal(final[name], rebuilt[name]) for name in final)


def test_shard_mode_follows_one_process_and_its_records_replay_unsharded(tiny_dir, data_dir, tmp_path, single):
    run = tmp_path / "shard"
    _follows(run, single, "shard", tiny_dir, data_dir)
    final = _weights(run)
    # Each rank updated its rows exactly as one process updates them, given the same g.
    assert main(["replay", str(tiny_dir), str(run / "trajectory.czt"), "--out", str(tmp_path / "rebuilt")]) == 0
    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert all(torch.equal(final[name], rebuilt[name]) for name in final)
    # The gathered checkpoint continues in one process.
    assert main(["train", "--resume", str(run), "--steps", str(STEPS + 1), "--no-progress"]) == 0
    assert len(_log(run)) == STEPS + 1


def test_a_newton_run_in_query_mode_logs_its_curvature_and_replays(tiny_dir, data_dir, tmp_path):
    """Each query's curvature crosses the ranks with its losses: the trajectory's Newton records
    rebuild the 2-process run in one process, bit for bit."""
    run = tmp_path / "newton"
    argv = _argv(tiny_dir, data_dir, run, "--parallel", "query", "--method", "curvzo", lr="0.1")
    code, err = _finish(_torchrun("-m", "curvzo", *argv))
    assert code == 0, err
    log = _log(run)
    assert all(r["curvature"] > 0 and r["step_lr"] > 0 for r in log)
    assert main(["replay", str(tiny_dir), str(run / "trajectory.czt"), "--out", str(tmp_path / "rebuilt")]) == 0
    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    final = _weights(run)
    assert all(torch.equal(final[name], rebuilt[name]) for name in final)


def _rank_pid(parent: int, rank: int) -> int | None:
    psutil = pytest.importorskip("psutil")
    for child in psutil.Process(parent).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    return None


def test_a_killed_rank_stops_the_other_and_the_run_resumes_in_one_process(tiny_dir, data_dir, tmp_path):
    run = tmp_path / "killed"
    proc = _torchrun("-m", "curvzo", *_argv(tiny_dir, data_dir, run, "--parallel", "data", "--checkpoint-every", "2",
                                          steps=10_000))
    deadline = time.monotonic() + 120
    while (not (run / "log.jsonl").exists() or len(_log(run)) < 3) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    code, err = _finish(proc, timeout=60)
    assert code != 0 and time.monotonic() - killed < 30
    lines = [line for line in err.splitlines() if line.startswith("curvzo:")]
    assert len(lines) == 1 and f"rank 1 (pid {victim}) died" in lines[0] and "--resume" in lines[0], err
    saved = torch.load(run / "checkpoint" / "state.pt", weights_only=False)["train_state"]["step"]
    assert saved >= 2
    # The checkpoint of the 2-process run continues in one process, along the one-process run.
    assert main(["train", "--resume", str(run), "--steps", str(saved + 2), "--no-progress"]) == 0
    assert [r["step"] for r in _log(run)] == list(range(1, saved + 3))
    reference = tmp_path / "reference"
    assert main(_argv(tiny_dir, data_dir, reference, steps=saved + 2)) == 0
    expected = _weights(reference)
    for name, tensor in _weights(run).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5)


def test_ranks_with_different_configs_are_refused(tiny_dir, data_dir, tmp_path):
    script = tmp_path / "per_rank.py"  # rank 1 is given another seed
    script.write_text("import os, sys\nfrom curvzo.cli import main\n"
                      "extra = ['--seed', '1'] if os.environ['RANK'] == '1' else []\n"
                      "sys.exit(main(sys.argv[1:] + extra))\n")
    run = tmp_path / "mismatch"
    code, err = _finish(_torchrun(str(script), *_argv(tiny_dir, data_dir, run, "--parallel", "data")))
    lines = [line for line in err.splitlines() if line.startswith("curvzo:")]
    assert code != 0 and len(lines) == 1, err
    assert "the ranks run different configs: rank 1 has seed=1 (rank 0: 0)" in lines[0]
    assert "exitcode  : 2" in err and not run.exists()


def test_an_input_error_of_one_rank_stops_every_rank(tiny_dir, data_dir, tmp_path):
    script = tmp_path / "rank1_fails.py"  # as if rank 1's machine lacked the data
    script.write_text("import os, sys\nimport curvzo.finetune as f\nfrom curvzo.errors import DataError\n"
                      "from curvzo.cli import main\nif os.environ['RANK'] == '1':\n"
                      "    def setup(cfg):\n        raise DataError('data folder /data/sst2 not found')\n"
                      "    f.setup = setup\nsys.exit(main(sys.argv[1:]))\n")
    run = tmp_path / "local"
    code, err = _finish(_torchrun(str(script), *_argv(tiny_dir, data_dir, run, "--parallel", "query")))
    lines = [line for line in err.splitlines() if line.startswith("curvzo:")]
    assert code != 0 and lines == ["curvzo: error: rank 1: data folder /data/sst2 not found"], err
    assert "exitcode  : 2" in err and not run.exists()


@pytest.mark.parametrize("extra,env,message", [
    (["--parallel", "model"], {}, "`parallel` must be one of none, data, query, shard"),
    (["--parallel", "data", "--method", "adamw"], {}, "`parallel: data` needs a ZO method"),
    (["--parallel", "shard", "--dtype", "bfloat16"], {}, "`parallel: shard` shards full fine-tuning of float32"),
    ([], {"WORLD_SIZE": "2"}, "torchrun started 2 processes but `parallel` is none"),
    (["--parallel", "data", "--batch-size", "3"], {"WORLD_SIZE": "2"}, "`batch_size` 3 does not split evenly over 2"),
])
def test_bad_parallel_inputs(tiny_dir, data_dir, tmp_path, capsys, monkeypatch, extra, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    assert main(_argv(tiny_dir, data_dir, run, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvzo: error:") and err.count("\n") == 1 and message in err, err
    assert not run.exists()
