"""What the sweep tests share: a digits sweep's argv, its table, a folder's bytes, and waiting on
a sweep started in a child process."""

from __future__ import annotations

import csv
import os
import subprocess
import time
from pathlib import Path

from helpers import FAST, set_args

CELL = [*FAST, "train.iterations=2"]  # a sweep cell: FAST, two iterations


def sweep_args(out: Path, *grid: str, sets: list[str] = CELL, extra: tuple = ()) -> list[str]:
    """`msl-kit sweep --config digits --set ... --grid ... --out OUT` as an argv list."""
    argv = ["sweep", "--config", "digits", *set_args(sets)]
    return [*argv, *(a for g in grid for a in ("--grid", g)), "--out", str(out), *extra]


def rows(out: Path) -> list[dict]:
    with open(out / "sweep.csv") as f:
        return list(csv.DictReader(f))


def listing(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def group_gone(pgid: int, timeout: float = 30) -> bool:
    """No process of the group is left (the resource tracker may take a moment to see EOF)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
