"""Blocks: the units a ZO optimizer perturbs, samples and scores.

A block is a contiguous slice of one parameter's flattened storage. By default every parameter
tensor is one block; ``block_size`` splits large tensors so that, for example, a 28M-element
embedding is not one all-or-nothing unit. For 2-D tensors the split is rounded to whole rows, so
that a block is a set of embedding rows (rows of tokens absent from a batch cannot change its loss).

The noise of a block is a pure function of (step seed, block id): each block reseeds a dedicated
generator, so an unsampled block costs no random numbers and any block can be regenerated alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Block", "build_blocks", "block_seed", "NoiseSource"]

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Block:
    """One perturbation unit: elements ``[start, end)`` of ``param.view(-1)``."""

    index: int
    group: int
    param: torch.Tensor
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start

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
                blocks.append(Block(len(blocks), g, p, start, min(start + step, p.numel())))
    return blocks


def block_seed(step_seed: int, block_id: int) -> int:
    """SplitMix64 of the pair, so nearby (seed, block) pairs give unrelated generator streams."""
    x = (step_seed * 0x9E3779B97F4A7C15 + (block_id + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class NoiseSource:
    """Gaussian block noise with one generator and one reusable fp32 buffer per device.

    Reusing the buffer matters: filling an existing buffer with ``normal_`` is several times
    cheaper on CPU than allocating a fresh tensor with ``randn`` for every block.
    """

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self.draws = 0  # elements generated so far: lets tests and benchmarks count noise passes

    def generator(self, block: Block, step_seed: int, salt: int = 0) -> torch.Generator:
        """The device's generator, seeded for (step seed, block, salt); salt 0 is the noise stream."""
        device = block.param.device
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(block_seed(step_seed ^ (salt * 0xD1B54A32D192ED03), block.index))

    def noise(self, block: Block, step_seed: int) -> torch.Tensor:
        """z for ``block`` at ``step_seed`` as an fp32 view shaped like the block (valid until the next call)."""
        device = block.param.device
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < block.numel:
            buf = self._buffers[device] = torch.empty(block.numel, dtype=torch.float32, device=device)
        gen = self.generator(block, step_seed)
        self.draws += block.numel
        return buf[: block.numel].normal_(generator=gen)
