"""The engine's named choices, readable without importing torch (``curvzo --help`` reads them).

Each list has one owner here; the optimizers validate against them and the harness imports them.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

__all__ = ["Rounding", "ROUNDINGS", "Noise", "NOISES", "PRESETS"]

Rounding = Literal["nearest", "stochastic", "master"]
ROUNDINGS: tuple[str, ...] = get_args(Rounding)

Noise = Literal["gaussian", "generated", "rademacher"]
NOISES: tuple[str, ...] = get_args(Noise)

#: Named configurations: (optimizer class name, options). "curvzo-ref" is the reference port's
#: configuration, kept for comparison; "curvzo" is the library default: the reference plus
#: ``dense_below`` (blocks of at most 16,384 elements, i.e. norm gains, biases and embedding
#: rows, are perturbed every step instead of being sampled and scaled by 1/pi: on SmolLM2-135M
#: that 1/pi amplification on norm gains made the reference diverge at 3x MeZO's lr).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mezo": ("MeZO", {}),
    "curvzo-ref": ("CurvZO", {}),
    "curvzo": ("CurvZO", {"dense_below": 16384}),
    "uniform-sparse": ("CurvZO", {"sampling": "uniform"}),
    "curvzo-fixed": ("CurvZO", {"budget": 0.4}),
}
