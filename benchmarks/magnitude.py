"""Does Sparse-MeZO's magnitude mask choose a better subspace than a random one? A one-step bound.

Sparse-MeZO perturbs and updates only the weights whose magnitude is at most a per-tensor quantile
of the pretrained weights: a choice that costs no gradient and no state beyond one threshold per
tensor, so it would run at inference memory. A subspace update on S reaches about
signal_S / (2 tr GN_S) per step, against signal / (2 tr GN) for dense MeZO (the one-step algebra
of benchmarks.oracle). With minibatch noise the ZO scalar's second moment carries the batch
gradient's energy E rather than its signal s = ||E g||^2, and the expected one-step decrease of
the subspace update at the step whose noise equals dense MeZO's, over MeZO's, is the oracle's
``subset_gain``:

    gain = (s_S / s) / sqrt((E_S / E) (tr GN_S / tr GN))

the measure on which the oracle's chosen groups score 1.5-2.9. A random mask gives 1 in
expectation at any fraction (the random-subspace law). ``run`` measures,
at the pretrained weights and the ``long`` protocol's first training batches, with the oracle's
estimators (``benchmarks.oracle.measure``: the signal ||E g||^2 from ``batches`` batch gradients,
the Gauss-Newton trace from ``samples`` probe backwards), the shares and the gain of three masks
per fraction f of each tensor's elements: the f smallest in magnitude (Sparse-MeZO's rule), the
f largest (the opposite choice) and f at random (the yardstick of the measurement's noise).

    python -m benchmarks.magnitude run --task sst2      # ~25 min on one core: magnitude.json / .md
    python -m benchmarks.magnitude report               # magnitude.md again from magnitude.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C
from benchmarks.oracle import LONG, MEZO_LR, by_group, measure, subset_gain
from curvzo import scoring
from curvzo.config import TrainConfig
from curvzo.finetune import setup, train_batch

OUT = C.RESULTS_DIR / "magnitude"
TASKS = ("sst2", "mr", "cb", "boolq")
KINDS = ("small", "large", "random")
FRACTIONS = (0.2, 0.5, 0.8)
DENSE = "dense"


def masks(weight: torch.Tensor, fraction: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The three masks of ``fraction`` of ``weight``'s elements: smallest |w|, largest |w|, random.
    Ties at a threshold are all in (a quantile of |w|, as Sparse-MeZO thresholds it)."""
    size = weight.abs().flatten()
    k = max(1, round(fraction * size.numel()))
    low = size.kthvalue(k).values
    high = size.kthvalue(size.numel() - k + 1).values
    return {"small": weight.abs() <= low, "large": weight.abs() >= high,
            "random": torch.rand(weight.shape, generator=gen) < fraction}


def subsets(params: Sequence[torch.Tensor], fractions: Sequence[float], seed: int = 0) -> tuple[list[str], list[list[torch.Tensor]]]:
    """(names, per tensor its masks in the order of names): the whole tensor first."""
    gen = torch.Generator().manual_seed(seed)
    names = [DENSE, *(f"{kind}-{f:g}" for f in fractions for kind in KINDS)]
    per_tensor = []
    for p in params:
        by_name = {f"{kind}-{f:g}": m for f in fractions for kind, m in masks(p.detach(), f, gen).items()}
        per_tensor.append([by_name[n] for n in names[1:]])
    return names, per_tensor


def masked_parts(per_tensor: list[list[torch.Tensor]]):
    """``benchmarks.oracle.Parts`` for the masks: tensor b's squared norm, then over each mask."""
    def parts(b: int, g: torch.Tensor) -> list[float]:
        sq = g.double().pow(2)
        return [float(sq.sum()), *(float(sq[m].sum()) for m in per_tensor[b])]
    return parts


def shares(m: dict[str, list], names: Sequence[str], tensors: int) -> list[dict[str, Any]]:
    """Per mask: its shares of the energy, signal and trace (with the trace share's standard error
    over the probes) and its gain over dense MeZO, from ``measure``'s per-part lists."""
    groups = names * tensors
    energy, signal = by_group(m["energy"], groups), by_group(m["signal"], groups)
    traces = [by_group(sample, groups) for sample in m["trace_samples"]]
    stats = {n: {"energy": energy[n], "signal": signal[n], "trace": statistics.fmean(t[n] for t in traces)}
             for n in names}
    dense = stats[DENSE]
    rows = []
    for name in names[1:]:
        kind, fraction = name.rsplit("-", 1)
        inside = stats[name]
        share = {k: inside[k] / dense[k] for k in inside}
        spread = [(t[name] - share["trace"] * t[DENSE]) / dense["trace"] for t in traces]
        outside = {k: dense[k] - v for k, v in inside.items()}
        rows.append({"mask": kind, "fraction": float(fraction), "energy_share": share["energy"],
                     "signal_share": share["signal"], "trace_share": share["trace"],
                     "trace_share_se": statistics.stdev(spread) / math.sqrt(len(spread)),
                     "gain": subset_gain({"in": inside, "out": outside}, ["in"])})
    return rows


def config(task: str, data_dir: str | None = None) -> TrainConfig:
    """The oracle's config for ``task`` (the ``long`` protocol at MeZO's selected lr), seed 0."""
    return TrainConfig(model="smollm2-135m", task=task, data_dir=data_dir or str(C.DEFAULT_DATA_DIR),
                       method="mezo", seed=0, lr=MEZO_LR[task], **LONG)


def run(task: str, batches: int, samples: int, out: Path = OUT, data_dir: str | None = None) -> dict[str, Any]:
    """Measure ``task`` and record it in ``magnitude.json`` (beside the other tasks') and ``.md``."""
    C.quiet_transformers()
    cfg = config(task, data_dir)
    _, (train_set, _, _), model, tokenizer, named = setup(cfg)
    params = [p for _, p in named]
    names, per_tensor = subsets(params, FRACTIONS)
    encoded = [scoring.encode(tokenizer, train_batch(train_set, i, cfg), max_length=cfg.max_length)
               for i in range(batches)]
    m = measure(model, params, encoded, samples, torch.Generator().manual_seed(1), masked_parts(per_tensor))
    result = {"batches": batches, "samples": samples, "rows": shares(m, names, len(params))}
    path = out / "magnitude.json"
    doc = json.loads(path.read_text()) if path.exists() else {"results": {}}
    doc["environment"] = C.environment()
    doc["results"][task] = result
    C.write_json(path, doc)
    report(out)
    return result


def report(out: Path = OUT) -> str:
    """Write ``magnitude.md`` from ``magnitude.json``."""
    text = _markdown(json.loads((out / "magnitude.json").read_text())["results"])
    (out / "magnitude.md").write_text(text)
    return text


def _markdown(results: dict[str, dict[str, Any]]) -> str:
    table = C.format_table(
        ["task", "mask", "fraction", "energy share", "signal share", "trace share", "+-", "gain"],
        [[task, row["mask"], row["fraction"], row["energy_share"], row["signal_share"], row["trace_share"],
          row["trace_share_se"], row["gain"]] for task, r in sorted(results.items()) for row in r["rows"]],
        floatfmt=".3f")
    return ("# Sparse-MeZO's magnitude mask: the one-step bound\n\n"
            "Generated by `python -m benchmarks.magnitude report` (runs: `python -m benchmarks.magnitude run "
            "--task T`). Per tensor, the fraction of its elements with the smallest |w|, the largest, or at "
            "random; the shares of the batch gradient's energy, its signal ||E g||^2 and the Gauss-Newton trace "
            "that the mask holds, at the pretrained weights; gain = signal share / sqrt(energy share x trace "
            "share), the subspace update's expected one-step decrease over dense MeZO's at equal noise "
            "(`benchmarks.oracle.subset_gain`; random masks: 1 in expectation).\n\n"
            f"```\n{table}\n```\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.magnitude", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="measure the masks' shares on one task")
    one.add_argument("--task", choices=TASKS, required=True)
    one.add_argument("--batches", type=int, default=8, help="training batches the signal is measured on")
    one.add_argument("--samples", type=int, default=32, help="probe backwards of the Gauss-Newton trace")
    one.add_argument("--data-dir", default=None)
    one.add_argument("--out", type=Path, default=OUT)
    summary = sub.add_parser("report", help="magnitude.md from magnitude.json")
    summary.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.batches < 2 or args.samples < 2:
            print(f"--batches and --samples must be at least 2, got {args.batches} and {args.samples}", file=sys.stderr)
            return 2
        for row in run(args.task, args.batches, args.samples, args.out, args.data_dir)["rows"]:
            print(f"{args.task} {row['mask']}-{row['fraction']:g}: signal share {row['signal_share']:.3f}, "
                  f"trace share {row['trace_share']:.3f} +- {row['trace_share_se']:.3f}, gain {row['gain']:.2f}")
        return 0
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
