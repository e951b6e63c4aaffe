"""ZOOptimizer: the shared machinery of two-point zeroth-order optimizers.

A ZO step needs only forwards: perturb the sampled blocks by +eps*z, evaluate, by -eps*z,
evaluate, restore, then move along z by the projected gradient (L+ - L-) / (2 eps). Subclasses
decide only which blocks to sample and with which inclusion probabilities (``_sample``) and what
to learn from the outcome (``_observe``); everything that must be exact lives here:

* z of a block is a pure function of (step seed, block id) (see ``_blocks``), so no noise is
  stored and the same perturbation is regenerated for +eps, -eps and the update (3 draws).
* Perturbed forwards never write into the original values: the sampled blocks are copied aside
  for the duration of the step and copied back, so ``lr=0`` leaves every bit unchanged in any
  dtype (in-place ``+eps, -2eps, +eps`` arithmetic would round).
* The update of a step is a pure function of a small :class:`StepRecord` and the weights before
  it, so records can be replayed to rebuild weights or exchanged between processes.
* Randomness comes from generators owned by the optimizer; the global torch RNG is never used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from ._blocks import Block, NoiseSource, build_blocks
from ._rounding import round_stochastic

__all__ = ["ZOOptimizer", "StepRecord", "StepInfo", "decay_param_groups"]

Closure = Callable[[], Any]
Rounding = Literal["nearest", "stochastic", "master"]
ROUNDINGS: tuple[str, ...] = get_args(Rounding)


@dataclass(frozen=True)
class StepRecord:
    """Everything that defines one update, given the weights before it.

    ``blocks[i]`` was sampled with inclusion probability ``pi[i]``; ``lr`` and ``weight_decay``
    are per parameter group, as they were when the step ran (schedulers change them).
    """

    step: int
    seed: int
    blocks: tuple[int, ...]
    pi: tuple[float, ...]
    grad: float
    lr: tuple[float, ...]
    weight_decay: tuple[float, ...]


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


def _as_float(loss: Any) -> float:
    return float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)


class ZOOptimizer(torch.optim.Optimizer):
    """Base class of the two-point ZO optimizers; see the module docstring for the contract.

    Args:
        params: iterable of parameters or parameter groups (groups may set ``lr``, ``weight_decay``).
        defaults: per-group defaults (``lr``, ``weight_decay``).
        eps (float): perturbation scale of the two-point estimate (not Adam's epsilon).
        seed (int): seed of the optimizer's own generators; same seed, same machine, same run.
        block_size (int, optional): split tensors larger than this many elements into blocks
            (whole rows for matrices); a group may set its own. Default: one block per tensor.
        rounding (str): how updates of bf16/fp16 weights are stored: ``"nearest"`` (loses updates
            below half an ulp), ``"stochastic"`` (unbiased; reproducible; no memory) or
            ``"master"`` (an fp32 master copy of each low-precision parameter, created when one
            of its blocks is first updated, accumulates the updates; the weights are its nearest
            rounding, so they follow fp32 training at the cost of 4 bytes per such element).
            Default: nearest.
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
    ) -> None:
        if not defaults["lr"] >= 0.0:
            raise ValueError(f"Invalid learning rate: {defaults['lr']}")
        if not defaults["weight_decay"] >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {defaults['weight_decay']}")
        if not (isinstance(eps, (int, float)) and eps > 0.0 and math.isfinite(eps)):
            raise ValueError(f"Invalid eps (perturbation scale): {eps}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"Invalid rounding: {rounding!r} (choose from {', '.join(ROUNDINGS)})")
        self.eps = float(eps)
        self.rounding = rounding
        self._blocks: list[Block] | None = None
        self._param_blocks: dict[int, tuple[int, int]] = {}  # id(param) -> its block id range, built with blocks
        super().__init__(params, {**defaults, "block_size": block_size})
        self._noise = NoiseSource()
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
        return self._blocks

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        block_size = param_group.get("block_size", self.defaults.get("block_size"))
        if block_size is not None and not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"Invalid block_size: {block_size}")
        super().add_param_group(param_group)
        self._blocks = None

    def _global_state(self) -> dict[str, Any]:
        """Step-wide statistics live in the first parameter's state, as LBFGS keeps its counters."""
        state = self.state[self.param_groups[0]["params"][0]]
        if "step" not in state:
            state["step"] = 0
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

        A step whose projected gradient is not finite (a NaN or inf loss) is skipped: weights and optimizer statistics stay as they were (only the sampler advances,
        so the next step tries a fresh direction) and ``last_step.skipped`` is True.
        """
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step requires a closure that returns the loss")

        def evaluate(blocks: list[Block], seed: int) -> tuple[float, float, float, torch.Tensor]:
            loss_plus, loss_minus, sq_norms = self._evaluate(closure, seed, blocks)
            return loss_plus, loss_minus, (loss_plus - loss_minus) / (2.0 * self.eps), sq_norms

        info = self._run(active, evaluate)
        return 0.5 * (info.loss_plus + info.loss_minus)

    @torch.no_grad()
    def replay(self, grad: float, *, active: torch.Tensor | None = None) -> StepInfo:
        """Redo a logged step from its projected gradient alone: no closure, no forward.

        Sampling, the update and the learned statistics evolve exactly as in the original step,
        so replaying a run's gradients (and ``active`` masks) from its starting weights and
        optimizer state rebuilds its weights bit for bit. A non-finite ``grad`` replays a skip.
        """

        def evaluate(blocks: list[Block], seed: int) -> tuple[float, float, float, torch.Tensor]:
            norms = self._noise_norms(blocks, seed) if self._needs_noise_norms and math.isfinite(grad) else None
            return math.nan, math.nan, grad, norms if norms is not None else torch.zeros(len(blocks), dtype=torch.float64)

        return self._run(active, evaluate)

    def _run(
        self,
        active: torch.Tensor | None,
        evaluate: Callable[[list[Block], int], tuple[float, float, float, torch.Tensor]],
    ) -> StepInfo:
        """Draw the step seed and blocks, obtain (L+, L-, g, ||z||^2), update and learn."""
        if active is not None and (active.dtype != torch.bool or active.shape != (len(self.blocks),)):
            raise ValueError(f"active must be a bool tensor of shape ({len(self.blocks)},)")
        state = self._global_state()
        budget = self.budget_fraction()
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=self._sampler))
        ids, pi = self._sample(state, active)
        blocks = [self.blocks[i] for i in ids.tolist()]
        loss_plus, loss_minus, grad, sq_norms = evaluate(blocks, seed)
        record = StepRecord(
            step=state["step"],
            seed=seed,
            blocks=tuple(ids.tolist()),
            pi=tuple(float(x) for x in pi.tolist()),
            grad=grad,
            lr=tuple(float(g["lr"]) for g in self.param_groups),
            weight_decay=tuple(float(g["weight_decay"]) for g in self.param_groups),
        )
        skipped = not math.isfinite(grad)
        if not skipped:
            self.apply(record)
            self._observe(state, record, sq_norms)
            state["step"] += 1
        self.last_step = StepInfo(loss_plus, loss_minus, grad, len(blocks), budget, skipped, record)
        return self.last_step

    def _evaluate(
        self, closure: Closure, seed: int, blocks: list[Block]
    ) -> tuple[float, float, torch.Tensor]:
        """L(theta + eps z) and L(theta - eps z) over the sampled blocks, then restore exactly."""
        originals = [b.view().clone() for b in blocks]
        try:
            sq_norms = self._shift(blocks, originals, seed, self.eps)
            loss_plus = _as_float(closure())
            self._shift(blocks, originals, seed, -self.eps)
            loss_minus = _as_float(closure())
        finally:
            for block, original in zip(blocks, originals):
                block.view().copy_(original)
        return loss_plus, loss_minus, sq_norms

    def _noise_norms(self, blocks: list[Block], seed: int) -> torch.Tensor:
        """||z_b||^2 of each block, computed as ``_shift`` computes it."""
        return _to_host([torch.dot(z, z) for z in (self._noise.noise(b, seed) for b in blocks)])

    def _shift(
        self, blocks: list[Block], originals: list[torch.Tensor], seed: int, scale: float
    ) -> torch.Tensor:
        """Write original + scale * z into each block; returns ||z_b||^2 where a subclass needs it."""
        norms: list[torch.Tensor] = []
        for block, original in zip(blocks, originals):
            z = self._noise.noise(block, seed)
            if self._needs_noise_norms and scale > 0:
                norms.append(torch.dot(z, z))
            target = block.view()
            if target.dtype == torch.float32:
                torch.add(original, z, alpha=scale, out=target)
            else:
                target.copy_(original.float().add_(z, alpha=scale))
        return _to_host(norms) if norms else torch.zeros(len(blocks), dtype=torch.float64)

    @torch.no_grad()
    def apply(self, record: StepRecord) -> None:
        """Apply the update a record describes: theta_b -= lr * ((g / pi_b) z_b + wd * theta_b).

        Pure in (record, current weights): replaying a run's records from its starting weights
        rebuilds its final weights bit for bit.
        """
        for block_id, pi in zip(record.blocks, record.pi):
            block = self.blocks[block_id]
            lr = record.lr[block.group]
            if lr == 0.0:
                continue  # exact no-op, even for -0.0 weights that adding +0.0 would flip
            wd = record.weight_decay[block.group]
            z = self._noise.noise(block, record.seed)
            target = block.view()
            work = self._work_view(block)
            if wd:
                work.mul_(1.0 - lr * wd)
            work.add_(z, alpha=-lr * record.grad / pi)
            if target.dtype == torch.float32:
                continue  # updated in place
            if self.rounding == "stochastic":
                work = round_stochastic(work, target.dtype, self._noise.generator(block, record.seed, salt=1))
            target.copy_(work)

    def _work_view(self, block: Block) -> torch.Tensor:
        """Where a block's update is computed in fp32: the weights themselves, a temporary upcast,
        or (``rounding="master"``) the block's slice of its parameter's persistent fp32 master,
        made from the weights when the parameter is first updated, so replay recreates it."""
        target = block.view()
        if target.dtype == torch.float32:
            return target
        if self.rounding != "master":
            return target.float()
        state = self.state[block.param]
        if "master" not in state:
            state["master"] = block.param.detach().float()
        return state["master"].view(-1)[block.start : block.end]
