"""Tasks as data: an explicit registry of :class:`TaskConfig` objects.

Built-in tasks are the ``*.yaml`` files next to this module, read on first use of the registry
so that importing :mod:`curvzo` stays cheap. User tasks come from :func:`task_from_dict` (a
``task:`` node of a run config) and may be added with :func:`register_task`.

This package maps a document to (prompt, choices, target); it imports neither optimizers nor
models.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from importlib import resources
from typing import Any

from curvzo.errors import ConfigError, UnknownTaskError
from curvzo.tasks.task import Example, Holdout, TaskConfig, TaskFunction, TaskLoader, load_task_yaml

__all__ = [
    "Example",
    "Holdout",
    "TaskConfig",
    "TaskFunction",
    "TaskLoader",
    "get_task",
    "list_tasks",
    "load_task_yaml",
    "register_task",
    "task_from_dict",
]

_REGISTRY: dict[str, TaskConfig] = {}
_builtins_loaded = False


def _ensure_builtins() -> None:
    """Load the shipped YAML files once; every registry call goes through here first."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    configs = [_load_builtin(entry) for entry in resources.files(__name__).iterdir() if entry.name.endswith(".yaml")]
    for config in sorted(configs, key=lambda c: c.name):  # parse all first: no half-filled registry
        _add(config, overwrite=False)
    _builtins_loaded = True


def _load_builtin(entry: Any) -> TaskConfig:
    with entry.open(encoding="utf-8") as stream:
        config = load_task_yaml(stream)
    if config.name != entry.name.removesuffix(".yaml"):
        raise ConfigError(f"task file {entry.name} defines `name: {config.name}`; the two must match")
    return config


def _add(config: TaskConfig, *, overwrite: bool) -> TaskConfig:
    if not isinstance(config, TaskConfig):
        raise TypeError(f"register_task expects a TaskConfig, got {type(config).__name__}")
    if config.name != config.name.lower():
        raise ConfigError(f"task names are lowercase (like the HF config names): use {config.name.lower()!r}")
    if config.name in _REGISTRY and not overwrite:
        raise ConfigError(f"task `{config.name}` is already registered; pass overwrite=True to replace it")
    _REGISTRY[config.name] = config
    return config


def register_task(config: TaskConfig, *, overwrite: bool = False) -> TaskConfig:
    """Add ``config`` under ``config.name``; a name collision is refused unless ``overwrite``."""
    _ensure_builtins()
    return _add(config, overwrite=overwrite)


def get_task(name: str) -> TaskConfig:
    """The registered task called ``name``; an unknown name lists close matches."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        available = ", ".join(sorted(_REGISTRY))
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownTaskError(f"Unknown task {name!r}.{hint} Available: {available}") from None


def list_tasks() -> list[str]:
    """Registered task names, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def task_from_dict(data: Mapping[str, Any]) -> TaskConfig:
    """A user-defined task from a config mapping: the YAML keys, usually with ``data_files``.

    Example::

        task_from_dict({
            "name": "reviews", "output_type": "multiple_choice",
            "doc_to_text": "{text} It was", "doc_to_choice": [" terrible", " great"],
            "doc_to_target": "label", "data_files": {"train": "train.jsonl", "test": "test.csv"},
        })

    It is not registered: pass it to :func:`curvzo.data.load_splits` directly, or to
    :func:`register_task` to make it available by name.
    """
    return TaskConfig.from_dict(data)
