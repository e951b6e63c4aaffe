"""A benchmark grid: the YAML file, its profiles, validation, and the runs' configs.

A grid (for example this repository's ``benchmarks/grids/cpu.yaml``) names tasks, methods with
their learning rates per mode, seeds and TrainConfig settings shared by every run; a profile
replaces any of them. :func:`load_grid` merges a profile over the base and reports every problem
in one ConfigError. Paths in a grid (``out``, ``data_dir``) are relative to the working directory.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import METHODS, ZO_METHODS, TrainConfig, read_yaml_mapping
from ..errors import ConfigError, CurvzoError
from ..model_options import PEFT_MODES
from ..optim._validate import is_int, is_real

__all__ = [
    "MODES", "ZERO_SHOT", "Grid", "MethodSpec", "format_lr", "load_grid", "parse_only", "run_config",
    "run_folder_name", "select_lr",
]

#: Grid mode name -> ``TrainConfig.peft``: the PEFT modes, with ``none`` called ``full``.
MODES = {("full" if peft == "none" else peft): peft for peft in PEFT_MODES}

#: Label and folder prefix of the zero-shot evaluations (no training).
ZERO_SHOT = "zero-shot"

_GRID_KEYS = {"tasks", "methods", "modes", "seeds", "select_seeds", "eps", "zero_shot", "keep_weights", "pack",
              "compare", "out", "model", "data_dir", "reuse", "step_cost"}
_TOP_ONLY = {"profiles", "default_profile"}
_METHOD_KEYS = {"method", "lr", "fixed_lr", "tasks", "modes", "seeds", "eps", "set"}
# TrainConfig fields the grid sets per run: not allowed as settings or in a method's `set`.
_CONTROLLED = {"task", "method", "peft", "lr", "seed", "output_dir", "eps", "model", "data_dir"}
_SETTINGS = set(TrainConfig.__dataclass_fields__) - _CONTROLLED
_DEFAULT_MODEL = next(f.default for f in fields(TrainConfig) if f.name == "model")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+]*(?:-[A-Za-z0-9_.+]+)*$")


@dataclass(frozen=True)
class MethodSpec:
    """One method row of a grid: ``label`` (folder and table name) runs TrainConfig ``method``."""

    label: str
    method: str
    lr: dict[str, tuple[float, ...]]  # mode -> learning rates to try
    eps: dict[str, float]  # mode -> perturbation scale
    tasks: tuple[str, ...]
    modes: tuple[str, ...]
    seeds: tuple[int, ...]  # the grid's, or a subset (`seeds:`): e.g. a reference row run on fewer seeds
    settings: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig keys (`set:`)
    #: mode -> the lr the other seeds run and the table reports instead of the dev selection
    #: (`fixed_lr:`): a method meant to run without a sweep, at its default; its sweep on the
    #: selection seeds then measures how far a dev selection would move it
    fixed_lr: dict[str, float] = field(default_factory=dict)

    @property
    def is_zo(self) -> bool:
        return self.method in ZO_METHODS


@dataclass(frozen=True)
class Grid:
    """A validated grid with its profile applied."""

    path: Path
    profile: str
    out: Path
    model: str
    data_dir: str | None
    tasks: tuple[str, ...]
    modes: tuple[str, ...]
    seeds: tuple[int, ...]
    select_seeds: tuple[int, ...]  # seeds every lr runs on (all seeds: the full lr x seed grid)
    methods: tuple[MethodSpec, ...]
    settings: dict[str, Any]  # TrainConfig run settings shared by every run
    zero_shot: bool = True
    keep_weights: bool = False
    pack: bool = False  # move finished runs' records into <out>/runs.tar.gz after each `run_bench`
    compare: tuple[str, str] = ("curvzo-sparse", "mezo")  # (method, baseline) labels of the summary
    base_out: Path | None = None  # the grid file's top-level `out`; a report's command names any other
    reuse: tuple[Path, ...] = ()  # other results folders whose finished runs of the same config count here
    step_cost: Path | None = None  # a benchmarks.step_cost JSON: quiet-machine step times for the wall-clock ratio

    def selection_seeds(self, spec: MethodSpec, lrs: tuple[float, ...]) -> tuple[int, ...]:
        """The seeds every lr of ``spec`` runs on: the grid's selection seeds among the method's own
        (all of its own when it has none of them), or all of its own for a single lr."""
        chosen = tuple(s for s in self.select_seeds if s in spec.seeds) or spec.seeds
        return chosen if len(lrs) > 1 else spec.seeds

    def cells(self) -> Iterator[tuple[str, MethodSpec, str]]:
        """(task, method, mode) in grid order: task-major, so early tasks finish first."""
        for task in self.tasks:
            for spec in self.methods:
                if task in spec.tasks:
                    for mode in spec.modes:
                        yield task, spec, mode

    def expected_runs(self) -> int:
        """Training runs of the complete grid (lr selection included), zero-shot excluded."""
        total = 0
        for _, spec, mode in self.cells():
            lrs = spec.lr[mode]
            chosen = self.selection_seeds(spec, lrs)
            total += len(lrs) * len(chosen) + len(spec.seeds) - len(chosen)
        return total


def format_lr(lr: float) -> str:
    """``1e-05`` -> ``"1e-5"``, ``0.00025`` -> ``"2.5e-4"``: short, exact for grid values."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def run_folder_name(label: str, mode: str, lr: float | None, seed: int) -> str:
    """``mezo-full-lr1e-5-s0``; the zero-shot evaluation of a seed is ``zero-shot-s0``."""
    if label == ZERO_SHOT:
        return f"{ZERO_SHOT}-s{seed}"
    return f"{label}-{mode}-lr{format_lr(lr)}-s{seed}"


def load_grid(path: str | Path, profile: str | None = None, out: str | Path | None = None) -> Grid:
    """Read, merge (profile over base) and validate a grid; every problem in one ConfigError."""
    path = Path(path)
    raw = read_yaml_mapping(path, "grid file", "a mapping (tasks, methods, seeds, profiles, ...)")
    problems: list[str] = []
    values, profile = _merge_profile(path, raw, profile, problems)
    grid = _build_grid(path, profile, values, out, raw.get("out"), problems)
    if problems:
        raise ConfigError(f"invalid grid {path} (profile {profile}): " + "; ".join(problems))
    return grid


def _merge_profile(path: Path, raw: dict[str, Any], profile: str | None, problems: list[str]) -> tuple[dict[str, Any], str]:
    """Profile keys replace base keys; a profile's `methods` picks the methods and merges each entry."""
    unknown = sorted(set(raw) - _GRID_KEYS - _TOP_ONLY - _SETTINGS)
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}")
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        problems.append("`profiles` must map profile names to mappings")
        profiles = {}
    name = profile or raw.get("default_profile") or ("cpu" if "cpu" in profiles else None)
    base = {k: v for k, v in raw.items() if k not in _TOP_ONLY}
    if name is None:
        return base, "(none)"
    if name not in profiles:  # nothing else is worth checking against the wrong profile
        raise ConfigError(f"grid {path}: unknown profile {name!r} (grid defines: {', '.join(profiles) or 'none'})")
    over = profiles[name] or {}
    if not isinstance(over, dict):
        problems.append(f"profile {name!r} must be a mapping")
        return base, name
    unknown = sorted(set(over) - _GRID_KEYS - _SETTINGS)
    if unknown:
        problems.append(f"profile {name!r}: unknown key(s) {', '.join(unknown)}")
    merged = {**base, **{k: v for k, v in over.items() if k != "methods"}}
    if "methods" in over:
        base_methods = base.get("methods") or {}
        chosen = over["methods"]
        if isinstance(chosen, list):  # a list of names: those base entries, in that order
            chosen = {m: None for m in chosen}
        if not isinstance(chosen, dict) or not isinstance(base_methods, dict):
            problems.append("`methods` must map method labels to their settings")
        else:
            merged["methods"] = {
                label: {**(base_methods.get(label) or {}), **(entry or {})} for label, entry in chosen.items()
            }
    return merged, name


def _build_grid(
    path: Path, profile: str, v: dict[str, Any], out: str | Path | None, base_out: Any, problems: list[str]
) -> Grid | None:
    from ..tasks import get_task

    tasks = _str_list(v.get("tasks"), "tasks", problems)
    for task in tasks:
        try:
            get_task(task)
        except CurvzoError as err:
            problems.append(f"`tasks`: {err}")
    modes = _str_list(v.get("modes", ["full"]), "modes", problems)
    for mode in modes:
        if mode not in MODES:
            problems.append(f"`modes` must be among {', '.join(MODES)}, got {mode!r}")
    seeds = _int_list(v.get("seeds", [0]), "seeds", problems)
    select = _int_list(v["select_seeds"], "select_seeds", problems) if v.get("select_seeds") is not None else seeds
    if not set(select) <= set(seeds):
        problems.append(f"`select_seeds` {list(select)} must be a subset of `seeds` {list(seeds)}")
    settings = {k: v[k] for k in v if k in _SETTINGS}
    for key in ("zero_shot", "keep_weights", "pack"):
        if key in v and not isinstance(v[key], bool):
            problems.append(f"`{key}` must be true or false, got {v[key]!r}")
    compare = v.get("compare") or {}
    if not isinstance(compare, dict) or set(compare) - {"method", "baseline"}:
        problems.append("`compare` must be a mapping with `method` and `baseline` labels")
        compare = {}
    base_eps = _eps(v.get("eps"), "eps", modes, problems)
    methods_raw = v.get("methods")
    if not isinstance(methods_raw, dict) or not methods_raw:
        problems.append("`methods` must be a non-empty mapping of method labels to their settings")
        methods_raw = {}
    methods = tuple(
        spec for label, entry in methods_raw.items()
        if (spec := _method_spec(str(label), entry, tasks, modes, seeds, base_eps, problems)) is not None
    )
    if out is None and v.get("out") is None:
        problems.append("no results folder: set `out` in the grid or pass one (curvzo bench --out)")
    reuse = _reuse_folders(v.get("reuse"), problems)
    step_cost = v.get("step_cost")
    if step_cost is not None and not isinstance(step_cost, str):
        problems.append(f"`step_cost` must be the path of a benchmarks.step_cost JSON or null, got {step_cost!r}")
    if problems:
        return None
    grid = Grid(
        path=path, profile=profile, out=Path(out if out is not None else v["out"]),
        model=str(v.get("model", _DEFAULT_MODEL)), data_dir=v.get("data_dir"),
        tasks=tasks, modes=modes, seeds=seeds, select_seeds=select, methods=methods, settings=settings,
        zero_shot=v.get("zero_shot", True), keep_weights=v.get("keep_weights", False), pack=v.get("pack", False),
        compare=(compare.get("method", "curvzo-sparse"), compare.get("baseline", "mezo")),
        base_out=None if base_out is None else Path(base_out), reuse=reuse,
        step_cost=None if step_cost is None else Path(step_cost),
    )
    for spec in methods:  # let TrainConfig validate the run settings, once per (method, mode)
        for mode in spec.modes:
            try:
                run_config(grid, tasks[0], spec, mode, spec.lr[mode][0], seeds[0], Path("."))
            except ConfigError as err:
                problems.append(f"methods.{spec.label} ({mode}): {str(err).removeprefix('invalid config: ')}")
    return grid


def _method_spec(
    label: str, entry: Any, tasks: tuple, modes: tuple, seeds: tuple, base_eps: dict, problems: list[str]
) -> MethodSpec | None:
    where = f"methods.{label}"
    entry = entry or {}
    if not isinstance(entry, dict):
        problems.append(f"`{where}` must be a mapping (lr, tasks, modes, seeds, eps, set, method)")
        return None
    n = len(problems)
    unknown = sorted(set(entry) - _METHOD_KEYS)
    if unknown:
        problems.append(f"`{where}`: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_METHOD_KEYS))})")
    if not _LABEL.match(label) or label == ZERO_SHOT:
        problems.append(f"`{where}`: a label is letters, digits, '_.+' and single dashes (not {ZERO_SHOT!r})")
    method = entry.get("method", label)
    if method not in METHODS:
        problems.append(f"`{where}`: method must be one of {', '.join(METHODS)}, got {method!r} "
                        "(set `method:` for a custom label)")
    # null (a profile undoing a base entry's subset) means all of the grid's tasks / modes
    own_tasks = tasks if entry.get("tasks") is None else _str_list(entry["tasks"], f"{where}.tasks", problems)
    own_modes = modes if entry.get("modes") is None else _str_list(entry["modes"], f"{where}.modes", problems)
    run_modes = tuple(m for m in modes if m in own_modes)
    own_seeds = seeds if entry.get("seeds") is None else _int_list(entry["seeds"], f"{where}.seeds", problems)
    if not set(own_seeds) <= set(seeds):
        problems.append(f"`{where}.seeds` {list(own_seeds)} must be a subset of `seeds` {list(seeds)}")
    lr_raw = entry.get("lr")
    lr: dict[str, tuple[float, ...]] = {}
    if not isinstance(lr_raw, dict):
        problems.append(f"`{where}.lr` must map each mode ({', '.join(run_modes)}) to a list of learning rates")
    else:
        for mode in run_modes:
            values = lr_raw.get(mode)
            if values is None:
                problems.append(f"`{where}.lr` has no learning rates for mode {mode!r}")
                continue
            values = values if isinstance(values, list) else [values]
            parsed = tuple(_number(x, f"{where}.lr.{mode}", problems) for x in values)
            if not parsed:
                problems.append(f"`{where}.lr.{mode}` is empty")
            elif len(set(parsed)) != len(parsed):
                problems.append(f"`{where}.lr.{mode}` repeats a value: {list(values)}")
            lr[mode] = parsed
    fixed = _fixed_lr(entry.get("fixed_lr"), lr, where, problems)
    eps = {**base_eps, **_eps(entry.get("eps"), f"{where}.eps", run_modes, problems)}
    settings = entry.get("set") or {}
    if not isinstance(settings, dict):
        problems.append(f"`{where}.set` must be a mapping of TrainConfig keys")
        settings = {}
    bad = sorted(set(settings) - _SETTINGS)
    if bad:
        problems.append(f"`{where}.set`: key(s) {', '.join(bad)} cannot be set per method "
                        f"(the grid sets {', '.join(sorted(_CONTROLLED))}; others are not TrainConfig fields)")
    if len(problems) > n:
        return None
    return MethodSpec(label=label, method=method, lr=lr, eps=eps, tasks=tuple(t for t in tasks if t in own_tasks),
                      modes=run_modes, seeds=tuple(s for s in seeds if s in own_seeds), settings=dict(settings),
                      fixed_lr=fixed)


def _fixed_lr(value: Any, lr: dict[str, tuple[float, ...]], where: str, problems: list[str]) -> dict[str, float]:
    """`fixed_lr`: mode -> one of that mode's learning rates."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"`{where}.fixed_lr` must map a mode to one of its learning rates")
        return {}
    fixed = {}
    for mode, raw in value.items():
        number = _number(raw, f"{where}.fixed_lr.{mode}", problems)
        if math.isnan(number):
            continue
        if mode not in lr or number not in lr[mode]:
            problems.append(f"`{where}.fixed_lr.{mode}`: {raw!r} is not one of the mode's learning rates "
                            f"{list(lr.get(mode, ()))}")
        else:
            fixed[mode] = number
    return fixed


def _reuse_folders(value: Any, problems: list[str]) -> tuple[Path, ...]:
    """`reuse`: results folders of other profiles (a run there is read, never written)."""
    if value is None:
        return ()
    folders = _str_list(value, "reuse", problems)
    missing = [f for f in folders if not Path(f).is_dir()]
    if missing:
        problems.append(f"`reuse` folder(s) not found: {', '.join(missing)}")
    return tuple(Path(f) for f in folders)


def _str_list(value: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        problems.append(f"`{where}` must be a non-empty list of names, got {value!r}")
        return ()
    if len(set(value)) != len(value):
        problems.append(f"`{where}` repeats a name: {value}")
    return tuple(value)


def _int_list(value: Any, where: str, problems: list[str]) -> tuple[int, ...]:
    value = [value] if is_int(value) else value
    if not isinstance(value, list) or not value or not all(is_int(x) for x in value):
        problems.append(f"`{where}` must be a non-empty list of integers, got {value!r}")
        return ()
    if len(set(value)) != len(value):
        problems.append(f"`{where}` repeats a value: {value}")
    return tuple(value)


def _number(value: Any, where: str, problems: list[str]) -> float:
    """A positive finite number, as a float."""
    if not (is_real(value) and value > 0):
        problems.append(f"`{where}` must hold positive numbers, got {value!r}")
        return math.nan
    return float(value)


def _eps(value: Any, where: str, modes: tuple[str, ...], problems: list[str]) -> dict[str, float]:
    """``eps: 1e-3`` (every mode) or ``eps: {full: 1e-3, lora: 1e-2}``."""
    if value is None:
        return {}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(MODES))
        if unknown:
            problems.append(f"`{where}`: unknown mode(s) {', '.join(unknown)}")
        return {m: _number(x, f"{where}.{m}", problems) for m, x in value.items() if m in MODES}
    number = _number(value, where, problems)
    return {m: number for m in MODES}


def run_config(grid: Grid, task: str, spec: MethodSpec, mode: str, lr: float, seed: int, path: Path) -> TrainConfig:
    """The TrainConfig of one training run: grid settings, then the method's, then the cell's."""
    values = {**grid.settings, **spec.settings}
    if grid.keep_weights:
        values["keep"] = "weights"
    if mode in spec.eps:
        values["eps"] = spec.eps[mode]
    return TrainConfig(**values, model=grid.model, data_dir=grid.data_dir, task=task, method=spec.method,
                       peft=MODES[mode], lr=lr, seed=seed, output_dir=str(path))


def select_lr(dev_by_lr: dict[float, list[float]]) -> float:
    """The lr with the best mean dev; ties go to the smaller lr."""
    return max(dev_by_lr, key=lambda lr: (statistics.fmean(dev_by_lr[lr]), -lr))


def parse_only(text: str | None, grid: Grid) -> dict[str, set]:
    """``"task=sst2,method=mezo,method=curvzo"`` -> ``{"task": {"sst2"}, "method": {"mezo", "curvzo"}}``."""
    if not text:
        return {}
    known = {"task": set(grid.tasks), "method": {s.label for s in grid.methods} | {ZERO_SHOT},
             "mode": set(grid.modes), "seed": set(grid.seeds), "lr": None}
    out: dict[str, set] = {}
    problems = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            problems.append(f"{item!r} is not KEY=VALUE with KEY one of {', '.join(known)}")
            continue
        try:
            parsed: Any = int(value) if key == "seed" else float(value) if key == "lr" else value
        except ValueError:
            problems.append(f"{item!r}: {key} must be a number")
            continue
        if known[key] is not None and parsed not in known[key]:
            problems.append(f"{item!r}: not in the grid (choose from {', '.join(map(str, sorted(known[key])))})")
        out.setdefault(key, set()).add(parsed)
    if problems:
        raise ConfigError("invalid --only: " + "; ".join(problems))
    return out
