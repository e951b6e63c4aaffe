"""Does bf16 ZO training follow the fp32 loss curve? Round-to-nearest vs stochastic rounding vs fp32 master copies.

    python -m benchmarks.precision                                      # SmolLM2-135M, SST-2, MeZO, lr 1e-5
    python -m benchmarks.precision --lr 1e-6 --name precision_lr1e-6    # updates far below half an ulp

Trains the same model from the same seed four times with the same optimizer and batches: fp32
weights, bf16 weights with round-to-nearest updates, bf16 weights with stochastic rounding
(``rounding="stochastic"``) and bf16 weights whose updates accumulate in fp32 master copies
(``rounding="master"``; the optimizer state then holds 4 bytes per weight). Every ``--eval-every`` steps it records the loss
on a fixed held-out batch (in the weights' own precision) and how far the weights moved from the
start. Most ZO updates are below half a bf16 ulp, so round-to-nearest leaves the weights almost
unchanged; stochastic rounding keeps the updates in expectation. Writes
``benchmarks/results/precision.json`` and ``precision.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from curvzo.optim import build_optimizer

from ._common import RESULTS_DIR, encode_batch, format_table, label_loss, load_lm, quiet_transformers, save_figure, sst2_examples, write_json

VARIANTS = (
    ("fp32", "float32", "nearest"),
    ("bf16-nearest", "bfloat16", "nearest"),
    ("bf16-stochastic", "bfloat16", "stochastic"),
    ("bf16-master", "bfloat16", "master"),
)


def _run(args: argparse.Namespace, dtype: str, rounding: str, examples: list, held_out: list) -> dict[str, Any]:
    model, tokenizer = load_lm("smollm2-135m", dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().float().clone() for p in params]
    opt = build_optimizer(args.method, params, lr=args.lr, eps=args.eps, seed=args.seed, rounding=rounding)
    eval_batch = encode_batch(tokenizer, held_out, max_length=args.max_length)
    curve, moved = [], []
    clock = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            with torch.no_grad():
                curve.append(float(label_loss(model, eval_batch)))
                moved.append(float(sum(((p.float() - s) ** 2).sum() for p, s in zip(params, start)) ** 0.5))
        if step == args.steps:
            break
        chunk = [examples[(step * args.batch_size + i) % len(examples)] for i in range(args.batch_size)]
        batch = encode_batch(tokenizer, chunk, max_length=args.max_length)
        opt.step(lambda: label_loss(model, batch))
    masters = sum(s["master"].numel() * s["master"].element_size() for s in opt.state.values() if "master" in s)
    return {"loss": curve, "distance": moved, "seconds": time.perf_counter() - clock, "master_mb": masters / 2**20}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mezo")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="precision", help="results file stem in benchmarks/results")
    args = parser.parse_args(argv)
    quiet_transformers()
    examples = sst2_examples(args.steps * args.batch_size + 32, seed=args.seed)
    held_out, examples = examples[:32], examples[32:]
    runs = {name: _run(args, dtype, rounding, examples, held_out) for name, dtype, rounding in VARIANTS}
    steps = list(range(0, args.steps + 1, args.eval_every))
    fp32 = runs["fp32"]["loss"]
    summary = {
        name: {
            "final_loss": run["loss"][-1],
            "loss_change": run["loss"][-1] - run["loss"][0],
            "max_gap_to_fp32": max(abs(a - b) for a, b in zip(run["loss"], fp32)),
            "distance_moved": run["distance"][-1],
            "master_mb": round(run["master_mb"], 1),
            "seconds": round(run["seconds"], 1),
        }
        for name, run in runs.items()
    }
    write_json(RESULTS_DIR / f"{args.name}.json", {"config": vars(args), "steps": steps, "runs": runs, "summary": summary})
    _plot(steps, runs, RESULTS_DIR / f"{args.name}.png")
    rows = [[name, s["final_loss"], s["loss_change"], s["max_gap_to_fp32"], s["distance_moved"], s["master_mb"], s["seconds"]]
            for name, s in summary.items()]
    print(format_table(["variant", "final held-out loss", "change", "max |gap| to fp32", "||w - w0||", "master MB", "s"], rows))
    return summary


def _plot(steps: list[int], runs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, run in runs.items():
        left.plot(steps, run["loss"], marker="o", label=name)
        right.plot(steps, run["distance"], marker="o", label=name)
    left.set(xlabel="step", ylabel="held-out loss", title="Loss (same seed, same batches)")
    right.set(xlabel="step", ylabel="||w - w0||", title="Distance moved")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
