"""Shared test set-up (tests/README.md): quiet OpenMP, one torch thread per xdist worker, how many
workers `-n auto` starts, the real-data folder, and the trained runs that tests only read, each
built once per test session and shared by every worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    FAST_ARGS,
    REPO,
    SHARED_DATA,
    WORKER,
    built_once,
    held_out_tree,
    read_only,
    start_cli,
    train_quietly,
)

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if WORKER:  # before torch is imported: N workers share N cores, and so do their children
    os.environ["OMP_NUM_THREADS"] = "1"
# A shell that starts the suite in the background (`pytest &` in a script, nohup) hands it
# SIGINT ignored, and every child inherits that: a Ctrl-C test would then find msl-kit deaf to
# Ctrl-C. The tests send the signal a terminal sends, so their children get its default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

__all__ = ["REPO", "SHARED_DATA", "start_cli"]  # older tests import these from here
MAX_WORKERS = 8  # past this the longest tests set the pace, and each worker holds torch


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's default): a worker per core, at most MAX_WORKERS; none when each
    argument names single tests (`path::test`), so one test starts at once and --pdb works."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    if config.args and all("::" in arg for arg in config.args):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_WORKERS))


def pytest_configure(config: pytest.Config) -> None:
    if WORKER:
        _one_torch_thread()


def _one_torch_thread() -> None:
    """An xdist worker owns one core: `msl-kit train` in this process sets torch's threads to
    the machine's cores (train.threads=0), which here would take the other workers' cores."""
    import torch

    set_threads = torch.set_num_threads
    set_threads(1)
    torch.set_num_threads = lambda n: set_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep `xdist_group` working under pytest >= 9.2: xdist 3.8 marks a grouped test by
    setting `item._nodeid`, which pytest 9.2 no longer reads (the id lives in `item._id`), so
    every group was spread over the workers (a shared fixture built twice, two wheel builds in
    one build/ folder). Adds the same `@group` suffix where xdist's did not take."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodes import coerce_node_id
    except ImportError:  # an older pytest, where xdist's own suffix works
        return
    for item in items:
        marks = item.iter_markers("xdist_group")
        names = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks}
        )
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip that says why (a user's fresh clone has no ../shared)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real data folder {SHARED_DATA} is absent (it exists only beside the team's checkout)"
        )
    return SHARED_DATA


# ----------------------------------------------------------------------------- built once
@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished run of `--config digits` with FAST: checkpoints at iterations 2, 4 and 6 (the
    last two kept as checkpoint.prev.pt and checkpoint.pt), metrics.json; shared, read only."""

    def build(out: Path) -> None:
        train_quietly(["train", "--out", str(out), *FAST_ARGS])

    yield from read_only(built_once(tmp_path_factory, "digits_run", build))


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """README's main job as a new user runs it: `python -m msl_kit.cli train --out run` with no
    other argument, from an empty folder, a fresh HOME, no PYTHONPATH, OpenMP's threads left
    to the default. The folder holds `run/` and what it printed, `stdout.txt`; shared, read
    only (the README example test copies `run/` to its own `runs/demo`)."""

    def build(folder: Path) -> None:
        folder.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
        env.update(HOME=str(folder / "home"), OMP_WAIT_POLICY="PASSIVE")
        done = subprocess.run(
            [sys.executable, "-m", "msl_kit.cli", "train", "--out", "run"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        (folder / "stdout.txt").write_text(done.stdout)

    yield from read_only(built_once(tmp_path_factory, "default_run", build))


@pytest.fixture(scope="session")
def use_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The embedded default (Omniglot-small, 64-d convnet at 28 px) trained 5 iterations: what
    embed, search and export read; shared, read only."""

    def build(out: Path) -> None:
        args = ["train", "--set", "train.iterations=5", "--set", "train.eval_every=0"]
        train_quietly([*args, "--set", "train.threads=1", "--no-baseline", "--out", str(out)])

    yield from read_only(built_once(tmp_path_factory, "use_run", build))


@pytest.fixture(scope="session")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """The embedded set's test split as PNG files, tree/<alphabet>__<character>/<file>.png
    (bytes as shipped), and each dataset item's written path, in the split's order; shared,
    read only."""
    base = built_once(tmp_path_factory, "held_out", lambda folder: held_out_tree(folder))
    for _ in read_only(base):
        yield held_out_tree(base)
