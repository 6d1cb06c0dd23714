"""The codebase stays one a reader can hold in their head: ruff-clean, short functions."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "msl_kit"


def _ruff() -> list[str]:
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(exe).exists():
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    return [exe]


@pytest.mark.subprocess
def test_ruff_check_passes():
    done = subprocess.run(
        [*_ruff(), "check", "msl_kit", "tests", "bench"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-4000:]


@pytest.mark.subprocess
def test_ruff_format_is_applied():
    done = subprocess.run(
        [*_ruff(), "format", "--check", "msl_kit", "tests", "bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-4000:]


def test_no_function_over_80_lines():
    """Modules have no size limit of their own: a module that grows is split by concept into a
    subpackage (tests/test_layout.py holds the rules that keep such splits honest)."""
    long_functions = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    where = path.relative_to(PACKAGE)
                    long_functions.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    assert not long_functions, long_functions


def test_losses_opens_with_the_readable_ms_loss():
    tree = ast.parse((PACKAGE / "losses" / "multi_similarity.py").read_text())
    first = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    assert first.name == "multi_similarity_loss"
    body = first.body[1:] if isinstance(first.body[0].value, ast.Constant) else first.body
    assert body[-1].end_lineno - body[0].lineno + 1 <= 40
