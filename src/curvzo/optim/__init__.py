"""The ZO engine: zeroth-order optimizers with the ``torch.optim`` contract.

Imports torch and the standard library only (a test enforces it), so the engine can be used
with any model, not only Hugging Face ones. The named choices (:data:`PRESETS`, roundings, noise
kinds) are plain data; the optimizers, and torch with them, are loaded on first use, so reading
a config or ``curvzo --help`` does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._modes import PARALLEL_MODES
from ._options import NEWTON_FRACTION, NOISES, PRESETS, ROUNDINGS, takes_newton_step

if TYPE_CHECKING:
    from ._noise import NOISE_VERSION
    from ._stream import read_rows
    from .curvzo import CurvZO
    from .distributed import DistributedZO
    from .mezo import MeZO
    from .optimizer import FallbackWarning, StepInfo, StepRecord, ZOOptimizer, decay_param_groups
    from .sparse import SparseCurvZO

__all__ = [
    "ZOOptimizer",
    "MeZO",
    "CurvZO",
    "SparseCurvZO",
    "StepRecord",
    "StepInfo",
    "FallbackWarning",
    "decay_param_groups",
    "read_rows",
    "NOISE_VERSION",
    "NOISES",
    "ROUNDINGS",
    "PRESETS",
    "NEWTON_FRACTION",
    "takes_newton_step",
    "PARALLEL_MODES",
    "DistributedZO",
    "build_optimizer",
]

_LAZY = {
    "ZOOptimizer": "optimizer", "StepRecord": "optimizer", "StepInfo": "optimizer", "decay_param_groups": "optimizer",
    "FallbackWarning": "optimizer",
    "MeZO": "mezo", "CurvZO": "curvzo", "SparseCurvZO": "sparse", "read_rows": "_stream", "NOISE_VERSION": "_noise",
    "DistributedZO": "distributed",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_optimizer(name: str, params: Iterable, **kwargs: Any) -> ZOOptimizer:
    """Instantiate a preset by name; ``kwargs`` override the preset's options."""
    if name not in PRESETS:
        raise ValueError(f"Unknown ZO method {name!r} (choose from {', '.join(PRESETS)})")
    cls_name, options = PRESETS[name]
    return __getattr__(cls_name)(params, **{**options, **kwargs})
