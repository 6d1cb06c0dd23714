"""Run folders and checkpoints written before each component had its own config section (their
stored config is the flat form: `loss.alpha`, `model.image_size`) still evaluate, embed and
resume; a resumed run's config.yaml is then written in the new form."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import yaml
from PIL import Image

from msl_kit import cli
from msl_kit.train import checkpoint, rundir
from msl_kit.train.config import config_text, load_config
from msl_kit.train.old_keys import ConfigNote
from msl_kit.train.rundir import RunFolder

QUICK = ["train.iterations=2", "train.eval_every=0", "train.threads=1", "eval.floors=false"]


def old_form(values: dict) -> dict:
    """A config dict as msl_kit wrote it before the sections (one flat loss and model)."""
    old = copy.deepcopy(values)
    conv = old["model"].pop("convnet")
    old["model"].update(
        image_size=conv["input_size"], resize_size=conv["resize_size"],
        in_channels=conv["in_channels"], width=conv["width"], global_pool=None, input_size=0,
    )  # fmt: skip
    old["loss"] = {"name": "ms", "preset": None, **old["loss"].pop("ms"), **old["loss"]}
    return old


def test_an_old_run_folder_still_evaluates_embeds_and_resumes(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", "digits", "--out", str(run)]
    assert cli.main([*args, *(a for s in QUICK for a in ("--set", s))]) == 0
    folder = RunFolder(run)
    state = checkpoint.load_checkpoint(folder.checkpoint)
    old = old_form(state["config"])
    assert "alpha" in old["loss"] and "image_size" in old["model"]
    state["config"] = old
    checkpoint.save_checkpoint(state, folder.checkpoint, keep_previous=False)
    rundir.write_config(run, yaml.safe_dump(old, sort_keys=False))  # as the kit wrote it then
    before = load_config()  # nothing of the old form leaks into a later load
    out = tmp_path / "m.json"
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i in range(2):
        Image.new("L", (8, 8), 50 * i).save(images / f"{i}.png")
    embed = ["embed", "--checkpoint", str(run), "--images", str(images.parent)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigNote)  # a stored config is upgraded without notes
        assert cli.main(["evaluate", "--checkpoint", str(run), "--out", str(out)]) == 0
        assert cli.main([*embed, "--out", str(tmp_path / "e.npz")]) == 0
        assert cli.main(["train", "--resume", str(run), "--set", "train.iterations=3"]) == 0
    cfg = load_config(folder.config, stored=True)
    assert folder.config.read_text() == config_text(cfg) and "  ms:\n" in config_text(cfg)
    assert cfg.train.iterations == 3 and cfg.model.params.input_size == 8
    assert load_config() == before and Path(out).is_file()
