"""curvzo: memory-efficient zeroth-order fine-tuning of Hugging Face language models.

    >>> import curvzo
    >>> opt = curvzo.CurvZO(model.parameters(), seed=0, model=model)  # lr: 0.1 of the Newton step
    >>> loss = opt.step(lambda: (loss_fn(logits := model(**batch).logits[:, -1, label_ids]), logits))

Everything is loaded on first use: the optimizers import torch only, the harness (tasks, data,
models, training loop) transformers too, so ``import curvzo`` (and ``curvzo --help``) stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "MeZO", "CurvZO", "ZOOptimizer", "PRESETS", "build_optimizer",
    "TrainConfig", "load_config", "train", "evaluate_run", "get_task", "list_tasks", "load_model",
]

_LAZY = {
    "MeZO": "optim", "CurvZO": "optim", "ZOOptimizer": "optim", "PRESETS": "optim", "build_optimizer": "optim",
    "TrainConfig": "config", "load_config": "config", "train": "finetune", "evaluate_run": "finetune",
    "get_task": "tasks", "list_tasks": "tasks", "load_model": "models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'curvzo' has no attribute {name!r}")
