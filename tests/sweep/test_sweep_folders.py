"""A sweep's --out: a folder it did not write or one holding a (live) training run is refused
in one line and left untouched; its own finished folder is taken back by its command."""

from __future__ import annotations

import json
import os

import pytest
from helpers import printed_error, set_args, start_cli
from sweeps import CELL, listing, sweep_args, wait_for

from msl_kit import cli
from msl_kit.sweep.spec import SWEEP_FILES


def test_3_a_folder_the_sweep_does_not_own_is_refused_untouched(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("# my notes\n")
    (mine / "sweep.csv").write_text("my,own\n1,2\n")
    before = listing(mine)
    assert cli.main(sweep_args(mine, "loss.ms.beta=10,20")) == 2
    printed_error(capsys, f"--out {mine} holds files msl-kit sweep did not write")
    assert listing(mine) == before and sorted(os.listdir(mine)) == ["summary.md", "sweep.csv"]

    run = tmp_path / "run"
    assert cli.main(["train", "--config", "digits", *set_args(CELL), "--out", str(run)]) == 0
    before = listing(run)
    capsys.readouterr()
    assert cli.main(sweep_args(run, "loss.ms.beta=10")) == 2
    printed_error(capsys, f"--out {run} holds a training run")
    assert listing(run) == before


@pytest.mark.subprocess
@pytest.mark.slow
def test_3_a_run_locked_by_a_live_train_is_refused(tmp_path, capsys):
    run = tmp_path / "live"
    train = start_cli(["train", "--config", "digits", "--set", "train.iterations=100000",
                   "--set", "eval.floors=false", "--out", str(run)])  # fmt: skip
    try:
        wait_for(lambda: (run / "config.yaml").is_file(), train)
        before = sorted(os.listdir(run))
        assert cli.main(sweep_args(run, "loss.ms.beta=10")) == 2
        printed_error(capsys, f"--out {run} holds a training run")
        # nothing of the sweep's (mark, optuna.db, runs/, tables); the live train itself may
        # have added its own files meanwhile (snapshots/ on a slow machine)
        added = set(os.listdir(run)) - set(before)
        assert not added & SWEEP_FILES, added
        locked = tmp_path / "locked"  # a folder holding only that live train's lock
        locked.mkdir()
        (locked / ".msl_kit.lock").write_bytes((run / ".msl_kit.lock").read_bytes())
        assert cli.main(sweep_args(locked, "loss.ms.beta=10")) == 2
        printed_error(capsys, f"{locked} is in use by another msl-kit run (pid {train.pid}")
        assert os.listdir(locked) == [".msl_kit.lock"]
    finally:
        train.kill()
        train.wait()


def test_a_finished_sweep_folder_is_taken_back_by_its_own_command(tmp_path):
    """The claim refuses foreign content only: the sweep's own folder (its mark, tables, study,
    runs, a temp file of a cut-off table write) is reclaimed by a rerun of its command."""
    out = tmp_path / "S"
    assert cli.main(sweep_args(out, "loss.ms.beta=10")) == 0
    mark = json.loads((out / "sweep.json").read_text())
    assert mark == {"written_by": "msl-kit sweep", "study": mark["study"]}
    (out / ".sweep.csv.abc123.tmp").write_text("cut off")
    assert cli.main(sweep_args(out, "loss.ms.beta=10")) == 0
    assert not (out / ".msl_kit.lock").exists()
