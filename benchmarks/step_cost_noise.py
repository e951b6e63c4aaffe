"""python -m benchmarks.step_cost_noise

What drawing noise costs in a perturbed copy, the operation a ZO step repeats over every sampled
weight (twice for the two forwards, once more for the update): ``out = w + eps * z`` over tensors of
SmolLM2-135M's shapes, fp32 on the CPU, measured round-robin (medians of ``--repeats`` rounds, each
timing every variant once, so that load from other processes hits all alike):

* ``copy``: ``out.copy_(w)``, no noise (the floor: one read and one write of the weights);
* ``table``: the engine's Gaussian noise (noise version 3): one fused ``torch.add(w, window,
  alpha=+-eps, out=...)`` per table window (:meth:`curvzo.optim._noise.NoiseSource.segments`);
* ``generator``: noise version 2's Gaussian noise: units of 16,384 elements, each drawn by
  ``torch.randn`` from a generator seeded with the unit's hash into a reused buffer, the units
  spread over the torch threads, then one add;
* ``rademacher``: the engine's random signs (eight per random byte, per-unit generators), then one add.

Reported: seconds per pass over all the listed tensors, elements per second, and each variant's
time over ``copy``. Writes ``benchmarks/results/step_cost_noise.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C

DEFAULT_OUT = C.RESULTS_DIR / "step_cost_noise.json"
#: SmolLM2-135M's weight shapes, one layer's worth plus the tied embedding: (shape, count per model).
SHAPES = {"embedding 49152x576": ((49152, 576), 1), "attention q/o 576x576": ((576, 576), 60),
          "attention k/v 192x576": ((192, 576), 60), "mlp 1536x576": ((1536, 576), 90), "norm 576": ((576,), 61)}
_UNIT = 1 << 14


def _generator_draw(out: torch.Tensor, seed: int, pool: ThreadPoolExecutor, threads: int) -> None:
    """Version-2 noise: per-unit seeded generators, units split over threads."""
    from curvzo.optim._noise import unit_seed

    n = out.numel()
    units = range(0, -(-n // _UNIT))

    def run(part: range) -> None:
        gen = torch.Generator()
        for u in part:
            gen.manual_seed(unit_seed(seed, 0, u))
            torch.randn(min(_UNIT, n - u * _UNIT), generator=gen, out=out[u * _UNIT:(u + 1) * _UNIT])

    if threads > 1 and len(units) >= 2 * threads:
        step = -(-len(units) // threads)
        for f in [pool.submit(run, units[i:i + step]) for i in range(0, len(units), step)]:
            f.result()
    else:
        run(units)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_cost_noise", description=__doc__.split("\n\n")[1])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path; the PNG goes beside it")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from curvzo.optim._blocks import Block
    from curvzo.optim._noise import NoiseSource

    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads)
    gen = torch.Generator().manual_seed(0)
    # One tensor of each shape stands for all of its kind: times scale by the count.
    tensors = {name: (torch.randn(*shape, generator=gen), count) for name, (shape, count) in SHAPES.items()}
    outs = {name: torch.empty_like(w) for name, (w, _) in tensors.items()}
    buffer = torch.empty(max(w.numel() for w, _ in tensors.values()))
    table, rademacher = NoiseSource("gaussian"), NoiseSource("rademacher")
    blocks = {name: Block(0, 0, w, 0, w.numel(), w.numel()) for name, (w, _) in tensors.items()}
    eps, step = 1e-3, [0]

    def variant(kind: str):
        def run(name: str) -> None:
            w, out, block = tensors[name][0].view(-1), outs[name].view(-1), blocks[name]
            seed = 1000 + step[0]
            if kind == "copy":
                out.copy_(w)
            elif kind == "table":
                for a, b, z, sign in table.segments(block, seed, 0, w.numel()):
                    torch.add(w[a:b], z, alpha=eps * sign, out=out[a:b])
            elif kind == "generator":
                z = buffer[: w.numel()]
                _generator_draw(z, seed, pool, threads)
                torch.add(w, z, alpha=eps, out=out)
            else:
                for a, b, z, sign in rademacher.segments(block, seed, 0, w.numel()):
                    torch.add(w[a:b], z, alpha=eps * sign, out=out[a:b])
        return run

    kinds = ["copy", "table", "generator", "rademacher"]
    runs = {k: variant(k) for k in kinds}
    times: dict[str, dict[str, list[float]]] = {k: {n: [] for n in tensors} for k in kinds}
    for k in kinds:  # warm-up: page in outputs, build the table
        for name in tensors:
            runs[k](name)
    for _ in range(args.repeats):
        step[0] += 1
        for k in kinds:
            for name, (_, count) in tensors.items():  # a whole pass: each shape as often as the model has it
                start = time.perf_counter()
                for _ in range(count):
                    runs[k](name)
                times[k][name].append((time.perf_counter() - start) / count)
    D = sum(w.numel() * count for w, count in tensors.values())
    result: dict[str, Any] = {"command": "python -m benchmarks.step_cost_noise " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "environment": C.environment("cpu"), "threads": threads, "elements_per_pass": D, "variants": {}}
    rows = []
    for k in kinds:
        per_round = [sum(times[k][n][r] * tensors[n][1] for n in tensors) for r in range(args.repeats)]
        copy = [sum(times["copy"][n][r] * tensors[n][1] for n in tensors) for r in range(args.repeats)]
        med = statistics.median(per_round)
        over_copy = statistics.median(p / c for p, c in zip(per_round, copy))
        result["variants"][k] = {"seconds_per_pass": med, "elements_per_second": D / med, "over_copy_within_round": over_copy,
                                 "per_round": per_round,
                                 "by_shape_median_s": {n: statistics.median(times[k][n]) for n in tensors}}
        rows.append([k, med, D / med / 1e6, over_copy])
    out = Path(args.out)
    C.write_json(out, result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(kinds, [r[1] for r in rows], color=["#8c8c8c", "#4c72b0", "#c44e52", "#dd8452"])
    for i, r in enumerate(rows):
        ax.annotate(f"{r[1]:.2f} s", (i, r[1]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per perturbed copy of 134.5M weights")
    ax.set_title(f"w + eps z, fp32, {threads} threads", fontsize=10)
    fig.tight_layout()
    C.save_figure(fig, out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    print(C.format_table(["variant", "s / pass", "M elements/s", "/ copy"], rows))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
