"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real task data (``$CURVZO_DATA_DIR``, default ``<repo>/../shared/data``); skip if absent."""
    path = Path(os.environ.get("CURVZO_DATA_DIR") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"real task data not found at {path} (set CURVZO_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as an ordinary HF folder, so the CLI loads it like any local model."""
    from tiny import tiny_model, tokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama", seed=0).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder
