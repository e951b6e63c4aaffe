"""docs/api.md against the code: the documented options and defaults are the real ones.

Each table under a ``<!-- defaults: module.Class -->`` marker must list exactly the options of
that class (for a dataclass, the fields it adds to its dataclass bases) with their defaults as
Python literals, so the page fails this test as soon as the code changes under it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from typing import Any

import pytest
from conftest import REPO

API = (REPO / "docs" / "api.md").read_text()
MARKER = re.compile(r"<!-- defaults: ([\w.]+) -->\n((?:\|.*\n)+)")
REQUIRED = "required"


def documented_tables() -> dict[str, dict[str, str]]:
    """``{"module.Class": {option: default cell}}`` for every marked table."""
    tables = {}
    for path, table in MARKER.findall(API):
        rows = [re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in table.strip().splitlines()[2:]]
        tables[path] = {cells[0].strip().strip("`"): cells[1].strip() for cells in rows}
    return tables


def code_defaults(path: str) -> dict[str, Any]:
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    if path == "curvzo.tasks.TaskConfig":  # the keys a task definition accepts: `version` is `metadata: {version}`
        keys = {f.name: REQUIRED if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls) if f.init and f.name != "version"}
        return {**keys, "metadata": {"version": cls.__dataclass_fields__["version"].default}}
    if dataclasses.is_dataclass(cls):
        inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
        return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls) if f.name not in inherited}
    return {name: REQUIRED if p.default is inspect.Parameter.empty else p.default
            for name, p in inspect.signature(cls).parameters.items()}


TABLES = documented_tables()


def test_the_page_documents_every_public_configuration_class() -> None:
    assert set(TABLES) == {"curvzo.optim.MeZO", "curvzo.optim.CurvZO", "curvzo.optim.SparseCurvZO", "curvzo.hf.ZOTrainingArguments",
                           "curvzo.config.TrainConfig", "curvzo.tasks.TaskConfig"}


@pytest.mark.parametrize("path", sorted(TABLES))
def test_documented_defaults_match_the_code(path: str) -> None:
    documented, actual = TABLES[path], code_defaults(path)
    assert list(documented) == list(actual), f"{path}: options documented vs in the code"
    for option, cell in documented.items():
        value = REQUIRED if cell == REQUIRED else ast.literal_eval(cell.strip("`"))
        assert value == actual[option] and type(value) is type(actual[option]), (
            f"{path}.{option}: documented {cell}, code {actual[option]!r}")



@pytest.mark.parametrize("module", ["curvzo", "curvzo.optim", "curvzo.hf"])
def test_every_public_class_and_function_has_a_docstring(module: str) -> None:
    mod = importlib.import_module(module)
    objects = {name: getattr(mod, name) for name in mod.__all__}
    missing = [name for name, obj in objects.items()
               if (inspect.isclass(obj) or inspect.isfunction(obj)) and not (obj.__doc__ or "").strip()]
    assert not missing


def test_the_generated_blocks_are_their_result_files_rendered() -> None:
    """README.md and docs/results.md copy result tables; `python -m benchmarks.readme` rewrites them."""
    from benchmarks import readme

    kinds = set()
    for page in readme.PAGES:
        text = page.read_text()
        kinds |= {m.group(1) for m in readme.BLOCK.finditer(text)}
        assert readme.render(text) == text, f"{page.name}'s generated blocks are stale: run python -m benchmarks.readme"
    assert kinds == set(readme.RENDERERS)
    assert readme.main(["--check"]) == 0


def test_the_readme_is_short_and_its_summary_is_generated() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    assert "<!-- accuracy-table:begin benchmarks/results/long/accuracy.md -->\n| method |" in text
    assert "<!-- accuracy:begin benchmarks/results/newton/accuracy.md -->\nRuns used: " in text  # the flagship's


def test_the_readme_block_follows_its_marker_and_keeps_the_rest(tmp_path) -> None:
    from benchmarks import readme

    source = (REPO / "benchmarks" / "results" / "long" / "accuracy.md").read_text()
    (tmp_path / "acc.md").write_text(source)
    text = "intro\n<!-- accuracy:begin acc.md -->\nold table\n<!-- accuracy:end -->\noutro\n"
    out = readme.render(text, root=tmp_path)
    assert out.startswith("intro\n<!-- accuracy:begin acc.md -->\nRuns used: ") and out.endswith("<!-- accuracy:end -->\noutro\n")
    assert "old table" not in out and "| curvzo-sparse | full |" in out and "- **curvzo-sparse − mezo**" in out
    assert "Selected learning rates" not in out and "## Figures" not in out
    with pytest.raises(ValueError, match="no <!-- <kind>:begin"):
        readme.render("no markers here\n", root=tmp_path)
    with pytest.raises(ValueError, match="unknown kind 'plots'"):
        readme.render("<!-- plots:begin acc.md -->\n<!-- plots:end -->\n", root=tmp_path)
    with pytest.raises(ValueError, match="no 'Runs used:' line"):
        readme.accuracy_block("# Accuracy\n\nno table yet\n")


def test_the_step_cost_block_has_a_row_per_measurement_and_drops_the_probe_column_when_unmeasured(tmp_path) -> None:
    import json

    from benchmarks import readme

    mib = 2**20
    result = {
        "timings": {"body_forward": {"median": 0.5}, "label_loss": {"median": 0.55}, "full_loss": {"median": 0.6},
                    "mezo": {"median": 2.0, "noise_draws_over_params": 2.6}, "adamw": {"median": 0.04},
                    "full:mezo": {"median": 2.4, "noise_draws_over_params": 2.6, "generated_over_params": 0.0}},
        "memory": {"inference-label": {"peak_bytes": 1000 * mib, "largest_allocation_bytes": 3 * mib},
                   "inference-full": {"peak_bytes": 1200 * mib, "largest_allocation_bytes": 96 * mib},
                   "mezo": {"peak_bytes": 1050 * mib, "largest_allocation_bytes": 3.5 * mib},
                   "adamw": {"peak_bytes": 3000 * mib, "largest_allocation_bytes": 100 * mib},
                   "full:mezo": {"peak_bytes": 1224 * mib, "largest_allocation_bytes": 96 * mib}},
    }
    (tmp_path / "probed.json").write_text(json.dumps(result))
    for measurement in result["memory"].values():
        del measurement["largest_allocation_bytes"]
    (tmp_path / "unprobed.json").write_text(json.dumps(result))
    text = "".join(f"<!-- step-cost:begin {name}.json -->\n<!-- step-cost:end -->\n" for name in ("probed", "unprobed"))
    probed, unprobed = (block.group(3) for block in readme.BLOCK.finditer(readme.render(text, root=tmp_path)))
    # Ratios are to the same closure's inference; a result without the generated count (measured
    # when every noise element was generated) shows its draws as generated.
    assert probed.splitlines()[2:] == [
        "| body forward | 0.50 s |  |  |  |  |  |  |",
        "| label-only inference (the closure) | 0.55 s |  |  | 1.00 (1000 MiB) | 3.0 MiB |  |  |",
        "| full-logits inference (the closure) | 0.60 s |  |  | 1.00 (1200 MiB) | 96.0 MiB |  |  |",
        "| `mezo` | 2.00 s | 1.82 | 2.00 | 1.05 | 3.5 MiB | 2.60 | 2.60 |",
        "| first-order AdamW (backprop) | 40.0 ms | 0.04 | 0.04 | 3.00 | 100.0 MiB |  |  |",
        "| `mezo`, full logits | 2.40 s | 2.00 | 2.40 | 1.02 | 96.0 MiB | 2.60 | 0.00 |",
    ]
    assert "largest tensor" not in unprobed and "| `mezo` | 2.00 s | 1.82 | 2.00 | 1.05 | 2.60 | 2.60 |" in unprobed
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="other.json is not a step-cost result: it has no 'timings' entry"):
        readme.render("<!-- step-cost:begin other.json -->\n<!-- step-cost:end -->\n", root=tmp_path)


PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", API, re.DOTALL)
YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", API, re.DOTALL)


def test_every_python_block_of_the_api_page_says_it_is_a_fragment_and_where_it_runs_whole() -> None:
    """The page's Python is excerpts; each names the file that runs it whole, and that file exists."""
    assert PYTHON_BLOCKS
    for block in PYTHON_BLOCKS:
        first = block.splitlines()[0]
        assert first.startswith("# A fragment:"), first
        named = re.findall(r"examples/\w+\.py", first)
        assert named and all((REPO / path).is_file() for path in named), first


@pytest.mark.parametrize("index", range(len(YAML_BLOCKS)))
def test_every_yaml_block_of_the_api_page_is_a_valid_config(index: int, monkeypatch) -> None:
    from curvzo.config import TrainConfig, load_yaml
    from curvzo.finetune import resolve_task

    monkeypatch.chdir(REPO)
    cfg = TrainConfig(**load_yaml(YAML_BLOCKS[index]))
    assert resolve_task(cfg.task).name


def test_the_own_data_example_is_the_custom_task_config_and_reads_its_files(monkeypatch) -> None:
    from curvzo.config import load_config, load_yaml
    from curvzo.data import load_splits
    from curvzo.finetune import resolve_task

    monkeypatch.chdir(REPO)  # the example's paths are relative to the repository root, as documented
    section = API.split("## Your own data\n", 1)[1].split("\n## ", 1)[0]
    example = load_yaml(re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1))["task"]
    assert example == load_config(REPO / "configs" / "custom-task.yaml").task
    splits = load_splits(resolve_task(example), num_train=24, num_dev=16, num_test=16)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (24, 16, 16)
    first = (REPO / "examples" / "data" / "reviews_train.jsonl").read_text().splitlines()[:2]
    assert "\n".join(first) in section, "the sample lines are the file's first two"


def test_train_help_points_at_the_task_format() -> None:
    from curvzo.cli import _parser

    train = next(a for a in _parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    assert "docs/api.md#your-own-data" in " ".join(train.format_help().split())
    assert "## Your own data" in API and "docs/api.md#your-own-data" in (REPO / "README.md").read_text()


def test_the_oracle_block_is_the_fenced_table_of_its_file(tmp_path) -> None:
    from benchmarks import readme

    (tmp_path / "oracle.md").write_text("# Oracle\n\nprose\n\n```\ntask  run\n----  ---\nmr    a s0\n```\n\nmore\n")
    out = readme.render("<!-- oracle:begin oracle.md -->\nold\n<!-- oracle:end -->\n", root=tmp_path)
    assert out == "<!-- oracle:begin oracle.md -->\n```\ntask  run\n----  ---\nmr    a s0\n```\n<!-- oracle:end -->\n"
    (tmp_path / "oracle.md").write_text("# Oracle\n\nno table\n")
    with pytest.raises(ValueError, match="no fenced table"):
        readme.render(out, root=tmp_path)
