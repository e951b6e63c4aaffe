"""TrainConfig: every knob of a run, from YAML and/or ``key=value`` overrides, validated at once.

YAML keys equal the field names; a ``task:`` may be a registered name or a whole task definition
(a mapping, see :func:`curvzo.tasks.task_from_dict`). All problems are collected and reported in
one :class:`~curvzo.errors.ConfigError` before anything heavy (a model) is loaded.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError, CurvzoWarning
from .model_options import DTYPES, PEFT_MODES
from .optim import NEWTON_FRACTION, PARALLEL_MODES, PRESETS, takes_newton_step
from .optim import ROUNDINGS as ENGINE_ROUNDINGS
from .optim._validate import is_int, is_real

if TYPE_CHECKING:
    import torch

__all__ = [
    "TrainConfig", "METHODS", "ZO_METHODS", "FO_METHODS", "ROUNDINGS", "DEFAULT_LR", "LR_FIND_RANGE", "load_config", "load_yaml",
    "parse_overrides", "read_yaml_mapping",
]

#: ZO methods are the engine's named presets; first-order baselines are built by the loop.
ZO_METHODS: tuple[str, ...] = tuple(PRESETS)
FO_METHODS: tuple[str, ...] = ("adamw", "sgd")
METHODS = ZO_METHODS + FO_METHODS
OBJECTIVES = ("loss", "accuracy", "f1")
#: The engine's roundings, the harness default first (in help and errors): bf16/fp16 runs keep
#: fp32 master copies unless told otherwise.
DEFAULT_ROUNDING = "master"
ROUNDINGS: tuple[str, ...] = (DEFAULT_ROUNDING, *(r for r in ENGINE_ROUNDINGS if r != DEFAULT_ROUNDING))
KEEPS = ("auto", "weights", "trajectory")
ON_DIVERGENCE = ("stop", "rollback")
#: ``none`` (one process) or a mode of the distributed ZO step (the engine owns that list).
PARALLELS: tuple[str, ...] = ("none", *PARALLEL_MODES)

#: Learning rate used when ``lr`` is not given: (full-parameter, adapter) per method family.
#: ZO full-parameter 5e-5 is what the accuracy grids select for MeZO on SmolLM2-135M (60 and 400
#: steps; 1e-5 barely moves in a short run, 1e-4 diverges within 400 steps on most tasks); the ZO
#: adapter value is the LoRA column's selection; FO values are the usual ones.
DEFAULT_LR = {"zo": (5e-5, 1e-3), "adamw": (1e-5, 1e-4), "sgd": (1e-3, 1e-2),
              # ZO with the Newton step: lr is the fraction of the Newton step, the same for any mode
              "newton": (NEWTON_FRACTION, NEWTON_FRACTION)}

#: ``curvzo lr-find``'s default grid, (smallest, largest) lr by kind of step: a rate, or for a
#: Newton step the fraction of the measured step taken, useful around 0.05-0.2 whatever the model.
LR_FIND_RANGE = {"rate": (1e-7, 1e-3), "newton": (1e-2, 1.0)}

#: Below this, an lr given to a Newton step is surely a rate meant for MeZO (the useful fractions
#: measured are 0.05-0.2), and the run is warned.
NEWTON_RATE_FLOOR = 1e-3


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """A fine-tuning run. The defaults are the embedded demo: CurvZO on SmolLM2-135M and MR, sized
    to finish in a few minutes on 2 CPU cores (60 steps, 100 dev and 300 test examples: the `cpu`
    accuracy grid's settings) and still move dev accuracy well above zero-shot."""

    model: str = field(default="smollm2-135m", metadata=_help("alias, hub id or local folder"))
    gguf_file: str | None = field(default=None, metadata=_help("GGUF file inside `model` to load"))
    task: Any = field(
        default="mr",
        metadata=_help("registered task name (`curvzo tasks`), or in a config file a task definition mapping "
                       "for your own data: its format is in docs/api.md#your-own-data"),
    )
    data_dir: str | None = field(default=None, metadata=_help("folder of <task>/*.jsonl files (else hub)"))
    method: str = field(default="curvzo", metadata=_help(f"one of {', '.join(METHODS)}"))
    peft: str = field(default="none", metadata=_help(" | ".join(PEFT_MODES)))
    steps: int = field(default=60, metadata=_help("optimizer steps"))
    lr: float | None = field(default=None, metadata=_help(
        f"learning rate; for a Newton step (curvzo) the fraction of the step taken (default: per method, "
        f"DEFAULT_LR: curvzo {DEFAULT_LR['newton'][0]:g}, mezo {DEFAULT_LR['zo'][0]:g})"))
    eps: float = field(default=1e-3, metadata=_help("ZO perturbation scale"))
    weight_decay: float = field(default=0.0, metadata=_help("decoupled weight decay (not on biases/norms)"))
    batch_size: int = field(default=16, metadata=_help("training examples per step"))
    eval_batch_size: int = field(default=32, metadata=_help("examples per evaluation forward"))
    seed: int = field(default=0, metadata=_help("seeds data sampling, batch order and the optimizer"))
    eval_every: int = field(default=20, metadata=_help("steps between dev evaluations (each also writes a checkpoint)"))
    checkpoint_every: int | None = field(
        default=None, metadata=_help("steps between checkpoints, besides evaluations (default: by time only)"),
    )
    checkpoint_minutes: float = field(
        default=3.0, metadata=_help("minutes of training after which a checkpoint is written: what a crash can lose at most"),
    )
    num_train: int = field(default=1000, metadata=_help("training examples drawn (MeZO protocol)"))
    num_dev: int = field(default=100, metadata=_help("dev examples drawn from the train split"))
    num_test: int = field(default=300, metadata=_help("test examples drawn from the validation split"))
    max_length: int = field(default=128, metadata=_help("token cap per sequence (prompts cut from the left)"))
    dtype: str = field(default="float32", metadata=_help(" | ".join(DTYPES)))
    objective: str = field(default="loss", metadata=_help(f"{' | '.join(OBJECTIVES)} (ZO methods only)"))
    rounding: str = field(
        default=DEFAULT_ROUNDING,
        metadata=_help(f"ZO updates of bf16/fp16 weights: {' | '.join(ROUNDINGS)}. master keeps fp32 master copies "
                       "(follows fp32, +4 B per weight); stochastic is unbiased with no memory (a random walk); "
                       "nearest drops updates below half an ulp"),
    )
    device: str = field(
        default="auto",
        metadata=_help("auto (cuda when available) | cpu | cuda | cuda:N; replay on the same device type (noise streams differ)"),
    )
    divergence_factor: float | None = field(
        default=3.0,
        metadata=_help("the run has diverged when its smoothed training loss stays above this multiple of its "
                       "start (mean of the first 10 steps) for divergence_patience steps (null: never)"),
    )
    divergence_patience: int = field(default=10, metadata=_help("steps the smoothed loss must stay that high"))
    on_divergence: str = field(
        default="stop",
        metadata=_help("stop (results from the best weights so far) | rollback (back to the last checkpoint with "
                       "half the lr, at most 3 times, then stop)"),
    )
    keep: str = field(
        default="auto",
        metadata=_help("what a finished run keeps: weights (best/ and the last checkpoint's weights) | trajectory "
                       "(the trajectory and optimizer state; weights rebuilt on demand by `curvzo export`, eval "
                       "and resume) | auto (trajectory for ZO methods, weights for first-order ones)"),
    )
    optimizer_options: dict = field(default_factory=dict, metadata=_help("extra ZO optimizer options"))
    embedding_rows: bool | None = field(
        default=None,
        metadata=_help("ZO: one block per embedding row, perturbing only rows the batch can use (default: curvzo-sparse only)"),
    )
    parallel: str = field(
        default="none",
        metadata=_help(f"{' | '.join(PARALLELS)}: how the processes of a torchrun launch share the work (data: "
                       "each rank a share of every batch; query: each rank its own direction on the whole batch; "
                       "shard: parameters sharded with FSDP2, batches shared as in data)"),
    )
    output_dir: str | None = field(
        default=None,
        metadata=_help("run folder (default: a new runs/<task>-<method>-<YYYYmmdd-HHMMSS>); a folder that "
                       "already holds a run needs --resume or --overwrite"),
    )
    report_to: str = field(
        default="none",
        metadata=_help("experiment tracking through transformers' integrations: none | all (every one installed) | "
                       "names separated by commas, e.g. tensorboard (events in the run folder's runs/)"),
    )

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        if self.is_zo and self.newton and self.lr is not None and self.lr < NEWTON_RATE_FLOOR:
            warnings.warn(f"lr {self.lr:g} is the fraction of the Newton step that `{self.method}` takes "
                          f"(default {NEWTON_FRACTION}), not a rate: a MeZO-sized value barely moves the weights",
                          CurvzoWarning, stacklevel=3)

    @property
    def is_zo(self) -> bool:
        return self.method in ZO_METHODS

    @property
    def newton(self) -> bool:
        """Whether the ZO optimizer takes the Newton step (``curvzo``, or ``optimizer_options: {newton: true}``)."""
        return isinstance(self.optimizer_options, dict) and takes_newton_step(self.method, self.optimizer_options)

    def resolved_lr(self) -> float:
        """The learning rate the run uses: ``lr`` or the method's default for the mode."""
        if self.lr is not None:
            return self.lr
        full, adapter = DEFAULT_LR["newton" if self.is_zo and self.newton else "zo" if self.is_zo else self.method]
        return full if self.peft == "none" else adapter

    def resolved_keep(self) -> str:
        """``weights`` or ``trajectory``: ``auto`` keeps a trajectory where there is one (ZO runs)."""
        if self.keep == "auto":
            return "trajectory" if self.is_zo else "weights"
        return self.keep

    def resolved_device(self) -> torch.device:
        """Where the model and batches live: ``auto`` is the first GPU when there is one."""
        import torch  # here, not at the top: `curvzo --help` must not pay for importing torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def problems(self) -> list[str]:
        """Every invalid value, each as one phrase naming the field (empty when valid)."""
        out = []
        for name, allowed in (("method", METHODS), ("peft", PEFT_MODES), ("dtype", DTYPES), ("objective", OBJECTIVES),
                              ("rounding", ROUNDINGS), ("keep", KEEPS), ("on_divergence", ON_DIVERGENCE),
                              ("parallel", PARALLELS)):
            if getattr(self, name) not in allowed:
                out.append(_not_one_of(name, getattr(self, name), allowed))
        for name in ("steps", "batch_size", "eval_batch_size", "eval_every", "num_train", "num_dev", "num_test", "max_length"):
            value = getattr(self, name)
            if not is_int(value, minimum=1):
                out.append(f"`{name}` must be an integer >= 1, got {value!r}")
        if self.lr is not None and not _positive(self.lr):
            out.append(f"`lr` must be a finite number > 0, got {self.lr!r}")
        if self.checkpoint_every is not None and not (is_int(self.checkpoint_every) and self.checkpoint_every >= 1):
            out.append(f"`checkpoint_every` must be an integer >= 1 or null, got {self.checkpoint_every!r}")
        if self.divergence_factor is not None and not (_positive(self.divergence_factor) and self.divergence_factor > 1):
            out.append(f"`divergence_factor` must be a number > 1 or null, got {self.divergence_factor!r}")
        if not (is_int(self.divergence_patience) and self.divergence_patience >= 1):
            out.append(f"`divergence_patience` must be an integer >= 1, got {self.divergence_patience!r}")
        if not _positive(self.checkpoint_minutes):
            out.append(f"`checkpoint_minutes` must be a finite number > 0, got {self.checkpoint_minutes!r}")
        if not _positive(self.eps):
            out.append(f"`eps` must be a finite number > 0, got {self.eps!r}")
        if not is_real(self.weight_decay, lo=0):
            out.append(f"`weight_decay` must be a finite number >= 0, got {self.weight_decay!r}")
        if not is_int(self.seed):
            out.append(f"`seed` must be an integer, got {self.seed!r}")
        if self.objective != "loss" and self.method in FO_METHODS:
            out.append(f"`objective: {self.objective}` is not differentiable: use a ZO method, not {self.method}")
        if self.keep == "trajectory" and self.method in FO_METHODS:
            out.append(f"`keep: trajectory` needs a ZO method: {self.method} records no trajectory (use keep: weights)")
        if self.parallel != "none" and self.method in FO_METHODS:
            out.append(f"`parallel: {self.parallel}` needs a ZO method: {self.method} has gradients to all-reduce "
                       "(use torch DDP/FSDP for first-order training)")
        if self.parallel == "shard" and (self.dtype != "float32" or self.peft != "none"):
            out.append("`parallel: shard` shards full fine-tuning of float32 weights (dtype: float32, peft: none)")
        if not isinstance(self.optimizer_options, dict):
            out.append("`optimizer_options` must be a mapping")
        elif self.newton and self.objective != "loss":
            out.append(f"the Newton step of `{self.method}` measures its curvature from the loss's logits "
                       f"(objective: loss, not {self.objective}; or method: mezo)")
        out += _device_problems(self.device)
        from .tracking import report_to_problem  # transformers is imported only for a value other than none

        report_problem = report_to_problem(self.report_to)
        if report_problem:
            out.append(report_problem)
        if not isinstance(self.task, (str, dict)):
            out.append("`task` must be a task name or a task definition mapping")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def comparable(self) -> dict[str, Any]:
        """``to_dict`` without settings that cannot change this run (rounding of fp32 weights), so a
        resume or a benchmark grid compares only what the run's weights depend on."""
        out = self.to_dict()
        if self.dtype == "float32":
            out.pop("rounding")
        return out

    def differences(self, other: TrainConfig, ignore: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Sorted names of the comparable settings in which ``other`` differs, ``ignore`` aside."""
        mine, theirs = self.comparable(), other.comparable()
        return sorted(k for k in mine.keys() | theirs.keys() if k not in ignore and mine.get(k) != theirs.get(k))


def _not_one_of(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """The problem of a value outside its choices, with the close ones first (a typo is the usual cause)."""
    close = difflib.get_close_matches(str(value), allowed, n=3)
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    return f"`{name}` must be one of {', '.join(allowed)}, got {value!r}{hint}"


def _device_problems(device: Any) -> list[str]:
    if device == "auto":
        return []
    import torch
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        return [f"`device` must be auto, cpu, cuda or cuda:N, got {device!r}"]
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        return [f"`device` {device!r} is not available on this machine (use cpu or auto)"]
    return []


def _positive(x: Any) -> bool:
    return is_real(x) and x > 0


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float: YAML 1.1 wants a dot (``1.0e-5``), and a
    learning rate written the usual way would otherwise arrive as the string ``"1e-5"``."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """YAML as curvzo reads every config, grid and override (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    return key.strip(), load_yaml(raw) if raw else None


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (flags win); unknown keys are errors."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml_mapping(Path(path)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return TrainConfig(**values)


def read_yaml_mapping(path: Path, kind: str = "config file", expect: str = "a mapping of keys to values") -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty one); errors name ``kind``."""
    try:
        data = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{kind} not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{kind} {path} is not valid YAML{_where(err)}: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {path} must hold {expect}")
    return data


def _where(err: yaml.YAMLError) -> str:
    """`` (line L, column C)`` of a parse error, 1-based as editors count; empty when YAML gives no position."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-5", "steps=10"]`` -> ``{"lr": 1e-05, "steps": 10}`` (values read as YAML)."""
    return dict(_parse_override(item) for item in items)
