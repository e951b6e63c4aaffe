"""The README's Python snippets run as written (the real `smollm2-135m` alias, from the repository root)."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)


def test_the_readme_has_its_snippets() -> None:
    assert len(SNIPPETS) == 2


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_a_readme_snippet_runs_as_written(index: int, data_dir, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)  # the snippets name ../shared/data, as the README's commands do
    namespace: dict = {}
    exec(compile(SNIPPETS[index], f"README.md python block {index}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "step 2: loss" in out or "zero-shot" in out, out
