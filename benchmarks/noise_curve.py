"""Does table noise train like generated Gaussian noise? MeZO's `long` runs, repeated with this engine.

The engine's Gaussian noise reads windows of one fixed table (noise version 3): drawing costs
nothing, but the directions of a step are no longer independent draws. The ``long`` profile's
MeZO runs at its selected lr were made with noise version 2, where every unit of 16,384 elements
was drawn by its own generator. ``run`` repeats such a run with this engine, every config key
the same but the folder, and ``report`` sets the two dev curves and test accuracies side by side,
with the spread of the version-2 seeds as the yardstick of seed noise: a gap within it is no
measurable cost of the table.

    python -m benchmarks.noise_curve run --task sst2 --seed 0     # one run (~30 min, resumable)
    python -m benchmarks.noise_curve report                       # noise_curve.json/.md/.png
    python -m benchmarks.noise_curve moments --task sst2          # what one step sees (~12 min)

``moments`` looks at one step instead of a run: at the pretrained weights and the run's first
batch (gradient by backprop), the second moment (over |grad|^2) and the kurtosis of the projected
gradient g = z . grad over many directions z, drawn from the table and generated i.i.d. N(0, 1).
Both must be 1 and 3 when E[z z^T] = I and projections are Gaussian; it writes ``moments.json``.

Runs live in ``<out>/runs/<task>/mezo-s<seed>/``; ``report`` copies what it compares into
``noise_curve.json``, the committed record (run folders are working state).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from curvzo.bench.store import read_record
from curvzo.config import TrainConfig

from . import _common as C

OUT = C.RESULTS_DIR / "noise_curve"
LONG = C.RESULTS_DIR / "long"
TASKS = ("sst2", "mr")


def selected_lr(task: str) -> float:
    """The lr the ``long`` profile selected for MeZO (full parameters) on ``task``."""
    doc = json.loads((LONG / "accuracy.json").read_text())
    return next(t["methods"]["mezo"]["full"]["lr"] for t in doc["tasks"] if t["task"] == task)


def long_run(task: str, seed: int) -> Path:
    """The folder of the ``long`` profile's MeZO run at its selected lr and ``seed``."""
    doc = json.loads((LONG / "accuracy.json").read_text())
    lr = selected_lr(task)
    path = next(r["path"] for r in doc["runs"] if r["task"] == task and r["method"] == "mezo"
                and r["mode"] == "full" and r["lr"] == lr and r["seed"] == seed)
    return LONG / "runs" / task / Path(path).name


def long_record(task: str, seed: int, name: str) -> bytes:
    record = read_record(long_run(task, seed), name)
    if record is None:
        raise FileNotFoundError(f"the long profile has no {name} for {task} seed {seed}")
    return record


def config(task: str, seed: int, out: Path = OUT, data_dir: str | None = None) -> TrainConfig:
    """The ``long`` run's config with this benchmark's folder (and, if given, data folder)."""
    values = yaml.safe_load(long_record(task, seed, "config.yaml"))
    values["output_dir"] = str(out / "runs" / task / f"mezo-s{seed}")
    values["keep"] = "trajectory"
    if data_dir is not None:
        values["data_dir"] = data_dir
    return TrainConfig(**values)


def run(task: str, seed: int, out: Path = OUT, data_dir: str | None = None) -> dict[str, Any]:
    import curvzo

    cfg = config(task, seed, out, data_dir)
    folder = Path(cfg.output_dir)
    if (folder / "results.json").exists():
        return json.loads((folder / "results.json").read_text())
    return curvzo.train(cfg, resume=folder.exists() and any(folder.iterdir()))


def projected_moments(params: list[torch.nn.Parameter], samples: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Second moment over |grad|^2 (with its standard error) and kurtosis of g = z . grad over
    ``samples`` step seeds, for the engine's table noise (``noise="gaussian"``) and its generated
    Gaussian noise (``noise="generated"``), on MeZO's blocks, at the gradients ``params`` hold."""
    from curvzo.optim import FallbackWarning, MeZO

    energy = float(sum(p.grad.double().square().sum() for p in params))
    seeds = torch.randint(0, 2**63 - 1, (samples,), generator=torch.Generator().manual_seed(seed)).tolist()

    def projection(optimizer: MeZO, step_seed: int) -> float:
        total = 0.0
        for block in optimizer.blocks:
            grad = block.param.grad.view(-1)[block.start : block.end]
            for a, b, z, sign in optimizer._noise.segments(block, step_seed, 0, block.numel):
                total += sign * float(torch.dot(z, grad[a:b]))
        return total

    out = {}
    for name, noise in (("table", "gaussian"), ("generated", "generated")):
        with warnings.catch_warnings():  # only the blocks and their noise are used: no step runs
            warnings.simplefilter("ignore", FallbackWarning)
            optimizer = MeZO(params, lr=0.0, seed=seed, noise=noise)
        ratio = torch.tensor([projection(optimizer, s) ** 2 / energy for s in seeds], dtype=torch.float64)
        mean = float(ratio.mean())
        out[name] = {"second_moment": mean, "standard_error": float(ratio.std()) / math.sqrt(samples),
                     "kurtosis": float(ratio.square().mean()) / mean**2, "samples": samples}
    return out


def moments(task: str, samples: int, out: Path = OUT, data_dir: str | None = None) -> dict[str, Any]:
    """:func:`projected_moments` at the pretrained weights and the first batch of ``task``'s long run
    (seed 0), merged into ``<out>/moments.json``."""
    from curvzo import finetune, scoring

    cfg = config(task, 0, out, data_dir)
    _, (train_set, _, _), model, tokenizer, named = finetune.setup(cfg)
    batch = scoring.encode(tokenizer, finetune.train_batch(train_set, 0, cfg), max_length=cfg.max_length)
    scoring.classification_loss(model, batch).backward()
    path = out / "moments.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc[task] = projected_moments([p for _, p in named], samples)
    C.write_json(path, doc)
    return doc[task]


def _curve(results: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, dev) of a run's evaluations, from step 0 (its zero-shot accuracy)."""
    return [(0, results["zero_shot"]), *((e["step"], e["dev"]) for e in results["evals"])]


def late_loss(log: str, steps: int) -> float:
    """Mean training loss of the logged steps in the second half of a ``steps``-step run: less
    noisy than 300 test examples, and a run that diverged there shows it."""
    losses = [r["loss"] for r in map(json.loads, log.splitlines()) if r["step"] > steps // 2]
    return statistics.fmean(losses) if losses else math.nan


def _paired(gaps: list[float]) -> dict[str, float]:
    """Mean, standard error and count of paired gaps."""
    if not gaps:
        return {"mean": math.nan, "standard_error": math.nan, "n": 0}
    se = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else math.nan
    return {"mean": statistics.fmean(gaps), "standard_error": se, "n": len(gaps)}


def report(out: Path = OUT) -> dict[str, Any]:
    rows = []
    for task in TASKS:
        generated = {s: json.loads(long_record(task, s, "results.json")) for s in (0, 1, 2)}
        steps = yaml.safe_load(long_record(task, 0, "config.yaml"))["steps"]
        for folder in sorted((out / "runs" / task).glob("mezo-s*")):
            if not (folder / "results.json").exists():
                continue
            seed = int(folder.name.removeprefix("mezo-s"))
            table = json.loads((folder / "results.json").read_text())
            tests = [r["test"] for r in generated.values()]
            rows.append({
                "task": task, "seed": seed, "lr": table["lr"],
                "table_test": table["test"], "generated_test": generated[seed]["test"],
                "table_best_dev": table["best_dev"], "generated_best_dev": generated[seed]["best_dev"],
                "generated_test_seeds": tests, "generated_test_spread": max(tests) - min(tests),
                "table_curve": _curve(table), "generated_curve": _curve(generated[seed]),
                "table_late_loss": late_loss((folder / "log.jsonl").read_text(), steps),
                "generated_late_loss": late_loss(long_record(task, seed, "log.jsonl").decode(), steps),
                "table_diverged": bool(table.get("diverged")), "generated_diverged": bool(generated[seed].get("diverged")),
            })
    step = json.loads((out / "moments.json").read_text()) if (out / "moments.json").exists() else {}
    steady = [r for r in rows if not (r["table_diverged"] or r["generated_diverged"])]
    summary = {
        "test_gap_points": _paired([100 * (r["table_test"] - r["generated_test"]) for r in rows]),
        "late_loss_gap": _paired([r["table_late_loss"] - r["generated_late_loss"] for r in steady]),
    } if rows else {}
    doc = {"environment": C.environment(), "runs": rows, "summary": summary, "moments": step}
    C.write_json(out / "noise_curve.json", doc)
    (out / "noise_curve.md").write_text(_markdown(rows, summary, step))
    if rows:
        _figure(rows, out / "noise_curve.png")
    print(_markdown(rows, summary, step))
    return doc


def _late(r: dict[str, Any], noise: str) -> str:
    return f"{r[f'{noise}_late_loss']:.3f}" + (" (diverged)" if r[f"{noise}_diverged"] else "")


def _markdown(rows: list[dict[str, Any]], summary: dict[str, Any], step: dict[str, Any]) -> str:
    table = C.format_table(
        ["task", "seed", "lr", "test table", "test generated", "gap (pts)", "generated seeds: mean, min-max",
         "best dev table", "best dev generated", "late loss table", "late loss generated"],
        [[r["task"], r["seed"], r["lr"], r["table_test"], r["generated_test"],
          100 * (r["table_test"] - r["generated_test"]),
          f"{statistics.fmean(r['generated_test_seeds']):.3f}, "
          f"{min(r['generated_test_seeds']):.3f}-{max(r['generated_test_seeds']):.3f}",
          r["table_best_dev"], r["generated_best_dev"], _late(r, "table"), _late(r, "generated")] for r in rows])
    paired = ""
    if summary:
        test, loss = summary["test_gap_points"], summary["late_loss_gap"]
        paired = (f"Paired by seed, table − generated: test {test['mean']:+.1f} ± {test['standard_error']:.1f} points "
                  f"over {test['n']} runs; late training loss {loss['mean']:+.3f} ± {loss['standard_error']:.3f} "
                  f"over the {loss['n']} pairs where neither run diverged.\n\n")
    return ("# Table noise against generated Gaussian noise (MeZO, `long` protocol)\n\n"
            "Generated by `python -m benchmarks.noise_curve report`. *table*: this engine (noise version 3); "
            "*generated*: the `long` profile's run of the same config and seed (noise version 2), and the "
            "test accuracy of its three seeds at that lr (a different noise draws different directions, "
            "so a table run is one more draw of that spread, not a replica of its seed). *Late loss*: the mean "
            "training loss over the second half of the steps.\n\n"
            f"```\n{table}\n```\n\n{paired}![dev curves](noise_curve.png)\n" + _moments_markdown(step))


def _moments_markdown(step: dict[str, Any]) -> str:
    """The ``moments`` measurements, if any: what one step sees of each noise."""
    if not step:
        return ""
    table = C.format_table(
        ["task", "noise", "E[g^2] / |grad|^2", "standard error", "kurtosis", "directions"],
        [[task, name, m["second_moment"], m["standard_error"], m["kurtosis"], m["samples"]]
         for task, by_noise in step.items() for name, m in by_noise.items()], floatfmt=".3f")
    return ("\nOne step (`python -m benchmarks.noise_curve moments --task T`): the projected gradient "
            "g = z . grad at the pretrained weights and the run's first batch, over many directions; "
            "N(0, I) noise gives 1 and 3.\n\n"
            f"```\n{table}\n```\n")


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for key, style in (("generated_curve", "--"), ("table_curve", "-")):
            steps, dev = zip(*r[key]) if r[key] else ((), ())
            ax.plot(steps, dev, style, marker="o", ms=3, label=key.split("_")[0])
        ax.set(title=f"{r['task']} seed {r['seed']} (lr {r['lr']:g})", xlabel="step", ylabel="dev accuracy")
        ax.legend()
    fig.tight_layout()
    C.save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noise_curve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="repeat one long MeZO run with this engine's noise")
    one.add_argument("--task", choices=TASKS, required=True)
    one.add_argument("--seed", type=int, choices=(0, 1, 2), default=0)
    one.add_argument("--data-dir", default=None, help="default: the long run's")
    one.add_argument("--out", type=Path, default=OUT)
    summary = sub.add_parser("report", help="compare the finished runs with the long profile's")
    summary.add_argument("--out", type=Path, default=OUT)
    step = sub.add_parser("moments", help="the projected gradient's moments, table against generated noise")
    step.add_argument("--task", choices=TASKS, required=True)
    step.add_argument("--samples", type=int, default=400)
    step.add_argument("--data-dir", default=None, help="default: the long run's")
    step.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.command == "run":
        result = run(args.task, args.seed, args.out, args.data_dir)
        print(f"{args.task} seed {args.seed}: test {result['test']}", file=sys.stderr)
        return 0
    if args.command == "moments":
        if args.samples < 2:
            print(f"--samples must be at least 2, got {args.samples}", file=sys.stderr)
            return 2
        for name, m in moments(args.task, args.samples, args.out, args.data_dir).items():
            print(f"{args.task} {name}: E[g^2]/|grad|^2 {m['second_moment']:.3f} +- {m['standard_error']:.3f}, "
                  f"kurtosis {m['kurtosis']:.2f} ({m['samples']} directions)")
        return 0
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
