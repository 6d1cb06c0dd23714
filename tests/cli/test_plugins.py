"""A loss and a backbone from a module outside msl_kit: one file each, with parameters of their
own that `--set`, sweeps, the checks and config.yaml all know; a dataset from such a module,
trained on and embedded through its own store; and a checkpoint that names a plugin imports
nothing unless the user passes `--plugin`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO

PLUGIN = textwrap.dedent(
    '''
    """A toy loss and a toy backbone, registered from outside msl_kit, each with a parameter of
    its own declared once: name, type, default, range, one line of documentation."""
    from dataclasses import dataclass

    import torch
    from torch import nn

    from msl_kit.losses.registry import LossSpec, register_loss
    from msl_kit.models.registry import BackboneSpec, register_backbone
    from msl_kit.params import param
    from msl_kit.preprocessing import Preprocessing


    @dataclass(frozen=True)
    class ToyParams:
        margin: float = param(0.1, "hinge margin", ge=0, lt=1)
        gamma: float = param(1.0, "exponent of each pair's hinge", gt=0, le=10)


    class ToyLoss(nn.Module):
        """Hinges pulling positives above 1 - margin and pushing negatives below margin, each
        raised to gamma (sum over pairs / B)."""

        def __init__(self, margin=0.1, gamma=1.0):
            super().__init__()
            self.margin, self.gamma = margin, gamma

        def from_sim(self, sim, labels, ref_labels=None, ignore=None):
            ref = labels if ref_labels is None else ref_labels
            same = labels[:, None] == ref[None, :]
            if ref_labels is None:
                same.fill_diagonal_(False)
            pos = torch.where(same, torch.relu(1 - self.margin - sim), 0.0)
            neg = torch.where(~same, torch.relu(sim - self.margin), 0.0)
            return ((pos + neg) ** self.gamma).sum() / sim.shape[0]

        def forward(self, embeddings, labels):
            return self.from_sim(embeddings @ embeddings.T, labels)


    @dataclass(frozen=True)
    class ToyBackboneParams:
        hidden: int = param(16, "width of the features", ge=2, le=256)


    class ToyBackbone(nn.Module):
        def __init__(self, side, hidden):
            super().__init__()
            self.feature_dim = hidden
            self.linear = nn.Linear(side * side, hidden)

        def forward(self, images):
            return torch.relu(self.linear(images.flatten(1)))


    def toy_spec(hidden=16):
        return Preprocessing(
            color="L", value_range=1.0, mean=(0.5,), std=(0.5,), input_size=8, resize_size=8,
            crop_scale=(1.0, 1.0), hflip=False, crop="fused",
        )


    register_loss("toy", LossSpec(ToyLoss, "Toy hinge", ToyParams))
    register_backbone(
        "toy",
        BackboneSpec(
            lambda spec, hidden: ToyBackbone(spec.input_size, hidden), toy_spec, ToyBackboneParams
        ),
    )
    '''
)
# A plugin that leaves a trace when it is imported: a checkpoint naming it must not import it.
MARKER = textwrap.dedent(
    """
    import os
    from pathlib import Path

    from msl_kit.losses.gpw import ContrastiveLoss
    from msl_kit.losses.registry import LossSpec, register_loss

    Path(os.environ["MARKER_FILE"]).write_text("imported")
    register_loss("marked", LossSpec(ContrastiveLoss, "Contrastive, from a plugin"))
    """
)
# A dataset of a plugin's own: images made in memory, read through a `Shipped` store; nothing
# inside msl_kit names it.
DATA_PLUGIN = textwrap.dedent(
    """
    import numpy as np
    from PIL import Image

    from msl_kit.datasets.layouts.common import Record
    from msl_kit.datasets.registry import DatasetInfo, register_dataset
    from msl_kit.datasets.stores import Shipped
    from msl_kit.datasets.transforms import CorruptImageError

    CLASSES, PER_CLASS = 10, 4  # bars at rows 0-5 train, 6-9 test (rows 8, 9: columns)


    def records():
        return [
            Record(str(c * PER_CLASS + k), c, f"bar{c}", "train" if c < 6 else "test")
            for c in range(CLASSES)
            for k in range(PER_CLASS)
        ]


    def load(item):
        if not item.isdigit() or int(item) >= CLASSES * PER_CLASS:
            raise CorruptImageError(f"toybars has no item {item!r}")
        i = int(item)
        pixels = np.random.default_rng(i).integers(0, 60, (8, 8)).astype(np.uint8)
        c = i // PER_CLASS
        if c < 8:
            pixels[c, :] = 255
        else:
            pixels[:, c - 6] = 255
        return Image.fromarray(pixels)


    register_dataset(
        DatasetInfo(
            "toybars", "bars on noise", "40 images, 10 classes", "MIT", "a test", grey=True,
            split_rule="classes 0-5 train, 6-9 test",
            store=Shipped(records, load, "toy_data_plugin"),
        )
    )
    """
)
QUICK = ["train.iterations=2", "train.eval_every=0", "train.threads=1", "eval.floors=false"]


@pytest.fixture()
def plugin_env(tmp_path: Path) -> dict:
    (tmp_path / "toy_plugin.py").write_text(PLUGIN)
    (tmp_path / "marker_plugin.py").write_text(MARKER)
    (tmp_path / "toy_data_plugin.py").write_text(DATA_PLUGIN)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
        "OMP_NUM_THREADS": "1",
        "MARKER_FILE": str(tmp_path / "marker.txt"),
    }


def _cli(env: dict, *args: str, sets: list[str] = ()) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "msl_kit.cli", *args, *(a for s in sets for a in ("--set", s))]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


# Several refused commands in one child process (each child pays ~1.5 s of CPU to import
# torch): `cli.main` per command, its stderr and exit status captured, and after each one
# whether the marker plugin has run and which plugin modules are imported. A command that
# imported a plugin would leave it imported for the next ones, so the checks after it fail too:
# sharing the process can only fail the test, never let a leak through.
REFUSALS = """
import contextlib, io, json, os, sys
from msl_kit import cli
marker, seen = os.environ["MARKER_FILE"], []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except SystemExit as stop:
            rc = stop.code
    plugins = sorted(m for m in sys.modules if m.endswith("_plugin"))
    seen.append({"rc": rc, "stderr": err.getvalue(), "marker": os.path.exists(marker),
                 "plugins": plugins})
print(json.dumps(seen))
"""


def _refusals(env: dict, *commands: list[str]) -> list[dict]:
    """Each command's {rc, stderr, marker, plugins}, all run in one child (`REFUSALS`)."""
    argv = [sys.executable, "-c", REFUSALS, json.dumps([list(c) for c in commands])]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


TOY = ["plugins=[toy_plugin]", "loss.name=toy", "model.backbone=toy"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_plugins_own_parameters_are_set_checked_and_recorded(tmp_path, plugin_env):
    out = tmp_path / "run"
    own = ["loss.toy.gamma=2", "model.toy.hidden=24", "loss.xbm_size=40"]
    done = _cli(
        plugin_env, "train", "--config", "digits", "--out", str(out), sets=TOY + own + QUICK
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["plugins"] == ["toy_plugin"]
    assert cfg["loss"]["name"] == "toy" and cfg["loss"]["toy"] == {"margin": 0.1, "gamma": 2.0}
    assert cfg["model"]["backbone"] == "toy" and cfg["model"]["toy"] == {"hidden": 24}
    assert "ms" not in cfg["loss"] and "convnet" not in cfg["model"]  # the recipe's, unused
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iteration"] == 2 and 0 <= metrics["recall@1"] <= 1
    assert "toy + toy loss (final)" in done.stdout
    # out of range: one line naming the key and the declared range, nothing written
    bad = _cli(
        plugin_env, "train", "--out", str(tmp_path / "bad"), sets=[*TOY, "loss.toy.gamma=20"]
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "loss.toy.gamma = 20.0 is not allowed: use 0 < value <= 10" in bad.stderr
    assert not (tmp_path / "bad").exists()
    unknown = _cli(plugin_env, "train", sets=[*TOY, "loss.toy.beta=2"])
    assert unknown.returncode == 2 and "loss.toy takes margin, gamma" in unknown.stderr


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_sweep_grids_over_a_plugins_parameter(tmp_path, plugin_env):
    out = tmp_path / "sweep"
    args = ["sweep", "--config", "digits", "--grid", "loss.toy.gamma=1,3", "--out", str(out)]
    done = _cli(plugin_env, *args, sets=[*TOY, *QUICK])
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["loss.toy.gamma"]) for r in rows) == [1.0, 3.0]
    for row in rows:
        cfg = yaml.safe_load((out / "runs" / Path(row["run"]).name / "config.yaml").read_text())
        assert cfg["loss"]["toy"]["gamma"] == float(row["loss.toy.gamma"])


@pytest.mark.subprocess
@pytest.mark.slow
def test_the_registries_feed_validation_and_an_unimportable_plugin_is_one_line(plugin_env):
    cases = {
        "loss.name=toy": "loss.name = 'toy' is not allowed: use one of ms, contrastive",
        "model.backbone=toy": "unknown model 'toy'; choose one of bninception",
        "plugins=[no_such_plugin]": "plugins: cannot import 'no_such_plugin'",
    }
    results = _refusals(plugin_env, *(["train", "--set", key] for key in cases))
    for (key, message), done in zip(cases.items(), results):
        assert done["rc"] == 2 and done["plugins"] == [], (key, done)
        assert done["stderr"].count("\n") == 1 and message in done["stderr"], (key, done)


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_checkpoint_never_imports_the_plugin_it_names(tmp_path, plugin_env):
    """Issue 24.6: evaluate, embed, search, export and --resume of a checkpoint whose config
    says `plugins: [marker_plugin]` imported it (it writes a marker file) with no warning."""
    run, marker = tmp_path / "run", tmp_path / "marker.txt"
    sets = ["plugins=[marker_plugin]", "loss.name=marked", *QUICK]
    assert (
        _cli(plugin_env, "train", "--config", "digits", "--out", str(run), sets=sets).returncode
        == 0
    )
    images = tmp_path / "images"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for i in range(2):
            (images / label / f"{i}.png").write_bytes(_png(i))
    index = tmp_path / "index.npz"
    embed = ("embed", "--checkpoint", str(run), "--images", str(images), "--out", str(index))
    assert _cli(plugin_env, *embed, "--plugin", "marker_plugin").returncode == 0
    marker.unlink()
    message = "was trained with plugin 'marker_plugin'; pass --plugin marker_plugin to import it"
    other = str(tmp_path / "e.npz")
    commands = (
        ("evaluate", "--checkpoint", str(run / "checkpoint.pt")),
        ("embed", "--checkpoint", str(run), "--images", str(images), "--out", other),
        ("export", "--checkpoint", str(run), "--out", str(tmp_path / "m.pt")),
        ("search", "--index", str(index), "--query", str(images / "a" / "0.png")),
        ("train", "--resume", str(run), "--set", "train.iterations=3"),
    )  # fmt: skip
    for args, done in zip(commands, _refusals(plugin_env, *commands)):
        assert done["rc"] == 2 and done["stderr"].count("\n") == 1, (args, done)
        assert message in done["stderr"], (args, done)
        assert not done["marker"] and done["plugins"] == [], (args, done)
    assert not marker.exists()
    done = _cli(plugin_env, "evaluate", "--checkpoint", str(run), "--plugin", "marker_plugin")
    assert done.returncode == 0 and marker.exists(), done.stderr


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_a_registered_dataset_is_read_through_its_own_reader(tmp_path, monkeypatch):
    """A dataset is one layout reader plus one registry entry: `register_dataset` makes its name
    valid in a config and `read_layout` reads its prepared folder with that reader."""
    from msl_kit.datasets import registry
    from msl_kit.datasets.layouts.common import Record
    from msl_kit.datasets.preparation import PreparedFolder
    from msl_kit.train.config import load_config

    def read_toy(ddir: Path) -> list[Record]:
        rows = (ddir / "list.txt").read_text().split()
        return [Record(p, int(p[0]), p[0], "train" if p[0] < "5" else "test") for p in rows]

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))  # leave no trace
    store = PreparedFolder(read_toy)
    toy = registry.DatasetInfo("toyset", "toy", "4 images", "MIT", "a test", store=store)
    registry.register_dataset(toy)
    (tmp_path / "list.txt").write_text("1a.png 2b.png 6c.png 7d.png")
    assert load_config(values={"data.name": "toyset"}).data.name == "toyset"
    records = registry.read_layout("toyset", tmp_path)
    assert [(r.path, r.split) for r in records][:2] == [("1a.png", "train"), ("2b.png", "train")]
    with pytest.raises(ValueError, match="already registered"):
        registry.register_dataset(registry.DatasetInfo("toyset", "other", "", "", ""))


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_plugins_dataset_trains_and_is_embedded_by_name(tmp_path, plugin_env):
    """A dataset registered from outside msl_kit, images in memory behind its own store: a run
    trains on it (its train split) and evaluates on its test split, and `embed --dataset` names
    its items as the store does, with the labels of the split."""
    run, index = tmp_path / "run", tmp_path / "bars.npz"
    own = ["plugins=[toy_data_plugin]", "data.name=toybars", "train.batch_size=8"]
    own += ["train.samples_per_class=2"]
    done = _cli(plugin_env, "train", "--config", "digits", "--out", str(run), sets=own + QUICK)
    assert done.returncode == 0, done.stderr[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["name"] == "toybars"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iteration"] == 2 and 0 <= metrics["recall@1"] <= 1
    embed = ["embed", "--checkpoint", str(run), "--dataset", "toybars", "--out", str(index)]
    done = _cli(plugin_env, *embed, "--plugin", "toy_data_plugin")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "16 images -> 64-d vectors, 4 classes" in done.stdout
    with np.load(index) as z:
        paths = bytes(z["paths"]).decode().split("\0")[:-1]  # one NUL-ended blob
        assert paths == [f"toybars:{i}" for i in range(24, 40)]
        assert list(z["labels"]) == [c for c in range(4) for _ in range(4)]
    without = _cli(plugin_env, *embed[:-1], str(tmp_path / "other.npz"))
    assert without.returncode == 2 and "pass --plugin toy_data_plugin" in without.stderr


def test_a_shipped_store_serves_build_prepare_embed_names_and_thumbnails(monkeypatch, capsys):
    """What a plugin's `Shipped` store owns, in process: the split, its mode, `prepare` and
    `is_prepared` (nothing to do), the item names `embed` stores and the search grid's
    thumbnail of such a name (the store's own image, not a file)."""
    from msl_kit import datasets
    from msl_kit.datasets import registry
    from msl_kit.viz.retrieval import thumbnail

    namespace: dict = {}
    exec(DATA_PLUGIN.replace("register_dataset(", "entry = ("), namespace)
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))  # leave no trace
    datasets.register_dataset(namespace["entry"])
    train = datasets.build("toybars", None, "train")
    assert (len(train), train.classes[:2]) == (24, ["bar0", "bar1"])
    image, label, index = train[5]
    assert (image.mode, image.size, label, index) == ("L", (8, 8), 1, 5)
    names = datasets.build("toybars", "ignored", "test").item_names()
    assert names[:2] == ["toybars:24", "toybars:25"]
    drawn = thumbnail(names[1])
    assert drawn is not None and np.array_equal(drawn, np.asarray(namespace["load"]("25")))
    assert thumbnail("toybars:99") is None  # an unknown item: "not readable", not a crash
    assert datasets.is_prepared("toybars", None)
    datasets.prepare("toybars", None)
    assert "toybars ships with toy_data_plugin: nothing to prepare" in capsys.readouterr().out
