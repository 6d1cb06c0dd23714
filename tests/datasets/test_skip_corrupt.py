"""data.skip_corrupt means the same in training, evaluation and the notebooks' embeddings:
one seam for the data, the same unreadable file skipped with the same warning."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FAST_ARGS
from PIL import Image

from msl_kit import cli
from msl_kit.notebook import explore
from msl_kit.train.checkpoint import load_model


def test_skip_corrupt_means_the_same_in_training_evaluation_and_notebooks(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, classes in (("train", range(4)), ("test", range(4, 8))):
        for c in classes:
            folder = tmp_path / "data" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(6):
                pixels = (rng.random((12, 12)) * 255).astype(np.uint8) // (c + 1)
                Image.fromarray(pixels, "L").save(folder / f"{i}.png")
    (tmp_path / "data" / "test" / "c4" / "bad.png").write_bytes(b"not an image")
    sets = [
        "--set",
        f"data.root={tmp_path / 'data'}",
        "--set",
        "data.name=folder",
        "--set",
        "data.skip_corrupt=true",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.samples_per_class=2",
        "--set",
        "model.convnet.input_size=12",
        "--set",
        "eval.ks=[1, 2]",
    ]
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        assert cli.main(["train", "--out", str(out), *FAST_ARGS, *sets]) == 0
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        assert cli.main(["evaluate", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    model, cfg = load_model(out)
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        emb, labels, _ = explore.split_embeddings(model, cfg)
    assert len(emb) == 4 * 6
