"""`msl-kit bench NAME [ARGS]`: run one of the source checkout's benchmark scripts (bench/)."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

# The source checkout this module runs from, if any: benchmarks live in its bench/ folder.
REPO = Path(__file__).resolve().parents[2]


def cmd_bench(args: argparse.Namespace) -> int:
    """Run bench/NAME.py with ARGS, or say in one line why it cannot run."""
    bench = REPO / "bench"
    if not (bench / "loss.py").is_file():
        print(
            "error: the benchmarks come with the source checkout (bench/ beside msl_kit/), "
            "not with the installed package: git clone the project and run msl-kit bench there",
            file=sys.stderr,
        )
        return 2
    script = bench / f"{args.name}.py"
    if not script.is_file():
        names = sorted(p.stem for p in (REPO / "bench").glob("*.py"))
        print(f"error: no benchmark '{args.name}'; available: {', '.join(names)}", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """`bench`."""
    p = sub.add_parser("bench", help="run a benchmark script from bench/")
    p.add_argument("name", help="loss, knn, data, train_step, quality, ...")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
