"""Bad --grid, --range, --seeds and --storage are one line before anything runs or is written."""

from __future__ import annotations

import optuna
import pytest
from helpers import printed_error
from sweeps import sweep_args

from msl_kit import cli


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
    printed_error(capsys, message)
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
    printed_error(capsys, f"cannot use --storage {url}: ")
    assert (db.read_bytes() if db.exists() else None) == before
    assert not (tmp_path / "S" / "runs").exists()
