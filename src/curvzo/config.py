"""TrainConfig: every knob of a run, from YAML and/or ``key=value`` overrides, validated at once.

YAML keys equal the field names; a ``task:`` may be a registered name or a whole task definition
(a mapping, see :func:`curvzo.tasks.task_from_dict`). All problems are collected and reported in
one :class:`~curvzo.errors.ConfigError` before anything heavy (a model) is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import ConfigError
from .model_options import DTYPES, PEFT_MODES
from .optim import PRESETS
from .optim._validate import is_int, is_real
from .optim.optimizer import ROUNDINGS as ENGINE_ROUNDINGS

__all__ = [
    "TrainConfig", "METHODS", "ZO_METHODS", "FO_METHODS", "ROUNDINGS", "DEFAULT_LR", "load_config", "load_yaml",
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

#: Learning rate used when ``lr`` is not given: (full-parameter, adapter) per method family.
#: ZO values are MeZO's published ranges scaled for a 135M model; FO values are the usual ones.
DEFAULT_LR = {"zo": (1e-5, 1e-3), "adamw": (1e-5, 1e-4), "sgd": (1e-3, 1e-2)}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """A fine-tuning run. The defaults are the embedded demo: CurvZO on SmolLM2-135M and MR."""

    model: str = field(default="smollm2-135m", metadata=_help("alias, hub id or local folder"))
    gguf_file: str | None = field(default=None, metadata=_help("GGUF file inside `model` to load"))
    task: Any = field(default="mr", metadata=_help("registered task name or a task definition mapping"))
    data_dir: str | None = field(default=None, metadata=_help("folder of <task>/*.jsonl files (else hub)"))
    method: str = field(default="curvzo", metadata=_help(f"one of {', '.join(METHODS)}"))
    peft: str = field(default="none", metadata=_help(" | ".join(PEFT_MODES)))
    steps: int = field(default=200, metadata=_help("optimizer steps"))
    lr: float | None = field(default=None, metadata=_help("learning rate (default: per method, DEFAULT_LR)"))
    eps: float = field(default=1e-3, metadata=_help("ZO perturbation scale"))
    weight_decay: float = field(default=0.0, metadata=_help("decoupled weight decay (not on biases/norms)"))
    batch_size: int = field(default=16, metadata=_help("training examples per step"))
    eval_batch_size: int = field(default=32, metadata=_help("examples per evaluation forward"))
    seed: int = field(default=0, metadata=_help("seeds data sampling, batch order and the optimizer"))
    eval_every: int = field(default=50, metadata=_help("steps between dev evaluations (and checkpoints)"))
    num_train: int = field(default=1000, metadata=_help("training examples drawn (MeZO protocol)"))
    num_dev: int = field(default=200, metadata=_help("dev examples drawn from the train split"))
    num_test: int = field(default=500, metadata=_help("test examples drawn from the validation split"))
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
    optimizer_options: dict = field(default_factory=dict, metadata=_help("extra ZO optimizer options"))
    embedding_rows: bool | None = field(
        default=None,
        metadata=_help("ZO: one block per embedding row, perturbing only rows the batch can use (default: curvzo only)"),
    )
    output_dir: str = field(default="runs/default", metadata=_help("run folder (created)"))

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))

    @property
    def is_zo(self) -> bool:
        return self.method in ZO_METHODS

    def resolved_lr(self) -> float:
        """The learning rate the run uses: ``lr`` or the method's default for the mode."""
        if self.lr is not None:
            return self.lr
        full, adapter = DEFAULT_LR["zo" if self.is_zo else self.method]
        return full if self.peft == "none" else adapter

    def resolved_device(self) -> torch.device:
        """Where the model and batches live: ``auto`` is the first GPU when there is one."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def problems(self) -> list[str]:
        """Every invalid value, each as one phrase naming the field (empty when valid)."""
        out = []
        for name, allowed in (("method", METHODS), ("peft", PEFT_MODES), ("dtype", tuple(DTYPES)), ("objective", OBJECTIVES), ("rounding", ROUNDINGS)):
            if getattr(self, name) not in allowed:
                out.append(f"`{name}` must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "eval_batch_size", "eval_every", "num_train", "num_dev", "num_test", "max_length"):
            value = getattr(self, name)
            if not is_int(value, minimum=1):
                out.append(f"`{name}` must be an integer >= 1, got {value!r}")
        if self.lr is not None and not _positive(self.lr):
            out.append(f"`lr` must be a finite number > 0, got {self.lr!r}")
        if not _positive(self.eps):
            out.append(f"`eps` must be a finite number > 0, got {self.eps!r}")
        if not is_real(self.weight_decay, lo=0):
            out.append(f"`weight_decay` must be a finite number >= 0, got {self.weight_decay!r}")
        if not is_int(self.seed):
            out.append(f"`seed` must be an integer, got {self.seed!r}")
        if self.objective != "loss" and self.method in FO_METHODS:
            out.append(f"`objective: {self.objective}` is not differentiable: use a ZO method, not {self.method}")
        if not isinstance(self.optimizer_options, dict):
            out.append("`optimizer_options` must be a mapping")
        out += _device_problems(self.device)
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


def _device_problems(device: Any) -> list[str]:
    if device == "auto":
        return []
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
        raise ConfigError(f"{kind} {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {path} must hold {expect}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-5", "steps=10"]`` -> ``{"lr": 1e-05, "steps": 10}`` (values read as YAML)."""
    return dict(_parse_override(item) for item in items)
