"""Count the tests and the checks of the suite, so a move or split can show that none was dropped.

A check is an `assert` statement, a `pytest.raises` / `pytest.warns` / `pytest.fail` call, or a
call of an `assert*` function (numpy.testing, torch.testing, a helper such as
`_assert_same_tensors`). Counted per function, by the AST, over every `tests/**/*.py`:

    python tests/count_checks.py                      # totals
    python tests/count_checks.py --save before.json   # the per-test table, to compare later
    python tests/count_checks.py --compare before.json

`--compare` lists each test function that disappeared or holds fewer checks than before (a test
is known by its function name; two of one name are compared by their counts) and exits 1 if there
is one.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CHECK_CALLS = {("pytest", "raises"), ("pytest", "warns"), ("pytest", "fail")}


def _is_check_call(node: ast.Call) -> bool:
    func = node.func
    if isinstance(func, ast.Attribute):
        if isinstance(func.value, ast.Name) and (func.value.id, func.attr) in CHECK_CALLS:
            return True
        name = func.attr
    elif isinstance(func, ast.Name):
        name = func.id
    else:
        return False
    return name.lstrip("_").startswith("assert")


def checks_in(node: ast.AST) -> int:
    """Checks inside `node`, nested functions and classes included."""
    return sum(
        isinstance(n, ast.Assert) or (isinstance(n, ast.Call) and _is_check_call(n))
        for n in ast.walk(node)
    )


def table(root: Path = TESTS) -> dict:
    """{test function name: [{"file", "checks"}, ...]} plus the checks outside test functions."""
    tests: dict[str, list[dict]] = {}
    other = 0
    for path in sorted(root.rglob("*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(root))
        inside = 0
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith(
                "test_"
            ):
                found = {"file": where, "checks": checks_in(node)}
                tests.setdefault(node.name, []).append(found)
                inside += found["checks"]
        other += checks_in(tree) - inside
    return {"tests": tests, "checks_outside_tests": other}


def summary(data: dict) -> str:
    tests = [t for same in data["tests"].values() for t in same]
    in_tests = sum(t["checks"] for t in tests)
    files = len({t["file"] for t in tests})
    return (
        f"{len(tests)} test functions in {files} files; {in_tests} checks inside test functions, "
        f"{data['checks_outside_tests']} in helpers and fixtures; "
        f"{in_tests + data['checks_outside_tests']} in all"
    )


def compare(before: dict, after: dict) -> list[str]:
    """Each test that is gone or checks less than before."""
    problems = []
    for name, olds in before["tests"].items():
        news = sorted(after["tests"].get(name, []), key=lambda t: -t["checks"])
        for i, old in enumerate(sorted(olds, key=lambda t: -t["checks"])):
            if i >= len(news):
                problems.append(f"missing: {name} (was {old['file']}, {old['checks']} checks)")
            elif news[i]["checks"] < old["checks"]:
                new = news[i]
                problems.append(
                    f"fewer checks: {name} {old['checks']} -> {new['checks']} ({new['file']})"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=TESTS, help="the tests folder (default: this one)")
    p.add_argument("--save", type=Path, help="write the per-test table as JSON")
    p.add_argument("--compare", type=Path, help="a table saved earlier: list what was lost")
    args = p.parse_args(argv)
    data = table(args.root)
    print(summary(data))
    if args.save:
        args.save.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    if not args.compare:
        return 0
    before = json.loads(args.compare.read_text())
    print(f"before: {summary(before)}")
    moved = Counter(
        (old["file"], new["file"])
        for name, news in data["tests"].items()
        for old, new in zip(before["tests"].get(name, []), news)
        if old["file"] != new["file"]
    )
    for (old, new), count in sorted(moved.items()):
        print(f"moved: {old} -> {new}: {count} tests")
    problems = compare(before, data)
    print("\n".join(problems) or "every test of before is here with at least its checks")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
