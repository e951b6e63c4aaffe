"""python -m benchmarks.stability

Which ZO estimator trains fastest without diverging? For every estimator variant, on real tasks:
the largest learning rate that trains ``--steps`` steps without diverging, and the training loss
against forward passes at the variant's best learning rate. This, not the one-batch MSE of
``benchmarks.estimator_quality`` (kept as a secondary figure), is how variants are chosen: the
MSE ranked configurations opposite to their stability on SmolLM2-135M.

Protocol (defaults reproduce ``benchmarks/results/stability/``):

* SmolLM2-135M fp32, full-parameter, label-only cross-entropy; batches of 16 with ``max_length``
  64 drawn by :func:`curvzo.finetune.train_batch` with ``--seed`` (0): every variant and learning
  rate sees the same batches in the same order, so losses at equal steps (equal forward passes:
  every ZO step costs two forwards of one batch) are comparable. Another seed draws other batches
  and other directions; its runs go to ``<out>/seed<N>/`` and the seed-0 table shows them beside
  its own, so each difference to MeZO stands next to the same difference on other seeds.
* Each variant is a harness optimizer (:func:`curvzo.finetune.build_training_optimizer`, as
  ``curvzo train`` builds it: a preset, option overrides, embedding rows as blocks or not).
* Divergence. Batches differ in difficulty far more than a few steps of ZO change the loss, so
  each step's loss is divided by the pretrained model's loss on the same batch (one forward per
  batch, once per task): the relative loss, 1 at the start. Its running value is an exponential
  average (0.9) started at 1. A run is stable when the running relative loss never exceeds 1.5
  and ends below 1; it is stopped as soon as the first fails (or a loss is not finite).
* Learning rates come from a geometric grid (factor 2); the search starts at the variant's own
  starting point, goes up while runs are stable and down while they are not, and then runs one
  grid step below the largest stable lr (the smallest unstable one's stable neighbour often trains
  worse than the lr below it). The largest stable lr is the largest stable one below the smallest
  unstable one. The best lr is the stable run with the lowest mean relative loss over its last 20
  steps (the loss figure; equal batches for all, so differences between variants are differences
  of training progress); every variant's best lr is chosen from (at least) its two largest stable lrs.

Every run is one JSON file under ``<out>/runs/<task>/<variant>-lr<lr>.json``, written when it
ends: an interrupted benchmark resumes where it stopped (``--aggregate-only`` redraws the summary
from finished runs). Variants run in the order listed, so a partial run covers the most important
first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import DEFAULT_DATA_DIR, RESULTS_DIR, environment, format_table, quiet_transformers, save_figure, write_json
from curvzo import finetune, scoring
from curvzo.config import TrainConfig

GRID = tuple(1.25e-5 * 2**i for i in range(12))  # 1.25e-5 .. 2.56e-2 (normalised variants need the top)
#: Where every search starts: MeZO's last stable lr on SST-2 (measured here from 5e-5 up: 5e-5,
#: 1e-4, 2e-4 stable, 4e-4 not). Starting at the edge costs two runs per search instead of four.
START_LR = 2e-4
LIMIT = 1.5  # the running loss may never exceed LIMIT x the start
TASKS = ("sst2", "mr")  # the default tasks, in table order
SMOOTHING = 0.9
TAIL = 20  # steps averaged for the loss figure


@dataclass(frozen=True)
class Variant:
    """A harness optimizer: a preset, option overrides, rows as blocks, where its lr search starts,
    and the ``benchmarks.estimator_quality`` method that measures the same estimator's one-batch MSE."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    embedding_rows: bool | None = None
    start_lr: float = START_LR
    mse_method: str | None = None
    retired: bool = False  # its options left the engine (rejected by this benchmark): records only

    def config(self, task: str, lr: float, steps: int, data_dir: str, seed: int) -> TrainConfig:
        return TrainConfig(
            task=task, method=self.method, lr=lr, optimizer_options=dict(self.options), embedding_rows=self.embedding_rows,
            steps=steps, batch_size=16, max_length=64, data_dir=data_dir, num_dev=16, num_test=16, seed=seed, device="cpu",
        )


_CURVZO = {"dense_below": 16384}
#: The random-subspace lr law, checked here at 40 steps as the ``scaling`` profile checks it at 400:
#: uniformly drawn tensors, a fixed budget f, and the update divided by the expected share f of the
#: elements perturbed (no 1/pi). The step along z_S is lr / f, so the law (theory and MeZO-BCD)
#: predicts MeZO's largest stable lr in these units at every f, and an equal loss per forward.
SUBSPACE_FRACTIONS = (0.5, 0.25, 0.125, 0.03125)
#: In priority order: a partial run covers the first ones. Normalised variants move by about lr
#: per coordinate instead of lr |g| (|g| ~ 5-50 here), so their search starts 8x higher.
#: A normalised g estimates the gradient divided by a running scale, so it has no MSE against the
#: gradient to compare (mse_method None). Retired variants are the rejected ones whose options
#: left the engine: their finished runs stay in the tables, and they cannot run again.
VARIANTS: dict[str, Variant] = {
    "mezo": Variant("mezo", mse_method="mezo"),
    "curvzo-sparse": Variant("curvzo-sparse", mse_method="curvzo-sparse-harness"),
    "curvzo-sparse+cap3": Variant("curvzo-sparse", {**_CURVZO, "multiplier_cap": 3.0}, mse_method="curvzo-sparse+cap3", retired=True),
    "curvzo-sparse+subspace": Variant("curvzo-sparse", {**_CURVZO, "correction": "subspace"}, mse_method="curvzo-sparse+subspace"),
    "curvzo-sparse+normalize": Variant("curvzo-sparse", {**_CURVZO, "normalize": True}, start_lr=8 * START_LR),
    "mezo+normalize": Variant("mezo", {"normalize": True}, start_lr=8 * START_LR),
    "mezo+rows": Variant("mezo", embedding_rows=True, mse_method="mezo+rows-active"),
    "curvzo-ref": Variant("curvzo-ref", embedding_rows=True, mse_method="ref+rows-active"),
    "curvzo-sparse+replacement": Variant("curvzo-sparse", {**_CURVZO, "sampling": "replacement", "explore_mix": 0.3},
                                         mse_method="curvzo-sparse+replacement", retired=True),
    "curvzo-sparse+floor0.2": Variant("curvzo-sparse", {**_CURVZO, "pi_floor": 0.2}, mse_method="curvzo-sparse+floor0.2"),
    "curvzo-sparse+rademacher": Variant("curvzo-sparse", {**_CURVZO, "noise": "rademacher"}, mse_method="curvzo-sparse+rademacher"),
    "uniform-sparse": Variant("uniform-sparse", mse_method="uniform-sparse"),
    **{f"subspace-f{f:g}": Variant("curvzo-ref", {"sampling": "uniform", "budget": f, "correction": "subspace"})
       for f in SUBSPACE_FRACTIONS},
}
#: Where the one-batch MSE column comes from (``python -m benchmarks.estimator_quality``).
ESTIMATOR_QUALITY = RESULTS_DIR / "estimator_quality.json"


# ------------------------------------------------------------------------------------ one run
class Task:
    """A task's model, pretrained weights (for resetting between runs), batches and start loss."""

    def __init__(self, name: str, steps: int, data_dir: str, seed: int) -> None:
        cfg = VARIANTS["mezo"].config(name, START_LR, steps, data_dir, seed)
        self.name, self.steps, self.seed = name, steps, seed
        self.task, (self.train_set, _, _), self.model, self.tokenizer, self.named = finetune.setup(cfg)
        self.initial = [p.detach().clone() for _, p in self.named]
        self.batches = [self.encode(finetune.train_batch(self.train_set, step, cfg)) for step in range(steps)]

    def encode(self, examples: list[Any]) -> Any:
        return scoring.encode(self.tokenizer, examples, max_length=64)

    def reset(self) -> None:
        with torch.no_grad():
            for (_, p), p0 in zip(self.named, self.initial):
                p.copy_(p0)

    @torch.no_grad()
    def pretrained_losses(self) -> list[float]:
        self.reset()
        return [float(scoring.classification_loss(self.model, b)) for b in self.batches]


def train(task: Task, variant: Variant, lr: float, base: Sequence[float], data_dir: str) -> dict[str, Any]:
    """``task.steps`` steps of ``variant`` at ``lr`` from the pretrained weights, stopped at divergence."""
    task.reset()
    cfg = variant.config(task.name, lr, task.steps, data_dir, task.seed)
    optimizer = finetune.build_training_optimizer(cfg, task.model, task.named)
    relative: list[float] = []
    running = 1.0
    reason = None
    clock = time.perf_counter()
    for batch, pretrained in zip(task.batches, base):
        active = finetune.active_blocks(optimizer, task.model, batch)
        loss, _ = finetune.take_step(optimizer, task.model, task.task, batch, cfg, active)
        relative.append(loss / pretrained)
        running = SMOOTHING * running + (1 - SMOOTHING) * relative[-1]
        if not math.isfinite(loss) or running > LIMIT:
            reason = f"running relative loss {running:.3g} > {LIMIT} at step {len(relative)}"
            break
    if reason is None and running >= 1.0:
        reason = f"final running relative loss {running:.3g} not below 1"
    return {
        "lr": lr, "stable": reason is None, "reason": reason, "relative_losses": relative, "final_running": running,
        "tail_loss": _tail(relative) if reason is None else None, "seconds": round(time.perf_counter() - clock, 1),
    }


def _tail(losses: Sequence[float]) -> float:
    return sum(losses[-TAIL:]) / len(losses[-TAIL:])


# ------------------------------------------------------------------------------------ the search
def run_path(out: Path, task: str, name: str, lr: float) -> Path:
    return out / "runs" / task / f"{name}-lr{lr:.4g}.json"


def search(task: Task, name: str, base: Sequence[float], out: Path, data_dir: str) -> list[dict[str, Any]]:
    """Runs of one variant up the grid while stable, down while not, then one grid step below the
    largest stable lr (the lr at the edge often trains worse than the next one down, so the best lr
    is looked for among both); finished runs are read back."""
    variant = VARIANTS[name]
    runs: dict[int, dict[str, Any]] = {}

    def run(index: int) -> dict[str, Any]:
        path = run_path(out, task.name, name, GRID[index])
        if path.exists():
            runs[index] = json.loads(path.read_text())
        else:
            runs[index] = train(task, variant, GRID[index], base, data_dir)
            write_json(path, {"task": task.name, "variant": name, **runs[index]})
            print(f"  {task.name} {name} lr {GRID[index]:.4g}: {'stable' if runs[index]['stable'] else 'unstable'} "
                  f"({runs[index]['seconds']} s)", flush=True)
        return runs[index]

    index = min(range(len(GRID)), key=lambda i: abs(math.log(GRID[i] / variant.start_lr)))
    direction = 0
    while 0 <= index < len(GRID) and index not in runs:
        step = 1 if run(index)["stable"] else -1
        if direction and step != direction:
            break  # the edge is found: a stable run next to an unstable one
        direction = step
        index += step
    largest = summarize([runs[i] for i in sorted(runs)])["largest_stable_lr"]
    below = GRID.index(largest) - 1 if largest is not None else -1  # run lrs are GRID values, read back exactly
    if below >= 0 and below not in runs:
        run(below)
    return [runs[i] for i in sorted(runs)]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest stable lr (below the smallest unstable one) and the best lr's loss curve."""
    unstable = [r["lr"] for r in runs if not r["stable"]]
    ceiling = min(unstable) if unstable else math.inf
    stable = [r for r in runs if r["stable"] and r["lr"] < ceiling]
    best = min(stable, key=lambda r: r["tail_loss"]) if stable else None
    return {
        "largest_stable_lr": max((r["lr"] for r in stable), default=None),
        "smallest_unstable_lr": min(unstable) if unstable else None,
        "grid_edge": bool(stable) and stable[-1]["lr"] >= GRID[-1],  # the true edge is higher
        "unfinished": not unstable and not (stable and stable[-1]["lr"] >= GRID[-1]),  # the search was cut
        "best_lr": best["lr"] if best else None,
        "best_tail_loss": best["tail_loss"] if best else None,
        "best_losses": best["relative_losses"] if best else None,
        "runs": [{k: r[k] for k in ("lr", "stable", "reason", "tail_loss", "seconds")} for r in runs],
    }


# ------------------------------------------------------------------------------------ report
def report(result: dict[str, Any]) -> str:
    tasks, others = result["tasks"], result.get("other_seeds", {})
    lines = []
    for task, entry in tasks.items():
        rows = []
        for name, s in entry["variants"].items():
            peer = entry["variants"].get(_baseline(name), {})
            ratio = (s["largest_stable_lr"] / peer["largest_stable_lr"]
                     if s.get("largest_stable_lr") and peer.get("largest_stable_lr") else None)
            largest = s["largest_stable_lr"]
            largest = f">= {largest:.4g} (grid top)" if s["grid_edge"] else f">= {largest:.4g} (unfinished)" if s["unfinished"] and largest else largest
            rows.append([name, largest, ratio, s["smallest_unstable_lr"], s["best_lr"], s["best_tail_loss"],
                         _minus_mezo(entry, name), *(_other_seed(o.get(task), name) for o in others.values()),
                         _mse(result.get("mse", {}).get(name))])
        lines.append(f"{task}: pretrained loss {entry['start_loss']:.4f} (mean over the batches), "
                     f"{result['config']['steps']} steps x 2 forwards of 16")
        lines.append(format_table(["variant", "largest stable lr", "/ its MeZO (same lr units)", "unstable at", "best lr",
                                   f"rel. loss (last {TAIL})", "- mezo",
                                   *(f"seed {seed}: stable lr, - mezo" for seed in others),
                                   "1-batch MSE / MeZO"], rows, floatfmt=".4g"))
        lines.append("")
    return "\n".join(lines)


def _minus_mezo(entry: dict[str, Any], name: str) -> float | None:
    """The variant's loss figure minus plain MeZO's on one seed's batches (losses compare across lr units)."""
    s, peer = entry["variants"][name], entry["variants"].get("mezo", {})
    return s["best_tail_loss"] - peer["best_tail_loss"] if s["best_tail_loss"] and peer.get("best_tail_loss") else None


def _other_seed(entry: dict[str, Any] | None, name: str) -> str | None:
    if not entry or name not in entry["variants"]:
        return None
    s, diff = entry["variants"][name], _minus_mezo(entry, name)
    largest = "-" if s["largest_stable_lr"] is None else f"{s['largest_stable_lr']:.4g}{'+' if s['unfinished'] or s['grid_edge'] else ''}"
    return f"{largest}, {'-' if diff is None else f'{diff:+.4g}'}"


def _mse(entry: dict[str, Any] | None) -> str | None:
    if entry is None:
        return None
    return f"{entry['ratio']:.3g} (exact)" if entry["exact"] else f"{entry['ratio']:.3g} +- {entry['se']:.2g} (MC)"


def mse_ratios(path: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """MSE / MeZO's of each variant's estimator on one SST-2 batch at the pretrained weights (a
    secondary figure: variants are chosen by stability), where measured: the exact formula where
    it applies (Horvitz-Thompson with Gaussian z), else the Monte-Carlo mean with its standard error."""
    if not path.exists():
        return {}
    measured = {m["name"]: m for m in json.loads(path.read_text())["methods"] if m.get("mc_mse_ratio") is not None}
    out = {}
    for name in names:
        m = measured.get(VARIANTS[name].mse_method or "")
        if m is not None:
            exact = m.get("formula_mse_ratio") is not None
            out[name] = {"method": m["name"], "exact": exact, "se": None if exact else m["mc_mse_ratio_se"],
                         "ratio": m["formula_mse_ratio"] if exact else m["mc_mse_ratio"]}
    return out


def _baseline(name: str) -> str:
    """MeZO in the variant's lr units: a normalised g makes lr a step length, not a multiple of |g|."""
    return "mezo+normalize" if VARIANTS[name].options.get("normalize", False) else "mezo"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, (task, entry) in zip(axes[0], tasks.items()):
        for name, s in entry["variants"].items():
            if not s["best_losses"]:
                continue
            running, curve = 1.0, []
            for loss in s["best_losses"]:
                running = SMOOTHING * running + (1 - SMOOTHING) * loss
                curve.append(running)
            x = [32 * (i + 1) for i in range(len(curve))]  # forward passes: 2 per step, 16 examples each
            ax.plot(x, curve, label=f"{name} (lr {s['best_lr']:.3g})", lw=2 if name in ("mezo", "curvzo-sparse") else 1)
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set(title=f"{task}: training loss at each variant's best lr", xlabel="forward passes (examples)",
               ylabel=f"loss / pretrained loss on the batch (EMA {SMOOTHING})")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def aggregate(out: Path, tasks: Sequence[str], names: Sequence[str], steps: int) -> dict[str, Any]:
    """The summary of every finished run (a variant with no finished run is left out)."""
    result: dict[str, Any] = {"config": {"steps": steps, "grid": GRID, "limit": LIMIT, "smoothing": SMOOTHING,
                                         "batch_size": 16, "max_length": 64, "model": "smollm2-135m"},
                              "variants": {n: VARIANTS[n].__dict__ for n in names}, "tasks": {}}
    for task in tasks:
        start_path = out / "runs" / task / "start.json"
        if not start_path.exists():
            continue
        start = json.loads(start_path.read_text())
        result["config"]["steps"] = start["steps"]  # what the runs took, whatever --steps says now
        entry = {"start_loss": sum(start["pretrained_losses"]) / len(start["pretrained_losses"]), "variants": {}}
        for name in names:
            runs = [json.loads(p.read_text()) for p in sorted((out / "runs" / task).glob(f"{name}-lr*.json"))]
            runs = sorted(runs, key=lambda r: r["lr"])
            if runs:
                entry["variants"][name] = summarize(runs)
        result["tasks"][task] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--variants", default=",".join(n for n, v in VARIANTS.items() if not v.retired),
                        help="comma-separated, in run order")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="batches and directions; seed N > 0 runs in <out>/seed<N>")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "stability")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s): {', '.join(unknown)} (known: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    retired = [n for n in names if VARIANTS[n].retired]
    if retired and not args.aggregate_only:
        print(f"retired variant(s): {', '.join(retired)} (rejected, their options left the engine; their records "
              "stay: use --aggregate-only)", file=sys.stderr)
        return 2
    tasks = [t for t in args.tasks.split(",") if t]
    if args.seed < 0:
        print(f"--seed must be >= 0, got {args.seed}", file=sys.stderr)
        return 2
    if not args.aggregate_only:
        quiet_transformers()
        run_out = seed_dir(args.out, args.seed)
        loaded = {t: Task(t, args.steps, args.data_dir, args.seed) for t in tasks}
        base = {}
        for t, task in loaded.items():
            start_path = run_out / "runs" / t / "start.json"
            if not start_path.exists():
                write_json(start_path, {"task": t, "pretrained_losses": task.pretrained_losses(), "steps": args.steps})
            start = json.loads(start_path.read_text())
            if start["steps"] != args.steps:
                print(f"{run_out} holds runs of {start['steps']} steps, not {args.steps}: use --steps "
                      f"{start['steps']} or another --out", file=sys.stderr)
                return 2
            base[t] = start["pretrained_losses"]
        for name in names:
            for t, task in loaded.items():
                search(task, name, base[t], run_out, args.data_dir)
                _write(args.out, tasks, args.steps)
    print(_write(args.out, tasks, args.steps))
    return 0


def seed_dir(out: Path, seed: int) -> Path:
    return out if seed == 0 else out / f"seed{seed}"


def _write(out: Path, tasks: Sequence[str], steps: int) -> str:
    """The tables of every variant and task with finished runs, whichever ran this time."""
    names = list(VARIANTS)
    tasks = list(dict.fromkeys([*TASKS, *tasks]))  # a task aggregates only where its runs are
    result = aggregate(out, tasks, names, steps)
    seeds = sorted(int(p.name[4:]) for p in out.glob("seed*") if p.name[4:].isdigit())
    result["other_seeds"] = {seed: aggregate(seed_dir(out, seed), tasks, names, steps)["tasks"] for seed in seeds}
    result["mse"] = mse_ratios(ESTIMATOR_QUALITY, names)
    result["environment"] = environment("cpu")
    write_json(out / "stability.json", result)
    if result["tasks"]:
        plot(result, out / "stability.png")
    table = report(result)
    (out / "stability.md").write_text(
        "# Stability: largest stable lr and training loss per forward, per estimator variant\n\n"
        f"Regenerate: `python -m benchmarks.stability` (resumable; `--aggregate-only` redraws).\n\n```\n{table}```\n\n"
        "![stability.png](stability.png)\n"
    )
    return table


if __name__ == "__main__":
    sys.exit(main())
