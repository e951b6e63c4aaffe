"""Does bf16 ZO training follow the fp32 loss curve? Round-to-nearest vs stochastic rounding vs fp32 master copies.

    python -m benchmarks.precision                                      # SmolLM2-135M, SST-2, MeZO, lr 1e-5
    python -m benchmarks.precision --lr 1e-6 --name precision_lr1e-6    # updates far below half an ulp

Two experiments from the same seed, optimizer and batches, so every variant draws the same noise
directions z:

* training: fp32 weights, then bf16 weights with each way of storing updates: round-to-nearest,
  stochastic rounding (``rounding="stochastic"``) and fp32 master copies (``rounding="master"``;
  the optimizer state then holds 4 bytes per weight). Each computes its own projected gradients,
  so bf16 differs from fp32 in two ways: how updates are stored, and the gradients themselves
  (the forwards see bf16 weights and an eps*z perturbation rounded to bf16).
* storage only: each bf16 variant replays the fp32 run's projected gradients
  (``opt.replay(grad)``), which isolates what the storage mode keeps of the same updates.

Every ``--eval-every`` steps it records the held-out loss (in the weights' own precision) and the
displacement from the start (of the master copy when there is one). Reported: the loss change,
the largest gap between a variant's loss change and fp32's, ||dw - dw_fp32|| (how far the
displacement is from fp32's), and the correlation of the projected gradients with fp32's. Writes
``benchmarks/results/<name>.json`` and ``<name>.png`` and prints a table.
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


def _displacement(params: list[torch.Tensor], start: list[torch.Tensor], opt: Any) -> list[torch.Tensor]:
    """w - w0 of what the optimizer holds: the fp32 master where there is one, else the weights."""
    return [opt.state[p]["master"] - s if "master" in opt.state[p] else p.detach().float() - s for p, s in zip(params, start)]


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(sum((t.double() ** 2).sum() for t in tensors) ** 0.5)


def _run(
    args: argparse.Namespace, dtype: str, rounding: str, examples: list, held_out: list, grads: list[float] | None
) -> dict[str, Any]:
    """One run: trains on its own forwards, or (``grads`` given) replays those projected gradients."""
    model, tokenizer = load_lm("smollm2-135m", dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().float().clone() for p in params]
    opt = build_optimizer(args.method, params, lr=args.lr, eps=args.eps, seed=args.seed, rounding=rounding)
    eval_batch = encode_batch(tokenizer, held_out, max_length=args.max_length)
    curve, moved, seen = [], [], []
    clock = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            with torch.no_grad():
                curve.append(float(label_loss(model, eval_batch)))
            moved.append(_norm(_displacement(params, start, opt)))
        if step == args.steps:
            break
        if grads is not None:
            opt.replay(grads[step])
        else:
            chunk = [examples[(step * args.batch_size + i) % len(examples)] for i in range(args.batch_size)]
            batch = encode_batch(tokenizer, chunk, max_length=args.max_length)
            opt.step(lambda: label_loss(model, batch))
        seen.append(opt.last_step.grad)
    masters = sum(s["master"].numel() * s["master"].element_size() for s in opt.state.values() if "master" in s)
    return {"loss": curve, "distance": moved, "grads": seen, "seconds": time.perf_counter() - clock,
            "master_mb": masters / 2**20, "displacement": _displacement(params, start, opt)}


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
    runs = {name: _run(args, dtype, rounding, examples, held_out, None) for name, dtype, rounding in VARIANTS}
    fp32_grads = runs["fp32"]["grads"]
    runs |= {f"{name} (fp32 grads)": _run(args, dtype, rounding, examples, held_out, fp32_grads)
             for name, dtype, rounding in VARIANTS[1:]}
    steps = list(range(0, args.steps + 1, args.eval_every))
    summary = {name: _summary(run, runs["fp32"]) for name, run in runs.items()}
    for run in runs.values():
        del run["displacement"]  # tensors: summarised above
    write_json(RESULTS_DIR / f"{args.name}.json", {"config": vars(args), "steps": steps, "runs": runs, "summary": summary})
    _plot(steps, runs, RESULTS_DIR / f"{args.name}.png")
    columns = ("loss_change", "max_change_gap", "distance_moved", "distance_to_fp32", "grad_corr", "master_mb", "seconds")
    rows = [[name, *(s[c] for c in columns)] for name, s in summary.items()]
    print(format_table(["variant", "held-out loss change", "max |change - fp32's|", "||dw||", "||dw - dw_fp32||",
                        "grad corr", "master MB", "s"], rows))
    return summary


def _summary(run: dict[str, Any], fp32: dict[str, Any]) -> dict[str, float]:
    change = [x - run["loss"][0] for x in run["loss"]]
    fp32_change = [x - fp32["loss"][0] for x in fp32["loss"]]
    grads, reference = torch.tensor(run["grads"]), torch.tensor(fp32["grads"])
    return {
        "final_loss": run["loss"][-1],
        "loss_change": change[-1],
        "max_change_gap": max(abs(a - b) for a, b in zip(change, fp32_change)),
        "distance_moved": run["distance"][-1],
        "distance_to_fp32": _norm([a - b for a, b in zip(run["displacement"], fp32["displacement"])]),
        "grad_corr": float(torch.corrcoef(torch.stack([grads, reference]))[0, 1]),
        "master_mb": round(run["master_mb"], 1),
        "seconds": round(run["seconds"], 1),
    }


def _plot(steps: list[int], runs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, run in runs.items():
        style = "--" if "fp32 grads" in name else "-"
        left.plot(steps, [x - run["loss"][0] for x in run["loss"]], style, marker="o", label=name)
        right.plot(steps, run["distance"], style, marker="o", label=name)
    left.set(xlabel="step", ylabel="held-out loss - its start", title="Loss change (same seed, same batches)")
    right.set(xlabel="step", ylabel="||w - w0||", title="Distance moved")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
