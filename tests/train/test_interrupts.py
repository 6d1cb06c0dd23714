"""Ctrl-C (to the process or to its whole group, DataLoader workers included) saves a checkpoint
and prints the command that resumes it; that command ends as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

DIGITS = ["--config", "digits"]


CHILD = """
import os, signal, sys
from msl_kit import cli
from msl_kit.train import engine, trainer
at = int(sys.argv[1])
class Interrupt(trainer.Callback):
    def on_step(self, record):
        if record["iteration"] == at:
            os.kill(os.getpid(), signal.SIGINT)
real = engine.train
engine.train = lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, Interrupt()], **k)
sys.exit(cli.main(sys.argv[2:]))
"""


# Ctrl-C in a terminal reaches the whole process group, DataLoader workers included: here the
# worker loading batch `at` sends it to its group while the main process trains.
CHILD_WORKERS = """
import os, signal, sys
from msl_kit import cli
from msl_kit.train import trainer
at = int(sys.argv[1])
real = trainer._SeededItems.__getitem__
def getitem(self, key):
    if key[0] == at * 50:
        os.killpg(os.getpgid(0), signal.SIGINT)
    return real(self, key)
trainer._SeededItems.__getitem__ = getitem
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_ctrl_c_saves_and_the_printed_command_resumes_to_identical_metrics(tmp_path, workers):
    at = int(np.random.default_rng().integers(1, 19))
    args = [
        "train",
        *DIGITS,
        "--set",
        f"data.workers={workers}",
        "--set",
        "train.iterations=20",
        "--set",
        "train.checkpoint_every=50",
        "--set",
        "train.eval_every=10",
        "--set",
        "train.threads=1",
        "--no-baseline",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD_WORKERS if workers else CHILD,
            str(at),
            *args,
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )
    assert child.returncode == 130, child.stderr[-2000:]
    assert f"msl-kit train --resume {out}" in child.stderr and "DIR" not in child.stderr
    assert "Traceback" not in child.stderr, child.stderr[-2000:]
    command = child.stderr.split("Continue with: ")[1].split()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]
    assert saved == at if not workers else 1 <= saved <= at
    resumed = subprocess.run(
        [sys.executable, "-m", "msl_kit.cli", *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = tmp_path / "straight"
    assert (
        subprocess.run(
            [sys.executable, "-m", "msl_kit.cli", *args, "--out", str(straight)],
            env=env,
            capture_output=True,
            timeout=300,
        ).returncode
        == 0
    )
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((straight / "metrics.json").read_text())
    assert {k: v for k, v in a.items() if k != "best"} == {
        k: v for k, v in b.items() if k != "best"
    }
