"""Same seed, same threads: two processes write byte-identical history.csv files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.subprocess
@pytest.mark.slow
def test_same_seed_same_threads_gives_byte_identical_history_across_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        cmd = [
            sys.executable,
            "-m",
            "msl_kit.cli",
            "train",
            "--out",
            str(out),
            "--set",
            "train.iterations=10",
            "--set",
            "train.threads=2",
            "--set",
            "train.log_every=5",
            "--set",
            "train.eval_every=0",
            "--no-baseline",
        ]
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
        outs.append((out / "history.csv").read_bytes())
    assert outs[0] == outs[1]
    assert b"pos_kept" in outs[0] or b"loss" in outs[0]
