"""The tree shows the layers: every module imports on its own, imports run one way, no cycles,
no hidden names, a name is imported from the module that defines it.

The layers themselves are the import-linter contract in pyproject.toml (`lint-imports`); the
rest is checked here by parsing every module of msl_kit.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "msl_kit"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__main__.py"}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks (those imports never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports_of(name: str) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every msl_kit import that runs, at any depth."""
    tree = ast.parse(MODULES[name].read_text())
    skip = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [
                (a.name, None, node.lineno) for a in node.names if a.name.startswith("msl_kit")
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "msl_kit" or node.module.startswith("msl_kit."):
                found += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append(("<relative>", None, node.lineno))
    return found


def defined_names(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def edges() -> dict[str, set[str]]:
    """module -> the msl_kit modules it imports (a `from pkg import submodule` is the submodule)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for module, imported, _ in imports_of(name):
            sub = f"{module}.{imported}" if imported else None
            graph[name].add(sub if sub in MODULES else module)
    return graph


FORKED_IMPORTS = """
import importlib, multiprocessing, sys
import torch  # loaded once, before any msl_kit module; each child then imports one module

def alone(name):
    try:
        importlib.import_module(name)
    except Exception as err:
        return f"{name}: {type(err).__name__}: {err}"
    return ""

if __name__ == "__main__":
    assert not any(m.startswith("msl_kit") for m in sys.modules)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        print("\\n".join(f for f in pool.map(alone, sys.argv[1:]) if f))
"""


@pytest.mark.subprocess
def test_every_module_imports_on_its_own_in_a_fresh_interpreter(tmp_path):
    """Each module first in a process of its own (forked from one that loaded torch only, so it
    is quick): an import cycle shows up as an ImportError in whichever order it is reached."""
    script = tmp_path / "imports.py"
    script.write_text(FORKED_IMPORTS)
    done = subprocess.run(
        [sys.executable, str(script), *sorted(MODULES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", done.stdout


@pytest.mark.subprocess
def test_import_linter_layers_contract_is_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("import-linter is not installed: pip install -e '.[dev]'")
    done = subprocess.run([exe], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_no_import_cycle_anywhere_including_imports_inside_functions():
    graph = edges()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_no_relative_imports_and_no_module_level_getattr():
    relative = [f"{n}:{line}" for n in MODULES for m, _, line in imports_of(n) if m == "<relative>"]
    getattr_modules = [
        name
        for name, path in MODULES.items()
        if any(
            isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__dir__")
            for node in ast.parse(path.read_text()).body
        )
    ]
    assert not relative and not getattr_modules, (relative, getattr_modules)


def test_no_private_name_is_imported_from_another_module():
    private = [
        f"{name}:{line} imports {imported} from {module}"
        for name in MODULES
        for module, imported, line in imports_of(name)
        if imported and imported.startswith("_")
    ]
    assert not private, private


def test_a_name_is_imported_from_the_module_that_defines_it():
    """Inside msl_kit, `from X import name` names X's own definition or a submodule of X; only a
    subpackage `__init__` (with an explicit `__all__`) gathers names for users."""
    wrong = []
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        for module, imported, line in imports_of(name):
            if imported is None or f"{module}.{imported}" in MODULES:
                continue
            if module not in MODULES or imported not in defined_names(module):
                wrong.append(f"{name}:{line} takes {imported} from {module}")
    assert not wrong, wrong


def test_module_attributes_are_what_that_module_defines():
    """`from msl_kit.train import checkpoint as ckpt; ckpt.name`: name must be checkpoint's own
    (reaching a re-exported name through a module is the same facade by another door)."""
    wrong = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    if target in MODULES and MODULES[target].name != "__init__.py":
                        aliases[a.asname or a.name] = target
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr not in defined_names(aliases[node.value.id])
            ):
                wrong.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not wrong, wrong


def test_only_package_inits_re_export_and_they_list_it():
    facades = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        exported = next(
            (
                {elt.value for elt in node.value.elts}
                for node in tree.body
                if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
            ),
            None,
        )
        if path.name == "__init__.py":
            imported = {a.asname or a.name for m, a in _from_imports(tree)}
            if imported and exported != imported:
                facades.append(f"{name}: __all__ differs from its imports by {exported ^ imported}")
        elif exported is not None and not exported <= defined_names(name):
            facades.append(f"{name}: __all__ lists names defined elsewhere")
    assert not facades, facades


def test_no_package_name_hides_one_of_its_modules():
    """`msl_kit.use.search` must be one thing: a package exporting a function named like one of
    its modules would shadow the module (`from msl_kit.use import search` gets the function)."""
    clashes = []
    for name, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        exported = {a.asname or a.name for _, a in _from_imports(tree)}
        clashes += [f"{name}.{n}" for n in exported if f"{name}.{n}" in MODULES]
    assert not clashes, clashes


def _from_imports(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                yield node.module, alias


def test_architecture_md_has_a_line_for_every_file():
    """docs/architecture.md is the map: every module of msl_kit is named in it."""
    text = (REPO / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(PACKAGE))
        for path in MODULES.values()
        if path.name not in ("__init__.py",) and f"`{path.relative_to(PACKAGE)}`" not in text
    ]
    assert not missing, missing


def test_model_side_owns_the_preprocessing_spec():
    import msl_kit.models

    for path in Path(msl_kit.models.__file__).parent.glob("*.py"):
        source = path.read_text()
        assert "msl_kit.datasets" not in source and "import transforms" not in source
