"""ZOOptimizer: the shared machinery of two-point zeroth-order optimizers.

A ZO step needs only forwards: evaluate the loss at theta + eps*z and theta - eps*z on the sampled
blocks, then move along z by the projected gradient (L+ - L-) / (2 eps). Subclasses decide only
which blocks to sample and with which inclusion probabilities (``_sample``) and what to learn from
the outcome (``_observe``); everything that must be exact lives here:

* z of an element is a pure function of (step seed, block id, element index) (``_noise``), so no
  noise is stored, and any piece of it is regenerated on its own: for the +eps forward, the -eps
  forward and the update (three draws of each sampled element per step).
* Perturbed forwards never write into the stored weights. Given the model (``model=``), each
  module sees its perturbed parameters only while it runs (``_stream``), so a step holds at most
  one module's worth of extra memory, bounded by ``max_chunk`` elements for embeddings and large
  output layers. Without it, the sampled blocks are set aside for the closure and copied back.
  Either way ``lr=0`` leaves every bit unchanged in any dtype.
* The update of a step is a pure function of a small :class:`StepRecord` and the weights before
  it, applied in chunks of at most ``max_chunk`` elements, so records can be replayed to rebuild
  weights or exchanged between processes.
* Randomness comes from generators owned by the optimizer; the global torch RNG is never used.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from torch import nn

from . import _newton
from ._blocks import Block, build_blocks
from ._noise import NOISE_VERSION, NoiseSource, unit_elements
from ._options import NOISES, ROUNDINGS, Noise, Rounding
from ._rounding import round_stochastic
from ._stream import Perturbation, owned_parameters, pieces, streamed
from ._validate import is_int, is_real

__all__ = ["ZOOptimizer", "StepRecord", "StepInfo", "FallbackWarning", "decay_param_groups", "DEFAULT_MAX_CHUNK"]

Closure = Callable[[], Any]

#: Largest piece of a tensor perturbed, drawn or updated at once (1M elements: 4 MB in fp32).
DEFAULT_MAX_CHUNK = 1 << 20


class FallbackWarning(UserWarning):
    """An optimizer built without ``model=`` runs the set-aside fallback: its closures see the
    perturbed weights written into the parameters, which needs a copy of the sampled blocks."""


#: One line (the CLI prints warnings as one line each): what the fallback costs and how to leave it.
_FALLBACK_MESSAGE = (
    "no model= given: each step copies the sampled parameters aside while the closure runs (up to "
    "one more copy of them; MeZO on SmolLM2-135M peaks at 1.5x inference memory); pass "
    "model=<the module the closure calls> to perturb each module only while it runs"
)


@dataclass(frozen=True)
class StepRecord:
    """Everything that defines one update, given the weights before it.

    ``blocks[i]`` was sampled with inclusion probability ``pi[i]``; ``lr``, ``weight_decay`` and
    ``eps`` are per parameter group, as they were when the step ran (schedulers change them).
    ``grad`` is (L+ - L-) / (2 eps) with the first group's eps; a group perturbed with another eps
    moves by ``grad * eps[0] / eps[g]``, its own projected gradient. The update divides it by
    ``divisor[i]`` where an estimator replaces the Horvitz-Thompson 1/pi (a subspace scaling, a
    running normalisation), by ``pi[i]`` when ``divisor`` is
    None; the record then still says how the blocks were drawn, which the optimizer learns from.
    ``newton`` is the curvature the lr is divided by in a Newton step (``newton=True``), None
    otherwise.
    """

    step: int
    seed: int
    blocks: tuple[int, ...]
    pi: tuple[float, ...]
    grad: float
    lr: tuple[float, ...]
    weight_decay: tuple[float, ...]
    eps: tuple[float, ...]
    divisor: tuple[float, ...] | None = None
    newton: float | None = None

    def step_lr(self, group: int) -> float:
        """The lr group ``group``'s update used: its lr, or for a Newton step that fraction of
        1 / curvature (no step where nothing curves)."""
        lr = self.lr[group]
        if self.newton is None:
            return lr
        return lr / self.newton if self.newton > 0.0 else 0.0


@dataclass(frozen=True)
class Draw:
    """What the first half of a step drew: its step number, seed, blocks and their probabilities
    (``probabilities``: the tensor ``_sample`` returned, which an estimator's correction may hand
    back unchanged to mean the plain 1/pi update), and the budget fraction it drew with
    (``blocks`` are the :class:`Block` objects of ``ids``)."""

    step: int
    seed: int
    ids: tuple[int, ...]
    pi: tuple[float, ...]
    probabilities: torch.Tensor
    budget: float
    blocks: list[Block]


@dataclass(frozen=True)
class StepInfo:
    """What happened in the last call of ``step`` (``opt.last_step``), for logs and plots."""

    loss_plus: float
    loss_minus: float
    grad: float
    num_blocks: int
    budget: float
    skipped: bool
    record: StepRecord
    curvature: float | None = None  # the Gauss-Newton curvature along z a Newton step measured


def decay_param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """Two groups: matrices with ``weight_decay``, biases and norm weights (vectors) without.

    Decaying a norm gain pulls it towards 0 rather than towards its neutral value 1, and biases
    carry no capacity worth regularising: the convention of MeZO, nanoGPT and HF Trainer.
    """
    decay, no_decay = [], []
    for _, p in named_parameters:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _to_host(values: list[torch.Tensor]) -> torch.Tensor:
    """0-dim tensors as one float64 CPU vector, with one copy per device rather than one per block:
    on a GPU a per-block ``float()`` stalls the launch queue hundreds of times a step."""
    out = torch.empty(len(values), dtype=torch.float64)
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        by_device.setdefault(value.device, []).append(i)
    for index in by_device.values():
        out[index] = torch.stack([values[i] for i in index]).to("cpu", torch.float64)
    return out


def _fp32_scalar(x: float) -> float:
    """``x`` as an fp32 kernel can take it: beyond fp32's range it is +-inf (the update overflows
    the weights, as the same product computed in fp32 would) rather than an error."""
    return x if abs(x) <= _FP32_MAX or not math.isfinite(x) else math.copysign(math.inf, x)


_FP32_MAX = float(torch.finfo(torch.float32).max)


def _running_scale(previous: float | None, grad: float) -> float:
    """0.9 previous + 0.1 |g|, started at the first |g|: a scale of the projected gradient that
    includes the current step, so |g| / scale <= 10; unchanged by a non-finite g."""
    if not math.isfinite(grad):
        return previous if previous is not None else math.nan
    if previous is None or previous == 0.0:
        return abs(grad)
    return 0.9 * previous + 0.1 * abs(grad)


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside curvzo.optim, so that a warning names the line
    that built the optimizer (a subclass's ``__init__`` or ``build_optimizer`` in between)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(__package__ or "curvzo.optim"):
        frame, level = frame.f_back, level + 1
    return level


def _as_float(loss: Any) -> float:
    return float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)


class ZOOptimizer(torch.optim.Optimizer):
    """Base class of the two-point ZO optimizers; see the module docstring for the contract.

    Args:
        params: iterable of parameters or parameter groups (groups may set ``lr``,
            ``weight_decay``, ``eps``, ``block_size`` and the subclass's per-group options).
        defaults: per-group defaults (``lr``, ``weight_decay`` and the subclass's own).
        eps (float): perturbation scale of the two-point estimate (not Adam's epsilon); a group
            default, so groups and schedulers may set their own.
        seed (int): seed of the optimizer's own generators; same seed, same machine, same run.
        block_size (int, optional): split tensors larger than this many elements into blocks
            (whole rows for matrices); a group may set its own. Default: one block per tensor.
        rounding (str): how updates of bf16/fp16 weights are stored: ``"nearest"`` (loses updates
            below half an ulp), ``"stochastic"`` (unbiased; reproducible; no memory) or
            ``"master"`` (an fp32 master copy of each low-precision parameter, created when one
            of its blocks is first updated, accumulates the updates; the weights are its nearest
            rounding, so they follow fp32 training at the cost of 4 bytes per such element).
            Default: nearest.
        model (nn.Module, optional): the module whose forward the closure runs. With it, each
            module sees its perturbed parameters only while it runs, and a step needs at most one
            module's worth of extra memory; without it the sampled blocks are set aside for the
            whole closure (memory of the sampled set). Default: None.
        max_chunk (int): the largest number of elements perturbed, drawn or updated in one piece
            (rounded up to a whole noise unit); embeddings and output layers larger than this are
            perturbed by rows or by chunks of rows. Default: 1,048,576 (4 MB of fp32).
        noise (str): ``"gaussian"`` (default: read from a fixed table, see ``curvzo.optim._noise``),
            ``"generated"`` (Gaussian drawn from per-unit generators: the table's reference, and
            slower) or ``"rademacher"`` (random signs, drawn likewise).
        normalize (bool): divide the projected gradient by a running scale of |g| (an average
            over recent steps, this one included, so the multiplier is at most 10 in size): the
            step length then stops following the heavy tail of |g|, and ``lr`` is in units of
            that scale rather than of the loss. Default: False.
        newton (bool): take the directional Newton step: the closure returns ``(loss, logits)``,
            the loss a cross-entropy of ``softmax(logits)``, and each update is divided by the
            Gauss-Newton curvature along z that the two forwards' logits measure (at least half
            its running mean; see ``curvzo.optim._newton``). ``lr`` is then the fraction of the
            Newton step taken, about 0.1 whatever the model or the subset perturbed, instead of
            a rate to sweep. The closure's logits are held from the first forward to the second.
            Default: False.
    """

    _needs_noise_norms = False  # subclasses that learn from ||z_b||^2 set this

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        eps: float,
        seed: int,
        block_size: int | None,
        rounding: Rounding = "nearest",
        model: nn.Module | None = None,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        noise: Noise = "gaussian",
        normalize: bool = False,
        newton: bool = False,
    ) -> None:
        if not is_int(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"Invalid rounding: {rounding!r} (choose from {', '.join(ROUNDINGS)})")
        if not is_int(max_chunk, minimum=1):
            raise ValueError(f"Invalid max_chunk: {max_chunk!r} (an int >= 1)")
        if noise not in NOISES:
            raise ValueError(f"Invalid noise: {noise!r} (choose from {', '.join(NOISES)})")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        if not isinstance(newton, bool):
            raise TypeError(f"newton must be a bool, got {type(newton).__name__}")
        if model is None:  # Python shows it once per calling line (the default warning filter)
            warnings.warn(_FALLBACK_MESSAGE, FallbackWarning, stacklevel=_caller_level())
        self.rounding = rounding
        self.normalize = normalize
        self.newton = newton
        self.model = model
        self.max_chunk = max_chunk
        self._blocks: list[Block] | None = None
        self._param_blocks: dict[int, tuple[int, int]] = {}  # id(param) -> its block id range, built with blocks
        self._owners: list | None = None  # modules owning the parameters, built with blocks
        super().__init__(params, {**defaults, "eps": eps, "block_size": block_size})
        self._noise = NoiseSource(noise)
        self._sampler = torch.Generator()  # step seeds and block draws; CPU so states are portable
        self._sampler.manual_seed(seed)
        self.last_step: StepInfo | None = None

    # ----------------------------------------------------------------- structure and state
    @property
    def blocks(self) -> list[Block]:
        """Blocks in id order; rebuilt lazily when parameter groups change."""
        if self._blocks is None:
            self._blocks = build_blocks(self.param_groups)
            self._param_blocks = {}
            for block in self._blocks:  # a parameter's blocks have consecutive ids
                first, _ = self._param_blocks.get(id(block.param), (block.index, 0))
                self._param_blocks[id(block.param)] = (first, block.index + 1)
            self._owners = None
        return self._blocks

    def _module_owners(self) -> list:
        """(module, its managed parameters) for every module of ``model`` that owns one."""
        if self._owners is None:
            managed = {id(block.param) for block in self.blocks}
            self._owners = owned_parameters(self.model, managed)
            owned = {id(p) for _, own in self._owners for _, p in own}
            if owned != managed:
                raise ValueError("every optimized parameter must belong to `model` (a parameter of another module was given)")
        return self._owners

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])
        self._blocks = None

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's options once the defaults are filled in (subclasses add theirs)."""
        if not is_real(group["lr"], lo=0.0):
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        if not is_real(group["weight_decay"], lo=0.0):
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if not (is_real(group["eps"]) and group["eps"] > 0.0):
            raise ValueError(f"Invalid eps (perturbation scale): {group['eps']}")
        block_size = group["block_size"]
        if block_size is not None and not is_int(block_size, minimum=1):
            raise ValueError(f"Invalid block_size: {block_size}")

    def _global_state(self) -> dict[str, Any]:
        """Step-wide statistics live in the first parameter's state, as LBFGS keeps its counters."""
        state = self.state[self.param_groups[0]["params"][0]]
        if "step" not in state:
            state["step"] = 0
            state["noise_version"] = NOISE_VERSION
            self._init_global_state(state)
        return state

    def _init_global_state(self, state: dict[str, Any]) -> None:
        """Hook for subclasses to create their step-wide state on first use."""

    def state_dict(self) -> dict[str, Any]:
        self._global_state()["sampler_state"] = self._sampler.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every state tensor to its parameter's dtype; ZO state (float64 scores, the
        # uint8 generator state) is not per-element parameter state and must keep its own dtype.
        first = state_dict["state"].get(0, {})
        version = first.get("noise_version", 1)
        if "step" in first and version != NOISE_VERSION:
            raise ValueError(
                f"optimizer state was written with noise version {version}; this engine draws version "
                f"{NOISE_VERSION} and cannot continue it bit for bit"
            )
        exact = {
            (idx, key): value.clone()
            for idx, entry in state_dict["state"].items()
            for key, value in entry.items()
            if isinstance(value, torch.Tensor)
        }
        super().load_state_dict(state_dict)
        self._blocks = None  # groups (and their block sizes) come from the state dict
        params = [p for group in self.param_groups for p in group["params"]]
        for (idx, key), value in exact.items():
            self.state[params[idx]][key] = value
        self._sampler.set_state(self._global_state()["sampler_state"].cpu())

    # ----------------------------------------------------------------- what subclasses define
    def _sample(self, state: dict[str, Any], active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sampled block ids, their inclusion probabilities), drawn from ``active`` blocks."""
        raise NotImplementedError

    def _observe(self, state: dict[str, Any], record: StepRecord, sq_norms: torch.Tensor) -> None:
        """Learn from a completed (not skipped) step; ``sq_norms[i]`` is ||z||^2 of record.blocks[i]."""

    def _correction(self, pi: torch.Tensor) -> torch.Tensor:
        """What the update divides g z_b by, before any normalisation: pi_b (Horvitz-Thompson)."""
        return pi

    def budget_fraction(self) -> float:
        """Fraction of blocks the next step expects to perturb."""
        return 1.0

    # ----------------------------------------------------------------- the step
    def blocks_of(self, param: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Ids of ``param``'s blocks, or of those holding any of ``rows`` (dim 0 indices)."""
        blocks = self.blocks
        first, end = self._param_blocks.get(id(param), (0, 0))
        if end == 0 or blocks[first].param is not param:
            raise ValueError("parameter is not managed by this optimizer")
        ids = torch.arange(first, end)
        if rows is None:
            return ids
        rows_per_block = blocks[first].numel * param.shape[0] // param.numel()
        return ids[torch.unique(torch.as_tensor(rows).flatten() // rows_per_block)]

    def rows_active(self, param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Mask for ``step(active=...)``: every block active except ``param``'s rows not in ``rows``."""
        mask = torch.ones(len(self.blocks), dtype=torch.bool)
        mask[self.blocks_of(param)] = False
        mask[self.blocks_of(param, rows)] = True
        return mask

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, active: torch.Tensor | None = None) -> float:  # type: ignore[override]
        """One two-point ZO step; ``closure`` evaluates the loss (no backward) and is called twice.

        ``active`` (bool, one entry per block) restricts sampling to blocks that can change this
        step's loss, e.g. the embedding rows of the tokens in the batch and of the scored output
        tokens. Leaving out blocks whose gradient is exactly zero keeps the estimator unbiased
        while removing their noise. Returns the mean of the two losses.

        A step whose projected gradient is not finite (a NaN or inf loss) is skipped: weights and
        optimizer statistics stay as they were (only the sampler advances, so the next step tries a
        fresh direction) and ``last_step.skipped`` is True.
        """
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step requires a closure that returns the loss")

        def evaluate(blocks: list[Block], seed: int) -> tuple[float, float, float, float | None]:
            loss_plus, loss_minus, curvature = self._evaluate_step(closure, seed, blocks)
            return loss_plus, loss_minus, (loss_plus - loss_minus) / (2.0 * self.param_groups[0]["eps"]), curvature

        info = self._run(active, evaluate)
        return 0.5 * (info.loss_plus + info.loss_minus)

    @torch.no_grad()
    def replay(self, grad: float, *, active: torch.Tensor | None = None, curvature: float | None = None) -> StepInfo:
        """Redo a logged step from its projected gradient alone: no closure, no forward.

        Sampling, the update and the learned statistics evolve exactly as in the original step,
        so replaying a run's gradients (and ``active`` masks) from its starting weights and
        optimizer state rebuilds its weights bit for bit. A non-finite ``grad`` replays a skip.
        A Newton step (``newton=True``) also needs the ``curvature`` it measured
        (``last_step.curvature``).
        """
        if self.newton and curvature is None and math.isfinite(grad):
            raise ValueError("a Newton step (newton=True) replays from its projected gradient and its curvature")
        return self._run(active, lambda blocks, seed: (math.nan, math.nan, grad, curvature))

    def _run(
        self,
        active: torch.Tensor | None,
        evaluate: Callable[[list[Block], int], tuple[float, float, float, float | None]],
    ) -> StepInfo:
        """Draw the step seed and blocks, obtain (L+, L-, g, curvature), update and learn."""
        draw = self._draw(active)
        loss_plus, loss_minus, grad, curvature = evaluate(draw.blocks, draw.seed)
        return self._commit(draw, loss_plus, loss_minus, grad, curvature=curvature)

    def _draw(self, active: torch.Tensor | None) -> Draw:
        """The first half of a step: budget, step seed and sampled blocks (advances the sampler).

        Split from :meth:`_commit` so that a query-parallel step can draw several directions from
        the same state before any of them is evaluated (``curvzo.optim.distributed``).
        """
        if active is not None and (active.dtype != torch.bool or active.shape != (len(self.blocks),)):
            raise ValueError(f"active must be a bool tensor of shape ({len(self.blocks)},)")
        state = self._global_state()
        budget = self.budget_fraction()
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=self._sampler))
        ids, pi = self._sample(state, active)
        return Draw(state["step"], seed, tuple(ids.tolist()), tuple(float(x) for x in pi.tolist()), pi, budget,
                    [self.blocks[i] for i in ids.tolist()])

    def _commit(
        self,
        draw: Draw,
        loss_plus: float,
        loss_minus: float,
        grad: float,
        apply: Callable[[StepRecord], torch.Tensor] | None = None,
        curvature: float | None = None,
    ) -> StepInfo:
        """The second half of a step: record it, update (``apply``, default :meth:`apply`) and learn.

        A non-finite ``grad`` (or, for a Newton step, ``curvature``) is a skip: weights,
        statistics and the step count stay as they were.
        """
        state = self._global_state()
        skipped = not math.isfinite(grad) or (self.newton and not math.isfinite(curvature if curvature is not None else math.nan))
        scale = _running_scale(state.get("grad_scale"), grad)
        divisor = None if skipped else self._divisor(draw.probabilities, scale)
        record = StepRecord(
            step=draw.step,
            seed=draw.seed,
            blocks=draw.ids,
            pi=draw.pi,
            grad=grad,
            lr=tuple(float(g["lr"]) for g in self.param_groups),
            weight_decay=tuple(float(g["weight_decay"]) for g in self.param_groups),
            eps=tuple(float(g["eps"]) for g in self.param_groups),
            divisor=divisor,
            newton=_newton.bound(curvature, state.get("curvature")) if self.newton and not skipped else None,
        )
        if not skipped:
            sq_norms = (apply or self.apply)(record)
            self._observe(state, record, sq_norms)
            state["grad_scale"] = scale
            if self.newton:
                state["curvature"] = _newton.updated(state.get("curvature"), curvature)
            state["step"] += 1
        self.last_step = StepInfo(loss_plus, loss_minus, grad, len(draw.blocks), draw.budget, skipped, record,
                                  curvature)
        return self.last_step

    def _divisor(self, pi: torch.Tensor, scale: float) -> tuple[float, ...] | None:
        """The record's ``divisor``: the estimator's correction, times the running scale when
        normalising; None for the plain Horvitz-Thompson update (divide by pi)."""
        divisor = self._correction(pi)
        if self.normalize and scale > 0.0:  # scale 0 means g = 0: a step of zero either way
            divisor = divisor * scale
        return None if divisor is pi else tuple(float(x) for x in divisor.tolist())

    def _evaluate_step(self, closure: Closure, seed: int, blocks: list[Block]) -> tuple[float, float, float | None]:
        """L+ and L-, and for a Newton step the Gauss-Newton curvature along z from their logits."""
        return self._measure(*self._forwards(closure, seed, blocks))

    def _measure(self, plus: Any, minus: Any) -> tuple[float, float, float | None]:
        """(L+, L-, curvature or None) from the closure's outputs at theta + eps z and theta - eps z."""
        if not self.newton:
            return _as_float(plus), _as_float(minus), None
        (loss_plus, logits_plus), (loss_minus, logits_minus) = map(_newton.loss_and_logits, (plus, minus))
        eps = float(self.param_groups[0]["eps"])
        return _as_float(loss_plus), _as_float(loss_minus), _newton.gauss_newton_curvature(logits_plus, logits_minus, eps)

    def _forwards(self, closure: Closure, seed: int, blocks: list[Block]) -> tuple[Any, Any]:
        """The closure's outputs at theta + eps z and theta - eps z over the sampled blocks."""
        eps = [float(self.param_groups[b.group]["eps"]) for b in blocks]
        shifts = [Perturbation(blocks, [sign * e for e in eps], seed, self._noise, self.max_chunk) for sign in (1.0, -1.0)]
        if self.model is None:
            return self._forwards_set_aside(closure, shifts, blocks)
        owners = self._module_owners()
        outputs = []
        for shift in shifts:
            with streamed(owners, shift):
                outputs.append(closure())
        return outputs[0], outputs[1]

    def _forwards_set_aside(self, closure: Closure, shifts: list[Perturbation], blocks: list[Block]) -> tuple[Any, Any]:
        """Without a model to stream through: write the perturbed blocks, evaluate, copy them back."""
        originals = [b.view().clone() for b in blocks]

        def restore() -> None:
            for block, original in zip(blocks, originals):
                block.view().copy_(original)

        outputs = []
        try:
            for i, shift in enumerate(shifts):
                if i:
                    restore()  # the next shift is computed from the original values
                for block in blocks:
                    block.view().copy_(shift.values(block.param, block.start, block.end))
                outputs.append(closure())
        finally:
            restore()
        return outputs[0], outputs[1]

    @torch.no_grad()
    def apply(self, record: StepRecord) -> torch.Tensor:
        """Apply the update a record describes: theta_b -= lr * ((g / pi_b) z_b + wd * theta_b).

        Pure in (record, current weights): replaying a run's records from its starting weights
        rebuilds its final weights bit for bit. Returns ||z_b||^2 of each sampled block (float64)
        when the optimizer learns from it, zeros otherwise.
        """
        norms: list[torch.Tensor] = []
        for block_id, pi in zip(record.blocks, record.divisor or record.pi):
            block = self.blocks[block_id]
            lr, decay, scale = self._update_factors(record, block, pi)
            squares = []
            if lr == 0.0 and not self._needs_noise_norms:
                continue  # exact no-op, even for -0.0 weights that adding +0.0 would flip
            for lo, hi in pieces(block, 0, block.numel, self.max_chunk):
                segments = list(self._noise.segments(block, record.seed, lo, hi))
                if self._needs_noise_norms:
                    squares.extend(torch.dot(z, z) for _, _, z, _ in segments)
                if lr != 0.0:
                    self._update(block, lo, hi, segments, scale, decay, record.seed)
            if squares:
                norms.append(squares[0] if len(squares) == 1 else torch.stack(squares).sum())
        return _to_host(norms) if norms else torch.zeros(len(record.blocks), dtype=torch.float64)

    @staticmethod
    def _update_factors(record: StepRecord, block: Block, divisor: float) -> tuple[float, float, float]:
        """(lr, lr * weight decay, the noise's factor -lr g / divisor) of ``block``'s update in
        ``record``; ``divisor`` is the block's pi, or the estimator's ``record.divisor`` entry."""
        g = block.group
        lr = record.step_lr(g)
        return lr, lr * record.weight_decay[g], _fp32_scalar(-lr * (record.grad * (record.eps[0] / record.eps[g])) / divisor)

    def _update(self, block: Block, lo: int, hi: int, segments: list, scale: float, decay: float, seed: int) -> None:
        """theta[lo:hi] = (1 - lr wd) theta + scale z, computed in fp32 and stored per ``rounding``;
        ``segments`` are z of ``[lo, hi)`` as :meth:`NoiseSource.segments` gives them."""
        target = block.view()[lo:hi]
        if target.dtype == torch.float32:
            work = target
        elif self.rounding == "master":
            work = self._master(block)[lo:hi]
        else:
            work = target.float()
        if decay:
            work.mul_(1.0 - decay)
        for a, b, z, sign in segments:
            work[a - lo : b - lo].add_(z, alpha=scale * sign)
        if work is target:
            return
        if self.rounding != "stochastic":
            target.copy_(work)
            return
        unit = unit_elements(block)
        for a in range(lo, hi, unit):  # rounding bits, like the noise, come per unit
            b = min(a + unit, hi)
            gen = self._noise.rounding_generator(block, seed, a // unit)
            target[a - lo : b - lo].copy_(round_stochastic(work[a - lo : b - lo], target.dtype, gen))

    def _master(self, block: Block) -> torch.Tensor:
        """The block's slice of its parameter's persistent fp32 master (``rounding="master"``),
        made from the weights when the parameter is first updated, so replay recreates it."""
        state = self.state[block.param]
        if "master" not in state:
            state["master"] = block.param.detach().float()
        return state["master"].view(-1)[block.start : block.end]
