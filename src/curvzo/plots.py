"""Figures of a run folder (or several on one figure): loss and dev metric against forward
passes, and for SparseCurvZO the budget over time and a heat map of block scores by layer."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoint import RunDir  # noqa: E402
from .io import atomic_write  # noqa: E402

__all__ = ["plot_run", "plot_runs"]


def _save(fig: plt.Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _smooth(values: list[float], window: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _label(run: Path) -> str:
    results = run / "results.json"
    if results.exists():
        data = json.loads(results.read_text())
        return f"{data['method']} ({run.name})"
    return run.name


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Loss and dev metric of several runs against forward passes, one figure each."""
    runs = [Path(r) for r in run_dirs]
    out = Path(out_dir)
    fig_loss, ax_loss = plt.subplots(figsize=(7, 4))
    fig_dev, ax_dev = plt.subplots(figsize=(7, 4))
    metrics = set()
    for run in runs:
        log = [r for r in RunDir(run).read_log() if "loss" in r]
        ax_loss.plot([r["forward_passes"] for r in log], _smooth([r["loss"] for r in log]), label=_label(run))
        results = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
        metrics.add(results.get("metric", "metric"))
        evals = [{"forward_passes": 0, "dev": results.get("zero_shot")}] + results.get("evals", [])
        evals = [e for e in evals if e["dev"] is not None]
        ax_dev.plot([e["forward_passes"] for e in evals], [e["dev"] for e in evals], marker="o", label=_label(run))
    ax_loss.set(xlabel="forward passes (examples)", ylabel="training loss (smoothed)", title="Training loss")
    metric = metrics.pop() if len(metrics) == 1 else "metric"  # runs of several tasks share one axis
    ax_dev.set(xlabel="forward passes (examples)", ylabel=f"dev {metric}", title=f"Dev {metric}")
    for ax in (ax_loss, ax_dev):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths = [out / "loss.png", out / "dev.png"]
    _save(fig_loss, paths[0])
    _save(fig_dev, paths[1])
    return paths


def plot_run(run_dir: str | Path) -> list[Path]:
    """All figures of one run into ``run_dir/plots``."""
    run = Path(run_dir)
    paths = plot_runs([run], run / "plots")
    log = [r for r in RunDir(run).read_log() if "budget" in r]
    if any(r["budget"] != 1.0 for r in log):  # a dense method (MeZO) perturbs everything: nothing to draw
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot([r["step"] for r in log], [r["budget"] for r in log], label="budget fraction f")
        ax.set(xlabel="step", ylabel="budget fraction", title="Perturbation budget", ylim=(0, 1))
        ax.grid(alpha=0.3)
        paths.append(run / "plots" / "budget.png")
        _save(fig, paths[-1])
    scores_file = run / "scores.json"
    if scores_file.exists():
        paths.append(_plot_scores(json.loads(scores_file.read_text()), run / "plots" / "scores.png"))
    return paths


def _plot_scores(snapshots: list[dict], path: Path) -> Path:
    layers = list(snapshots[0]["layers"])
    grid = [[snap["layers"].get(layer, 0.0) for snap in snapshots] for layer in layers]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.18 * len(layers))))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_xticks(range(len(snapshots)), [s["step"] for s in snapshots], fontsize=7)
    ax.set(xlabel="step", title="SparseCurvZO mean block score by layer")
    fig.colorbar(image, ax=ax)
    _save(fig, path)
    return path
