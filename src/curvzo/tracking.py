"""Experiment tracking for ``curvzo train --report-to``: transformers' reporting integrations.

The harness is not a ``transformers.Trainer``, but its integrations (TensorBoard, W&B, MLflow,
...) are Trainer callbacks that only need ``TrainingArguments``, a ``TrainerState`` and the logs,
so a run drives them directly: each tracker writes through its own library, as it does for
Trainer, and curvzo adds no writer of its own. The values are those of ``log.jsonl`` under
Trainer's names (``train/loss``, ``train/learning_rate``, ``eval/<metric>``, ``test/<metric>``),
at the step they belong to; the zero-shot evaluation is ``eval/<metric>`` at step 0.

TensorBoard writes to ``<run folder>/runs/<date>_<host>/`` as under Trainer
(``TENSORBOARD_LOGGING_DIR`` moves it): ``tensorboard --logdir runs/``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .config import TrainConfig

__all__ = ["REPORT_TO_ALL", "REPORT_TO_NONE", "Tracker", "report_to_problem"]

REPORT_TO_NONE = "none"
#: Every integration whose library is installed (Trainer's meaning).
REPORT_TO_ALL = "all"


def _integrations() -> tuple[list[str], list[str]]:
    """(every integration transformers knows, those whose library is installed here)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return list(INTEGRATION_TO_CALLBACK), get_available_reporting_integrations()


def report_to_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a ``report_to`` here (None: it can): names checked against
    transformers' integrations, and against what is installed."""
    if value == REPORT_TO_NONE:
        return None
    names = value.split(",") if isinstance(value, str) else None
    if not names or not all(n.strip() for n in names):
        return f"`report_to` must be none, all or integration names separated by commas, got {value!r}"
    known, installed = _integrations()
    for name in (n.strip() for n in names):
        if name == REPORT_TO_ALL:
            continue
        if name not in known:
            close = difflib.get_close_matches(name, [REPORT_TO_NONE, REPORT_TO_ALL, *known], n=3)
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            return f"`report_to` {name!r} is not a reporting integration{hint}; known: {', '.join(known)}"
        if name not in installed:
            here = ", ".join(installed) or "none"
            return (f"`report_to` {name!r} needs its library, which is not installed here (installed: {here}; "
                    "TensorBoard comes with `pip install tensorboard`)")
    return None


class Tracker:
    """The run's reporting callbacks, driven by the training loop; without ``report_to`` it does nothing."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, model: torch.nn.Module, *, writes: bool) -> None:
        self._callbacks: list[Any] = []
        names = [n.strip() for n in cfg.report_to.split(",")]
        if names == [REPORT_TO_NONE] or not writes:  # under torchrun, rank 0 reports for the run
            return
        from transformers import TrainerControl, TrainerState, TrainingArguments
        from transformers.integrations import get_reporting_integration_callbacks

        report_to = _integrations()[1] if REPORT_TO_ALL in names else list(dict.fromkeys(names))
        # The run's settings under Trainer's names, so a tracker's record of the arguments is the run's.
        self._args = TrainingArguments(
            output_dir=str(run_dir), report_to=report_to, run_name=run_dir.name, max_steps=cfg.steps,
            learning_rate=cfg.resolved_lr(), weight_decay=cfg.weight_decay, per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, eval_steps=cfg.eval_every,
            logging_steps=1, use_cpu=cfg.resolved_device().type == "cpu",
        )
        self._state, self._control = TrainerState(max_steps=cfg.steps), TrainerControl()
        self._callbacks = [cls() for cls in get_reporting_integration_callbacks(report_to)]
        for callback in self._callbacks:
            callback.on_train_begin(self._args, self._state, self._control, model=model)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Hand ``values`` (Trainer's names: ``loss``, ``eval_accuracy``, ...) to every tracker at ``step``."""
        if not self._callbacks:
            return
        self._state.global_step = step
        for callback in self._callbacks:
            callback.on_log(self._args, self._state, self._control, logs=dict(values))

    def close(self) -> None:
        """Flush and close every tracker (the event files are complete after this)."""
        for callback in self._callbacks:
            callback.on_train_end(self._args, self._state, self._control)
        self._callbacks = []
