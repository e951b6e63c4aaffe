"""Every shipped YAML in configs/ is a valid TrainConfig whose task resolves and renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from curvzo.config import load_config
from curvzo.finetune import resolve_task

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_is_valid(path):
    cfg = load_config(path)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), "each config starts with a comment saying what it runs"
    assert f"--config configs/{path.name}" in path.read_text()
    task = resolve_task(cfg.task)
    assert task.name


def test_configs_exist():
    assert len(CONFIGS) >= 3


def test_device_auto_is_the_gpu_when_there_is_one():
    import torch

    from curvzo.config import TrainConfig

    assert TrainConfig().resolved_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert TrainConfig(device="cpu").resolved_device() == torch.device("cpu")


def test_the_demo_config_is_the_embedded_default_written_out():
    from dataclasses import replace

    from curvzo.config import TrainConfig

    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert replace(demo, output_dir=None) == replace(TrainConfig(), lr=TrainConfig().resolved_lr())
