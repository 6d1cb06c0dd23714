"""A run killed with SIGKILL at several points, each time resumed, ends exactly like an
uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# 30 iterations, checkpoints every 6, evaluated at 15 and 30: each kill below lands between two
# checkpoints (10: replays 7-10; 18: a torn save, replays 13-18; 28: after an evaluation).
ARGS = [
    "--config",
    "digits",
    "--set",
    "train.iterations=30",
    "--set",
    "train.checkpoint_every=6",
    "--set",
    "train.eval_every=15",
    "--set",
    "train.threads=1",
    "--no-baseline",
]

# Runs `msl-kit train` in a child process that SIGKILLs itself at a chosen moment: after a given
# iteration, or halfway through writing a given checkpoint (a torn temp file, the rename never
# done).
CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from msl_kit import cli
    from msl_kit.cli import run as cli_run
    from msl_kit.train import engine, trainer
    mode, at = sys.argv[1], int(sys.argv[2])
    if mode == "step":
        class Killer(trainer.Callback):
            def on_step(self, record):
                if record["iteration"] == at:
                    os.kill(os.getpid(), signal.SIGKILL)
        cli_run._Progress.on_end = lambda self, r: None
        real_train = engine.train
        engine.train = lambda *a, callbacks=(), **k: real_train(
            *a, callbacks=[*callbacks, Killer()], **k
        )
    elif mode == "save":
        real_save, count = torch.save, [0]
        def torn_save(obj, f, *a, **k):
            if obj.get("iteration") == at and hasattr(f, "write"):
                f.write(b"PK\\x03\\x04 half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)
        torch.save = torn_save
    sys.exit(cli.main(sys.argv[3:]))
""")


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_metrics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    ref = tmp_path / "reference"
    done = _run(["-m", "msl_kit.cli", "train", "--out", str(ref), *ARGS], env)
    assert done.returncode == 0, done.stderr
    expected = _metrics(ref)

    child = tmp_path / "child.py"
    child.write_text(CHILD)
    # One run killed three times: the first process, then each resume of it, until the last
    # resume finishes. A resume that changed anything would carry into every later checkpoint
    # and so into the final metrics.
    out = tmp_path / "killed"
    args = ["train", "--out", str(out), *ARGS]
    for mode, at in [("step", 10), ("save", 18), ("step", 28)]:
        killed = _run([str(child), mode, str(at), *args], env)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not (out / "metrics.json").exists()
        torn = list(out.glob(".checkpoint.pt.*.tmp"))
        if mode == "save":
            assert torn, "the torn write should be a temp file, never checkpoint.pt"
        else:
            assert not torn, "resume should clear torn temp files"
        args = ["train", "--resume", str(out), "--no-baseline"]
    resumed = _run(["-m", "msl_kit.cli", *args], env)
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(out) == expected, (
        "a resume after the kills at 10, 18 (torn save), 28 changed the result"
    )
    assert not list(out.glob(".checkpoint.pt.*.tmp")), "resume should clear torn temp files"
    history = (out / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == [
        row.split(",")[0] for row in (ref / "history.csv").read_text().splitlines()[1:]
    ]
