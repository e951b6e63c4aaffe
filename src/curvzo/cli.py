"""``curvzo``: a thin command line over the library (parse, call, print).

    curvzo train                          # embedded default: CurvZO, SmolLM2-135M, MR
    curvzo train --config configs/sst2-curvzo.yaml --steps 500 --set optimizer_options.pi_floor=0.05
    curvzo train --resume runs/mr-curvzo-20261130-043100    # continue a run from its last checkpoint
    curvzo eval runs/mr-curvzo-20261130-043100              # dev and test metric of a run's best weights
    curvzo plot runs/a runs/b --out cmp   # several runs on one figure
    curvzo models list | curvzo models fetch smollm2-135m
    curvzo tasks
    curvzo replay smollm2-135m runs/mr-curvzo-20261130-043100/trajectory.czt --out rebuilt   # weights from a trajectory
    curvzo export runs/mr-curvzo-20261130-043100 --step best --out best-model               # a run's weights at a step
    curvzo lr-find --task sst2 --method mezo   # short lr range test: the largest stable lr and a suggestion
    curvzo bench --profile quick          # accuracy grid (benchmarks/grids/cpu.yaml), resumable

Input errors (config, data, model, run folder) print one line on stderr and exit with code 2;
failures during training keep their traceback, except the death of another rank of a distributed
run, which prints one line and exits with code 1.

    torchrun --nproc-per-node 2 -m curvzo train --parallel data   # 2 processes (also query, shard)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import LR_FIND_RANGE, TrainConfig, load_config, load_yaml, parse_overrides
from .errors import (
    INPUT_ERROR_EXIT, ConfigError, CurvzoError, CurvzoWarning, RankFailed, TrainingDiverged, error_line,
)

__all__ = ["main"]

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("curvzo")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other input error
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="curvzo", description="Zeroth-order fine-tuning of Hugging Face language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a model on a task (no arguments: the embedded demo)")
    train.add_argument("--config", help="YAML file of TrainConfig keys")
    reuse = train.add_mutually_exclusive_group()
    reuse.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    reuse.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir if there is one")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(train)
    _add_lr_find(sub)
    evaluate = sub.add_parser("eval", help="dev and test metric of a run's best weights")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    plot = sub.add_parser("plot", help="re-draw figures from run folders")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("--out", help="folder for a combined figure of several runs")
    models = sub.add_parser("models", help="list or fetch built-in model aliases")
    models.add_argument("action", choices=["list", "fetch"])
    models.add_argument("alias", nargs="?")
    sub.add_parser("tasks", help="list the registered tasks")
    rebuild = sub.add_parser("replay", help="rebuild a ZO run's weights from its base model and trajectory")
    rebuild.add_argument("base_model", help="alias, hub id or local folder the run started from")
    rebuild.add_argument("trajectory", help="a run's trajectory.czt")
    rebuild.add_argument("--out", required=True, help="folder for the rebuilt model (or adapter)")
    rebuild.add_argument("--no-progress", action="store_true", help="no progress bar")
    export = sub.add_parser("export", help="write a run's weights at a step as a Hugging Face folder (rebuilt from its trajectory)")
    export.add_argument("run_dir")
    export.add_argument("--step", default="best", help="best | last | a step number (default: %(default)s)")
    export.add_argument("--out", required=True, help="folder for the model (or adapter) and tokenizer")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench = sub.add_parser("bench", help="run (resumably) and aggregate an accuracy grid")
    bench.add_argument("--grid", default="benchmarks/grids/cpu.yaml", help="grid YAML (default: %(default)s)")
    bench.add_argument("--profile", help="profile of the grid (its `profiles:` keys; default: the grid's `default_profile`)")
    bench.add_argument("--out", help="results folder (default: the profile's `out`)")
    bench.add_argument("--only", metavar="KEY=V,...", help="restrict to task=, method=, mode=, seed=, lr= values")
    bench.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default: 1)")
    bench.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    bench.add_argument("--aggregate-only", action="store_true", help="only rewrite tables and figures")
    bench.add_argument("--no-progress", action="store_true", help="no per-run progress bar")
    return parser


def _add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One ``--flag-name`` per TrainConfig field (but ``exclude``), typed by its annotation, helped
    by its metadata.

    The flags default to None, so only what is given on the command line overrides the config
    file; the help shows the field's own default.
    """
    hints = typing.get_type_hints(TrainConfig)
    for spec in dataclasses.fields(TrainConfig):
        if spec.name in exclude:
            continue
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        text = spec.metadata.get("help", "")
        if default is not None:
            text += f" (default: {default})"
        parser.add_argument("--" + spec.name.replace("_", "-"), dest=spec.name, type=_flag_type(hints[spec.name]),
                            help=text.replace("%", "%%"))


def _flag_type(hint: Any) -> Callable[[str], Any]:
    """How a flag's text becomes the field's value: int and float as such, a bool or a mapping as
    YAML (``--embedding-rows true``, ``--optimizer-options '{pi_floor: 0.05}'``), anything else text."""
    kinds = set(typing.get_args(hint) or (hint,)) - {type(None)}
    if kinds == {int}:
        return int
    if kinds == {float}:
        return float
    if kinds == {bool}:
        return _yaml_of(bool, "true or false")
    if kinds == {dict}:
        return _yaml_of(dict, "a mapping such as {key: value}")
    return str


def _yaml_of(kind: type, expected: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = load_yaml(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_lr_find(sub: Any) -> None:
    find = sub.add_parser("lr-find", help="short lr range test: the largest lr that does not diverge, and a suggestion")
    find.add_argument("--config", help="YAML file of TrainConfig keys")
    find.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    (rate_min, rate_max), (newton_min, newton_max) = LR_FIND_RANGE["rate"], LR_FIND_RANGE["newton"]
    find.add_argument("--lr-min", type=float, help=f"smallest lr of the grid (default: {rate_min:g}, {newton_min:g} for a Newton step)")
    find.add_argument("--lr-max", type=float, help=f"largest lr of the grid (default: {rate_max:g}, {newton_max:g} for a Newton step)")
    find.add_argument("--per-decade", type=int, default=2, help="grid values per factor of ten (default: %(default)s)")
    find.add_argument("--steps-per-lr", type=int, default=10, help="steps at each lr (default: %(default)s)")
    find.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(find, exclude=("lr", "steps", "output_dir"))


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig keys given as flags or ``--set``."""
    overrides: dict[str, Any] = {spec.name: getattr(args, spec.name, None) for spec in dataclasses.fields(TrainConfig)}
    overrides.update(_nested(parse_overrides(args.set)))
    return overrides


def _lr_find(args: argparse.Namespace) -> None:
    from .lrfind import default_range, lr_find, lr_grid

    _quiet_libraries()
    cfg = load_config(args.config, _config_overrides(args))
    low, high = default_range(cfg)
    lrs = lr_grid(low if args.lr_min is None else args.lr_min, high if args.lr_max is None else args.lr_max, args.per_decade)
    result = lr_find(cfg, lrs=lrs, steps=args.steps_per_lr,
                     progress=not args.no_progress)
    print(f"{'lr':>8}  {'loss, last third':>16}  {'/ smallest lr':>13}")
    for trial in result.trials:
        print(f"{trial.lr:8.3g}  {trial.tail:16.4g}  {trial.ratio:13.3f}{'  diverged' if trial.diverged else ''}")
    cost = f"{result.forward_passes} forward passes, {result.seconds:.0f} s"
    if result.largest_stable is None:
        print(f"every lr diverged: lower --lr-min ({cost})")
    else:
        print(f"largest lr that did not diverge: {result.largest_stable:g}; suggested: --lr {result.suggested:g} ({cost})")


def _train(args: argparse.Namespace) -> None:
    from .checkpoint import with_run_folder
    from .finetune import train

    _quiet_libraries()
    overrides = _config_overrides(args)
    if args.resume:
        config_file = Path(args.resume) / "config.yaml"
        if not config_file.exists():
            raise ConfigError(f"cannot resume: {config_file} not found (not a run folder)")
        overrides["output_dir"] = args.resume
        cfg = load_config(args.config or config_file, overrides)
    else:
        cfg = with_run_folder(load_config(args.config, overrides))
    results = train(cfg, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress)
    if "diverged" in results:
        raise TrainingDiverged(results["diverged"])


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"optimizer_options.pi_floor": 0.05}`` -> ``{"optimizer_options": {"pi_floor": 0.05}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[head] = value
    return out


def _eval(args: argparse.Namespace) -> None:
    from .finetune import evaluate_run

    _quiet_libraries()
    print(json.dumps(evaluate_run(args.run_dir, progress=not args.no_progress), indent=2))


def _plot(args: argparse.Namespace) -> None:
    from .plots import plot_run, plot_runs

    for run in args.run_dirs:
        if not (Path(run) / "log.jsonl").exists():
            raise ConfigError(f"{run} is not a run folder (no log.jsonl)")
    paths = plot_runs(args.run_dirs, args.out) if args.out else [p for r in args.run_dirs for p in plot_run(r)]
    print("\n".join(str(p) for p in paths))


def _models(args: argparse.Namespace) -> None:
    from .models import fetch_model, list_models

    if args.action == "fetch":
        if not args.alias:
            raise ConfigError("models fetch needs an alias (see `curvzo models list`)")
        print(fetch_model(args.alias))
        return
    for entry in list_models():
        print(f"{entry.alias:16} {'cached' if entry.cached else 'not cached':11} {entry.path}  {entry.description}")


def _tasks(args: argparse.Namespace) -> None:
    from .tasks import get_task, list_tasks

    for name in list_tasks():
        task = get_task(name)
        print(f"{name:10} {task.output_type:22} {task.metric}")


def _replay(args: argparse.Namespace) -> None:
    from .finetune import replay

    _quiet_libraries()
    replay(args.base_model, args.trajectory, args.out, progress=not args.no_progress)
    print(args.out)


def _export(args: argparse.Namespace) -> None:
    from .finetune import export

    _quiet_libraries()
    print(export(args.run_dir, args.step, args.out, progress=not args.no_progress))


def _bench(args: argparse.Namespace) -> None:
    from .bench import load_grid, parse_only, run_bench

    _quiet_libraries()
    grid = load_grid(args.grid, args.profile, args.out)
    report = run_bench(grid, only=parse_only(args.only, grid), jobs=args.jobs, dry_run=args.dry_run,
                       aggregate_only=args.aggregate_only, progress=not args.no_progress)
    if report.failed:
        sys.exit(f"curvzo: {len(report.failed)} run(s) failed: {', '.join(report.failed)}")


_COMMANDS = {"train": _train, "eval": _eval, "plot": _plot, "models": _models, "tasks": _tasks, "replay": _replay,
             "export": _export, "lr-find": _lr_find, "bench": _bench}


def _quiet_libraries() -> None:
    """Keep stderr for our own progress bar and errors: no per-tensor loading bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """A warning as one stderr line, beside the errors' lines (no file, line number or source line)."""
    text = " ".join(str(message).split())
    prefix = "curvzo: warning" if issubclass(category, CurvzoWarning) else f"curvzo: warning ({category.__name__})"
    print(f"{prefix}: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores the caller's handler (main may run inside a program)
        warnings.showwarning = _one_line_warning
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
        _COMMANDS[args.command](args)
    except CurvzoError as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has it: rank 0 says it once
            print(error_line(err), file=sys.stderr)
        return INPUT_ERROR_EXIT
    except RankFailed as err:  # another rank died: each survivor says which, in one line
        print(error_line(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C: one line (a run says how to resume), no traceback
        print(f"curvzo: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `curvzo bench --dry-run | head`: the reader left early. Point stdout at /dev/null so that
        # the interpreter's final flush does not raise again, and exit like other CLI tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
