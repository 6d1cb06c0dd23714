"""The embedded default: Omniglot-small ships in the package and `msl-kit train` shows the
method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from msl_kit import datasets
from msl_kit.datasets import embedded


def test_embedded_set_is_the_documented_split():
    train = datasets.build("omniglot_small", None, "train")
    test = datasets.build("omniglot_small", None, "test")
    assert (len(train), len(test)) == (2600, 2240)
    assert (len(train.classes), len(test.classes)) == (130, 112)
    alphabets = {
        name: Counter(c.split("/")[0] for c in ds.classes)
        for name, ds in (("train", train), ("test", test))
    }
    assert set(alphabets["train"]) == {"Balinese", "Greek", "Korean", "Sanskrit"}
    assert set(alphabets["test"]) == {"Early_Aramaic", "Japanese_(katakana)", "Latin", "Tagalog"}
    image, label, index = test[5]
    assert image.mode == "L" and image.size == (105, 105) and index == 5
    assert datasets.is_prepared("omniglot_small", "nowhere")


def test_a_damaged_archive_is_reported(tmp_path, monkeypatch):
    for name in embedded.ARCHIVES:
        (tmp_path / name).write_bytes(b"PK not the archive")
    monkeypatch.setattr(embedded, "DATA_DIR", tmp_path)
    monkeypatch.setattr(embedded, "_verified", set())
    with pytest.raises(OSError, match="damaged .* reinstall msl_kit"):
        embedded.records()


@pytest.mark.subprocess
@pytest.mark.slow
def test_default_train_from_an_empty_folder_shows_what_metric_learning_adds(tmp_path):
    """No arguments, no ../shared, no network, a fresh HOME: the README's main job."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HOME=str(tmp_path / "home"), OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run(
        [sys.executable, "-m", "msl_kit.cli", "train", "--out", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    pixels = metrics["floors"]["raw_pixels"]["recall@1"]
    assert metrics["recall@1"] >= 0.65 and metrics["recall@1"] - pixels >= 0.25, metrics
    assert metrics["floors"]["untrained"]["recall@1"] < pixels
    lines = done.stdout.splitlines()
    assert any(line.startswith("raw pixels") for line in lines)
    assert any(line.startswith("untrained convnet") for line in lines)
    assert any(line.startswith("convnet + ms loss") for line in lines)
