"""Trajectory files: a whole ZO fine-tune in a few bytes per step.

Given the base model, a ZO run is determined by its configuration and, per step, the projected
gradient (plus the ``active`` block mask when the run restricts sampling, e.g. to the embedding
rows of each batch's tokens): the optimizer regenerates everything else (seeds, sampled blocks,
inclusion probabilities, noise). ``curvzo replay`` rebuilds the fine-tuned weights bit for bit.

Layout: a magic line, one JSON header line, then records, appended as the run goes:

* ``H`` + uint16 n + n x (float64 lr, float64 weight_decay, float64 eps): group hyperparameters,
  written before the first step and whenever a scheduler changes them;
* ``S`` + float64 grad + varint r + r varints: one step; the varints are the run lengths of the
  active mask, alternating inactive / active and starting with inactive (r = 0: no mask);
* ``N`` + float64 grad + float64 curvature + varint r + r varints: one Newton step (``newton=True``),
  which replays from its measured curvature as well;
* ``Q`` + uint16 q: the following steps are query-parallel steps of q queries each, every one
  written as q consecutive ``S`` records (until the next ``Q``; before any, q = 1).

A resumed run truncates the file to the byte offset stored in its checkpoint, so the file always
matches the weights it would rebuild. The magic line carries the format version, which is also the
engine's noise version: a file written with another noise cannot be rebuilt and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import CheckpointError
from .optim import NOISE_VERSION

__all__ = ["MAGIC", "TrajectoryWriter", "Step", "Hyper", "Queries", "read_trajectory", "fingerprint"]

_MAGIC_PREFIX = b"CURVZO-TRAJECTORY "
MAGIC = _MAGIC_PREFIX + f"{NOISE_VERSION}\n".encode()


@dataclass(frozen=True)
class Step:
    grad: float
    active: torch.Tensor | None
    curvature: float | None = None  # a Newton step's measured curvature


@dataclass(frozen=True)
class Hyper:
    lr: tuple[float, ...]
    weight_decay: tuple[float, ...]
    eps: tuple[float, ...]


@dataclass(frozen=True)
class Queries:
    """From here on a step is ``q`` consecutive :class:`Step` records (a query-parallel step)."""

    q: int


def fingerprint(named: list[tuple[str, torch.Tensor]]) -> str:
    """Digest of the trainable tensors' names, shapes and values: a replay on other weights is refused."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _runs(mask: torch.Tensor) -> list[int]:
    """Run lengths of a bool mask, alternating False/True, starting with False (may be 0)."""
    values = mask.to(torch.int8)
    change = torch.nonzero(values[1:] != values[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), values.numel()]
    runs = [b - a for a, b in zip(bounds, bounds[1:])]
    return runs if not bool(mask[0]) else [0, *runs]


def _mask(runs: list[int]) -> torch.Tensor:
    parts = [torch.full((n,), bool(i % 2), dtype=torch.bool) for i, n in enumerate(runs)]
    return torch.cat(parts)


class TrajectoryWriter:
    """Appends records to a trajectory file; each record is flushed as soon as it is written."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], *, resume_at: int | None = None) -> None:
        self.path = Path(path)
        if resume_at is None:
            with open(self.path, "wb") as handle:
                handle.write(MAGIC + json.dumps(header).encode() + b"\n")
        else:
            with open(self.path, "r+b") as handle:
                handle.truncate(resume_at)
        self._handle: BinaryIO = open(self.path, "ab")
        self._hyper: Hyper | None = None
        self._queries = 1  # the q the records so far leave in force (a resumed file may have set one)
        if resume_at is not None:
            for record in read_trajectory(self.path)[1]:
                if isinstance(record, Queries):
                    self._queries = record.q

    @property
    def offset(self) -> int:
        """Bytes written so far: what a checkpoint stores to truncate to on resume."""
        return self._handle.tell()

    def step(self, grad: float, active: torch.Tensor | None, hyper: Hyper, queries: int = 1,
             curvature: float | None = None) -> None:
        """One step record; a query-parallel step of q queries is q calls with ``queries=q``; a
        Newton step gives its ``curvature``."""
        if queries != self._queries:
            self._handle.write(b"Q" + struct.pack("<H", queries))
            self._queries = queries
        if hyper != self._hyper:
            payload = struct.pack("<H", len(hyper.lr)) + b"".join(
                struct.pack("<ddd", *values) for values in zip(hyper.lr, hyper.weight_decay, hyper.eps)
            )
            self._handle.write(b"H" + payload)
            self._hyper = hyper
        runs = _runs(active) if active is not None else []
        head = b"S" + struct.pack("<d", grad) if curvature is None else b"N" + struct.pack("<dd", grad, curvature)
        self._handle.write(head + _varint(len(runs)) + b"".join(map(_varint, runs)))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def read_trajectory(
    path: str | os.PathLike, end: int | None = None
) -> tuple[dict[str, Any], Iterator[Step | Hyper | Queries]]:
    """The header and the records of a trajectory file, or of its first ``end`` bytes (a torn last record is dropped)."""
    path = Path(path)
    try:
        data = path.read_bytes()[:end]
    except OSError as err:
        raise CheckpointError(f"cannot read trajectory {path}: {err.strerror}") from None
    if data.startswith(_MAGIC_PREFIX) and not data.startswith(MAGIC):
        version = data[len(_MAGIC_PREFIX) :].split(b"\n", 1)[0].decode(errors="replace")
        raise CheckpointError(
            f"{path} was written with noise version {version}; this curvzo draws noise version {NOISE_VERSION} "
            "and cannot rebuild its weights (replay it with the curvzo release that wrote it)"
        )
    if not data.startswith(MAGIC) or b"\n" not in data[len(MAGIC) :]:
        raise CheckpointError(f"{path} is not a curvzo trajectory file")
    end = data.index(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC) : end])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: corrupt trajectory header") from None
    return header, _records(data, end + 1)


def _records(data: bytes, pos: int) -> Iterator[Step | Hyper | Queries]:
    while pos < len(data):
        try:
            kind = data[pos : pos + 1]
            if kind == b"H":
                (n,) = struct.unpack_from("<H", data, pos + 1)
                values = struct.unpack_from(f"<{3 * n}d", data, pos + 3)
                pos += 3 + 24 * n
                yield Hyper(tuple(values[0::3]), tuple(values[1::3]), tuple(values[2::3]))
            elif kind == b"Q":
                (q,) = struct.unpack_from("<H", data, pos + 1)
                pos += 3
                yield Queries(q)
            elif kind in (b"S", b"N"):
                newton = kind == b"N"
                grad, *curvature = struct.unpack_from("<dd" if newton else "<d", data, pos + 1)
                count, pos = _read_varint(data, pos + (17 if newton else 9))
                runs = []
                for _ in range(count):
                    run, pos = _read_varint(data, pos)
                    runs.append(run)
                yield Step(grad, _mask(runs) if runs else None, curvature[0] if newton else None)
            else:
                raise CheckpointError(f"corrupt trajectory record at byte {pos}")
        except (struct.error, IndexError):
            return  # a record cut short by a crash: the file ends at the last whole record
