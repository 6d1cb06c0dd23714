"""A sweep killed or signalled: SIGKILL before a cell's first checkpoint or at a random moment,
then a rerun gives the uninterrupted table; SIGTERM or Ctrl-C stops every worker and names the
rerun; workers stop when the parent is killed."""

from __future__ import annotations

import os
import random
import shlex
import signal
import time
from pathlib import Path

import pytest
from helpers import printed_error, start_cli
from sweeps import group_gone, rows, sweep_args, wait_for

from msl_kit import cli
from msl_kit.cli import app as cli_app


@pytest.mark.subprocess
@pytest.mark.slow
def test_4_a_cell_killed_before_its_first_checkpoint_is_restarted(tmp_path, capsys):
    out = tmp_path / "S"
    sets = ["train.iterations=300", "train.checkpoint_every=0", "eval.floors=false"]
    proc = start_cli(sweep_args(out, "loss.ms.beta=10", sets=sets))
    wait_for(lambda: any(out.glob("runs/*/config.yaml")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (cell,) = (out / "runs").iterdir()
    assert not any(cell.glob("checkpoint*")), "killed after the first checkpoint: too late"
    # Was: --resume says to drop --resume, and dropping it says to use --resume.
    assert cli.main(["train", "--resume", str(cell)]) == 2
    printed_error(capsys, f"cannot resume from {cell}: no checkpoint.pt found")
    assert cli.main(["train", "--config", "digits", "--out", str(cell)]) == 2
    err = printed_error(capsys, f"{cell} is not empty (it holds a config.yaml but no checkpoint")
    assert "--resume" not in err and "nothing to resume" in err
    assert cli.main(sweep_args(out, "loss.ms.beta=10", sets=sets)) == 0  # was: "not empty" forever
    (row,) = rows(out)
    assert (out / row["run"] / "metrics.json").is_file() and row["resumed"] == "False"


@pytest.mark.subprocess
@pytest.mark.slow
def test_4_a_kill_at_a_random_moment_then_a_rerun_gives_the_uninterrupted_table(tmp_path):
    sets = ["train.iterations=6", "train.checkpoint_every=2", "eval.floors=false"]
    grid = ("loss.ms.beta=10,40",)
    began = time.monotonic()
    ref = start_cli(sweep_args(tmp_path / "ref", *grid, sets=sets))
    assert ref.wait(timeout=300) == 0, ref.communicate()[0]
    whole = time.monotonic() - began
    delay = random.uniform(0, whole)
    killed = start_cli(sweep_args(tmp_path / "S", *grid, sets=sets))
    time.sleep(delay)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    again = start_cli(sweep_args(tmp_path / "S", *grid, sets=sets))
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, f"killed after {delay:.2f} s of {whole:.2f} s\n{log}"
    same = ["loss.ms.beta", "seed", "recall@1", "map@r", "run", "config"]
    assert [{k: r[k] for k in same} for r in rows(tmp_path / "S")] == [
        {k: r[k] for k in same} for r in rows(tmp_path / "ref")
    ], f"killed after {delay:.2f} s of {whole:.2f} s"


@pytest.mark.subprocess
@pytest.mark.slow
def _spawned_children(pid: int) -> list[int]:
    """The processes `pid` started with multiprocessing's spawn: the sweep's workers (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            spawned = b"spawn_main" in (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == pid and spawned:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize(
    "how", ["SIGTERM to the sweep", "Ctrl-C to its process group", "Ctrl-C to its workers alone"]
)
def test_5_a_signal_stops_every_worker_and_names_the_rerun(tmp_path, how):
    """However the signal arrives, the sweep exits 130 and prints the rerun. "Workers alone":
    the parent sees only its workers end interrupted (it may also see a group's Ctrl-C only
    after they have ended), and still reports a stop, not an error."""
    out = tmp_path / "S"
    sets = ["train.iterations=100000", "train.checkpoint_every=500", "eval.floors=false"]
    args = sweep_args(out, "loss.ms.beta=10,40", sets=sets, extra=("--jobs", "2"))
    proc = start_cli(args)
    wait_for(lambda: len(list(out.glob("runs/*/config.yaml"))) == 2, proc)  # both training
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)  # was: the parent exits, the workers train on
    elif how.endswith("group"):
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    else:
        workers = _spawned_children(proc.pid)
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGINT)
    log = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, log
    assert group_gone(proc.pid), "a process of the sweep is still alive"
    assert "Traceback" not in log and "train --resume" not in log, log
    command = log.split("resume the sweep with: ")[1].strip()
    resumed = cli_app.build_parser().parse_args(shlex.split(command)[1:])
    assert vars(resumed) == vars(cli_app.build_parser().parse_args(args)), command
    assert len(list(out.glob("runs/*/checkpoint.pt"))) == 2  # each worker checkpointed its cell


@pytest.mark.subprocess
@pytest.mark.slow
def test_5_workers_stop_when_the_sweep_parent_is_killed(tmp_path):
    """SIGKILL leaves the parent no chance to stop its workers: each asked the kernel to send
    it SIGTERM when the parent dies, so it checkpoints its cell and stops; a rerun resumes."""
    out = tmp_path / "S"
    sets = ["train.iterations=100000", "train.checkpoint_every=500", "eval.floors=false"]
    proc = start_cli(sweep_args(out, "loss.ms.beta=10,40", sets=sets, extra=("--jobs", "2")))
    wait_for(lambda: len(list(out.glob("runs/*/config.yaml"))) == 2, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert group_gone(proc.pid, timeout=180), "a worker outlived its killed parent"
    assert len(list(out.glob("runs/*/checkpoint.pt"))) == 2  # each worker checkpointed its cell
