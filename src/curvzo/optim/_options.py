"""The engine's named choices, readable without importing torch (``curvzo --help`` reads them).

Each list has one owner here; the optimizers validate against them and the harness imports them.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

__all__ = ["Rounding", "ROUNDINGS", "Noise", "NOISES", "PRESETS", "NEWTON_FRACTION", "NEWTON_CLASSES", "takes_newton_step"]

Rounding = Literal["nearest", "stochastic", "master"]
ROUNDINGS: tuple[str, ...] = get_args(Rounding)

Noise = Literal["gaussian", "generated", "rademacher"]
NOISES: tuple[str, ...] = get_args(Noise)

#: Named configurations: (optimizer class name, options). "curvzo" is the library's flagship:
#: MeZO's direction with the step length that the forwards' curvature measures (``lr`` is the
#: fraction of the Newton step). The sparse estimator of the paper stays for comparison:
#: "curvzo-ref" is the reference port's configuration, "curvzo-sparse" the port plus
#: ``dense_below`` (blocks of at most 16,384 elements, i.e. norm gains, biases and embedding rows,
#: perturbed every step instead of being sampled and scaled by 1/pi: on SmolLM2-135M that 1/pi
#: amplification on norm gains made the reference diverge at 3x MeZO's lr), and its two ablations.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mezo": ("MeZO", {}),
    "curvzo": ("CurvZO", {}),
    "curvzo-ref": ("SparseCurvZO", {}),
    "curvzo-sparse": ("SparseCurvZO", {"dense_below": 16384}),
    "uniform-sparse": ("SparseCurvZO", {"sampling": "uniform"}),
    "curvzo-fixed": ("SparseCurvZO", {"budget": 0.4}),
}

#: The default fraction of the Newton step (``lr`` of a Newton step): one value for every task,
#: as a fraction of a measured step it does not scale with the model or the subset perturbed
#: (measured on SmolLM2-135M: 0.05-0.1 useful, 0.2 too long).
NEWTON_FRACTION = 0.1

#: Optimizer classes that always take the Newton step (their closure returns ``(loss, logits)``).
NEWTON_CLASSES: frozenset[str] = frozenset({"CurvZO"})


def takes_newton_step(method: str, options: dict[str, Any]) -> bool:
    """Whether preset ``method`` built with ``options`` takes the directional Newton step."""
    return method in PRESETS and (PRESETS[method][0] in NEWTON_CLASSES or options.get("newton") is True)
