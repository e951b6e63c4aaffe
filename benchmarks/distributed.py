"""python -m benchmarks.distributed

Steps per second and bytes communicated per step of the distributed ZO step
(:class:`curvzo.optim.DistributedZO`) in each mode, on 1 and 2 processes, beside the peer
library's query-parallel MeZO step (``mezo.distributed_mezo_update``, PyPI ``mezo==0.0.1``), on
SmolLM2-135M in fp32 with a global batch of ``--batch-size`` real SST-2 prompts padded to
``--max-length`` tokens (defaults reproduce ``benchmarks/results/distributed.json`` and ``.png``).

Each configuration is one ``torchrun --standalone --nproc-per-node N`` launch of this script
(``--worker``) with gloo on CPU and one thread per process (``OMP_NUM_THREADS=1``: two processes
on two cores). A worker loads the model, takes ``--warmup`` untimed steps, then ``--steps``
timed ones; rank 0 prints a JSON line that the driver collects.

* ``data``, ``query``, ``shard``: ``DistributedZO(build_optimizer(method, ...), mode)`` with the
  label-only classification loss as closure (``data``/``shard``: each rank its share of the batch;
  ``query``: the whole batch, one direction per rank, so a step makes N updates); ``shard`` first
  applies FSDP2 per decoder layer (:func:`curvzo.parallel.shard_model`).
* ``peer``: ``distributed_mezo_update`` (a seed per rank on the whole batch, all-gather of the
  projected gradients, every rank applies every update: the same scheme as ``query`` with MeZO).

Bytes: every collective a worker issues is recorded by wrapping ``torch.distributed``'s
functions (``all_gather``, ``all_gather_single``/``all_gather_into_tensor``, ``all_reduce``,
``broadcast``, ``reduce_scatter*``): the payload each rank puts in, per timed step. This counts
FSDP's parameter all-gathers in ``shard`` mode too. ``zo_bytes`` is DistributedZO's own count.
"dirs/s" is steps/s times the directions a step evaluates (q = N in ``query`` and ``peer``).

The machine is shared (another benchmark may run at the same time): times are noisy; the
configurations of one run are side by side under the same conditions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C

DEFAULT_OUT = C.RESULTS_DIR / "distributed.json"
MODES = ("data", "query", "shard", "peer")
_COLLECTIVES = ("all_gather", "all_gather_single", "all_gather_into_tensor", "all_reduce", "broadcast",
                "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2", help="numbers of processes (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES), help="modes (default: %(default)s)")
    parser.add_argument("--methods", default="mezo,curvzo-sparse", help="ZO presets of the curvzo modes (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result (the PNG beside it)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # MODE:METHOD, run under torchrun
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ worker
class _Counter:
    """Wraps torch.distributed's collectives to add up the bytes this rank puts into them."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.bytes = 0
        self.calls = 0
        for name in _COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(original, name))

    def _wrap(self, original: Any, name: str) -> Any:
        def collective(*args: Any, **kwargs: Any) -> Any:
            # The payload: the input tensor (second argument of gathers into an output, else first).
            tensor = args[1] if name.startswith(("all_gather", "reduce_scatter")) else args[0]
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            self.calls += 1
            return original(*args, **kwargs)

        return collective


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    C.quiet_transformers()
    mode, method = args.worker.split(":")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = _Counter()
    model, tokenizer = C.load_lm("smollm2-135m")
    examples = C.sst2_examples(args.batch_size)
    share = len(examples) // world
    mine = examples[rank * share : (rank + 1) * share] if mode in ("data", "shard") else examples
    batch = C.encode_batch(tokenizer, mine, max_length=args.max_length, pad_to=args.max_length)
    zo = None
    if mode == "peer":
        from mezo.distributed import distributed_mezo_update

        seeds = itertools.count(1000)

        def step() -> None:
            distributed_mezo_update(model, batch, C.label_loss, args.eps, args.lr, next(seeds))
    else:
        from curvzo.optim import DistributedZO, build_optimizer
        from curvzo.parallel import shard_model

        if mode == "shard":
            shard_model(model)
        opt = build_optimizer(method, model.parameters(), lr=args.lr, eps=args.eps, seed=0, model=model)
        zo = DistributedZO(opt, mode)

        def step() -> None:
            zo.step(lambda: C.label_loss(model, batch), weight=float(len(mine)))
    for _ in range(args.warmup):
        step()
    dist.barrier()
    counter.bytes = counter.calls = 0
    zo_before = zo.bytes_communicated if zo else 0
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {
        "mode": mode, "method": method if mode != "peer" else "mezo (peer)", "processes": world,
        "directions_per_step": world if mode in ("query", "peer") else 1,
        "time": C.summarize(times), "steps_per_s": 1.0 / C.summarize(times)["median"],
        "bytes_per_step": counter.bytes / args.steps, "collectives_per_step": counter.calls / args.steps,
        "zo_bytes_per_step": (zo.bytes_communicated - zo_before) / args.steps if zo else None,
    }
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(result))


# ------------------------------------------------------------------------------------ driver
def _launch(args: argparse.Namespace, processes: int, mode: str, method: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "benchmarks.distributed", "--worker", f"{mode}:{method}", "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--lr", str(args.lr), "--eps", str(args.eps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=C.REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"{mode}:{method} on {processes} processes failed ({done.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1])


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["mode"], r["method"]) for r in rows}, key=lambda k: (MODES.index(k[0]), k[1]))
    counts = sorted({r["processes"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(counts)
    for j, n in enumerate(counts):
        by = {(r["mode"], r["method"]): r for r in rows if r["processes"] == n}
        xs = [i + (j - (len(counts) - 1) / 2) * width for i in range(len(labels))]
        left.bar(xs, [by[k]["steps_per_s"] * by[k]["directions_per_step"] if k in by else 0 for k in labels], width,
                 label=f"{n} process{'es' if n > 1 else ''}")
        right.bar(xs, [max(by[k]["bytes_per_step"], 1) if k in by else 0 for k in labels], width, label=f"{n} proc.")
    names = [f"{mode}\n{method}" for mode, method in labels]
    for ax in (left, right):
        ax.set_xticks(range(len(labels)), names, fontsize=8)
        ax.legend(fontsize=8)
    left.set_ylabel("directions evaluated per second (steps/s x q)")
    right.set_ylabel("bytes into collectives per rank and step")
    right.set_yscale("log")
    fig.suptitle("Distributed ZO on SmolLM2-135M (fp32, CPU, gloo, 1 thread per process)", fontsize=10)
    fig.tight_layout()
    C.save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.worker:
        _worker(args)
        return
    out = Path(args.out)
    rows = []
    methods = args.methods.split(",")
    for processes in (int(n) for n in args.processes.split(",")):
        for mode in args.modes.split(","):
            for method in (["mezo"] if mode == "peer" else methods):
                row = _launch(args, processes, mode, method)
                rows.append(row)
                print(f"{processes} x {mode:5} {row['method']:11} {row['steps_per_s']:.3f} steps/s "
                      f"{row['bytes_per_step']:.0f} B/step", file=sys.stderr)
    table = C.format_table(
        ["mode", "method", "procs", "q", "steps/s", "dirs/s", "bytes/step", "collectives/step"],
        [[r["mode"], r["method"], r["processes"], r["directions_per_step"], r["steps_per_s"],
          r["steps_per_s"] * r["directions_per_step"], f"{r['bytes_per_step']:.0f}", r["collectives_per_step"]]
         for r in rows])
    print(table)
    C.write_json(out, {"config": {k: v for k, v in vars(args).items() if k != "worker"},
                       "environment": C.environment(), "results": rows, "table": table,
                       "command": "python -m benchmarks.distributed " + " ".join(argv if argv is not None else sys.argv[1:])})
    _figure(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
