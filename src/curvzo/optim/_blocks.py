"""Blocks: the units a ZO optimizer perturbs, samples and scores.

A block is a contiguous slice of one parameter's flattened storage. By default every parameter
tensor is one block; ``block_size`` splits large tensors so that, for example, a 28M-element
embedding is not one all-or-nothing unit. For 2-D tensors the split is rounded to whole rows, so
that a block is a set of embedding rows (rows of tokens absent from a batch cannot change its loss).

The noise of a block is a pure function of (step seed, block id, element index) (``_noise``), so an
unsampled block costs no random numbers and any part of any block can be regenerated alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Block", "build_blocks", "block_seed"]

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Block:
    """One perturbation unit: elements ``[start, end)`` of ``param.view(-1)``; a parameter's blocks
    all span ``span`` elements (its last may be shorter), so element i lies in block i // span."""

    index: int
    group: int
    param: torch.Tensor
    start: int
    end: int
    span: int

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def row_length(self) -> int:
        """Elements per row of a matrix parameter (blocks of matrices are whole rows); 1 otherwise."""
        return self.param.numel() // self.param.shape[0] if self.param.dim() >= 2 and self.param.numel() else 1

    def view(self) -> torch.Tensor:
        return self.param.view(-1)[self.start : self.end]


def _chunk_elements(param: torch.Tensor, block_size: int | None) -> int:
    """Chunk length for ``param``: whole rows for matrices, so blocks align with token rows."""
    n = param.numel()
    if block_size is None or n <= block_size:
        return n
    if param.dim() >= 2:
        row = n // param.shape[0]
        return max(1, block_size // row) * row
    return block_size


def build_blocks(param_groups: list[dict]) -> list[Block]:
    """Blocks in a fixed order (groups, then parameters, then chunks): the order is the block id.

    Each group may set its own ``block_size``, e.g. one embedding row per block for the embedding
    group while every other tensor stays one block.
    """
    blocks: list[Block] = []
    for g, group in enumerate(param_groups):
        block_size = group.get("block_size")
        for p in group["params"]:
            if not p.is_contiguous():
                raise ValueError("ZO optimizers need contiguous parameters (blocks are slices of storage)")
            step = _chunk_elements(p, block_size)
            for start in range(0, p.numel(), step):
                blocks.append(Block(len(blocks), g, p, start, min(start + step, p.numel()), step))
    return blocks


def block_seed(step_seed: int, block_id: int) -> int:
    """SplitMix64 of the pair, so nearby (seed, block) pairs give unrelated generator streams."""
    x = (step_seed * 0x9E3779B97F4A7C15 + (block_id + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
