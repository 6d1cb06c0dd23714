"""Every shipped recipe loads and trains 2 iterations (on a few tiny images, no weights), and
switching a recipe's loss never carries a number written for another loss (issue 25)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msl_kit.train import engine
from msl_kit.train.config import CONFIG_DIR, load_config

# The GPU recipes' backbones take seconds to build and step even at 32 px on the CPU (and the
# photo recipe builds its prefix cache first).
SLOW = ("_512", "_384", "_lite0_")
RECIPES = [
    pytest.param(p.stem, marks=[pytest.mark.slow] if any(s in p.stem for s in SLOW) else [])
    for p in sorted(CONFIG_DIR.glob("*.yaml"))
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """root/<split>/<class>/*.png: 3 training classes and 2 test classes of 3 colour images."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, classes in (("train", "abc"), ("test", "de")):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def small(root: Path) -> list[str]:
    """The overrides that make any recipe a 2-iteration CPU run on `root`; the timm section is
    left out of every non-timm run (a section of another backbone)."""
    return [
        "data.name=folder",
        f"data.root={root}",
        "data.workers=0",
        "model.pretrained=none",
        "model.timm.input_size=32",
        "train.iterations=2",
        "train.batch_size=4",
        "train.samples_per_class=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.warmup_frozen=0",
        "train.keep_snapshots=false",
        "train.amp=none",
        "train.threads=1",
        "eval.ks=[1]",
        "eval.floors=false",
        "eval.batch_size=8",
        "device=cpu",
    ]


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_trains_two_iterations(name, tiny_folder, tmp_path):
    cfg = load_config(name, small(tiny_folder))
    assert cfg.description
    final = engine.train(cfg, tmp_path / "run")
    assert final["iteration"] == 2 and 0 <= final["recall@1"] <= 1


@pytest.mark.parametrize(
    "name", [pytest.param("cub200_bninception_512", marks=pytest.mark.slow), "digits"]
)
def test_switching_a_recipe_to_proxy_anchor_trains_with_its_own_alpha(name, tiny_folder, tmp_path):
    """`--config NAME --set loss.name=proxy_anchor` trained Proxy-Anchor with MS's alpha 2 (the
    recipe's `alpha: 2` for MS): now its history equals the run with alpha 32 written out."""
    runs = {}
    for extra in ([], ["loss.proxy_anchor.alpha=32"]):
        cfg = load_config(name, [*small(tiny_folder), "loss.name=proxy_anchor", *extra])
        assert cfg.loss.params.alpha == 32.0
        out = tmp_path / f"run{len(runs)}"
        engine.train(cfg, out)
        runs[len(runs)] = (out / "history.csv").read_bytes()
    assert runs[0] == runs[1]
