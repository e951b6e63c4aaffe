"""Copy benchmark results into README.md, so the README cannot drift from them.

README.md holds each generated table between ``<!-- <kind>:begin <file> -->`` and
``<!-- <kind>:end -->``, where ``<file>`` is the result it is made from (repository-relative), and
the result file stays the one owner of the numbers:

* ``accuracy``: a `curvzo bench` profile's ``accuracy.md``; the block is its status paragraph, its
  main table and its summary bullets, verbatim;
* ``step-cost``: a ``benchmarks.step_cost`` JSON, rendered by :func:`benchmarks.step_cost.readme_table`.

``python -m benchmarks.readme`` rewrites every block from its file (after a benchmark reran, or
after pointing a marker at another file); ``--check`` only says whether the README is current
(exit 1 if not), as the test suite does.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from curvzo.io import write_text

from ._common import REPO_ROOT
from .step_cost import readme_table

README = REPO_ROOT / "README.md"
BLOCK = re.compile(r"<!-- ([a-z-]+):begin (\S+) -->\n(.*?)<!-- \1:end -->", re.DOTALL)


def accuracy_block(markdown: str) -> str:
    """The status paragraph, the main table and the summary bullets of an ``accuracy.md``."""
    lines = markdown.splitlines()
    status = next((i for i, line in enumerate(lines) if line.startswith("Runs used:")), None)
    if status is None or "## Summary" not in lines:
        raise ValueError("the accuracy.md it names has no 'Runs used:' line or no '## Summary'")
    table_end = next((i for i in range(status + 2, len(lines)) if not lines[i].startswith("|")), len(lines))
    summary = lines.index("## Summary") + 2
    bullets = [line for line in lines[summary:] if line.startswith("- ")]
    return "\n".join(lines[status:table_end] + [""] + bullets) + "\n"


#: How each kind of block is made from the text of its file.
RENDERERS = {
    "accuracy": accuracy_block,
    "step-cost": lambda text: readme_table(json.loads(text)),
}


def render(readme: str, root: Path = REPO_ROOT) -> str:
    """``readme`` with every generated block replaced by what its marker's file gives now."""
    def block(match: re.Match[str]) -> str:
        kind, path = match.group(1), match.group(2)
        if kind not in RENDERERS:
            raise ValueError(f"README.md has a block of unknown kind '{kind}' (known: {', '.join(RENDERERS)})")
        try:
            body = RENDERERS[kind]((root / path).read_text())
        except KeyError as err:
            raise ValueError(f"{path} is not a {kind} result: it has no {err} entry") from None
        return f"<!-- {kind}:begin {path} -->\n{body}<!-- {kind}:end -->"

    rendered, count = BLOCK.subn(block, readme)
    if count == 0:
        raise ValueError("README.md has no <!-- <kind>:begin <file> --> ... <!-- <kind>:end --> block")
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether README.md is current (exit 1 if not)")
    args = parser.parse_args(argv)
    readme = README.read_text()
    try:
        current = render(readme)
    except (ValueError, OSError) as err:
        print(f"readme: {err}", file=sys.stderr)
        return 2
    if current == readme:
        print("README.md's generated blocks are current")
        return 0
    if args.check:
        print("README.md's generated blocks differ from their files: run python -m benchmarks.readme", file=sys.stderr)
        return 1
    write_text(README, current)
    print("rewrote README.md's generated blocks from " + ", ".join(m.group(2) for m in BLOCK.finditer(current)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
