"""Resume: the stored config is checked (an edit is refused in one line), --set may only extend
the iterations, and an extension killed before its next checkpoint resumes; each ends as the
run asked for that many iterations from the start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAST_ARGS, file_digests, run_cli

from msl_kit import cli
from msl_kit.train import engine, rundir, trainer
from msl_kit.train.config import load_config


def test_edited_config_is_refused_on_resume(digits_run, tmp_path, capsys):
    run = tmp_path / "copy"
    import shutil

    shutil.copytree(digits_run, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("iterations: 6", "iterations: 60"))
    before = file_digests(run)
    rc, line = run_cli(capsys, "train", "--resume", str(run))
    assert rc == 2 and "was edited" in line and "train.iterations: 6 -> 60" in line
    assert file_digests(run) == before


def test_resume_overrides_extend_a_finished_run_and_others_are_refused(
    digits_run, tmp_path, capsys
):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(digits_run, run)
    rc, line = run_cli(capsys, "train", "--resume", str(run), "--set", "loss.ms.beta=60")
    assert rc == 2 and "loss.ms.beta cannot change on --resume" in line
    rc, _ = run_cli(capsys, "train", "--resume", str(run), "--set", "train.iterations=10")
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iteration"] == 10
    assert metrics["resumes"][0]["iteration"] == 6
    assert metrics["resumes"][0]["overrides"] == ["train.iterations=10"]
    assert load_config(run / "config.yaml").train.iterations == 10
    # ...and equals a run that was asked for 10 iterations from the start
    straight = tmp_path / "straight"
    assert (
        cli.main(["train", "--out", str(straight), *FAST_ARGS, "--set", "train.iterations=10"]) == 0
    )
    ref = json.loads((straight / "metrics.json").read_text())
    assert metrics["recall@1"] == ref["recall@1"] and metrics["map@r"] == ref["map@r"]


@pytest.fixture(scope="module")
def straight10(tmp_path_factory) -> dict:
    """An uninterrupted run asked for 10 iterations from the start."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert cli.main(["train", "--out", str(out), *FAST_ARGS, "--set", "train.iterations=10"]) == 0
    return json.loads((out / "metrics.json").read_text())


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler saves anything."""


@pytest.mark.parametrize("point", ["after the record, before config.yaml", "at iteration 7"])
def test_an_extension_killed_before_its_next_checkpoint_resumes(
    digits_run, straight10, tmp_path, capsys, monkeypatch, point
):
    """Item 7: `--resume R --set train.iterations=10`, killed before the checkpoint of
    iteration 8, then `--resume R` (no --set) continues to 10 and ends like a straight run."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    real_write = rundir.atomic_write_text
    if point.startswith("after"):

        def write(path, text):
            if Path(path).name == "config.yaml":
                raise Crash
            real_write(path, text)

        monkeypatch.setattr(rundir, "atomic_write_text", write)
        callbacks = []
    else:

        class Killer(trainer.Callback):
            def on_step(self, record):
                if record["iteration"] == 7:
                    raise Crash

        callbacks = [Killer()]
    real_train = engine.train
    monkeypatch.setattr(
        engine, "train", lambda *a, **k: real_train(*a, **{**k, "callbacks": callbacks})
    )
    with pytest.raises(Crash):
        cli.main(["train", "--resume", str(run), "--set", "train.iterations=10"])
    monkeypatch.undo()
    assert (
        not (run / "checkpoint.pt").exists()
        or torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 6
    )
    rc, out = run_cli(capsys, "train", "--resume", str(run))
    assert rc == 0, out
    got = json.loads((run / "metrics.json").read_text())
    assert got["iteration"] == 10
    assert [r["overrides"] for r in got["resumes"]] == [["train.iterations=10"]]
    assert got["recall@1"] == straight10["recall@1"] and got["map@r"] == straight10["map@r"]
    assert load_config(run / "config.yaml").train.iterations == 10


def test_a_users_edit_after_an_extension_is_still_refused(digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    assert run_cli(capsys, "train", "--resume", str(run), "--set", "train.iterations=8")[0] == 0
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("beta: 40.0", "beta: 50.0"))
    rc, line = run_cli(capsys, "train", "--resume", str(run), "--set", "train.iterations=9")
    assert rc == 2 and "was edited" in line and "loss.ms.beta: 40.0 -> 50.0" in line
