"""Run folders: resolved config, step log, checkpoints and results, each written atomically.

A checkpoint is a folder ``checkpoint/`` with the trainable weights (safetensors) and
``state.pt`` (optimizer state, step, counters, best dev record). It is written as
``checkpoint.tmp/`` and swapped in by renames, so a crash at any point leaves a loadable
``checkpoint/`` or ``checkpoint.old/``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import TrainConfig
from .errors import CheckpointError, ConfigError
from .io import write_text

__all__ = ["RunDir", "RUN_ENTRIES", "with_run_folder"]

# Keys that may differ between a run and its resumption without changing the trajectory.
_RESUMABLE_DIFFERENCES = {"output_dir", "steps", "eval_every", "eval_batch_size", "checkpoint_every", "checkpoint_minutes",
                          "keep", "divergence_factor", "divergence_patience", "on_divergence", "parallel"}


#: What a run folder may hold; ``--overwrite`` deletes a folder only if it holds nothing else.
RUN_ENTRIES = frozenset({
    "config.yaml", "log.jsonl", "results.json", "scores.json", "trajectory.czt", "plots", "best", "error.txt",
    "checkpoint", "checkpoint.tmp", "checkpoint.old",
})


def with_run_folder(cfg: TrainConfig, root: str | Path = "runs") -> TrainConfig:
    """``cfg`` with an ``output_dir``: its own, else a new ``root/<task>-<method>-<YYYYmmdd-HHMMSS>``
    (suffixed ``-2``, ``-3``, ... if a run started in the same second)."""
    if cfg.output_dir is not None:
        return cfg
    task = cfg.task if isinstance(cfg.task, str) else str(cfg.task.get("name", "custom"))
    base = Path(root) / f"{task}-{cfg.method}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return replace(cfg, output_dir=str(path))


class RunDir:
    """The output folder of one run.

    ``writes=False`` makes every write a no-op (a distributed run's other ranks read the folder
    that rank 0 alone writes).
    """

    def __init__(self, path: str | Path, *, writes: bool = True) -> None:
        self.path = Path(path)
        self.writes = writes

    # ------------------------------------------------------------------ setup
    def check_unused(self, *, overwrite: bool) -> None:
        """Refuse a folder that already holds files, unless ``overwrite`` and they are all a run's.

        Called before any work, so a refused run leaves the old one untouched.
        """
        if not self.path.is_dir():
            return
        entries = sorted(p.name for p in self.path.iterdir())
        if not entries:
            return
        if not overwrite:
            raise ConfigError(f"{self.path} already holds a run: continue it with `curvzo train --resume {self.path}` "
                              "or replace it with --overwrite")
        foreign = [name for name in entries if name not in RUN_ENTRIES]
        if foreign:
            raise ConfigError(f"--overwrite refuses {self.path}: it holds files no run writes ({', '.join(foreign[:5])}); "
                              "remove the folder yourself")

    def check_writable(self) -> None:
        """Fail before any work if the folder cannot be created or written; creates nothing."""
        existing = self.path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"output folder {self.path} is not writable ({existing} is not a writable folder)")

    def prepare(self, cfg: TrainConfig, *, resume: bool) -> None:
        """Create the folder (or check it belongs to ``cfg`` on resume) and write ``config.yaml``.

        A new run starts from an empty folder: what :meth:`check_unused` let ``--overwrite``
        replace is deleted here, so no file of the previous run survives into this one.
        """
        if not self.writes:
            return
        if resume:
            self._check_same_config(cfg)
        elif self.path.is_dir():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def read_config(self) -> TrainConfig:
        config_file = self.path / "config.yaml"
        if not config_file.exists():
            raise CheckpointError(f"{self.path} is not a run folder ({config_file.name} not found)")
        return TrainConfig(**(yaml.safe_load(config_file.read_text()) or {}))

    def _check_same_config(self, cfg: TrainConfig) -> None:
        changed = self.read_config().differences(cfg, _RESUMABLE_DIFFERENCES)
        if changed:
            raise CheckpointError(f"cannot resume {self.path}: config differs in {', '.join(changed)}")

    # ------------------------------------------------------------------ logging
    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line; a torn last line from a crash is skipped by :meth:`read_log`."""
        if not self.writes:
            return
        with open(self.path / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        path = self.path / "log.jsonl"
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_log(self, step: int) -> None:
        """Drop log lines past ``step``: a resumed run rewrites them identically."""
        if not self.writes:
            return
        kept = [r for r in self.read_log() if r.get("step", 0) <= step]
        write_text(self.path / "log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        if not self.writes:
            return
        tmp, final, old = (self.path / n for n in ("checkpoint.tmp", "checkpoint", "checkpoint.old"))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _checkpoint_folder(self) -> Path | None:
        for name in ("checkpoint", "checkpoint.old"):
            folder = self.path / name
            if (folder / "state.pt").exists():  # both are complete: a save renames a finished folder in
                return folder
        return None

    def checkpoint_step(self) -> int | None:
        """The step of the last checkpoint, None when there is none."""
        folder = self._checkpoint_folder()
        return None if folder is None else int(torch.load(folder / "state.pt", weights_only=False)["train_state"]["step"])

    def checkpoint_has_weights(self) -> bool:
        folder = self._checkpoint_folder()
        return folder is not None and (folder / "model.safetensors").exists()

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """Weights (None when the run kept only its trajectory: see :meth:`drop_weights`) and state."""
        folder = self._checkpoint_folder()
        if folder is None:
            raise CheckpointError(f"cannot resume: no checkpoint in {self.path}")
        weights_file = folder / "model.safetensors"
        weights = load_file(str(weights_file)) if weights_file.exists() else None
        return weights, torch.load(folder / "state.pt", weights_only=False)

    def train_state(self) -> dict[str, Any]:
        """Counters of the run so far (``step``, ``best_step``, ...): the checkpoint's, else results.json's."""
        folder = self._checkpoint_folder()
        if folder is not None:
            return torch.load(folder / "state.pt", weights_only=False)["train_state"]
        results = self.path / "results.json"
        if results.exists():
            data = json.loads(results.read_text())
            return {"step": data["steps"], "best_step": data["best_step"]}
        raise CheckpointError(f"{self.path} holds neither a checkpoint nor results")

    def drop_weights(self) -> None:
        """Delete the weight copies (best/, the checkpoint's weights); the checkpoint's state.pt stays.

        What remains (trajectory, state, logs) rebuilds any step's weights from the base model.
        """
        if not self.writes:
            return
        for name in ("best", "checkpoint.old", "checkpoint.tmp"):
            shutil.rmtree(self.path / name, ignore_errors=True)
        (self.path / "checkpoint" / "model.safetensors").unlink(missing_ok=True)
