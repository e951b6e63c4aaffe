"""Ctrl-C that never tears a step: SIGINT is held back while the weights are mid-update.

A ZO step perturbs the sampled blocks in place and restores them before it returns, so a
``KeyboardInterrupt`` raised inside it would leave weights that belong to no step. Inside
:class:`StepGuard` a first SIGINT is remembered and raised as ``KeyboardInterrupt`` when the block
ends, at a step boundary, where a checkpoint is exact; a second one inside the same block
interrupts at once and marks the guard ``torn`` (the weights must not be saved then).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

__all__ = ["StepGuard"]


class StepGuard:
    """Context manager deferring SIGINT to the end of the block (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.torn = False
        self._pending = False
        self._previous: signal.Handlers | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._pending:
            raise KeyboardInterrupt
        self._pending = True

    def __enter__(self) -> StepGuard:
        self._pending = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if kind is not None:
            self.torn = issubclass(kind, KeyboardInterrupt)
            return
        if self._pending:
            raise KeyboardInterrupt
