"""Finished runs kept compactly: their records in one ``<out>/runs.tar.gz`` per results folder.

A grid's runs are written as folders (``<out>/runs/<task>/<run>/``) while they run, so that an
interrupted run resumes from its checkpoint. A finished run is only read afterwards, so
:func:`pack` moves its records (config, per-step log, results, block scores, trajectory) into
the archive and removes the folder: hundreds of small files become one. Readers go through
:func:`read_record`, which prefers a folder over the archive, so both forms count as finished
and a run present in both is the folder's version.

The archive is deterministic (sorted members, zero timestamps and owners), so packing the same
runs again gives the same bytes.
"""

from __future__ import annotations

import functools
import gzip
import io
import shutil
import tarfile
from pathlib import Path

from ..io import atomic_write

__all__ = ["ARCHIVE", "RECORDS", "pack", "read_record", "stored"]

ARCHIVE = "runs.tar.gz"
#: The files of a finished run worth keeping; weights, checkpoints and per-run plots are regenerable.
RECORDS = ("config.yaml", "log.jsonl", "results.json", "scores.json", "trajectory.czt")


def stored(out: Path) -> dict[str, bytes]:
    """Every member of ``<out>/runs.tar.gz`` (``<task>/<run>/<file>`` -> bytes); empty without one."""
    path = Path(out) / ARCHIVE
    if not path.is_file():
        return {}
    stat = path.stat()
    return _read_archive(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_archive(path: Path, mtime_ns: int, size: int) -> dict[str, bytes]:
    # Keyed by modification time and size too: a pack in this process is read afresh.
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def read_record(run_path: Path, name: str) -> bytes | None:
    """A run's file ``name`` from its folder, else from its results folder's archive; None if neither has it."""
    file = run_path / name
    if file.is_file():
        return file.read_bytes()
    out = run_path.parents[2]  # <out>/runs/<task>/<run>
    return stored(out).get(f"{run_path.parent.name}/{run_path.name}/{name}")


def pack(out: Path) -> list[Path]:
    """Move the records of every finished run folder under ``<out>/runs/`` into ``<out>/runs.tar.gz``.

    Returns the folders packed. A folder holding anything but records and plots (kept weights,
    a checkpoint) keeps that; the rest of it is removed once the archive is written.
    """
    out = Path(out)
    members = dict(stored(out))
    folders = sorted(p.parent for p in out.glob("runs/*/*/results.json"))
    for folder in folders:
        prefix = f"{folder.parent.name}/{folder.name}/"
        for key in [k for k in members if k.startswith(prefix)]:
            del members[key]
        members.update({prefix + name: (folder / name).read_bytes() for name in RECORDS if (folder / name).is_file()})
    if not folders:
        return []
    atomic_write(out / ARCHIVE, lambda tmp: tmp.write_bytes(_archive_bytes(members)))
    for folder in folders:
        for name in RECORDS:
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(folder / "plots", ignore_errors=True)
        _remove_if_empty(folder)
        _remove_if_empty(folder.parent)
    _remove_if_empty(out / "runs")
    return folders


def _archive_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name in sorted(members):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(members[name]), 0o644, 0
                tar.addfile(info, io.BytesIO(members[name]))
    return buffer.getvalue()


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
