"""Streaming perturbation: a module sees theta + scale * z only while it runs.

During one closure call of a ZO step, every module that owns a sampled parameter is given the
perturbed values just for its own forward, and the stored weights are never written, so
restoration is exact by construction and costs nothing. The extra memory at any moment is one
module's perturbed weights, or less:

* an ``nn.Embedding`` perturbs only the rows its input reads (one table of the batch's rows);
* an ``nn.Linear`` larger than ``max_chunk`` elements (an LM head over a 128k vocabulary) is
  applied in chunks of output rows, each perturbed on its own;
* any other module gets a perturbed copy of its sampled parameters, swapped in by a forward
  pre-hook and swapped back by a forward hook.

A parameter read outside the forward of a module that owns it (the harness reads a few LM-head
rows by index to score label tokens) goes through :func:`read_rows`, which returns the rows as the
running perturbation sees them. Tied parameters (embedding = LM head) are one parameter with one
set of blocks, so every use sees the same noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import Block
from ._noise import NoiseSource, unit_elements

__all__ = ["Perturbation", "pieces", "read_rows", "streamed", "owned_parameters"]

_ACTIVE: list[Perturbation] = []  # the perturbations closures are running under, innermost last


class Perturbation:
    """theta_b + scale_b * z_b on the sampled blocks of one step, computed on demand.

    Args:
        blocks: the sampled blocks; ``scales[i]`` multiplies block i's noise (+-eps of its group).
        seed: the step seed (the noise is a pure function of it, the block and the element).
        noise: the optimizer's noise source (it owns the reusable noise buffer).
        max_chunk: the largest number of elements perturbed in one piece.
    """

    def __init__(self, blocks: list[Block], scales: list[float], seed: int, noise: NoiseSource, max_chunk: int) -> None:
        self.seed = seed
        self.noise = noise
        self.max_chunk = max_chunk
        self._by_param: dict[int, list[tuple[Block, float]]] = {}
        for block, scale in zip(blocks, scales):
            self._by_param.setdefault(id(block.param), []).append((block, scale))

    def touches(self, param: torch.Tensor) -> bool:
        return id(param) in self._by_param

    def values(self, param: torch.Tensor, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """A perturbed copy of ``param.view(-1)[lo:hi]`` in the parameter's dtype, written into
        ``out`` when given: one fused ``theta + scale z`` per noise segment (computed in fp32,
        rounded once), a plain copy where no sampled block lies."""
        flat = param.detach().view(-1)[lo:hi]
        out = torch.empty_like(flat) if out is None else out
        done = lo  # elements below this are written
        for block, scale in self._by_param.get(id(param), ()):
            first, last = max(lo, block.start), min(hi, block.end)
            if first >= last:
                continue
            if done < first:
                out[done - lo : first - lo].copy_(flat[done - lo : first - lo])
            for a, b in pieces(block, first - block.start, last - block.start, self.max_chunk):
                for c, d, z, sign in self.noise.segments(block, self.seed, a, b):
                    at = slice(c + block.start - lo, d + block.start - lo)
                    torch.add(flat[at], z, alpha=scale * sign, out=out[at])
            done = last
        if done < hi:
            out[done - lo :].copy_(flat[done - lo :])
        return out

    def rows(self, param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Perturbed ``param[rows]`` (indices along dim 0, any shape), reading noise only for those rows."""
        unique, inverse = torch.unique(rows.flatten(), return_inverse=True)  # sorted
        row = param.numel() // param.shape[0]
        table = param.detach().view(param.shape[0], row)[unique]  # a gather: already a copy
        sampled = self._by_param.get(id(param))
        if sampled:
            table = table if table.dtype == torch.float32 else table.float()
            by_start = {block.start: (block, scale) for block, scale in sampled}
            span = sampled[0][0].span // row  # rows per block (the last may be shorter)
            # Sorted rows fall into consecutive block groups: one noise read per group.
            keys, counts = torch.unique_consecutive(torch.div(unique, span, rounding_mode="floor"), return_counts=True)
            at = 0
            for key, count in zip(keys.tolist(), counts.tolist()):
                entry = by_start.get(key * span * row)
                if entry is not None:
                    block, scale = entry
                    table[at : at + count].add_(self.noise.rows(block, self.seed, unique[at : at + count]), alpha=scale)
                at += count
        return table.to(param.dtype)[inverse].view(*rows.shape, *param.shape[1:])


def pieces(block: Block, lo: int, hi: int, max_chunk: int) -> Iterator[tuple[int, int]]:
    """Block-relative pieces of ``[lo, hi)`` cut at multiples of the noise unit, each of at most
    ``max_chunk`` elements (at least one unit): no unit is drawn for two pieces."""
    unit = unit_elements(block)
    size = max(unit, max_chunk // unit * unit)
    a = lo
    while a < hi:
        b = min(hi, (a // size + 1) * size)
        yield a, b
        a = b


def read_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``weight[rows]`` as the running ZO perturbation sees it; plain indexing outside one.

    For code that reads parameter rows outside the forward of the module that owns them (e.g.
    scoring a few label tokens from the LM head): inside a ZO closure the rows carry the step's
    perturbation, and only those rows' noise is generated.
    """
    for ctx in reversed(_ACTIVE):
        if ctx.touches(weight):
            return ctx.rows(weight, rows)
    return weight[rows]


def owned_parameters(model: nn.Module, managed: set[int]) -> list[tuple[nn.Module, list[tuple[str, nn.Parameter]]]]:
    """Each module with the managed parameters it owns directly (a tied parameter has two owners)."""
    owners = []
    for module in model.modules():
        own = [(name, p) for name, p in module._parameters.items() if p is not None and id(p) in managed]
        if own:
            owners.append((module, own))
    return owners


def _plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """A module whose forward is ``cls``'s own (no subclass override, no instance-level wrapper)."""
    return isinstance(module, cls) and type(module).forward is cls.forward and "forward" not in module.__dict__


def _embedding_forward(ctx: Perturbation, weight: torch.Tensor) -> Any:
    def forward(input: torch.Tensor) -> torch.Tensor:
        return ctx.rows(weight, input)
    return forward


def _linear_forward(ctx: Perturbation, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """A large ``nn.Linear`` (an LM head) applied in chunks of output rows, each perturbed into one
    reused chunk buffer and multiplied straight into its columns of one output tensor: the extra
    memory is one chunk, never a second output."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        b = None if bias is None else (ctx.values(bias, 0, bias.numel()) if ctx.touches(bias) else bias)
        if x.numel() == 0:  # nothing reads the weight (e.g. a head asked for no positions)
            return F.linear(x, weight, b)
        rows, width = weight.shape
        step = max(1, ctx.max_chunk // width)
        inputs = x.reshape(-1, width)
        out = inputs.new_empty(inputs.shape[0], rows, dtype=torch.result_type(x, weight))
        chunk = torch.empty(min(step, rows) * width, dtype=weight.dtype, device=weight.device)
        for r in range(0, rows, step):
            e = min(r + step, rows)
            w = ctx.values(weight, r * width, e * width, chunk[: (e - r) * width]).view(-1, width)
            if b is None:
                torch.mm(inputs, w.t(), out=out[:, r:e])
            else:
                torch.addmm(b[r:e], inputs, w.t(), out=out[:, r:e])
        return out.view(*x.shape[:-1], rows)
    return forward


@contextlib.contextmanager
def streamed(owners: list[tuple[nn.Module, list[tuple[str, nn.Parameter]]]], ctx: Perturbation) -> Iterator[None]:
    """Run a closure under ``ctx``: modules owning sampled parameters see them perturbed while they run."""
    handles: list[Any] = []
    overridden: list[nn.Module] = []
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

    def swap_in(module: nn.Module, own: list[tuple[str, nn.Parameter]]) -> None:
        for name, p in own:
            module._parameters[name] = ctx.values(p, 0, p.numel()).view_as(p)  # type: ignore[assignment]
            swapped.append((module, name, p))

    def swap_out(module: nn.Module, own: list[tuple[str, nn.Parameter]]) -> None:
        for name, p in own:
            module._parameters[name] = p

    try:
        for module, params in owners:
            own = [(name, p) for name, p in params if ctx.touches(p)]
            if not own:
                continue
            if _plain(module, nn.Embedding) and module.max_norm is None:
                module.forward = _embedding_forward(ctx, module.weight)  # type: ignore[method-assign]
                overridden.append(module)
            elif _plain(module, nn.Linear) and module.weight.numel() > ctx.max_chunk:
                module.forward = _linear_forward(ctx, module.weight, module.bias)  # type: ignore[method-assign]
                overridden.append(module)
            else:
                handles.append(module.register_forward_pre_hook(lambda m, args, own=own: swap_in(m, own)))
                handles.append(module.register_forward_hook(lambda m, args, out, own=own: swap_out(m, own), always_call=True))
        _ACTIVE.append(ctx)
        yield
    finally:
        if _ACTIVE and _ACTIVE[-1] is ctx:
            _ACTIVE.pop()
        for handle in handles:
            handle.remove()
        for module in overridden:
            del module.forward
        for module, name, p in swapped:  # a forward that raised may have skipped its swap-back
            module._parameters[name] = p
