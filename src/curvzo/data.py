"""Train/dev/test documents under MeZO's sampling protocol, from the hub, local JSONL or user files.

MeZO (princeton-nlp/MeZO, ``large_models/run.py``) draws ``num_train + num_dev`` documents from
the official *train* split with one seeded permutation, takes the dev set from the tail of that
sample, and draws the test set from the official *validation* split with the same seed.
:func:`load_splits` does the same with its own ``random.Random(seed)``, never the global RNG.

Sources, in order of precedence:

* ``task.data_files`` (a user task): ``{train: path, test: path}``, JSON Lines or CSV;
* ``data_dir``: ``<data_dir>/<local_dir>/<split>.jsonl``, the layout of the project's offline
  data. A folder without the train split file is read from the task's ``holdout`` file, with a
  fixed, seed-independent share of whole groups (articles, passages, sentences) held out as the
  test pool. A task's ``expand`` turns each row into the documents it holds;
* otherwise ``datasets.load_dataset(*task.hub)``, each row passed through the task's ``adapter``;
* a task with neither builds its local files with its ``fetch``.

The task-specific functions live in :mod:`curvzo.tasks.sources`; this module knows no task by name.

Every drawn document is rendered once, so a missing field or a label outside the choices is a
:class:`~curvzo.errors.DataError` naming its file and line before any model is loaded.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from curvzo.errors import ConfigError, CurvzoWarning, DataError
from curvzo.hub import hub_unreachable
from curvzo.optim._validate import is_int
from curvzo.tasks import Example, Holdout, TaskConfig, get_task

if TYPE_CHECKING:
    from curvzo.config import TrainConfig

__all__ = ["MIN_DEV", "Splits", "load_run_examples", "load_splits"]

MIN_DEV = 100
"""Smallest dev set kept when the train pool is short: MeZO's mezo.sh uses DEV=100 for CB and COPA."""

Doc = dict[str, Any]


@dataclass
class Splits:
    """Raw documents (dicts) of one protocol draw; render them with ``task.render``."""

    train: list[Doc]
    dev: list[Doc]
    test: list[Doc]


class _Row(NamedTuple):
    doc: Doc
    where: str  # "rte/train.jsonl line 17": lets errors found after sampling name their source


# Fixed (seed-independent) so that no seed's train pool ever overlaps another seed's test pool.
_HOLDOUT_SEED = 0


def load_splits(
    task: TaskConfig | str,
    *,
    data_dir: str | Path | None = None,
    num_train: int = 1000,
    num_dev: int = 500,
    num_test: int = 1000,
    seed: int = 0,
) -> Splits:
    """Draw train, dev and test documents for ``task`` as MeZO does.

    Args:
        task: a TaskConfig or a registered task name.
        data_dir: folder holding ``<local_dir>/...jsonl``; None reads the hub (or runs the
            task's ``fetch``).
        num_train, num_dev: drawn together from the train split, dev being the tail. When the
            split is smaller, dev shrinks first, down to ``min(MIN_DEV, half the split)``, then
            train; a CurvzoWarning gives the sizes used (CB: 150 + 100, as in MeZO).
        num_test: drawn from the validation split; all of it when that is smaller.
        seed: seeds private ``random.Random`` instances; the train sample for a given
            ``num_train`` does not depend on ``num_dev``.
    """
    config = get_task(task) if isinstance(task, str) else task
    for name, value in (("num_train", num_train), ("num_dev", num_dev), ("num_test", num_test)):
        if not is_int(value, minimum=0):
            raise ConfigError(f"`{name}` must be a non-negative integer, got {value!r}")
    pool, test_pool = _read_pools(config, data_dir)
    n_train, n_dev = _fit(len(pool), num_train, num_dev)
    if (n_train, n_dev) != (num_train, num_dev):
        warnings.warn(
            f"task `{config.name}`: the train split has {len(pool)} documents, fewer than "
            f"num_train + num_dev = {num_train} + {num_dev}; using {n_train} train + {n_dev} dev",
            CurvzoWarning,
            stacklevel=2,
        )
    drawn = _permuted(pool, seed)[: n_train + n_dev]
    parts = {"train": drawn[:n_train], "dev": drawn[n_train:], "test": _permuted(test_pool, seed)[:num_test]}
    for rows in parts.values():
        _check_renders(config, rows)
    return Splits(**{part: [row.doc for row in rows] for part, rows in parts.items()})


def load_run_examples(task: TaskConfig, cfg: TrainConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """Rendered (train, dev, test) examples of a run of ``cfg``: the draw of its sizes and seed."""
    splits = load_splits(task, data_dir=cfg.data_dir, num_train=cfg.num_train, num_dev=cfg.num_dev,
                         num_test=cfg.num_test, seed=cfg.seed)
    train, dev, test = ([task.render(doc) for doc in docs] for docs in (splits.train, splits.dev, splits.test))
    if cfg.batch_size > len(train):
        warnings.warn(
            f"batch_size {cfg.batch_size} exceeds the {len(train)} training examples of task `{task.name}`: every "
            "batch repeats examples; lower batch_size or give the task more data", CurvzoWarning, stacklevel=2)
    return train, dev, test


def _fit(pool_size: int, num_train: int, num_dev: int) -> tuple[int, int]:
    """Train/dev sizes that fit the pool: dev gives way first, but not below its floor."""
    if pool_size >= num_train + num_dev:
        return num_train, num_dev
    dev = min(num_dev, max(pool_size - num_train, min(MIN_DEV, pool_size // 2)))
    return min(num_train, pool_size - dev), dev


def _permuted(rows: list[_Row], seed: int) -> list[_Row]:
    # A full permutation (as MeZO's np.random.permutation): its prefixes are stable across sizes.
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order]


def _check_renders(config: TaskConfig, rows: Iterable[_Row]) -> None:
    for row in rows:
        try:
            config.render(row.doc)
        except DataError as exc:
            raise DataError(f"{row.where}: {exc}") from None


# --- sources ---------------------------------------------------------------------------------


def _read_pools(config: TaskConfig, data_dir: str | Path | None) -> tuple[list[_Row], list[_Row]]:
    """The (train pool, test pool) of ``config`` from the highest-precedence source."""
    if config.data_files is not None:
        return _read_file(Path(config.data_files["train"])), _read_file(Path(config.data_files["test"]))
    if data_dir is None:
        if config.hub is not None:
            return _read_hub(config)
        if config.fetch is not None:
            data_dir = Path(config.fetch()).parents[1]
        else:
            raise ConfigError(f"task `{config.name}` has no hub dataset and no `data_files`: pass data_dir")
    return _read_local(config, Path(data_dir))


def _read_local(config: TaskConfig, data_dir: Path) -> tuple[list[_Row], list[_Row]]:
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    folder = data_dir / config.local_dir
    if not folder.is_dir():
        raise DataError(f"task `{config.name}`: no folder {config.local_dir}/ in {data_dir}")
    holdout = config.holdout
    if holdout is not None and not (folder / f"{config.train_split}.jsonl").is_file():
        label = f"{config.local_dir}/{holdout.file}"
        return _split_groups(_read_jsonl(folder / holdout.file, label, config.expand), holdout, label)
    train, test = (
        _read_jsonl(folder / f"{split}.jsonl", f"{config.local_dir}/{split}.jsonl", config.expand)
        for split in (config.train_split, config.test_split)
    )
    return train, test


def _read_file(path: Path) -> list[_Row]:
    """A user's data file: CSV by its suffix, otherwise JSON Lines (`.jsonl` or `.json`)."""
    return _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path, str(path))


def _read_jsonl(path: Path, label: str, expand: Callable[[Doc], list[Doc]] | None = None) -> list[_Row]:
    """One JSON object per line; ``label`` names the file in errors (``rte/train.jsonl line 17``)."""
    if not path.is_file():
        raise DataError(f"{label}: file not found ({path})")
    rows: list[_Row] = []
    with _open_text(path, label) as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{label} line {lineno}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(doc, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(doc).__name__}")
            rows.extend(_Row(d, where) for d in (_expanded(expand, doc, where) if expand else (doc,)))
    if not rows:
        raise DataError(f"{label} is empty")
    return rows


def _expanded(expand: Callable[[Doc], list[Doc]], doc: Doc, where: str) -> list[Doc]:
    try:
        return expand(doc)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def _read_csv(path: Path) -> list[_Row]:
    """A header row naming the fields, then one document per record (values stay text)."""
    label = str(path)
    if not path.is_file():
        raise DataError(f"{label}: file not found")
    rows: list[_Row] = []
    with _open_text(path, label) as stream:
        reader = csv.DictReader(stream)
        try:
            for doc in reader:
                where = f"{label} line {reader.line_num}"
                if None in doc or None in doc.values():
                    header = len(reader.fieldnames or ())
                    raise DataError(f"{where}: the number of fields differs from the header's {header}")
                rows.append(_Row(doc, where))
        except csv.Error as exc:
            raise DataError(f"{label} line {reader.line_num}: not valid CSV ({exc})") from None
    if not rows:
        raise DataError(f"{label} is empty")
    return rows


@contextmanager
def _open_text(path: Path, label: str) -> Iterator[TextIO]:
    """Open UTF-8 text; a decoding failure anywhere in the file becomes a DataError."""
    with path.open(encoding="utf-8", newline="") as stream:
        try:
            yield stream
        except UnicodeDecodeError as exc:
            raise DataError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _split_groups(rows: list[_Row], holdout: Holdout, label: str) -> tuple[list[_Row], list[_Row]]:
    """Hold out whole groups (articles, passages, sentences) so no text is in both pools."""
    keys = [_group_key(row, holdout.group_by) for row in rows]
    groups = sorted(set(keys))
    random.Random(_HOLDOUT_SEED).shuffle(groups)
    test_groups = set(groups[: round(len(groups) * holdout.test_fraction)])
    pool = [row for row, key in zip(rows, keys) if key not in test_groups]
    test = [row for row, key in zip(rows, keys) if key in test_groups]
    if not pool or not test:
        raise DataError(f"{label}: {len(groups)} distinct `{holdout.group_by}` values cannot give two parts")
    return pool, test


def _group_key(row: _Row, group_by: str) -> str:
    if group_by not in row.doc:
        raise DataError(f"{row.where}: no field `{group_by}` to split on")
    return str(row.doc[group_by])


def _read_hub(config: TaskConfig) -> tuple[list[_Row], list[_Row]]:
    name = "/".join(config.hub or ())
    unreachable = hub_unreachable()
    if unreachable:
        raise DataError(f"task `{config.name}`: {name} needs the Hugging Face hub, but {unreachable}; "
                        "pass data_dir, or set HF_HUB_OFFLINE=1 to read the hub's local cache")
    import datasets  # heavy; only the online path needs it

    try:
        dataset = datasets.load_dataset(*(config.hub or ()))
    except Exception as exc:  # network, auth and format errors all mean the same to the user
        raise DataError(
            f"task `{config.name}`: cannot load {name} from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}); offline, pass data_dir"
        ) from exc
    adapt = config.adapter or dict
    train, test = (
        _hub_rows(dataset, split, f"{name}[{split}]", adapt) for split in (config.train_split, config.test_split)
    )
    return train, test


def _hub_rows(dataset: Any, split: str, label: str, adapt: Callable[[Doc], Doc]) -> list[_Row]:
    if split not in dataset:
        raise DataError(f"{label}: no such split (available: {', '.join(dataset)})")
    rows = [_Row(adapt(doc), f"{label} row {i}") for i, doc in enumerate(dataset[split])]
    if not rows:
        raise DataError(f"{label} is empty")
    return rows
