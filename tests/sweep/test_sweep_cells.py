"""A cell's result is only ever reported for its own config (another study, an edited --config,
two values with one readable name); equal values are one cell and the sweep ends."""

from __future__ import annotations

import optuna
import pytest
import yaml
from helpers import REPO, printed_error, start_cli
from sweeps import CELL, listing, rows, sweep_args

from msl_kit import cli, sweep
from msl_kit.train.config import load_config


def test_1_a_result_is_only_ever_reported_for_its_own_config(tmp_path, capsys):
    """The issue's --storage case, an edited --config file, and two values with one readable
    folder name: every reported row is of its own config."""
    out = tmp_path / "S"
    assert cli.main(sweep_args(out, "loss.ms.beta=10")) == 0
    before = listing(out)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    later = sweep_args(out, "loss.ms.beta=10", sets=[*CELL, "train.iterations=3"])
    assert cli.main([*later, "--storage", other]) == 2  # was: the 2-iteration result shown
    printed_error(capsys, f"--out {out} holds another sweep")
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
    printed_error(capsys, "the sweep's study holds a result for runs/beta=10.0_seed=0_")
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


@pytest.mark.subprocess
@pytest.mark.slow
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
