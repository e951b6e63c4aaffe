"""The ZO engine: zeroth-order optimizers with the ``torch.optim`` contract.

Imports torch and the standard library only (a test enforces it), so the engine can be used
with any model, not only Hugging Face ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._noise import NOISE_VERSION, NOISES
from ._stream import read_rows
from .curvzo import CurvZO
from .mezo import MeZO
from .optimizer import ROUNDINGS, StepInfo, StepRecord, ZOOptimizer, decay_param_groups

__all__ = [
    "ZOOptimizer",
    "MeZO",
    "CurvZO",
    "StepRecord",
    "StepInfo",
    "decay_param_groups",
    "read_rows",
    "NOISE_VERSION",
    "NOISES",
    "ROUNDINGS",
    "OPTIMIZERS",
    "PRESETS",
    "build_optimizer",
]

OPTIMIZERS: dict[str, type[ZOOptimizer]] = {"mezo": MeZO, "curvzo": CurvZO}

#: Named configurations: (optimizer class, options). "curvzo-ref" is the reference port's
#: configuration, kept for comparison; "curvzo" is the library default: the reference plus
#: ``dense_below`` (blocks of at most 16,384 elements, i.e. norm gains, biases and embedding
#: rows, are perturbed every step instead of being sampled and scaled by 1/pi: on SmolLM2-135M
#: that 1/pi amplification on norm gains made the reference diverge at 3x MeZO's lr).
PRESETS: dict[str, tuple[type[ZOOptimizer], dict[str, Any]]] = {
    "mezo": (MeZO, {}),
    "curvzo-ref": (CurvZO, {}),
    "curvzo": (CurvZO, {"dense_below": 16384}),
    "uniform-sparse": (CurvZO, {"sampling": "uniform"}),
    "curvzo-fixed": (CurvZO, {"budget": 0.4}),
}


def build_optimizer(name: str, params: Iterable, **kwargs: Any) -> ZOOptimizer:
    """Instantiate a preset by name; ``kwargs`` override the preset's options."""
    if name not in PRESETS:
        raise ValueError(f"Unknown ZO method {name!r} (choose from {', '.join(PRESETS)})")
    cls, options = PRESETS[name]
    return cls(params, **{**options, **kwargs})
