"""Copy benchmark results into README.md and docs/results.md, so the pages cannot drift from them.

Each page in ``PAGES`` holds each generated table between ``<!-- <kind>:begin <file> -->`` and
``<!-- <kind>:end -->``, where ``<file>`` is the result it is made from (repository-relative), and
the result file stays the one owner of the numbers:

* ``accuracy``: a `curvzo bench` profile's ``accuracy.md``; the block is its status paragraph, its
  main table and its summary bullets, verbatim;
* ``accuracy-table``: the main table of an ``accuracy.md`` alone (the README's summary);
* ``oracle``: ``benchmarks.oracle``'s ``oracle.md``; the block is its table, fenced as there;
* ``step-cost``: a ``benchmarks.step_cost`` JSON, rendered by :func:`benchmarks.step_cost.readme_table`;
* ``demo``: the timing of the demo by ``benchmarks.demo``, rendered by :func:`benchmarks.demo.readme_block`.

``python -m benchmarks.readme`` rewrites every block of every page from its file (after a
benchmark reran, or after pointing a marker at another file); ``--check`` only says whether the
pages are current (exit 1 if not), as the test suite does.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from curvzo.io import write_text

from ._common import REPO_ROOT
from .demo import readme_block
from .step_cost import readme_table

#: The pages with generated blocks: the README's summary and the evidence page.
PAGES = (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "results.md")
BLOCK = re.compile(r"<!-- ([a-z-]+):begin (\S+) -->\n(.*?)<!-- \1:end -->", re.DOTALL)


def _accuracy_parts(markdown: str) -> tuple[list[str], list[str], list[str]]:
    """(status paragraph, main table, summary bullets) of an ``accuracy.md``, as lines."""
    lines = markdown.splitlines()
    status = next((i for i, line in enumerate(lines) if line.startswith("Runs used:")), None)
    if status is None or "## Summary" not in lines:
        raise ValueError("the accuracy.md it names has no 'Runs used:' line or no '## Summary'")
    table = next((i for i in range(status, len(lines)) if lines[i].startswith("|")), len(lines))
    table_end = next((i for i in range(table, len(lines)) if not lines[i].startswith("|")), len(lines))
    summary = lines.index("## Summary") + 2
    bullets = [line for line in lines[summary:] if line.startswith("- ")]
    return lines[status:table], lines[table:table_end], bullets


def accuracy_block(markdown: str) -> str:
    """The status paragraph, the main table and the summary bullets of an ``accuracy.md``."""
    status, table, bullets = _accuracy_parts(markdown)
    return "\n".join(status + table + [""] + bullets) + "\n"


def accuracy_table(markdown: str) -> str:
    """The main table of an ``accuracy.md`` alone."""
    return "\n".join(_accuracy_parts(markdown)[1]) + "\n"


def oracle_table(markdown: str) -> str:
    """The fenced table of an ``oracle.md``, fences included."""
    lines = markdown.splitlines()
    if lines.count("```") < 2:
        raise ValueError("the oracle.md it names has no fenced table")
    start = lines.index("```")
    end = lines.index("```", start + 1)
    return "\n".join(lines[start:end + 1]) + "\n"


#: How each kind of block is made from the text of its file.
RENDERERS = {
    "accuracy": accuracy_block,
    "accuracy-table": accuracy_table,
    "oracle": oracle_table,
    "step-cost": lambda text: readme_table(json.loads(text)),
    "demo": lambda text: readme_block(json.loads(text)),
}


def render(page: str, root: Path = REPO_ROOT) -> str:
    """``page`` with every generated block replaced by what its marker's file gives now."""
    def block(match: re.Match[str]) -> str:
        kind, path = match.group(1), match.group(2)
        if kind not in RENDERERS:
            raise ValueError(f"a block of unknown kind '{kind}' (known: {', '.join(RENDERERS)})")
        try:
            body = RENDERERS[kind]((root / path).read_text())
        except KeyError as err:
            raise ValueError(f"{path} is not a {kind} result: it has no {err} entry") from None
        return f"<!-- {kind}:begin {path} -->\n{body}<!-- {kind}:end -->"

    rendered, count = BLOCK.subn(block, page)
    if count == 0:
        raise ValueError("no <!-- <kind>:begin <file> --> ... <!-- <kind>:end --> block")
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the pages are current (exit 1 if not)")
    args = parser.parse_args(argv)
    stale = []
    for path in PAGES:
        name = path.relative_to(REPO_ROOT)
        text = path.read_text()
        try:
            current = render(text)
        except (ValueError, OSError) as err:
            print(f"readme: {name}: {err}", file=sys.stderr)
            return 2
        if current == text:
            print(f"{name}'s generated blocks are current")
        elif args.check:
            stale.append(str(name))
        else:
            write_text(path, current)
            print(f"rewrote {name}'s generated blocks from " + ", ".join(m.group(2) for m in BLOCK.finditer(current)))
    if stale:
        print(f"{', '.join(stale)}: generated blocks differ from their files: run python -m benchmarks.readme",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
