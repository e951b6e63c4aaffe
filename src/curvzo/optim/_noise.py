"""Counter-based block noise: z of an element is a pure function of (step seed, block id, index).

A block's elements are cut into fixed *units* (``UNIT_ELEMENTS`` for the device type; for a block
of whole matrix rows, a whole number of rows, so one row never straddles two units). Each unit is
drawn from the device's generator seeded with a hash of (step seed, block id, unit index). Any
range of any block can therefore be generated alone, in any chunking and order, on any number of
threads, and it holds the same values: a perturbed module, a few embedding rows read by the
batch, an update done chunk by chunk and a replay all see the same z. No buffer larger than the
requested range is ever needed.

On CPU the units of a range are drawn on several threads at once (the generator itself is
sequential, so one stream per unit is what makes noise parallel and still deterministic).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
import torch

from ._blocks import Block, block_seed
from ._options import Noise

__all__ = ["NOISE_VERSION", "UNIT_ELEMENTS", "NoiseSource", "unit_elements", "unit_seed"]

#: Stamped into trajectories and optimizer states: the noise of another version cannot be rebuilt.
NOISE_VERSION = 2

#: Elements per noise unit by device type: small on CPU (a row read costs at most one unit), large
#: on accelerators (one generator call per unit is one kernel launch).
UNIT_ELEMENTS = {"cpu": 1 << 14}
_UNIT_ACCELERATOR = 1 << 22

_MASK64 = (1 << 64) - 1
#: Row v holds the eight signs that the bits of byte v stand for: one random byte, eight elements.
_SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float() * 2.0 - 1.0
_SIGNS_ON: dict[torch.device, torch.Tensor] = {}  # the table on each device that has drawn from it


def unit_elements(block: Block) -> int:
    """Elements per unit of ``block``: the device's unit, rounded down to whole rows for matrices."""
    base = UNIT_ELEMENTS.get(block.param.device.type, _UNIT_ACCELERATOR)
    row = block.row_length
    return max(1, base // row) * row


def unit_seed(step_seed: int, block_id: int, unit: int, salt: int = 0) -> int:
    """Generator seed of one unit; ``salt`` separates streams (0: noise, 1: stochastic rounding)."""
    x = block_seed(step_seed ^ (salt * 0xD1B54A32D192ED03), block_id)
    x = ((x ^ ((unit + 1) * 0x9E3779B97F4A7C15)) * 0xBF58476D1CE4E5B9) & _MASK64
    return x ^ (x >> 31)


class _Worker(threading.local):
    """Per-thread generators (one per device): generators are not safe to share across threads."""

    def __init__(self) -> None:
        self.generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = torch.Generator(device=device)
        return gen.manual_seed(seed)


_WORKER = _Worker()
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="curvzo-noise")
        return _POOL


def _draw(out: torch.Tensor, gen: torch.Generator, noise: Noise) -> None:
    """Fill ``out`` (fp32, contiguous) with i.i.d. unit-variance noise from ``gen``."""
    if noise == "gaussian":
        out.normal_(generator=gen)
        return
    # Rademacher: one random byte gives eight signs, looked up in a table.
    n = out.numel()
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8, device=out.device).random_(generator=gen)
    signs = _SIGNS_ON.get(out.device)
    if signs is None:
        signs = _SIGNS_ON[out.device] = _SIGNS.to(out.device)
    if n % 8 == 0:
        torch.index_select(signs, 0, packed.int(), out=out.view(-1, 8))
    else:
        out.copy_(signs[packed.long()].view(-1)[:n])


class NoiseSource:
    """Generates block noise by units; counts the elements drawn (``draws``) for benchmarks and tests."""

    def __init__(self, noise: Noise = "gaussian") -> None:
        self.noise: Noise = noise
        self.draws = 0
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def buffer(self, n: int, device: torch.device) -> torch.Tensor:
        """A reusable fp32 buffer of ``n`` elements (valid until the next call): refilling one buffer
        is several times cheaper on CPU than allocating fresh pages for every block."""
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < n:
            buf = self._buffers[device] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n]

    def fill(self, block: Block, step_seed: int, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Write z of the block's elements ``[lo, hi)`` into ``out`` (fp32, ``hi - lo`` elements)."""
        size = unit_elements(block)
        units = range(lo // size, (hi - 1) // size + 1)
        self.draws += hi - lo

        def run(part: range) -> None:
            for u in part:
                start, end = u * size, min((u + 1) * size, block.numel)
                gen = _WORKER.generator(out.device, unit_seed(step_seed, block.index, u))
                if lo <= start and end <= hi:
                    _draw(out[start - lo : end - lo], gen, self.noise)
                else:  # a unit cut by the range: draw it whole, keep the overlap
                    whole = torch.empty(end - start, dtype=torch.float32, device=out.device)
                    _draw(whole, gen, self.noise)
                    a, b = max(lo, start), min(hi, end)
                    out[a - lo : b - lo] = whole[a - start : b - start]

        threads = torch.get_num_threads() if out.device.type == "cpu" else 1
        if threads > 1 and len(units) >= 2 * threads:
            step = -(-len(units) // threads)
            parts = [units[i : i + step] for i in range(0, len(units), step)]
            for future in [_pool().submit(run, part) for part in parts]:
                future.result()
        else:
            run(units)
        return out

    def rounding_generator(self, block: Block, step_seed: int, unit: int) -> torch.Generator:
        """Generator of a unit's stochastic-rounding bits (a stream apart from the noise)."""
        return _WORKER.generator(block.param.device, unit_seed(step_seed, block.index, unit, salt=1))
