"""The ZO core must import torch and the standard library only (never transformers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import curvzo.optim

OPTIM_DIR = Path(curvzo.optim.__file__).parent
ALLOWED_ROOTS = {"torch", "__future__"} | set(sys.stdlib_module_names)


def test_optim_sources_import_only_torch_and_stdlib():
    for path in OPTIM_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= ALLOWED_ROOTS, f"{path.name} imports {roots}"


def test_importing_optim_does_not_load_transformers():
    code = "import sys, curvzo.optim; print(sorted(m for m in ('transformers', 'peft', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
