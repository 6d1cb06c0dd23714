"""A loss and a backbone from a module outside msl_kit: one file, one registry line each, and
`msl-kit train --set loss.name=... model.backbone=...` trains with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

PLUGIN = textwrap.dedent(
    '''
    """A toy loss and a toy backbone, registered from outside msl_kit."""
    import torch
    from torch import nn

    from msl_kit.losses.registry import LossSpec, register_loss
    from msl_kit.models.registry import BackboneSpec, register_backbone
    from msl_kit.preprocessing import Preprocessing


    class ToyLoss(nn.Module):
        """Pull positives above `margin`, push negatives below it (sum over pairs / B)."""

        def __init__(self, margin=0.1):
            super().__init__()
            self.margin = margin

        def from_sim(self, sim, labels, ref_labels=None, ignore=None):
            ref = labels if ref_labels is None else ref_labels
            same = labels[:, None] == ref[None, :]
            if ref_labels is None:
                same.fill_diagonal_(False)
            pos = torch.where(same, torch.relu(1 - self.margin - sim), 0.0)
            neg = torch.where(~same, torch.relu(sim - self.margin), 0.0)
            return (pos + neg).sum() / sim.shape[0]

        def forward(self, embeddings, labels):
            return self.from_sim(embeddings @ embeddings.T, labels)


    class ToyBackbone(nn.Module):
        feature_dim = 16

        def __init__(self, side):
            super().__init__()
            self.linear = nn.Linear(side * side, self.feature_dim)

        def forward(self, images):
            return torch.relu(self.linear(images.flatten(1)))


    def toy_spec():
        return Preprocessing(
            color="L", value_range=1.0, mean=(0.5,), std=(0.5,), input_size=8, resize_size=8,
            crop_scale=(1.0, 1.0), hflip=False, crop="fused",
        )


    register_loss("toy", LossSpec(ToyLoss, "Toy hinge", ("margin",)))
    register_backbone("toy", BackboneSpec(lambda spec: ToyBackbone(spec.input_size), toy_spec))
    '''
)


@pytest.fixture()
def plugin_env(tmp_path: Path) -> dict:
    (tmp_path / "toy_plugin.py").write_text(PLUGIN)
    repo = Path(__file__).resolve().parents[1]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repo)]),
        "OMP_NUM_THREADS": "1",
    }


def test_a_toy_loss_and_backbone_from_outside_train_two_iterations(tmp_path, plugin_env):
    out = tmp_path / "run"
    argv = [
        sys.executable, "-m", "msl_kit.cli", "train", "--config", "digits", "--out", str(out),
        "--set", "plugins=[toy_plugin]", "--set", "loss.name=toy", "--set", "model.backbone=toy",
        "--set", "train.iterations=2", "--set", "train.eval_every=0", "--set", "train.threads=1",
        "--set", "loss.xbm_size=40",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=plugin_env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["plugins"] == ["toy_plugin"]
    assert (cfg["loss"]["name"], cfg["model"]["backbone"]) == ("toy", "toy")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iteration"] == 2 and 0 <= metrics["recall@1"] <= 1
    assert "toy + toy loss (final)" in done.stdout


def test_the_registries_feed_validation_and_an_unimportable_plugin_is_one_line(plugin_env):
    argv = [sys.executable, "-m", "msl_kit.cli", "train", "--set"]
    for extra, message in (
        (["loss.name=toy"], "loss.name = 'toy' is not allowed: use one of ms, contrastive"),
        (["model.backbone=toy"], "unknown model 'toy'; choose one of bninception"),
        (["plugins=[no_such_plugin]"], "plugins: cannot import 'no_such_plugin'"),
    ):
        done = subprocess.run(
            argv + extra, capture_output=True, text=True, env=plugin_env, timeout=120
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_a_registered_dataset_is_read_through_its_own_reader(tmp_path, monkeypatch):
    """A dataset is one layout reader plus one registry entry: `register_dataset` makes its name
    valid in a config and `read_layout` reads its prepared folder with that reader."""
    from msl_kit.datasets import registry
    from msl_kit.datasets.layouts.common import Record
    from msl_kit.train.config import load_config

    def read_toy(ddir: Path) -> list[Record]:
        rows = (ddir / "list.txt").read_text().split()
        return [Record(p, int(p[0]), p[0], "train" if p[0] < "5" else "test") for p in rows]

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))  # leave no trace
    toy = registry.DatasetInfo("toyset", "toy", "4 images", "MIT", "a test", reader=read_toy)
    registry.register_dataset(toy)
    (tmp_path / "list.txt").write_text("1a.png 2b.png 6c.png 7d.png")
    assert load_config(values={"data.name": "toyset"}).data.name == "toyset"
    records = registry.read_layout("toyset", tmp_path)
    assert [(r.path, r.split) for r in records][:2] == [("1a.png", "train"), ("2b.png", "train")]
    with pytest.raises(ValueError, match="already registered"):
        registry.register_dataset(registry.DatasetInfo("toyset", "other", "", "", ""))
