"""Type checks shared by the engine and the harness (standard library only).

``bool`` is a subclass of ``int`` in Python, so ``isinstance(True, int)`` holds; every check of
an integer or a real option must exclude it, or ``steps: true`` in a config would mean one step.
"""

from __future__ import annotations

import math

__all__ = ["is_int", "is_real"]


def is_int(x: object, *, minimum: int | None = None) -> bool:
    """``x`` is an int (not a bool), at least ``minimum`` when given."""
    return isinstance(x, int) and not isinstance(x, bool) and (minimum is None or x >= minimum)


def is_real(x: object, *, lo: float = -math.inf, hi: float = math.inf, hi_open: bool = False) -> bool:
    """``x`` is a finite int or float (not a bool) in [lo, hi] (or [lo, hi) with ``hi_open``)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        return False
    return lo <= x < hi if hi_open else lo <= x <= hi
