"""`msl-kit sweep`: grid specs, run folders and tables, resume after SIGKILL, --jobs overlap.

Cells are tiny runs of the default config (whatever `load_config()` gives), so each takes about
a second once the process is warm (the grid test's cells: of the digits config); the
multi-process tests start the CLI in subprocesses.
"""

from __future__ import annotations

import csv
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import start_cli

from msl_kit import cli, sweep
from msl_kit.train.validation import ConfigError

# A cell: 4 iterations, evaluated once at the end, no floors (a sweep's tables never show them).
TINY = [
    "train.iterations=4",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.log_every=2",
    "eval.floors=false",
]
GRID = ["--grid", "loss.ms.beta=10,40", "--grid", "loss.ms.lam=0.3,0.5"]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    url = f"sqlite:///{out / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(url)
    return optuna.load_study(study_name=summary.study_name, storage=url).trials


def cli_args(out: Path, *extra: str, grid: list[str] = GRID) -> list[str]:
    return ["sweep", *grid, *(a for s in TINY for a in ("--set", s)), "--out", str(out), *extra]


GRID_LAM3 = ["--grid", "loss.ms.beta=10,40", "--grid", "loss.ms.lam=0.3"]
DIGITS = ["--config", "digits"]  # cells of 360 test images instead of 2,240


# ----------------------------------------------------------------------------- specs (fast)
def test_parse_grid_and_range():
    assert sweep.parse_grid("loss.ms.beta=10,40,160") == ("loss.ms.beta", [10, 40, 160])
    assert sweep.parse_grid("train.lr=1e-4,3e-4") == ("train.lr", [1e-4, 3e-4])
    assert sweep.parse_grid("loss.name=ms,binomial") == ("loss.name", ["ms", "binomial"])
    assert sweep.parse_range("loss.ms.beta=10:160:log") == ("loss.ms.beta", (10.0, 160.0, True))
    for bad in ("loss.ms.beta", "loss.ms.beta=", "loss.ms.beta=1,1", "loss.ms.beta=[1],2"):
        with pytest.raises(sweep.SweepError):
            sweep.parse_grid(bad)
    for bad in (
        "loss.ms.beta=10",
        "loss.ms.beta=160:10",
        "loss.ms.beta=0:1:log",
        "loss.ms.beta=1:2:lin",
    ):
        with pytest.raises(sweep.SweepError):
            sweep.parse_range(bad)


def test_spec_errors_are_caught_before_training():
    with pytest.raises(
        ConfigError, match="unknown config key 'loss.betta'.*Did you mean loss.ms.beta"
    ):
        sweep.make_spec(["loss.betta=1,2"])
    with pytest.raises(ConfigError, match="loss.ms.beta expects float"):
        sweep.make_spec(["loss.ms.beta=abc,2"])
    with pytest.raises(ConfigError, match="multiple of train.samples_per_class"):
        sweep.make_spec(["train.batch_size=7,20"])
    with pytest.raises(sweep.SweepError, match="--seeds"):
        sweep.make_spec(["seed=1,2"])
    with pytest.raises(sweep.SweepError, match="not both"):
        sweep.make_spec(["loss.ms.beta=1,2"], ["loss.ms.lam=0:1"], trials=2)
    spec = sweep.make_spec(["loss.ms.beta=10,40", "loss.ms.lam=0.3,0.5"], seeds=[0, 1])
    assert len(sweep.cells(spec)) == 4 and spec.keys == ["loss.ms.beta", "loss.ms.lam"]
    name = sweep.cell_name(spec, {"loss.ms.beta": 10, "loss.ms.lam": 0.3}, 1)
    digest = sweep.config_hash(sweep.cell_config(spec, {"loss.ms.beta": 10, "loss.ms.lam": 0.3}, 1))
    assert name == f"beta=10_lam=0.3_seed=1_{digest[:10]}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--grid", "loss.betta=1,2"], "error: unknown config key 'loss.betta'"),
        (["--grid", "loss.ms.beta=abc,2"], "error: loss.ms.beta expects float"),
        (["--grid", "loss.ms.beta=1,2", "--jobs", "0"], "error: --jobs must be at least 1, got 0"),
        (["--study", "no-such-study"], "error: no sweep study 'no-such-study'; studies: "),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    assert cli.main(["sweep", *argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


def test_named_studies_load(tmp_path):
    """Every shipped study parses; those whose keys exist here also validate (loss.mining comes
    with the losses work); a study file by path runs the same machinery."""
    names = sorted(p.stem for p in sweep.STUDY_DIR.glob("*.yaml"))
    assert {"ablation-mining", "batch-size"} <= set(names)
    for name in names:
        raw = sweep.load_study(name)
        assert raw["grid"] and len(raw["seeds"]) == 3, name
        try:
            spec = sweep.make_spec(study=name)
        except ConfigError as e:
            assert "loss.mining" in str(e), (name, e)  # the one key still to come
            continue
        assert spec.seeds == [0, 1, 2] and sweep.cells(spec)
    path = tmp_path / "mine.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "grid": {"loss.name": ["ms", "contrastive"]},
                "set": ["train.iterations=3"],
                "seeds": [0, 1, 2],
            }
        )
    )
    spec = sweep.make_spec(study=str(path), seeds=[5], overrides=["train.lr=0.01"])
    assert spec.seeds == [5] and spec.overrides == ["train.iterations=3", "train.lr=0.01"]
    assert sweep.cell_config(spec, {"loss.name": "contrastive"}, 5).train.iterations == 3


# ----------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_grid_writes_run_folders_and_tables(tmp_path, capsys):
    # digits: the tables and folders, not the data, are what this test reads
    out = tmp_path / "sweep"
    assert cli.main(cli_args(out, *DIGITS, "--seeds", "0,1", grid=GRID_LAM3)) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert [r.rsplit("_", 1)[0] for r in runs] == [  # + the cell's config hash
        "beta=10.0_lam=0.3_seed=0",
        "beta=10.0_lam=0.3_seed=1",
        "beta=40.0_lam=0.3_seed=0",
        "beta=40.0_lam=0.3_seed=1",
    ]
    for run in runs:
        for name in ("config.yaml", "history.csv", "checkpoint.pt", "metrics.json"):
            assert (out / "runs" / run / name).is_file()
    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 4
    assert {"loss.ms.beta", "loss.ms.lam", "seed", "recall@1", "map@r", "wall_s", "run"} <= set(
        rows[0]
    )
    assert (
        yaml.safe_load((out / rows[0]["run"] / "config.yaml").read_text())["loss"]["ms"]["beta"]
        == 10
    )
    summary = read_csv(out / "summary.csv")
    assert [(r["loss.ms.beta"], r["seeds"]) for r in summary] == [("10.0", "2"), ("40.0", "2")]
    mean = sum(float(r["recall@1"]) for r in rows[:2]) / 2
    assert float(summary[0]["recall@1_mean"]) == pytest.approx(mean)
    assert " ± " in (out / "summary.md").read_text()
    printed = capsys.readouterr().out
    assert "| loss.ms.beta | loss.ms.lam | seeds | R@1 | MAP@R | wall s |" in printed
    before = {p: p.stat().st_mtime for p in out.glob("runs/*/metrics.json")}
    assert cli.main(cli_args(out, *DIGITS, "--seeds", "0,1", grid=GRID_LAM3)) == 0  # all done
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/metrics.json")} == before
    assert len(trials(out)) == 4
    assert cli.main(cli_args(out, *DIGITS, "--seeds", "0")) == 2  # another spec in the same folder
    assert "holds another sweep" in capsys.readouterr().err


@pytest.mark.slow
def test_search_with_tpe(tmp_path):
    spec = sweep.make_spec(ranges=["loss.ms.beta=10:160:log"], trials=2, overrides=TINY)
    result = sweep.run_sweep(spec, tmp_path / "tpe")
    assert len(result["rows"]) == 2 and result["keys"] == ["loss.ms.beta"]
    assert all(10 <= r["loss.ms.beta"] <= 160 for r in result["rows"])
    names = sorted(p.name for p in (tmp_path / "tpe" / "runs").iterdir())
    assert [n.rsplit("_", 1)[0] for n in names] == ["trial0000_seed=0", "trial0001_seed=0"]


# ----------------------------------------------------------------------------- processes (slow)
@pytest.mark.subprocess
@pytest.mark.slow
def test_sigkill_then_rerun_finishes_only_the_missing_cells(tmp_path):
    out = tmp_path / "sweep"
    proc = start_cli(cli_args(out))
    deadline = time.monotonic() + 120
    while len(list(out.glob("runs/*"))) < 3:  # the third cell's folder: it is training now
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime for p in out.glob("runs/*/metrics.json")}
    assert len(done) == 2, "killed after the third cell had finished; make cells longer"
    states = [t.state.name for t in trials(out)]
    assert sorted(states) == ["COMPLETE", "COMPLETE", "RUNNING"]

    again = start_cli(cli_args(out))
    log = again.communicate(timeout=180)[0]
    assert again.returncode == 0, log
    assert len(read_csv(out / "sweep.csv")) == 4 and len(list(out.glob("runs/*"))) == 4
    after = {p.parent.name: p.stat().st_mtime for p in out.glob("runs/*/metrics.json")}
    assert {k: after[k] for k in done} == done  # finished cells were not rerun
    assert log.count(": R@1") == 2, log  # the killed cell and the never-started one
    states = [t.state.name for t in trials(out)]  # the killed trial failed, then retried
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 1


@pytest.mark.subprocess
@pytest.mark.slow
def test_jobs_run_cells_at_the_same_time(tmp_path):
    out = tmp_path / "sweep"
    proc = start_cli(
        cli_args(out, "--jobs", "2", grid=GRID[:2] + ["--grid", "loss.ms.lam=0.5"])
    )  # 2 cells, 2 workers
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, log
    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 2
    spans = [(datetime.fromisoformat(r["start"]), datetime.fromisoformat(r["end"])) for r in rows]
    overlapping = [
        (i, j)
        for i, (s1, e1) in enumerate(spans)
        for j, (s2, e2) in enumerate(spans)
        if i < j and s1 < e2 and s2 < e1
    ]
    assert overlapping, spans  # two cells were training at the same moment
    pids = {t.user_attrs["pid"] for t in trials(out)}
    assert len(pids) == 2  # two worker processes shared the study
    threads = {
        yaml.safe_load((out / r["run"] / "config.yaml").read_text())["train"]["threads"]
        for r in rows
    }
    assert threads == {max(1, (os.cpu_count() or 1) // 2)}


def test_a_grid_over_the_preset_applies_its_numbers_and_explicit_keys_still_win():
    spec = sweep.make_spec(grid=["loss.ms.preset=released,paper"], overrides=["loss.ms.alpha=3"])
    released, paper = (sweep.cell_config(spec, params, 0) for params in sweep.cells(spec))
    assert (released.loss.params.beta, released.loss.params.lam) == (40.0, 0.5)
    assert (paper.loss.params.beta, paper.loss.params.lam) == (50.0, 1.0)
    assert released.loss.params.alpha == paper.loss.params.alpha == 3.0  # --set beats the preset
