"""The embedded default: Omniglot-small ships in the package and `msl-kit train` shows the
method."""

from __future__ import annotations

import json
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


def test_an_image_is_decoded_once_and_each_call_gets_its_own_copy(monkeypatch):
    member = embedded.records()[7].path
    first = embedded.load(member)
    reference = first.tobytes()
    first.paste(1, (0, 0, 105, 105))  # the caller changes its image...

    def no_archive(name):
        raise AssertionError(f"{name} read again from the archive")

    monkeypatch.setattr(embedded, "_archive_for", no_archive)
    again = embedded.load(member)  # ...the next caller gets the decoded pixels, unchanged
    assert (again.mode, again.size) == ("1", (105, 105)) and again.tobytes() == reference
    assert again is not first


@pytest.mark.xdist_group("default_run")
@pytest.mark.subprocess
@pytest.mark.slow
def test_default_train_from_an_empty_folder_shows_what_metric_learning_adds(default_run):
    """No arguments, no ../shared, no network, a fresh HOME: the README's main job
    (`default_run` in conftest.py runs it)."""
    metrics = json.loads((default_run / "run" / "metrics.json").read_text())
    pixels = metrics["floors"]["raw_pixels"]["recall@1"]
    assert metrics["recall@1"] >= 0.65 and metrics["recall@1"] - pixels >= 0.25, metrics
    assert metrics["floors"]["untrained"]["recall@1"] < pixels
    lines = (default_run / "stdout.txt").read_text().splitlines()
    assert any(line.startswith("raw pixels") for line in lines)
    assert any(line.startswith("untrained convnet") for line in lines)
    assert any(line.startswith("convnet + ms loss") for line in lines)
