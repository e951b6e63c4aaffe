"""The command lines the README, docs/cli.md's distributed section and the examples document.

Every such line is listed in ``PLAN`` with what this file does with it, and a documented line that
is not listed fails the test, so a new command cannot land untested. What is done, honestly:

* ``run``: run as written, as a subprocess from a copy of the files it names (so the checkout
  gets no run folder): ``curvzo tasks`` and the custom-data config, which trains the real
  SmolLM2-135M for 20 steps (about a minute on 2 cores; ``slow``).
* ``resolve``: too long to run in the suite (the 5-minute demo, 100 steps of MeZO, 20 steps of
  LoRA through ZOTrainer, torchrun launches), so the line goes through the same parsers that
  would run it (curvzo's argparse and ``load_config``, torchrun's own argument parser for the
  launch, the environment variables the example script reads) and every file or folder it names
  must exist. The demo is the embedded default: ``tests/test_configs.py`` checks that
  configs/demo.yaml is it, and ``benchmarks.demo`` times it whole; the example scripts run
  end to end on the tiny model in ``tests/test_examples.py``; the parallel modes in
  ``tests/test_parallel.py``.
* ``skip``: the install line and the test command itself.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def _bash_lines(markdown: str) -> list[str]:
    """The commands of a page's ``bash`` blocks: comments dropped, continuations joined, `&&` split."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                lines += [" ".join(part.split()) for part in command.split("&&")]
    return lines


def _example_lines(path: Path) -> list[str]:
    """The command lines an example's docstring documents (its indented ``python`` / ``curvzo`` lines)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return [" ".join(re.sub(r"\s+#.*$", "", line).split()) for line in doc.splitlines()
            if line.startswith("    ") and re.search(r"\b(python|curvzo) ", line)]


def _distributed_section(cli_md: str) -> str:
    return cli_md.split("## Distributed runs\n", 1)[1].split("\n## ", 1)[0]


def documented() -> list[str]:
    lines = _bash_lines((REPO / "README.md").read_text())
    lines += _bash_lines(_distributed_section((REPO / "docs" / "cli.md").read_text()))
    for path in EXAMPLES:
        lines += _example_lines(path)
    return list(dict.fromkeys(lines))


DEMO = "curvzo train"
PLAN = {
    'pip install torch==2.13.0 -e ".[dev]"': "skip",
    DEMO: "resolve",
    "python3 -m pytest -q": "skip",
    "curvzo train --task sst2 --data-dir ../shared/data --method mezo --steps 100": "resolve",
    "curvzo train --config configs/custom-task.yaml": "run",
    "curvzo tasks": "run",
    "DATA=../shared/data STEPS=20 OUT=runs/zotrainer-lora-local python examples/zotrainer_lora.py": "resolve",
    "python examples/zotrainer_lora.py": "resolve",
    "python examples/own_data.py": "resolve",
    "python examples/plain_pytorch.py": "resolve",
    "STEPS=5 python examples/plain_pytorch.py": "resolve",
    "torchrun --nproc-per-node 2 -m curvzo train --task sst2 --data-dir ../shared/data --parallel data": "resolve",
    "HOST=10.0.0.1 NODE_RANK=0 RUN=/shared/runs/sst2-query": "resolve",
    "torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 "
    "-m curvzo train --config configs/sst2-curvzo.yaml --parallel query --output-dir $RUN": "resolve",
}


def test_every_documented_command_line_is_planned() -> None:
    lines = documented()
    assert DEMO in lines and any(line.startswith("torchrun --nnodes 2") for line in lines)
    assert [line for line in lines if line not in PLAN] == []
    assert [line for line in PLAN if line not in lines] == [], "a planned line is no longer documented"


def _resolve_curvzo(argv: list[str]) -> None:
    """What ``curvzo <argv>`` would run with, through the CLI's own parser; bad input raises."""
    from curvzo.checkpoint import with_run_folder
    from curvzo.cli import _config_overrides, _parser
    from curvzo.config import load_config
    from curvzo.finetune import resolve_task

    args = _parser().parse_args(argv)
    assert args.command == "train"
    cfg = with_run_folder(load_config(args.config, _config_overrides(args)))
    resolve_task(cfg.task)
    if cfg.data_dir is not None:
        assert (Path(cfg.data_dir) / resolve_task(cfg.task).local_dir).is_dir(), cfg.data_dir


def _env_and_words(line: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(line)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def _template_variables() -> dict[str, str]:
    """The shell variables the two-machine template sets on its own line."""
    (line,) = [line for line in documented() if line.startswith("HOST=")]
    env, words = _env_and_words(line)
    assert words == [] and set(env) == {"HOST", "NODE_RANK", "RUN"}
    return env


RESOLVED = [line for line, how in PLAN.items() if how == "resolve" and not line.startswith("HOST=")]


@pytest.mark.parametrize("line", RESOLVED)
def test_a_documented_line_resolves(line: str, data_dir, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the lines are written for the repository root
    for key, value in _template_variables().items():
        line = line.replace(f"${key}", value)
    env, words = _env_and_words(line)
    if words[0] == "curvzo":
        _resolve_curvzo(words[1:])
    elif words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(words[1:])
        assert args.module and args.training_script == "curvzo", words
        assert args.node_rank in range(int(str(args.nnodes).split(":")[-1]))
        _resolve_curvzo(args.training_script_args)
    else:
        assert words[0] == "python" and len(words) == 2, words
        script = REPO / words[1]
        read = set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', script.read_text()))
        assert set(env) <= read, f"{words[1]} does not read {set(env) - read}"
        assert all((REPO / value).exists() for key, value in env.items() if key == "DATA"), env


def _run(line: str, cwd: Path) -> subprocess.CompletedProcess:
    curvzo = Path(sys.executable).with_name("curvzo")
    words = shlex.split(line)
    assert words[0] == "curvzo"
    return subprocess.run([str(curvzo) if curvzo.exists() else "curvzo", *words[1:]], cwd=cwd, capture_output=True,
                          text=True, check=False)


def test_curvzo_tasks_runs_as_written(tmp_path: Path) -> None:
    done = _run("curvzo tasks", tmp_path)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()][:2] == ["boolq", "cb"]


@pytest.mark.slow
def test_the_custom_task_config_runs_as_written(tmp_path: Path) -> None:
    """From a copy of the files it names, so the run folder it writes lands in tmp_path."""
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "custom-task.yaml", tmp_path / "configs")
    shutil.copytree(REPO / "examples" / "data", tmp_path / "examples" / "data")
    done = _run("curvzo train --config configs/custom-task.yaml", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith("my_reviews accuracy: zero-shot "), done.stdout
    assert (tmp_path / "runs" / "my-reviews" / "results.json").is_file()
