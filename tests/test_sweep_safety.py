"""Issue 21, sweeps 1-6: each case as the issue writes it, then the fixed behaviour.

Cells are tiny digits runs (`--config digits`, two iterations, evaluated at the end only, no
floors); the cases that need a kill or a signal start the CLI in a subprocess of its own.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shlex
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import start_cli

from msl_kit import cli, sweep
from msl_kit.cli import app as cli_app
from msl_kit.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
FAST = ["train.iterations=2", "eval.floors=false"]


def sweep_args(out: Path, *grid: str, sets: list[str] = FAST, extra: tuple = ()) -> list[str]:
    """`msl-kit sweep --config digits --set ... --grid ... --out OUT` as an argv list."""
    argv = ["sweep", "--config", "digits", *(a for s in sets for a in ("--set", s))]
    return [*argv, *(a for g in grid for a in ("--grid", g)), "--out", str(out), *extra]


def rows(out: Path) -> list[dict]:
    with open(out / "sweep.csv") as f:
        return list(csv.DictReader(f))


def listing(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line_error(capsys, start: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"error: {start}") and err.count("\n") == 1, err
    return err


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


# ----------------------------------------------------------------------------- 1
def test_1_a_result_is_only_ever_reported_for_its_own_config(tmp_path, capsys):
    """The issue's --storage case, an edited --config file, and two values with one readable
    folder name: every reported row is of its own config."""
    out = tmp_path / "S"
    assert cli.main(sweep_args(out, "loss.ms.beta=10", sets=[*FAST[1:], "train.iterations=2"])) == 0
    before = listing(out)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    later = sweep_args(out, "loss.ms.beta=10", sets=[*FAST[1:], "train.iterations=3"])
    assert cli.main([*later, "--storage", other]) == 2  # was: the 2-iteration result shown
    one_line_error(capsys, f"--out {out} holds another sweep")
    assert listing(out) == before

    # Same command, config file edited in between: the stored result is of another config.
    base = tmp_path / "base.yaml"
    values = yaml.safe_load((REPO / "msl_kit" / "configs" / "digits.yaml").read_text())
    values["train"]["iterations"], values["eval"] = 2, {"floors": False}
    base.write_text(yaml.safe_dump(values))
    edited = [
        "sweep",
        "--config",
        str(base),
        "--grid",
        "loss.ms.beta=10",
        "--out",
        str(tmp_path / "E"),
    ]
    assert cli.main(edited) == 0
    values["train"]["iterations"] = 3
    base.write_text(yaml.safe_dump(values))
    assert cli.main(edited) == 2
    one_line_error(capsys, "the sweep's study holds a result for runs/beta=10.0_seed=0_")
    assert cli.main([*edited, "--storage", other]) == 0  # a new study: the new cell trains
    (row,) = rows(tmp_path / "E")
    cfg = load_config(tmp_path / "E" / row["run"] / "config.yaml")
    assert cfg.train.iterations == 3 and row["config"] == sweep.config_hash(cfg)
    assert len(list((tmp_path / "E" / "runs").iterdir())) == 2  # the old cell is kept apart

    # A checkpoint of another config in a cell's folder is never resumed as that cell.
    spec = sweep.make_spec(["loss.ms.beta=10"], config=str(base))
    old_cell = next(p for p in (tmp_path / "E" / "runs").iterdir() if p.name != row["run"][5:])
    with pytest.raises(sweep.SweepError, match="holds a run of another config"):
        sweep.run_cell(sweep.cell_config(spec, {"loss.ms.beta": 10.0}, 0), old_cell)


def test_1_two_values_with_one_readable_name_are_two_cells(tmp_path):
    out = tmp_path / "S"
    assert cli.main(sweep_args(out, "description=a b,ab")) == 0
    table = rows(out)
    assert len({r["run"] for r in table}) == 2  # was: one folder, the second cell's result copied
    for r in table:
        assert load_config(out / r["run"] / "config.yaml").description == r["description"]
        assert r["config"] == sweep.config_hash(load_config(out / r["run"] / "config.yaml"))


# ----------------------------------------------------------------------------- 2
def test_2_equal_values_are_one_cell_and_the_sweep_ends(tmp_path):
    assert sweep.make_spec(["loss.ms.beta=40,40.0"]).grid == {"loss.ms.beta": [40.0]}
    assert sweep.make_spec(["loss.ms.beta=40"]).fingerprint() == (
        sweep.make_spec(["loss.ms.beta=40.0"]).fingerprint()
    )
    out = tmp_path / "S"
    proc = start_cli(sweep_args(out, "loss.ms.beta=40,40.0"))
    log = proc.communicate(timeout=120)[0]  # was: 3,385 trials in 10 minutes, never ending
    assert proc.returncode == 0, log
    assert len(rows(out)) == 1 and len(list((out / "runs").iterdir())) == 1
    url = f"sqlite:///{out / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(url)
    assert summary.n_trials == 1


# ----------------------------------------------------------------------------- 3
def test_3_a_folder_the_sweep_does_not_own_is_refused_untouched(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("# my notes\n")
    (mine / "sweep.csv").write_text("my,own\n1,2\n")
    before = listing(mine)
    assert cli.main(sweep_args(mine, "loss.ms.beta=10,20")) == 2
    one_line_error(capsys, f"--out {mine} holds files msl-kit sweep did not write")
    assert listing(mine) == before and sorted(os.listdir(mine)) == ["summary.md", "sweep.csv"]

    run = tmp_path / "run"
    assert cli.main(["train", "--config", "digits", *(a for s in FAST for a in ("--set", s)),
                     "--out", str(run)]) == 0  # fmt: skip
    before = listing(run)
    capsys.readouterr()
    assert cli.main(sweep_args(run, "loss.ms.beta=10")) == 2
    one_line_error(capsys, f"--out {run} holds a training run")
    assert listing(run) == before


@pytest.mark.slow
def test_3_a_run_locked_by_a_live_train_is_refused(tmp_path, capsys):
    run = tmp_path / "live"
    train = start_cli(["train", "--config", "digits", "--set", "train.iterations=100000",
                   "--set", "eval.floors=false", "--out", str(run)])  # fmt: skip
    try:
        wait_for(lambda: (run / "config.yaml").is_file(), train)
        before = sorted(os.listdir(run))
        assert cli.main(sweep_args(run, "loss.ms.beta=10")) == 2
        one_line_error(capsys, f"--out {run} holds a training run")
        assert sorted(os.listdir(run)) == before  # no optuna.db, runs/ or tables
        locked = tmp_path / "locked"  # a folder holding only that live train's lock
        locked.mkdir()
        (locked / ".msl_kit.lock").write_bytes((run / ".msl_kit.lock").read_bytes())
        assert cli.main(sweep_args(locked, "loss.ms.beta=10")) == 2
        one_line_error(capsys, f"{locked} is in use by another msl-kit run (pid {train.pid}")
        assert os.listdir(locked) == [".msl_kit.lock"]
    finally:
        train.kill()
        train.wait()


# ----------------------------------------------------------------------------- 4
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
    one_line_error(capsys, f"cannot resume from {cell}: no checkpoint.pt found")
    assert cli.main(["train", "--config", "digits", "--out", str(cell)]) == 2
    err = one_line_error(capsys, f"{cell} is not empty (it holds a config.yaml but no checkpoint")
    assert "--resume" not in err and "nothing to resume" in err
    assert cli.main(sweep_args(out, "loss.ms.beta=10", sets=sets)) == 0  # was: "not empty" forever
    (row,) = rows(out)
    assert (out / row["run"] / "metrics.json").is_file() and row["resumed"] == "False"


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


# ----------------------------------------------------------------------------- 5
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the sweep", "Ctrl-C to its process group"])
def test_5_a_signal_stops_every_worker_and_names_the_rerun(tmp_path, how):
    out = tmp_path / "S"
    sets = ["train.iterations=100000", "train.checkpoint_every=500", "eval.floors=false"]
    args = sweep_args(out, "loss.ms.beta=10,40", sets=sets, extra=("--jobs", "2"))
    proc = start_cli(args)
    wait_for(lambda: len(list(out.glob("runs/*/config.yaml"))) == 2, proc)  # both training
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)  # was: the parent exits, the workers train on
    else:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    log = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, log
    assert group_gone(proc.pid), "a process of the sweep is still alive"
    assert "Traceback" not in log and "train --resume" not in log, log
    command = log.split("resume the sweep with: ")[1].strip()
    resumed = cli_app.build_parser().parse_args(shlex.split(command)[1:])
    assert vars(resumed) == vars(cli_app.build_parser().parse_args(args)), command
    assert len(list(out.glob("runs/*/checkpoint.pt"))) == 2  # each worker checkpointed its cell


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


# ----------------------------------------------------------------------------- 6
@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--grid", "loss.ms.beta=10,20", "--grid", "loss.ms.beta=30"],
            "--grid loss.ms.beta is given twice",
        ),
        (
            ["--range", "loss.ms.lam=0.9:5", "--trials", "2"],
            "--range loss.ms.lam=0.9:5 reaches a bad",
        ),
        (
            ["--grid", "loss.ms.beta=10", "--seeds", "-1"],
            "--seeds must be distinct integers in 0..",
        ),
    ],
)
def test_6_bad_grid_range_and_seeds_are_one_line_before_anything_runs(
    argv, message, tmp_path, capsys
):
    out = tmp_path / "S"
    assert cli.main(["sweep", "--config", "digits", *argv, "--out", str(out)]) == 2
    one_line_error(capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["corrupt", "not a URL", "read-only", "no such folder"])
def test_6_a_bad_storage_is_one_line(kind, tmp_path, capsys):
    db = tmp_path / "study.db"
    if kind == "corrupt":
        db.write_bytes(b"this is not an sqlite file" * 40)
    elif kind == "read-only":
        optuna.create_study(study_name="x", storage=f"sqlite:///{db}")
        db.chmod(0o444)  # root ignores this; the URI's mode=ro does not
    url = {
        "corrupt": f"sqlite:///{db}",
        "not a URL": "optuna.db",
        "read-only": f"sqlite:///file:{db}?mode=ro&uri=true",
        "no such folder": f"sqlite:///{tmp_path / 'nowhere' / 'study.db'}",
    }[kind]
    before = db.read_bytes() if db.exists() else None
    assert cli.main(sweep_args(tmp_path / "S", "loss.ms.beta=10", extra=("--storage", url))) == 2
    one_line_error(capsys, f"cannot use --storage {url}: ")
    assert (db.read_bytes() if db.exists() else None) == before
    assert not (tmp_path / "S" / "runs").exists()


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
