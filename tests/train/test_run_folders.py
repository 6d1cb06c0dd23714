"""Run folders: an --out that cannot be written, holds something else or is in use is refused
in one line and left as it was; a missing --resume folder is not created; evaluate never
replaces a file it did not write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import FAST_ARGS, error_line, file_digests, run_cli

from msl_kit import cli
from msl_kit.train import engine, rundir
from msl_kit.train.rundir import RunFolder


def test_out_folder_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc, err = run_cli(capsys, "train", "--out", str(blocker / "run"), *FAST_ARGS)
    line = error_line(err)
    assert (
        rc == 2
        and f"cannot write to the output folder {blocker / 'run'}" in line
        and "--out" in line
    )
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0,
    reason="root writes into a 0o500 folder anyway; the under-a-file case covers root",
)
def test_read_only_out_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        rc, err = run_cli(capsys, "train", "--out", str(folder), *FAST_ARGS)
    finally:
        folder.chmod(0o700)
    assert rc == 2 and "cannot write to the output folder" in error_line(err)


def test_out_pointing_at_an_existing_run_is_refused(digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc, err = run_cli(capsys, "train", "--out", str(run), *FAST_ARGS)
    line = error_line(err)
    assert rc == 2 and f"msl-kit train --resume {run}" in line and "another --out" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_of_a_missing_folder_does_not_create_it(tmp_path, capsys):
    missing = tmp_path / "typo"
    rc, err = run_cli(capsys, "train", "--resume", str(missing), "--no-baseline")
    line = error_line(err)
    assert rc == 2 and f"cannot resume from {missing}" in line and "drop --resume" in line
    assert not missing.exists()


def test_second_writer_is_refused_before_touching_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    with rundir.claim(out, new=True):  # another live process (this one) holds the folder
        (out / "config.yaml").write_text("mine\n")
        before = file_digests(out)
        rc, line = run_cli(capsys, "train", "--out", str(out), *FAST_ARGS)
        assert rc == 2 and "in use by another msl-kit run" in line and f"pid {os.getpid()}" in line
        assert file_digests(out) == before
    assert not (out / RunFolder.LOCK).exists()


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_concurrent_trains_into_one_folder_exactly_one_runs(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "msl_kit.cli",
        "train",
        "--out",
        str(out),
        *FAST_ARGS,
        "--set",
        "train.iterations=40",
        "--no-baseline",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    while not (out / RunFolder.LOCK).exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2 and (
        "in use by another msl-kit run" in second.stderr or "is not empty" in second.stderr
    )
    assert json.loads((out / "metrics.json").read_text())["iteration"] == 40


@pytest.mark.subprocess
def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (out / RunFolder.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.warns(RuntimeWarning, match="gone"):
        with rundir.claim(out, new=False):
            pass


@pytest.mark.parametrize("present", [["best.pt", "metrics.json"], ["config.yaml"], ["notes.txt"]])
def test_non_empty_out_is_refused_and_left_alone(tmp_path, capsys, present):
    out = tmp_path / "proj"
    out.mkdir()
    for name in present:
        (out / name).write_text(f"# my own {name}\n")
    before = file_digests(out)
    rc, line = run_cli(capsys, "train", "--out", str(out), *FAST_ARGS)
    assert rc == 2 and "not empty" in line
    assert file_digests(out) == before


def test_user_config_in_its_own_folder_is_not_overwritten(tmp_path, capsys):
    proj = tmp_path / "myproj"
    proj.mkdir()
    (proj / "config.yaml").write_text("# my commented config\ndata:\n  name: digits\n")
    before = file_digests(proj)
    rc, _ = run_cli(capsys, "train", "--config", str(proj / "config.yaml"), "--out", str(proj))
    assert rc == 2 and file_digests(proj) == before


def test_evaluate_never_replaces_a_checkpoint(digits_run, tmp_path, capsys):
    before = file_digests(digits_run)
    rc, line = run_cli(
        capsys,
        "evaluate",
        "--checkpoint",
        str(digits_run / "best.pt"),
        "--out",
        str(digits_run / "checkpoint.pt"),
    )
    assert rc == 2 and "not written by `msl-kit evaluate`" in line
    assert file_digests(digits_run) == before
    # its own earlier output may be replaced
    out = tmp_path / "eval.json"
    assert (
        cli.main(["evaluate", "--checkpoint", str(digits_run / "best.pt"), "--out", str(out)]) == 0
    )
    assert (
        cli.main(["evaluate", "--checkpoint", str(digits_run / "best.pt"), "--out", str(out)]) == 0
    )


def test_evaluate_out_in_a_missing_folder_is_refused_before_evaluating(
    digits_run, tmp_path, capsys, monkeypatch
):
    def never(*a, **k):
        raise AssertionError("evaluated before checking --out")

    monkeypatch.setattr(engine, "evaluate_checkpoint", never)
    target = tmp_path / "nodir" / "x.json"
    rc, line = run_cli(
        capsys, "evaluate", "--checkpoint", str(digits_run / "best.pt"), "--out", str(target)
    )
    assert rc == 2 and str(target) in line and "does not exist" in line and ".tmp" not in line
