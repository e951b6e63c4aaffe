"""Copy a `curvzo bench` profile's result table into README.md, so the README cannot drift from it.

README.md holds the accuracy section between ``<!-- accuracy:begin <file> -->`` and
``<!-- accuracy:end -->``, where ``<file>`` is a profile's ``accuracy.md`` (repository-relative).
The block is that file's status paragraph, its main table and its summary bullets, verbatim; the
file stays the one owner of the numbers. ``python -m benchmarks.readme`` rewrites the block from
the file (after `curvzo bench --aggregate-only`, or after pointing the marker at another profile);
``--check`` only says whether the README is current (exit 1 if not), as the test suite does.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from curvzo.io import write_text

from ._common import REPO_ROOT

README = REPO_ROOT / "README.md"
BLOCK = re.compile(r"(<!-- accuracy:begin (\S+) -->\n)(.*?)(<!-- accuracy:end -->)", re.DOTALL)


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


def render(readme: str, root: Path = REPO_ROOT) -> str:
    """``readme`` with its accuracy block replaced by the one its marker names."""
    match = BLOCK.search(readme)
    if match is None:
        raise ValueError("README.md has no <!-- accuracy:begin <file> --> ... <!-- accuracy:end --> block")
    block = accuracy_block((root / match.group(2)).read_text())
    return readme[:match.start(3)] + block + readme[match.end(3):]


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
        print("README.md's accuracy block is current")
        return 0
    if args.check:
        print("README.md's accuracy block differs from its accuracy.md: run python -m benchmarks.readme", file=sys.stderr)
        return 1
    write_text(README, current)
    print(f"rewrote README.md's accuracy block from {BLOCK.search(current).group(2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
