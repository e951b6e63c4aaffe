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
    run_example("zotrainer_lora.py", monkeypatch, MODEL=str(tiny_dir), DATA=str(data_dir / "sst2"), STEPS="2",
                OUT=str(tmp_path / "run"))
    assert "'eval_loss'" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").is_file()
