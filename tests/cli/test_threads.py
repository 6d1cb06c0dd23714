"""How many torch threads a CLI run takes: train.threads, else OMP_NUM_THREADS, else the cores
left after the loader's workers (a scheduler's or a test runner's share of the cores is kept)."""

from __future__ import annotations

import os

import pytest

from msl_kit.cli.run import torch_threads
from msl_kit.train.config import load_config


@pytest.mark.parametrize(
    ("sets", "omp", "expected"),
    [
        (["train.threads=3"], "1", 3),  # the config wins
        ([], "1", 1),
        ([], " 5 ", 5),
        ([], None, "cores"),
        ([], "0", "cores"),  # not a positive number: ignored as torch does
        ([], "four", "cores"),
        (["data.workers=1"], None, "cores-1"),
    ],
)
def test_torch_threads(monkeypatch, sets, omp, expected):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    cores = os.cpu_count() or 1
    want = {"cores": cores, "cores-1": max(1, cores - 1)}.get(expected, expected)
    assert torch_threads(load_config(None, sets)) == want
