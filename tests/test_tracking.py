"""`curvzo train --report-to`: TensorBoard's own event files hold the run's values, read back with
TensorBoard's reader; a bad value is one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curvzo.cli import main

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def train(tiny_dir: Path, data_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "16",
                 "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--steps", "4", "--eval-every", "2",
                 "--lr", "1e-3", "--output-dir", str(out), "--no-progress", *extra])


def test_tensorboard_events_hold_the_logged_values(tiny_dir, data_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "run"
    assert train(tiny_dir, data_dir, out, "--report-to", "tensorboard") == 0
    (events_dir,) = [p.parent for p in out.glob("runs/*/events.out.tfevents.*")]
    events = EventAccumulator(str(events_dir))
    events.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    assert series("train/loss") == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log]
    assert series("train/zo_grad") == [(r["step"], pytest.approx(r["grad"], rel=1e-6)) for r in log]
    assert [step for step, _ in series("train/learning_rate")] == [1, 2, 3, 4]
    dev = [(0, results["zero_shot"])] + [(e["step"], e["dev"]) for e in results["evals"]]
    assert series("eval/accuracy") == [(step, pytest.approx(value, abs=1e-6)) for step, value in dev]
    assert series("test/accuracy") == [(4, pytest.approx(results["test"], abs=1e-6))]


def test_without_report_to_nothing_is_written(tiny_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "run"
    assert train(tiny_dir, data_dir, out) == 0
    assert not (out / "runs").exists()


def _not_installed() -> str | None:
    from curvzo.tracking import _integrations

    known, installed = _integrations()
    return next((name for name in known if name not in installed), None)


@pytest.mark.parametrize("value,message", [
    ("tensorbord", "`report_to` 'tensorbord' is not a reporting integration (did you mean: tensorboard?)"),
    ("tensorboard,", "`report_to` must be none, all or integration names separated by commas"),
    (None, "needs its library, which is not installed here (installed: "),
])
def test_a_bad_report_to_is_one_line_exit_2(tiny_dir, data_dir, tmp_path, capsys, value, message) -> None:
    value = value or _not_installed()
    if value is None:
        pytest.skip("every integration transformers knows is installed here")
    out = tmp_path / "never"
    assert train(tiny_dir, data_dir, out, "--report-to", value) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curvzo: error:") and message in err, err
    assert not out.exists()
