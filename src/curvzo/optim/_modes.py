"""The parallel modes of the distributed ZO step, readable without importing torch.

The one list of modes: :mod:`curvzo.optim.distributed` validates against it, and the harness's
config and command line import it (``curvzo --help`` must not import torch).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["Parallel", "PARALLEL_MODES"]

Parallel = Literal["data", "query", "shard"]
PARALLEL_MODES: tuple[str, ...] = get_args(Parallel)
