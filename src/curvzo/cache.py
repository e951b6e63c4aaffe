"""curvzo's cache: the one folder that first use fills (model aliases, the MR data), and its notice.

Fetching a model alias writes about half a gigabyte, so the first write of an entry says, in one
line on stderr, what was cached, where the cache is, how large it is now and how to clear it.
Later runs read the entry and say nothing. A command that may fetch several entries in a row (a
run's data, then its model) wraps them in :func:`announce`, so they share that one line and its
size is the cache's after all of them.

This module imports neither torch nor transformers: the task sources use it too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CACHE_ENV", "announce", "cache_root", "note_added"]

#: The environment variable that moves the cache.
CACHE_ENV = "CURVZO_CACHE"

_pending: list[tuple[str, Path]] = []  # entries added inside the current announce() block
_depth = 0


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$CURVZO_CACHE``, else ``~/.cache/curvzo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "curvzo").expanduser()


def note_added(what: str, root: Path) -> None:
    """Record that ``what`` was just written under the cache ``root``; said now, or at the end of announce()."""
    _pending.append((what, root))
    if _depth == 0:
        _flush()


@contextmanager
def announce() -> Iterator[None]:
    """Collect the entries added inside the block into one notice, printed when the block ends."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _flush()


def _flush() -> None:
    added = list(_pending)
    _pending.clear()
    if not added or os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        return
    for root in dict.fromkeys(root for _, root in added):
        names = ", ".join(what for what, r in added if r == root)
        print(f"curvzo: cached {names} in {root} (the cache now holds {_size(_bytes_under(root))}); "
              f"delete that folder to clear it, or set {CACHE_ENV} to keep the cache elsewhere",
              file=sys.stderr, flush=True)


def _bytes_under(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # a file another process is just renaming away
                pass
    return total


def _size(n: int) -> str:
    if n >= 10**9:
        return f"{n / 10**9:.1f} GB"
    return f"{n / 10**6:.0f} MB" if n >= 10**7 else f"{n / 10**6:.1f} MB"
