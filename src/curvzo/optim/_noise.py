"""Counter-based block noise: z of an element is a pure function of (step seed, block id, index).

Gaussian noise (the default) is read, not generated. Each device holds one fixed table of
``TABLE_ELEMENTS`` values, built once from a fixed seed (the shared noise table of evolution
strategies, Salimans et al. 2017). A block's elements are cut into *windows* of
``window_elements(block)``; window w of a block reads the table circularly from an offset, with a
sign, both taken from a hash of (step seed, block id, w). Drawing is slicing: the perturbed copy
of a module is one fused ``torch.add(theta, window, alpha=+-eps)`` per window, and no random
number is generated during a step.

The table is a random-phase sequence with a flat spectrum (every Fourier coefficient of modulus
1), so its circular autocorrelation is exactly 1 at lag 0 and 0 at every other lag, and its values
are Gaussian to the eye (kurtosis 3.006). Over the hash's uniform offset, two elements of one
window therefore have E[z_i z_j] = [i == j], and the independent signs of two windows make
elements of different windows uncorrelated: E[z z^T] = I, as for i.i.d. Gaussian noise, so the
two-point estimator keeps its expectation. (A table of i.i.d. values instead would make E[z z^T]
a random circulant whose spectrum is the table's periodogram, exponentially spread.)

Generated noise is drawn from generators: Gaussian (``"generated"``, i.i.d. N(0, 1), the reference
the table is measured against) or Rademacher (random signs). Its elements are cut into *units* of
``unit_elements(block)``, each drawn from the device's generator seeded with a hash of (step seed,
block id, unit): ``normal_`` values, or eight signs per random byte. Stochastic-rounding bits come
by units in the same way from a separate stream. For a block of whole matrix rows a unit is a
whole number of rows and a window a whole number of units.

Either way any range of any block can be produced alone, in any chunking and order, on any number
of threads or processes, and it holds the same values: a perturbed module, a few embedding rows
read by the batch, an update done chunk by chunk and a replay all see the same z.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ._blocks import Block, block_seed
from ._options import Noise

__all__ = ["NOISE_VERSION", "NoiseSource", "noise_table", "unit_elements", "unit_seed", "window_elements"]

#: Stamped into trajectories and optimizer states: the noise of another version cannot be rebuilt.
NOISE_VERSION = 3


@dataclass(frozen=True)
class _Layout:
    """Noise geometry of one device type: generator unit, table window and table length (elements)."""

    unit: int
    window: int
    table: int


#: CPU: small generator units (a row read draws at most one unit); windows of 2^18 values from a
#: table of 2^20 (4 MiB, plus the 1 MiB it wraps into). Accelerators: large units (one generator
#: call is one kernel launch), one window per unit.
_LAYOUTS = {"cpu": _Layout(unit=1 << 14, window=1 << 18, table=1 << 20)}
_ACCELERATOR = _Layout(unit=1 << 22, window=1 << 22, table=1 << 22)
_TABLE_SEED = 20170307  # the table is part of the noise version: changing it changes every z

_MASK64 = (1 << 64) - 1
#: Row v holds the eight signs that the bits of byte v stand for: one random byte, eight elements.
_SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float() * 2.0 - 1.0
_SIGNS_ON: dict[torch.device, torch.Tensor] = {}  # the table on each device that has drawn from it
_TABLES: dict[torch.device, torch.Tensor] = {}
_TABLES_LOCK = threading.Lock()


def _layout(device: torch.device) -> _Layout:
    return _LAYOUTS.get(device.type, _ACCELERATOR)


def unit_elements(block: Block) -> int:
    """Elements per generator unit of ``block``: the device's unit, rounded down to whole rows for matrices."""
    row = block.row_length
    return max(1, _layout(block.param.device).unit // row) * row


def window_elements(block: Block) -> int:
    """Elements per table window of ``block``: a whole number of its units, at most the device's window."""
    layout, unit = _layout(block.param.device), unit_elements(block)
    return min(layout.window, max(1, layout.window // unit) * unit)


def unit_seed(step_seed: int, block_id: int, unit: int, salt: int = 0) -> int:
    """Hash of one unit or window; ``salt`` separates streams (0: noise, 1: stochastic rounding)."""
    x = block_seed(step_seed ^ (salt * 0xD1B54A32D192ED03), block_id)
    x = ((x ^ ((unit + 1) * 0x9E3779B97F4A7C15)) * 0xBF58476D1CE4E5B9) & _MASK64
    return x ^ (x >> 31)


def _flat_spectrum_table(n: int) -> torch.Tensor:
    """n values (n even) with every Fourier coefficient of modulus 1 and a random phase: mean
    square 1 and circular autocorrelation 0 at every nonzero lag. Computed in float64 on the CPU
    from a fixed seed, then rounded to float32, so every device holds the same values."""
    gen = torch.Generator().manual_seed(_TABLE_SEED)
    phase = torch.rand(n // 2 - 1, generator=gen, dtype=torch.float64) * (2.0 * math.pi)
    spectrum = torch.ones(n // 2 + 1, dtype=torch.complex128)
    spectrum[1:-1] = torch.polar(torch.ones_like(phase), phase)
    return torch.fft.irfft(spectrum, n=n, norm="ortho").float()


def noise_table(device: torch.device) -> torch.Tensor:
    """The device's noise table, followed by its first ``window`` values again, so that a window
    that wraps around the end is still one contiguous slice. Built on first use, then shared."""
    device = torch.device(device)
    with _TABLES_LOCK:
        table = _TABLES.get(device)
        if table is None:
            layout = _layout(device)
            values = _flat_spectrum_table(layout.table)
            table = _TABLES[device] = torch.cat([values, values[: layout.window]]).to(device)
        return table


def _window(step_seed: int, block: Block, window: int) -> tuple[int, float]:
    """(table offset, sign) of one window of ``block`` at a step."""
    h = unit_seed(step_seed, block.index, window)
    return h % _layout(block.param.device).table, 1.0 if h >> 63 else -1.0


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


def _draw_signs(out: torch.Tensor, gen: torch.Generator) -> None:
    """Fill ``out`` (fp32, contiguous) with random signs from ``gen``: one random byte gives eight
    signs, looked up in a table."""
    n = out.numel()
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8, device=out.device).random_(generator=gen)
    signs = _SIGNS_ON.get(out.device)
    if signs is None:
        signs = _SIGNS_ON[out.device] = _SIGNS.to(out.device)
    if n % 8 == 0:
        torch.index_select(signs, 0, packed.int(), out=out.view(-1, 8))
    else:
        out.copy_(signs[packed.long()].view(-1)[:n])


def _draw_normal(out: torch.Tensor, gen: torch.Generator) -> None:
    """Fill ``out`` with i.i.d. N(0, 1) values from ``gen``."""
    out.normal_(generator=gen)


class NoiseSource:
    """Block noise by segments. Counts the noise elements read (``draws``: the passes over the
    sampled elements) and the random numbers generated for them (``generated``: 0 for table
    reads), for benchmarks and tests."""

    def __init__(self, noise: Noise = "gaussian") -> None:
        self.noise: Noise = noise
        self.draws = 0
        self.generated = 0
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def buffer(self, n: int, device: torch.device) -> torch.Tensor:
        """A reusable fp32 buffer of ``n`` elements (valid until the next call): refilling one buffer
        is several times cheaper on CPU than allocating fresh pages for every block."""
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < n:
            buf = self._buffers[device] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n]

    def segments(self, block: Block, step_seed: int, lo: int, hi: int) -> Iterator[tuple[int, int, torch.Tensor, float]]:
        """z of the block's elements ``[lo, hi)`` as (a, b, values, sign) with z[a:b] = sign * values.

        Gaussian: one segment per table window crossed, ``values`` a view of the table (valid as
        long as the table: callers fold ``sign`` into the scale of their fused add). Generated and
        Rademacher: one segment, drawn into the reusable buffer (valid until the next draw).
        """
        self.draws += hi - lo
        if self.noise != "gaussian":
            yield lo, hi, self._draw_units(block, step_seed, lo, hi, self.buffer(hi - lo, block.param.device)), 1.0
            return
        table = noise_table(block.param.device)
        size = window_elements(block)
        a = lo
        while a < hi:
            w = a // size
            b = min(hi, (w + 1) * size)
            offset, sign = _window(step_seed, block, w)
            start = offset + a - w * size
            yield a, b, table[start : start + b - a], sign
            a = b

    def fill(self, block: Block, step_seed: int, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Write z of the block's elements ``[lo, hi)`` into ``out`` (fp32, ``hi - lo`` elements)."""
        for a, b, values, sign in self.segments(block, step_seed, lo, hi):
            torch.mul(values, sign, out=out[a - lo : b - lo])
        return out

    def rows(self, block: Block, step_seed: int, rows: torch.Tensor) -> torch.Tensor:
        """z of whole rows of a matrix block: ``rows`` are sorted row indices of the parameter, all
        inside the block; returns a (len(rows), row length) fp32 tensor."""
        row = block.row_length
        self.draws += rows.numel() * row
        device = block.param.device
        if self.noise != "gaussian":
            return self._generated_rows(block, step_seed, rows)
        size = window_elements(block)
        starts = rows * row - block.start  # block-relative first element of each row
        windows = torch.div(starts, size, rounding_mode="floor")
        keys, inverse = torch.unique_consecutive(windows, return_inverse=True)
        hashes = [_window(step_seed, block, w) for w in keys.tolist()]
        offsets = torch.tensor([o for o, _ in hashes], dtype=torch.int64, device=device)
        signs = torch.tensor([s for _, s in hashes], dtype=torch.float32, device=device)
        index = (offsets[inverse] + starts - windows * size).unsqueeze(1) + torch.arange(row, device=device)
        return noise_table(device)[index] * signs[inverse].unsqueeze(1)

    def _generated_rows(self, block: Block, step_seed: int, rows: torch.Tensor) -> torch.Tensor:
        """Generated rows: each generator unit holding one of ``rows`` is drawn whole (units are whole rows)."""
        row, unit = block.row_length, unit_elements(block) // block.row_length
        first = block.start // row
        out = torch.empty(rows.numel(), row, dtype=torch.float32, device=block.param.device)
        units, counts = torch.unique_consecutive(torch.div(rows - first, unit, rounding_mode="floor"), return_counts=True)
        at = 0
        for u, count in zip(units.tolist(), counts.tolist()):
            lo, hi = u * unit * row, min((u + 1) * unit * row, block.numel)
            z = self._draw_units(block, step_seed, lo, hi, self.buffer(hi - lo, block.param.device)).view(-1, row)
            out[at : at + count] = z[rows[at : at + count] - first - u * unit]
            at += count
        return out

    def _draw_units(self, block: Block, step_seed: int, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Generated z of ``[lo, hi)``, unit by unit, the units spread over threads on CPU."""
        draw = _draw_signs if self.noise == "rademacher" else _draw_normal
        size = unit_elements(block)
        units = range(lo // size, (hi - 1) // size + 1)
        self.generated += min(units.stop * size, block.numel) - units.start * size

        def run(part: range) -> None:
            for u in part:
                start, end = u * size, min((u + 1) * size, block.numel)
                gen = _WORKER.generator(out.device, unit_seed(step_seed, block.index, u))
                if lo <= start and end <= hi:
                    draw(out[start - lo : end - lo], gen)
                else:  # a unit cut by the range: draw it whole, keep the overlap
                    whole = torch.empty(end - start, dtype=torch.float32, device=out.device)
                    draw(whole, gen)
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
