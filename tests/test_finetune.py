"""The loop on its own: train, resume, replay and trajectories through ``curvzo.finetune``'s functions,
on the tiny model and a task written inline to a temporary folder (no shared data needed)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from curvzo.checkpoint import RunDir
from curvzo.config import TrainConfig
from curvzo.errors import CheckpointError
from curvzo.finetune import TRAJECTORY_FILE, evaluate_run, replay, setup, train, train_batch
from curvzo.trajectory import Hyper, Queries, Step, TrajectoryWriter, read_trajectory

WORDS = [("dull", 0), ("boring", 0), ("awful", 0), ("bad", 0), ("great", 1), ("lovely", 1), ("superb", 1), ("fine", 1)]


@pytest.fixture()
def toy_task(tmp_path: Path) -> dict:
    """A two-way sentiment task defined inline, its JSONL files in ``tmp_path``."""
    folder = tmp_path / "toy"
    folder.mkdir()
    for split, count in (("train", 24), ("test", 8)):
        rows = [{"text": f"a {WORDS[i % 8][0]} film, take {i}", "label": WORDS[i % 8][1]} for i in range(count)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"name": "toy", "doc_to_text": "{text} It was", "doc_to_choice": [" bad", " good"], "doc_to_target": "label",
            "data_files": {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}}


def config(tiny_dir: Path, task: dict, out: Path, **values) -> TrainConfig:
    settings = {"model": str(tiny_dir), "task": task, "method": "mezo", "lr": 1e-3, "steps": 4, "eval_every": 2,
                "batch_size": 4, "num_train": 16, "num_dev": 4, "num_test": 8, "max_length": 32, "device": "cpu",
                "output_dir": str(out)}
    return TrainConfig(**{**settings, **values})


def strip_time(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in RunDir(run).read_log()]


def steps(run: Path) -> list[tuple]:
    """A trajectory's step records as comparable tuples (a resumed writer restates the hyperparameters
    once, and the header holds the config, `steps` included, so neither is compared)."""
    return [(r.grad, None if r.active is None else r.active.tolist())
            for r in read_trajectory(run / TRAJECTORY_FILE)[1] if isinstance(r, Step)]


def test_train_writes_results_log_checkpoint_and_trajectory(tiny_dir, toy_task, tmp_path):
    cfg = config(tiny_dir, toy_task, tmp_path / "run")
    results = train(cfg, progress=False)
    assert (results["task"], results["steps"], results["forward_passes"]) == ("toy", 4, 2 * 4 * 4)
    assert [e["step"] for e in results["evals"]] == [2, 4] and 0 <= results["test"] <= 1
    assert results == json.loads((tmp_path / "run" / "results.json").read_text())
    log = RunDir(tmp_path / "run").read_log()
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["forward_passes"] == 8 * r["step"] for r in log)
    assert RunDir(tmp_path / "run").read_config() == cfg
    scores = evaluate_run(tmp_path / "run")  # the best weights, scored again from the folder alone
    assert scores["dev"] == results["best_dev"] and scores["test"] == results["test"]


def test_batches_are_a_pure_function_of_seed_and_step(tiny_dir, toy_task, tmp_path):
    cfg = config(tiny_dir, toy_task, tmp_path / "run")
    _, (train_set, _, _), *_ = setup(cfg)
    epoch = [e for step in range(4) for e in train_batch(train_set, step, cfg)]
    assert sorted(e.prompt for e in epoch) == sorted(e.prompt for e in train_set)  # steps 0-3: one epoch of 16
    assert train_batch(train_set, 5, cfg) == train_batch(train_set, 5, cfg)
    assert train_batch(train_set, 5, cfg) != train_batch(train_set, 5, replace(cfg, seed=1))


# curvzo-ref (tensor blocks) stands for the sparse presets here: `curvzo-sparse`'s one block per row of
# the 49k-token embedding costs seconds per step on the tiny model (test_cli.py runs it on real data).
@pytest.mark.parametrize("method", ["mezo", "curvzo", "curvzo-ref", "adamw"])
def test_resume_equals_an_uninterrupted_run(tiny_dir, toy_task, tmp_path, method):
    full = config(tiny_dir, toy_task, tmp_path / "full", method=method, keep="weights")  # weights compared below
    train(full, progress=False)
    part = config(tiny_dir, toy_task, tmp_path / "part", method=method, steps=2, keep="weights")
    train(part, progress=False)
    resumed = train(replace(part, steps=4), resume=True, progress=False)
    assert resumed == {**json.loads((tmp_path / "full" / "results.json").read_text()),
                       "wall_time_s": resumed["wall_time_s"]}
    a, _ = RunDir(tmp_path / "full").load_checkpoint()
    b, _ = RunDir(tmp_path / "part").load_checkpoint()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert strip_time(tmp_path / "full") == strip_time(tmp_path / "part")
    if method != "adamw":  # the trajectory was cut back to the checkpoint, then continued
        assert steps(tmp_path / "full") == steps(tmp_path / "part") and len(steps(tmp_path / "full")) == 4


def test_resume_refuses_a_changed_config(tiny_dir, toy_task, tmp_path):
    cfg = config(tiny_dir, toy_task, tmp_path / "run", steps=2)
    train(cfg, progress=False)
    with pytest.raises(CheckpointError, match="config differs in lr"):
        train(replace(cfg, lr=2e-3), resume=True, progress=False)


@pytest.mark.parametrize("method", ["mezo", "curvzo-ref"])
def test_replay_rebuilds_the_final_weights_from_the_trajectory(tiny_dir, toy_task, tmp_path, method):
    cfg = config(tiny_dir, toy_task, tmp_path / "run", method=method, keep="weights")
    train(cfg, progress=False)
    trained, _ = RunDir(tmp_path / "run").load_checkpoint()  # the checkpoint at the last step
    rebuilt = dict(replay(str(tiny_dir), tmp_path / "run" / TRAJECTORY_FILE, tmp_path / "rebuilt"))
    assert trained.keys() == rebuilt.keys() and all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    header, records = read_trajectory(tmp_path / "run" / TRAJECTORY_FILE)
    records = list(records)
    assert TrainConfig(**header["config"]) == cfg
    assert [type(r) for r in records] == [Hyper] + [Step] * 4
    assert [r.grad for r in records[1:]] == [r["grad"] for r in RunDir(tmp_path / "run").read_log()]
    assert all(r.active is None for r in records[1:])  # no row sampling: no masks


def test_trajectory_file_round_trip_and_resume_truncation(tmp_path):
    path = tmp_path / "t.czt"
    masks = [torch.tensor([True, False, False, True, True]), torch.tensor([False] * 3 + [True]), None]
    hypers = [Hyper((1e-3, 1e-3), (0.0, 0.1), (1e-3, 1e-3)), Hyper((1e-3, 1e-3), (0.0, 0.1), (1e-3, 1e-3)),
              Hyper((5e-4, 5e-4), (0.0, 0.1), (1e-3, 2e-3))]
    writer = TrajectoryWriter(path, {"config": {"seed": 3}})
    writer.step(0.25, masks[0], hypers[0])
    cut = writer.offset
    writer.step(-1.5, masks[1], hypers[1])
    writer.step(float("inf"), masks[2], hypers[2])
    writer.close()
    header, records = read_trajectory(path)
    records = list(records)
    assert header == {"config": {"seed": 3}}
    assert [type(r) for r in records] == [Hyper, Step, Step, Hyper, Step]  # hyperparameters only when they change
    steps = [r for r in records if isinstance(r, Step)]
    assert [s.grad for s in steps] == [0.25, -1.5, float("inf")]
    assert torch.equal(steps[0].active, masks[0]) and torch.equal(steps[1].active, masks[1]) and steps[2].active is None
    assert records[3] == hypers[2]
    resumed = TrajectoryWriter(path, {}, resume_at=cut)  # as a resumed run does: back to its checkpoint
    resumed.close()
    assert [type(r) for r in read_trajectory(path)[1]] == [Hyper, Step]


def test_query_parallel_steps_are_grouped_and_survive_a_resume(tmp_path):
    path = tmp_path / "q.czt"
    hyper = Hyper((1e-3,), (0.0,), (1e-3,))
    writer = TrajectoryWriter(path, {})
    writer.step(0.5, None, hyper)  # an ordinary step, then one of 2 queries (a resumed query run)
    for grad in (1.0, 2.0):
        writer.step(grad, None, hyper, queries=2)
    cut = writer.offset
    writer.close()
    assert [type(r) for r in read_trajectory(path)[1]] == [Hyper, Step, Queries, Step, Step]
    resumed = TrajectoryWriter(path, {}, resume_at=cut)  # q = 2 is still in force: no second Q record
    for grad in (3.0, 4.0):
        resumed.step(grad, None, hyper, queries=2)
    resumed.step(5.0, None, hyper)  # back to one process: q = 1 is recorded
    resumed.close()
    records = list(read_trajectory(path)[1])
    assert [type(r) for r in records] == [Hyper, Step, Queries, Step, Step, Hyper, Step, Step, Queries, Step]
    assert [r.q for r in records if isinstance(r, Queries)] == [2, 1]


def test_a_newton_run_logs_its_curvature_replays_and_resumes_bit_for_bit(tiny_dir, toy_task, tmp_path):
    newton = {"optimizer_options": {"newton": True}, "lr": 0.1, "keep": "weights"}
    cfg = config(tiny_dir, toy_task, tmp_path / "run", **newton)
    train(cfg, progress=False)
    log = RunDir(tmp_path / "run").read_log()
    records = [r for r in read_trajectory(tmp_path / "run" / TRAJECTORY_FILE)[1] if isinstance(r, Step)]
    assert [(r.grad, r.curvature) for r in records] == [(e["grad"], e["curvature"]) for e in log]
    assert all(e["curvature"] > 0 and e["step_lr"] > 0 for e in log)
    trained, _ = RunDir(tmp_path / "run").load_checkpoint()
    rebuilt = dict(replay(str(tiny_dir), tmp_path / "run" / TRAJECTORY_FILE, tmp_path / "rebuilt"))
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    part = config(tiny_dir, toy_task, tmp_path / "part", **newton, steps=2)
    train(part, progress=False)
    train(replace(part, steps=4), resume=True, progress=False)
    resumed, _ = RunDir(tmp_path / "part").load_checkpoint()
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)
    assert steps(tmp_path / "run") == steps(tmp_path / "part")


def test_a_newton_run_needs_the_loss_and_reads_a_generation_tasks_answer_logits(tiny_dir, toy_task, tmp_path):
    from curvzo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Newton step of `curvzo`.*\(objective: loss"):
        config(tiny_dir, toy_task, tmp_path / "a", method="curvzo", objective="accuracy")
    with pytest.raises(ConfigError, match=r"Newton step of `mezo`"):
        config(tiny_dir, toy_task, tmp_path / "a", optimizer_options={"newton": True}, objective="accuracy")
    generation = {**toy_task, "output_type": "generate_until", "metric": "f1", "doc_to_target": "text"}
    generation.pop("doc_to_choice")
    train(config(tiny_dir, generation, tmp_path / "b", method="curvzo", lr=0.1), progress=False)
    log = RunDir(tmp_path / "b").read_log()
    assert all(r["curvature"] > 0 and r["step_lr"] > 0 for r in log)  # curvature of the answer tokens' logits
