"""No file load in msl_kit, bench/ or the notebooks can run code: a source scan for torch.load
without weights_only=True, unsafe YAML, pickle and np.load(allow_pickle=True)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from helpers import REPO

_UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def unsafe_loads(source: str) -> list[str]:
    """Calls in `source` that could run code from a file: torch.load without weights_only=True,
    yaml loads other than safe_load, pickle loads, np.load(allow_pickle=True), torch.hub.load."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr, owner = node.func.attr, ast.unparse(node.func.value)
        kwargs = {k.arg: k.value for k in node.keywords}
        true = lambda key: isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value is True  # noqa: E731
        bad = (
            (owner == "torch" and attr == "load" and not true("weights_only"))
            or (owner == "yaml" and attr in _UNSAFE_YAML)
            or (owner in ("pickle", "dill", "cloudpickle", "joblib") and attr in ("load", "loads"))
            or (owner in ("np", "numpy") and attr == "load" and true("allow_pickle"))
            or (owner == "torch.hub" and attr == "load")
        )
        if bad:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _code_of(path: Path) -> str:
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    # IPython magics and shell lines are not Python
    return "\n".join(
        line
        for cell in code
        for line in cell.splitlines()
        if not line.lstrip().startswith(("%", "!"))
    )


def test_every_load_of_a_file_is_safe():
    bad = (
        "torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(t)\nyaml.full_load(t)\n"
        "pickle.loads(b)\nnp.load(p, allow_pickle=True)\ntorch.hub.load('a', 'b')\n"
    )
    assert len(unsafe_loads(bad)) == 7  # the scanner catches each unsafe form
    assert (
        unsafe_loads(
            "torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(t)\nnp.load(p)\n"
        )
        == []
    )
    files = [
        *REPO.glob("msl_kit/**/*.py"),
        *REPO.glob("bench/*.py"),
        *REPO.glob("notebooks/*.ipynb"),
    ]
    assert any(f.name == "checkpoint.py" for f in files)
    problems = {str(f.relative_to(REPO)): unsafe_loads(_code_of(f)) for f in files}
    assert {k: v for k, v in problems.items() if v} == {}
    loaded = [f.name for f in files if "torch.load(" in f.read_text()]
    assert "atomic.py" in loaded  # the guard really sees the loader (models go through it)
