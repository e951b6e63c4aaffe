"""ZO steps across the ranks of a ``torch.distributed`` process group: data, query and shard modes.

A two-point ZO step is fixed by its seed, its sampled blocks and one scalar, and every rank can
regenerate seeds, blocks and noise from the optimizer's state. Ranks that start from the same
weights and optimizer state (same config, same seed) therefore only ever exchange scalars: per
step a few float64 per query, whatever the model size. No parameter or gradient tensor is sent
(shard mode aside, where FSDP gathers the parameters each forward needs: the price of not holding
the model), and weights stay bit-identical across ranks because every rank applies the same
updates in the same order.

* ``data``: every rank draws the same seed and blocks, evaluates the closure on its share of the
  global batch, and the two losses are averaged over the ranks (weighted by share size): one
  all-gather of 3 float64 per rank and step (4 for a Newton step, whose curvature is averaged the
  same way). Same trajectory as one process on the global batch, up to the order of the reduction.
* ``query``: q directions (q = the group size by default) are drawn one after another from the
  same state, rank r evaluates directions r, r + W, ... on the same batch, the (L+, L-) pairs are
  all-gathered (2 float64 per query, 3 with a Newton step's curvature) and every rank applies all
  q updates in query order, then learns from each (SparseCurvZO's scores and budget see all q records,
  identically on every rank). One process with ``queries=q`` evaluates all q itself and is the
  reference a q-rank run equals bit for bit: the q-query step is q ordinary steps whose
  directions are all drawn, and whose losses are all evaluated, at the weights and statistics of
  the step's start. With q = 1 it is the ordinary step.
* ``shard``: the model's parameters are DTensors sharded on dim 0 by FSDP2's ``fully_shard``,
  and the batch is split as in ``data``. Blocks, sampling and noise are those of the full
  tensors (a block is a range of the full tensor's flattened elements, and the noise of an element
  is a pure function of its index there), so each rank perturbs and updates only its local rows,
  with exactly the values the unsharded run gives them. A perturbation is written into the local
  shards before the forward, so FSDP's own all-gather delivers the perturbed tensors to every
  module (the gathered copies are dropped after each forward so the next one sees the next
  perturbation), and the local originals are copied back afterwards: the stored weights return
  bit for bit, at the cost of a copy of this rank's part of the sampled blocks. Blocks' squared
  noise norms, which SparseCurvZO learns from, are summed over the ranks (one float64 per sampled block).
  Float32 weights only (the other dtypes' rounding state is per full tensor).

Example::

    dist.init_process_group("gloo")                  # under torchrun
    opt = MeZO(model.parameters(), lr=1e-6, seed=0, model=model)
    zo = DistributedZO(opt, "data")
    loss = zo.step(lambda: loss_fn(model(**my_share_of_the_batch)), weight=len(my_share))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._modes import PARALLEL_MODES, Parallel
from ._stream import pieces
from .optimizer import Draw, StepInfo, StepRecord, ZOOptimizer

__all__ = ["DistributedZO", "replay_queries", "local_shard"]

_UNSET = object()

#: What one direction's evaluation gives: L+, L- and, for a Newton step, the curvature along z.
Measured = tuple[float, float, float | None]


class DistributedZO:
    """Runs a ZO optimizer's step on every rank of a process group (see the module docstring).

    Every rank must build the same optimizer (same parameters, options and seed) and call
    :meth:`step` the same number of times: each step is one collective.

    Args:
        optimizer: this rank's optimizer.
        mode (str): ``"data"``, ``"query"`` or ``"shard"``.
        process_group: the ranks taking part (default: the default group; without an initialised
            ``torch.distributed``, this process alone).
        queries (int, optional): ``query`` mode: directions per step, a multiple of the group
            size (default: the group size). One process with ``queries=q`` is the single-process
            q-query step a q-rank run equals.

    Attributes:
        bytes_communicated (int): payload bytes this rank has put into collectives so far.
        last_steps (list[StepInfo]): the records of the last step, in query order.
    """

    def __init__(
        self, optimizer: ZOOptimizer, mode: Parallel, *, process_group: Any = None, queries: int | None = None
    ) -> None:
        if not isinstance(optimizer, ZOOptimizer):
            raise TypeError(f"optimizer must be a ZOOptimizer, got {type(optimizer).__name__}")
        if mode not in PARALLEL_MODES:
            raise ValueError(f"Invalid mode: {mode!r} (choose from {', '.join(PARALLEL_MODES)})")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(process_group) if distributed else 0
        self.world = dist.get_world_size(process_group) if distributed else 1
        if queries is not None and mode != "query":
            raise ValueError(f"queries is a query-mode option, got mode={mode!r}")
        q = (self.world if mode == "query" else 1) if queries is None else queries
        if mode == "query" and not (isinstance(q, int) and not isinstance(q, bool) and q >= 1 and q % self.world == 0):
            raise ValueError(f"Invalid queries: {queries!r} (a multiple of the {self.world} ranks)")
        if mode == "shard" and any(p.dtype != torch.float32 for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("shard mode needs float32 parameters")
        if mode == "shard" and optimizer.model is None:
            raise ValueError("shard mode needs the optimizer's `model` (the fully_shard-ed module it reshards)")
        self.optimizer = optimizer
        self.mode = mode
        self.queries = q
        self.group = process_group
        self.bytes_communicated = 0
        self.last_steps: list[StepInfo] = []

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any], *, active: torch.Tensor | None = None, weight: float = 1.0) -> float:
        """One distributed step; returns the mean loss (over ranks, or over queries).

        ``closure`` evaluates this rank's loss (data and shard modes: on its share of the batch,
        whose size is ``weight``; query mode: on the whole batch). ``active`` must be the same on
        every rank (computed from the global batch).
        """
        if closure is None:
            raise RuntimeError("DistributedZO.step requires a closure that returns the loss")
        opt = self.optimizer
        draws = _draws(opt, active, self.queries)
        if self.mode == "query":
            local = [self._evaluate(closure, draws[i][0]) for i in range(self.rank, self.queries, self.world)]
            measured = self._gather_queries(local)
        else:
            measured = [self._mean_over_ranks(self._evaluate(closure, draws[0][0]), weight)]
        two_eps = 2.0 * opt.param_groups[0]["eps"]
        self.last_steps = _commit(opt, draws, measured, [(plus - minus) / two_eps for plus, minus, _ in measured],
                                  self._apply)
        return sum(0.5 * (plus + minus) for plus, minus, _ in measured) / len(measured)

    @torch.no_grad()
    def replay(self, grads: Sequence[float], *, active: torch.Tensor | None = None,
               curvatures: Sequence[float] | None = None) -> list[StepInfo]:
        """Redo a logged step from its projected gradients alone (one per query; a Newton step also
        needs the curvature each measured): no closure, no forward (shard mode still sums the
        blocks' noise norms over the ranks). Replaying a run's gradients from its start rebuilds
        its weights."""
        if len(grads) != self.queries:
            raise ValueError(f"a step of {self.queries} queries needs {self.queries} gradients, got {len(grads)}")
        self.last_steps = _commit(self.optimizer, _draws(self.optimizer, active, self.queries),
                                  _replayed(self.optimizer, grads, curvatures), list(grads), self._apply)
        return self.last_steps

    @property
    def _apply(self) -> Callable[[StepRecord], torch.Tensor] | None:
        """How this mode updates the weights (None: the optimizer's own ``apply``)."""
        return self._apply_shards if self.mode == "shard" else None

    def _evaluate(self, closure: Callable[[], Any], draw: Draw) -> Measured:
        if self.mode == "shard":
            return self.optimizer._measure(*self._evaluate_shards(closure, draw))
        return self.optimizer._evaluate_step(closure, draw.seed, draw.blocks)

    # ----------------------------------------------------------------- communication
    def _all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (float64) of every rank, stacked in rank order: a reduction summed from it in
        that order is the same bits on every rank, which an all-reduce does not promise."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else None
        local = values.to(device or "cpu")
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local, group=self.group)
        self.bytes_communicated += local.numel() * local.element_size()
        return torch.stack(out).cpu()

    def _mean_over_ranks(self, measured: Measured, weight: float) -> Measured:
        """(L+, L-, curvature) averaged over the ranks, each weighted by its share of the batch
        (the curvature is a mean over the batch's rows as the losses are)."""
        if self.world == 1:
            return measured
        plus, minus, curvature = measured
        values = [plus * weight, minus * weight, weight] + ([] if curvature is None else [curvature * weight])
        rows = self._all_gather(torch.tensor(values, dtype=torch.float64))
        total = rows[0].clone()
        for row in rows[1:]:
            total += row
        mean = (total / total[2]).tolist()
        return mean[0], mean[1], None if curvature is None else mean[3]

    def _gather_queries(self, local: list[Measured]) -> list[Measured]:
        """Every query's (L+, L-, curvature) in query order, from each rank's own (query i is rank
        i mod W's)."""
        if self.world == 1:
            return local
        newton = self.optimizer.newton
        values = [m[:3] if newton else m[:2] for m in local]
        rows = self._all_gather(torch.tensor(values, dtype=torch.float64).view(len(local), -1))
        out = [rows[i % self.world, i // self.world].tolist() for i in range(self.queries)]
        return [(row[0], row[1], row[2] if newton else None) for row in out]

    # ----------------------------------------------------------------- shard mode
    def _local_pieces(self, draw_blocks: Sequence[Any]) -> list[tuple[Any, torch.Tensor, int, int, int]]:
        """(block, local flat shard, its first element, block-relative lo, hi) of each sampled block's
        overlap with this rank's shard."""
        out = []
        for block in draw_blocks:
            local, first, last = local_shard(block.param)
            lo, hi = max(block.start, first), min(block.end, last)
            if lo < hi:
                out.append((block, local, first, lo - block.start, hi - block.start))
        return out

    def _reshard(self) -> None:
        """Drop the parameters FSDP keeps gathered after a forward (the root's), so that the next
        forward gathers the shards as they are now, and the module's parameters are the sharded
        ones the optimizer holds."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.optimizer.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _evaluate_shards(self, closure: Callable[[], Any], draw: Draw) -> tuple[Any, Any]:
        """The closure's outputs at theta + eps z and theta - eps z, each perturbation written into
        the local shards (from the originals) before FSDP gathers them; the originals are copied
        back at the end."""
        opt = self.optimizer
        parts = self._local_pieces(draw.blocks)
        originals = [local[block.start + a - first : block.start + b - first].clone() for block, local, first, a, b in parts]
        outputs = []
        try:
            for sign in (1.0, -1.0):
                self._reshard()
                for (block, local, first, a, b), original in zip(parts, originals):
                    scale = sign * float(opt.param_groups[block.group]["eps"])
                    for lo, hi in pieces(block, a, b, opt.max_chunk):
                        for c, d, z, z_sign in opt._noise.segments(block, draw.seed, lo, hi):
                            at = block.start + c - first
                            torch.add(original[c - a : d - a], z, alpha=scale * z_sign, out=local[at : at + d - c])
                outputs.append(closure())
        finally:
            for (block, local, first, a, b), original in zip(parts, originals):
                local[block.start + a - first : block.start + b - first].copy_(original)
            self._reshard()
        return outputs[0], outputs[1]

    def _apply_shards(self, record: StepRecord) -> torch.Tensor:
        """:meth:`ZOOptimizer.apply` on this rank's shards; squared noise norms summed over ranks."""
        opt = self.optimizer
        blocks = [opt.blocks[i] for i in record.blocks]
        squares = torch.zeros(len(blocks), dtype=torch.float64)
        overlaps = {block.index: rest for block, *rest in self._local_pieces(blocks)}
        for i, (block, divisor) in enumerate(zip(blocks, record.divisor or record.pi)):
            lr, decay, scale = opt._update_factors(record, block, divisor)
            if block.index not in overlaps or (lr == 0.0 and not opt._needs_noise_norms):
                continue
            local, first, a, b = overlaps[block.index]
            for lo, hi in pieces(block, a, b, opt.max_chunk):
                target = local[block.start + lo - first : block.start + hi - first]
                if lr != 0.0 and decay:
                    target.mul_(1.0 - decay)
                for c, d, z, sign in opt._noise.segments(block, record.seed, lo, hi):
                    if opt._needs_noise_norms:
                        squares[i] += float(torch.dot(z, z))
                    if lr != 0.0:
                        target[c - lo : d - lo].add_(z, alpha=scale * sign)
        if not opt._needs_noise_norms or self.world == 1:
            return squares
        return self._all_gather(squares).sum(0)


@torch.no_grad()
def replay_queries(optimizer: ZOOptimizer, grads: Sequence[float], *, active: torch.Tensor | None = None,
                   curvatures: Sequence[float] | None = None) -> list[StepInfo]:
    """Redo one q-query step (q = ``len(grads)``) of one process from its q projected gradients
    (and, for a Newton step, the q curvatures measured): how a query-parallel run's trajectory is
    replayed, on any number of processes."""
    return _commit(optimizer, _draws(optimizer, active, len(grads)), _replayed(optimizer, grads, curvatures),
                   list(grads))


def _replayed(optimizer: ZOOptimizer, grads: Sequence[float], curvatures: Sequence[float] | None) -> list[Measured]:
    """What a replayed step knows of each query: no losses, and the curvature a Newton step needs."""
    if curvatures is None:
        if optimizer.newton and any(math.isfinite(g) for g in grads):
            raise ValueError("a Newton step (newton=True) replays from its projected gradients and their curvatures")
        curvatures = [None] * len(grads)
    if len(curvatures) != len(grads):
        raise ValueError(f"{len(grads)} gradients need {len(grads)} curvatures, got {len(curvatures)}")
    return [(math.nan, math.nan, c) for c in curvatures]


def _draws(optimizer: ZOOptimizer, active: torch.Tensor | None, queries: int) -> list[tuple[Draw, dict[str, Any]]]:
    """A step's ``queries`` draws, each as if the previous ones were steps already taken (step
    number, budget schedule), all from the statistics of the step's start.

    Each draw comes with the attributes it (re)assigned on the optimizer: what ``_sample`` leaves
    for ``_commit`` (SparseCurvZO's subspace correction reads every block's pi), restored before the draw's
    record is learnt from.
    """
    state = optimizer._global_state()
    base = state["step"]
    draws = []
    try:
        for i in range(queries):
            state["step"] = base + i
            before = dict(vars(optimizer))
            draw = optimizer._draw(active)
            draws.append((draw, {k: v for k, v in vars(optimizer).items() if before.get(k, _UNSET) is not v}))
    finally:
        state["step"] = base
    return draws


def _commit(
    optimizer: ZOOptimizer,
    draws: list[tuple[Draw, dict[str, Any]]],
    measured: list[Measured],
    grads: list[float],
    apply: Callable[[StepRecord], torch.Tensor] | None = None,
) -> list[StepInfo]:
    """Apply and learn from the records in query order (a skipped one changes nothing)."""
    infos = []
    for (draw, left), (plus, minus, curvature), grad in zip(draws, measured, grads):
        vars(optimizer).update(left)
        infos.append(optimizer._commit(draw, plus, minus, grad, apply=apply, curvature=curvature))
    return infos


def local_shard(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """This rank's shard of a ``fully_shard``-ed parameter, flattened, and the elements [lo, hi)
    of the full tensor's flattening that it holds.

    ``fully_shard`` splits dim 0 as ``torch.chunk`` does, so a rank's rows are one contiguous
    range of the full tensor's flattened elements. The local tensor is a view of FSDP's sharded
    storage, which its next all-gather reads.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor) or tuple(param.placements) != (Shard(0),):
        raise ValueError("shard mode needs parameters sharded on dim 0 by fully_shard (DTensors)")
    local = param.to_local()
    rows, mesh = param.shape[0], param.device_mesh
    chunk = -(-rows // mesh.size())
    first = min(mesh.get_local_rank() * chunk, rows)
    row = param.numel() // rows
    if not local.is_contiguous() or local.numel() != min(chunk, rows - first) * row:
        raise ValueError("shard mode needs contiguous dim-0 shards as fully_shard makes them")
    return local.view(-1), first * row, first * row + local.numel()
