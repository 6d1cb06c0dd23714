"""Engine: run folder contents, schedule, lr multipliers, frozen BN, val split, evaluate, DDP
launch."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FAST, set_args

from msl_kit import cli
from msl_kit.train import engine, recipe
from msl_kit.train.checkpoint import load_checkpoint
from msl_kit.train.config import load_config

# FAST with a schedule of its own: logs at 3, 6, 9, 12, evaluations and checkpoints at 6, 12
SCHEDULE = [
    *FAST,
    "train.iterations=12",
    "train.eval_every=6",
    "train.checkpoint_every=6",
    "train.log_every=3",
]


def _train(tmp_path: Path, *overrides: str, name: str = "run", **kw) -> tuple[dict, Path]:
    out = tmp_path / name
    return engine.train(load_config("digits", [*SCHEDULE, *overrides]), out, **kw), out


def test_run_folder_holds_what_the_contract_names(tmp_path):
    results, out = _train(tmp_path)
    assert {p.name for p in out.iterdir()} >= {
        "config.yaml",
        "history.csv",
        "checkpoint.pt",
        "best.pt",
        "metrics.json",
    }
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["recall@1"] == results["recall@1"] and 0 < saved["map@r"] <= 1
    assert {f"recall@{k}" for k in (1, 2, 4, 8)} <= saved.keys() and saved["iteration"] == 12
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [3, 6, 9, 12]
    assert rows[1]["recall@1"] and not rows[0]["recall@1"], "metrics only on evaluation rows"
    assert load_config(out / "config.yaml") == load_config("digits", SCHEDULE)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["iteration"] == 12 and state["config"] == yaml.safe_load(
        (out / "config.yaml").read_text()
    )


def test_lr_schedule_is_warmup_then_steps():
    cfg = load_config("digits", ["train.warmup=4", "train.lr_steps=[10, 20]", "train.lr_gamma=0.5"])
    factors = [recipe.lr_factor(i, cfg) for i in (0, 1, 3, 9, 10, 19, 20, 30)]
    assert factors == pytest.approx([0.25, 0.5, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


def test_lr_multipliers_take_effect(tmp_path):
    recipe.seed_everything(0)  # the engine seeds the same way before it builds the model
    init = recipe.build_model(load_config("digits", SCHEDULE)).state_dict()
    _, out = _train(tmp_path, "train.backbone_lr_mult=0.0", "train.weight_decay=0.0", "seed=0")
    trained = load_checkpoint(out / "checkpoint.pt")["model"]
    backbone = [
        k
        for k in trained
        if k.startswith("backbone.") and "running" not in k and "num_batches" not in k
    ]
    head = [k for k in trained if k.startswith("head.")]
    assert backbone and head
    assert all(torch.equal(trained[k], init[k]) for k in backbone), (
        "backbone moved with lr multiplier 0"
    )
    assert any(not torch.equal(trained[k], init[k]) for k in head), "head did not learn"


def test_frozen_batchnorm_keeps_running_statistics(tmp_path):
    init = recipe.build_model(
        load_config("digits", [*SCHEDULE, "model.freeze_bn=true"])
    ).state_dict()
    for frozen in (True, False):
        _, out = _train(tmp_path, f"model.freeze_bn={str(frozen).lower()}", name=f"bn-{frozen}")
        trained = load_checkpoint(out / "checkpoint.pt")["model"]
        stats = [k for k in trained if k.endswith(("running_mean", "running_var"))]
        assert stats
        unchanged = all(torch.equal(trained[k], init[k]) for k in stats)
        assert unchanged == frozen
        gammas = [
            k
            for k in trained
            if k.endswith(".weight") and k.replace("weight", "running_mean") in trained
        ]
        assert any(not torch.equal(trained[k], init[k]) for k in gammas), (
            "BN affine parameters must still learn"
        )


def test_validation_split_is_class_disjoint_and_used(tmp_path):
    results, out = _train(
        tmp_path, "data.val_fraction=0.4", "eval.split=val", "train.batch_size=30"
    )
    assert results["split"] == "val"
    from msl_kit import datasets

    train = datasets.build("digits", "data", "train", val_fraction=0.4, seed=0)
    val = datasets.build("digits", "data", "val", val_fraction=0.4, seed=0)
    assert not set(train.classes) & set(val.classes) and len(val.classes) == 2


def test_evaluate_command_reproduces_metrics_json(tmp_path, capsys):
    results, out = _train(tmp_path)
    assert (
        cli.main(
            [
                "evaluate",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--out",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    for key in ("recall@1", "recall@8", "map@r"):
        assert evaluated[key] == pytest.approx(results[key], abs=1e-12)
    assert "R@1" in capsys.readouterr().out


def test_cli_train_prints_table_with_pixel_baseline(tmp_path, capsys):
    args = ["train", "--config", "digits", "--out", str(tmp_path / "cli")]
    args += set_args([*SCHEDULE, "eval.floors=true"])  # the floors are the baseline rows
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "raw pixels" in out and "convnet + ms loss" in out and "MAP@R" in out


@pytest.mark.parametrize("name", ["contrastive", "triplet", "binomial", "lifted"])
def test_every_loss_trains(tmp_path, name):
    results, _ = _train(
        tmp_path, f"loss.name={name}", "train.iterations=4", "train.eval_every=0", name=name
    )
    assert 0 <= results["recall@1"] <= 1


def test_cross_batch_memory_run_resumes_with_its_memory(tmp_path):
    cfg = load_config("digits", [*SCHEDULE, "loss.xbm_size=200", "loss.xbm_start=3"])
    full = engine.train(cfg, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    state = load_checkpoint(tmp_path / "part" / "checkpoint.prev.pt")
    assert state["iteration"] == 6 and state["xbm"]["labels"].numel() > 0
    (tmp_path / "part" / "checkpoint.pt").unlink()
    (tmp_path / "part" / "checkpoint.prev.pt").rename(tmp_path / "part" / "checkpoint.pt")
    assert engine.train(None, tmp_path / "part", resume=True) == full


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    _, out = _train(tmp_path, "train.tensorboard=true")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.ddp
@pytest.mark.subprocess
@pytest.mark.slow
def test_torchrun_two_processes_train_and_report_once(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "msl_kit.cli",
        "train",
        "--config",
        "digits",
        "--out",
        str(out),
        "--no-baseline",
    ] + set_args([*SCHEDULE, "train.batch_size=40"])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1, "only rank 0 reports"
    assert json.loads((out / "metrics.json").read_text())["iteration"] == 12
