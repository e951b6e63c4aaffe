"""The scripts in examples/ run as a user would run them, here on the tiny Llama (``tiny_dir``).

They read their model, data, step count and output folder from environment variables, and run
in this process (``runpy``) to spare a second import of torch and transformers.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
from conftest import REPO

EXAMPLES = REPO / "examples"


def run_example(name: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_plain_pytorch_example(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    run_example("plain_pytorch.py", monkeypatch, MODEL=str(tiny_dir), STEPS="3")
    lines = capsys.readouterr().out.splitlines()
    assert [int(re.match(r"step (\d+): loss \d+\.\d+", line).group(1)) for line in lines] == [0, 1, 2]


def test_zotrainer_lora_example(
    tiny_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run_example("zotrainer_lora.py", monkeypatch, MODEL=str(tiny_dir), DATA=str(data_dir), STEPS="2",
                OUT=str(tmp_path / "run"))
    assert "'eval_loss'" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_own_data_example(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(REPO)  # its data files are named from the repository root, as documented
    run_example("own_data.py", monkeypatch, MODEL=str(tiny_dir), STEPS="2", OUT=str(tmp_path / "run"))
    assert "my_reviews accuracy: zero-shot" in capsys.readouterr().out
    assert (tmp_path / "run" / "results.json").is_file()


def test_an_example_that_needs_the_unreachable_hub_ends_in_one_line(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """Without DATA the ZOTrainer example reads the hub; an unreachable endpoint is one line and exit code 2."""
    from curvzo.hub import _probe

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    _probe.cache_clear()
    monkeypatch.delenv("DATA", raising=False)
    with pytest.raises(SystemExit) as done:
        run_example("zotrainer_lora.py", monkeypatch, MODEL=str(tiny_dir))
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and "needs the Hugging Face hub" in err, err
