"""The frozen prefix and its activation cache (`cache.*`): a cut backbone computes what the whole
one does, a cached step equals the uncached step on the same view, evaluation from the cache
equals evaluation from the images, and a cache is never reused for other weights or
preprocessing. A tiny CUB-layout archive (20 images of 24x20) at 64 px keeps it quick."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import cub_members, tar_bytes

from msl_kit.models.convnet import ConvNetBackbone
from msl_kit.models.prefix import PrefixSplit, prefix_names
from msl_kit.train import distributed, engine, recipe
from msl_kit.train.config import load_config
from msl_kit.train.prefix_cache.build import view_images
from msl_kit.train.trainer import Trainer
from msl_kit.train.validation import ConfigError

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from msl_kit.datasets.registry import prepare

    folder = tmp_path_factory.mktemp("tiny_cub")
    (folder / "cub.tgz").write_bytes(tar_bytes(cub_members(per_class=4)))
    prepare("cub200", folder, archive=str(folder / "cub.tgz"), progress=False)
    from safetensors.torch import save_file

    torch.manual_seed(7)  # "pretrained" weights: the same prefix for every run seed
    save_file(timm.create_model("tf_efficientnet_lite0").state_dict(), folder / "w.safetensors")
    return folder


def _config(root: Path, cache_dir: Path, *overrides: str):
    return load_config(
        None,
        [
            "data.name=cub200",
            f"data.root={root}",
            "model.backbone=timm:tf_efficientnet_lite0",
            "model.timm.input_size=64",
            f"model.pretrained={root / 'w.safetensors'}",
            "model.embedding_dim=16",
            "model.freeze_bn=true",
            "cache.prefix=blocks.4",
            f"cache.dir={cache_dir}",
            "train.iterations=3",
            "train.batch_size=4",
            "train.samples_per_class=2",
            "train.eval_every=0",
            "train.keep_snapshots=false",
            "eval.ks=[1,2]",
            *overrides,
        ],
    )


def _trainer(cfg, out: Path) -> Trainer:
    out.mkdir()
    return Trainer(cfg, out, distributed.init_distributed())


# ----------------------------------------------------------------------------- the cut


@pytest.mark.parametrize(
    "make, last, side",
    [
        (lambda: timm.create_model("tf_efficientnet_lite0", num_classes=0), "blocks.4", 64),
        (lambda: timm.create_model("tf_efficientnet_lite0", num_classes=0), "blocks.4.1", 64),
        (lambda: timm.create_model("resnet18", num_classes=0), "layer2", 64),
        (lambda: ConvNetBackbone(3, 32, 8), "blocks.7", 32),  # its forward ends in a mean
    ],
)
def test_tail_of_prefix_is_the_whole_backbone(make, last, side):
    torch.manual_seed(0)
    backbone = make().eval()
    split = PrefixSplit(backbone, last)
    x = torch.randn(3, 3, side, side)
    split.check(x)
    with torch.no_grad():
        full, cut = backbone(x), split.tail(split.prefix_output(x))
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
    # the tail trains the backbone's own parameters, and none of the prefix's
    prefix = {id(p) for m in split.modules for p in m.parameters()}
    tail = {id(p) for p in split._tail.parameters()}
    assert tail and tail <= {id(p) for p in backbone.parameters()} and not tail & prefix


def test_prefix_is_every_module_before_the_cut_along_its_path():
    backbone = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    names = prefix_names(backbone, "blocks.4.1")
    assert names == [
        "conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3",
        "blocks.4.0", "blocks.4.1",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no module 'blocks.9'.*conv_stem, bn1, blocks"):
        prefix_names(backbone, "blocks.9")


def test_a_backbone_whose_forward_is_not_its_modules_in_order_is_refused():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8)
    with pytest.raises(ValueError, match="cannot be cut after 'blocks.1'.*earlier module"):
        PrefixSplit(vit.eval(), "blocks.1").check(torch.randn(1, 3, 32, 32))
    PrefixSplit(vit, "patch_embed").check(torch.randn(1, 3, 32, 32))  # the position embedding
    # is added after patch_embed, by the forward itself: cutting there holds


def test_frozen_prefix_stays_in_eval_mode_and_gets_no_gradient():
    backbone = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    split = PrefixSplit(backbone, "blocks.1")
    split.freeze()
    backbone.train()
    before = backbone.bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 32, 32)).sum().backward()
    assert torch.equal(backbone.bn1.running_mean, before), "prefix BatchNorm kept its statistics"
    assert all(p.grad is None for m in split.modules for p in m.parameters())
    assert backbone.conv_head.weight.grad is not None
    assert backbone.blocks[2].training and not backbone.blocks[1].training


# ----------------------------------------------------------------------------- exactness


@pytest.mark.slow
def test_a_cached_step_equals_the_uncached_step_on_the_same_view(root, tmp_path):
    cache = tmp_path / "cache"
    cached = _trainer(_config(root, cache, "cache.views=3"), tmp_path / "a")
    plain = _trainer(_config(root, cache, "cache.views=0"), tmp_path / "b")
    for p, q in zip(cached.model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q), "same seed, same initial weights"
    train_set = recipe.train_data(cached.cfg)
    for n, (acts, labels, idx) in enumerate(cached.loader):
        views = cached.loader.views_of(n, len(idx))
        images = view_images(train_set, cached.cfg.cache.view_seed, views, idx.numpy())
        a = cached.step(acts, labels, idx)
        b = plain.step(images, labels, idx)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        for (name, p), q in zip(cached.model.named_parameters(), plain.model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    start = _trainer(_config(root, cache, "cache.views=0"), tmp_path / "c").model
    moved = [
        name
        for (name, p), q in zip(cached.model.named_parameters(), start.parameters())
        if not torch.equal(p, q)
    ]
    assert moved and not [m for m in moved if m.startswith(("backbone.blocks.4", "backbone.bn1"))]
    assert any(m.startswith("backbone.blocks.5") for m in moved), "the tail trained"


@pytest.mark.slow
def test_evaluation_from_the_cache_equals_evaluation_from_the_images(root, tmp_path):
    cfg = _config(root, tmp_path / "cache", "cache.views=1")
    cached = engine.train(cfg, tmp_path / "run")
    again, _ = engine.evaluate_checkpoint(tmp_path / "run" / "checkpoint.pt")  # whole network
    for key in ("recall@1", "recall@2", "map@r"):
        assert cached[key] == pytest.approx(again[key], abs=1e-9)
    uncached = engine.train(_config(root, tmp_path / "cache", "cache.views=0"), tmp_path / "u")
    for floor in ("raw_pixels", "untrained", "backbone"):
        assert cached["floors"][floor] == pytest.approx(uncached["floors"][floor], abs=1e-9)


@pytest.mark.slow
def test_a_cached_run_resumes_exactly(root, tmp_path):
    cfg = _config(root, tmp_path / "cache", "cache.views=2", "train.iterations=4")
    whole = engine.train(cfg, tmp_path / "whole")
    first = _config(root, tmp_path / "cache", "cache.views=2", "train.iterations=2")
    engine.train(first, tmp_path / "part")
    resumed = engine.train(None, tmp_path / "part", resume=True, overrides=["train.iterations=4"])
    assert resumed["recall@1"] == whole["recall@1"] and resumed["map@r"] == whole["map@r"]


# ----------------------------------------------------------------------------- reuse and refusal


def _cache_folders(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.is_dir()}


@pytest.mark.slow
def test_a_cache_is_reused_only_for_the_same_weights_and_preprocessing(root, tmp_path, capsys):
    cache = tmp_path / "cache"
    engine.train(_config(root, cache, "cache.views=2"), tmp_path / "r1")
    first = _cache_folders(cache)
    assert len(first) == 2  # the eval set and the train views
    engine.train(_config(root, cache, "cache.views=2", "seed=1"), tmp_path / "r2")
    assert _cache_folders(cache) == first, "another run seed reads the same cache"
    assert "(2 of 2 chunks there)" in capsys.readouterr().err
    engine.train(_config(root, cache, "cache.views=2", "data.hflip=false"), tmp_path / "r3")
    assert len(_cache_folders(cache) - first) == 1, "other train preprocessing: a new train set"
    engine.train(_config(root, cache, "cache.views=2", "model.timm.input_size=48"), tmp_path / "r4")
    assert len(_cache_folders(cache) - first) == 3, "other input size: new eval and train sets"
    for folder in cache.iterdir():
        meta = json.loads((folder / "meta.json").read_text())
        assert {"weights_sha256", "preprocessing", "view_seed", "items_sha256"} <= set(meta)


def test_a_validation_run_reads_its_training_classes_from_the_whole_training_cache(
    root, tmp_path, capsys
):
    cache = tmp_path / "cache"
    engine.train(_config(root, cache, "cache.views=2"), tmp_path / "whole")
    first = _cache_folders(cache)
    val = ["data.val_fraction=0.4", "eval.split=val", "cache.views=1", "eval.ks=[1]"]
    run = _trainer(_config(root, cache, *val), tmp_path / "val")
    assert "which holds them among its 12" in capsys.readouterr().err
    assert len(_cache_folders(cache) - first) == 1  # only the val classes' eval set is new
    train_set = recipe.train_data(run.cfg)
    acts, labels, idx = next(iter(run.loader))
    views = run.loader.views_of(0, len(idx))
    images = view_images(train_set, run.cfg.cache.view_seed, views, idx.numpy())
    prefix = run.prefix.split.prefix_output(images)
    torch.testing.assert_close(acts, prefix, rtol=1e-5, atol=1e-5)  # the very rows of its images


def test_other_weights_get_another_cache(root, tmp_path):
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    engine.train(_config(root, cache, "cache.views=1"), tmp_path / "a")
    first = _cache_folders(cache)
    state = load_file(root / "w.safetensors")
    state["blocks.0.0.conv_dw.weight"] *= 2  # one prefix tensor differs
    save_file(state, tmp_path / "w2.safetensors")
    other = _config(root, cache, "cache.views=1", f"model.pretrained={tmp_path / 'w2.safetensors'}")
    engine.train(other, tmp_path / "b")
    assert len(_cache_folders(cache) - first) == 2  # new eval and train sets; the old untouched


@pytest.mark.slow
def test_a_cut_off_chunk_is_rebuilt_and_a_foreign_meta_refused(root, tmp_path):
    cache = tmp_path / "cache"
    cfg = _config(root, cache, "cache.views=1")
    first = engine.train(cfg, tmp_path / "r1")
    chunk = next(cache.glob("*/v000_c00000.npy"))
    chunk.write_bytes(chunk.read_bytes()[:100])
    again = engine.train(cfg, tmp_path / "r2")
    assert again["recall@1"] == first["recall@1"] and np.load(chunk).ndim == 4
    meta = chunk.parent / "meta.json"
    meta.write_text(meta.read_text().replace('"float32"', '"float16"'))
    with pytest.raises(ValueError, match="holds a cache other than this one"):
        engine.train(cfg, tmp_path / "r3")


def test_a_cache_under_torchrun_is_refused_in_one_line(root, tmp_path):
    from msl_kit.train.prefix_cache.run import FrozenPrefix

    cfg = _config(root, tmp_path, "cache.views=2")
    model = recipe.build_model(cfg)
    with pytest.raises(ValueError, match="does not run under torchrun.*cache.views=0"):
        FrozenPrefix.attach(cfg, model, torch.device("cpu"), world_size=2)


def test_cache_keys_are_checked(root, tmp_path):
    with pytest.raises(ConfigError, match="cache.views.*name its last module in cache.prefix"):
        _config(root, tmp_path, "cache.prefix=", "cache.views=2")
    with pytest.raises(ConfigError, match="cache.dtype"):
        _config(root, tmp_path, "cache.dtype=int8")
    with pytest.raises(ValueError, match="above cache.max_gb = 1e-06"):
        engine.train(_config(root, tmp_path, "cache.views=2", "cache.max_gb=1e-6"), tmp_path / "r")
    assert not (tmp_path / "r").exists(), "refused before the run folder was made"
