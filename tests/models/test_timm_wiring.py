"""timm backbones through the config, the recipe, build_model and the CLI; the model.* keys of
the ViT / ResNet-50 recipes; the frozen-backbone floor. No network: random weights, and
weights files the tests write."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from msl_kit import metrics  # noqa: E402
from msl_kit.cli import app as cli  # noqa: E402
from msl_kit.models.builder import build_model, preprocessing_spec  # noqa: E402
from msl_kit.models.convnet import ConvNetBackbone  # noqa: E402
from msl_kit.reports import paper  # noqa: E402
from msl_kit.train import engine, recipe  # noqa: E402
from msl_kit.train.config import config_text, load_config  # noqa: E402
from msl_kit.train.validation import ConfigError  # noqa: E402

QUICK = ["train.threads=1", "train.eval_every=0", "train.checkpoint_every=0"]


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_cli_trains_a_timm_backbone_on_the_embedded_grey_images(tmp_path, capsys, name):
    # The command; model.input_size=32 keeps the CPU test to seconds (ViT: pos-embed
    # grid 2x2; the 1-channel Omniglot images become RGB for the RGB backbone). ViT-Tiny is
    # the recipes' ViT-S/16 at a quarter of the width (the same VisionTransformer class and
    # wiring), a quarter of the cost of its two passes over the test split.
    out = tmp_path / "run"
    args = [
        f"model.backbone=timm:{name}",
        "model.pretrained=none",
        "train.iterations=3",
        "model.timm.input_size=32",
        *QUICK,
    ]
    assert cli.main(["train", *_sets(*args), "--out", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert 0 <= results["recall@1"] <= 1 and results["iteration"] == 3
    assert set(results["floors"]) == {"raw_pixels", "untrained"}  # no weights, no backbone floor
    assert f"timm:{name} + ms loss (final)" in capsys.readouterr().out
    assert load_config(out / "config.yaml").model.backbone == f"timm:{name}"


def test_bad_timm_name_is_one_line_with_close_names_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", *_sets("model.backbone=timm:vit_smal_patch16_224"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and not out.exists()
    assert err.startswith("error: model.backbone = 'timm:vit_smal_patch16_224'")
    assert "close names: vit_small_patch16_224" in err


def test_offline_hub_is_one_cli_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    original = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return original(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    out = tmp_path / "run"
    sets = _sets("model.backbone=timm:resnet18", "model.pretrained=hub")
    assert cli.main(["train", *sets, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: could not download timm weights for resnet18")
    assert "resnet18.a1_in1k/resolve/main/model.safetensors" in err and not out.exists()


def test_dino_spec_through_the_config_equals_timms_resolved_data_config():
    model = timm.create_model("vit_small_patch16_224.dino", pretrained=False)
    want = timm.data.resolve_data_config({}, model=model)
    cfg = load_config(None, ["model.backbone=timm:vit_small_patch16_224.dino"])
    for spec in (recipe.preprocessing(cfg), preprocessing_spec(cfg.model.backbone)):
        assert (3, spec.input_size, spec.input_size) == want["input_size"]
        assert spec.interpolation == want["interpolation"] == "bicubic"
        assert spec.mean == pytest.approx(want["mean"]) and spec.std == pytest.approx(want["std"])
        assert spec.resize_size == math.floor(224 / want["crop_pct"]) == 248
    # Hyp-ViT's eval resize (the CUB recipe's model.resize_size) replaces timm's 248
    cfg = load_config(
        None, ["model.backbone=timm:vit_small_patch16_224.dino", "model.timm.resize_size=256"]
    )
    assert recipe.preprocessing(cfg).resize_size == 256


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_weights_file_through_build_model_reproduces_timms_features_exactly(tmp_path, name):
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False).eval()  # with its classifier
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    torch.manual_seed(1)
    cfg = load_config(None, [f"model.backbone=timm:{name}", f"model.pretrained={path}"])
    model = recipe.build_model(cfg).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = source.forward_head(source.forward_features(images), pre_logits=True)
        assert torch.equal(model.backbone(images), want)
        assert model(images).shape == (2, cfg.model.embedding_dim)


def test_pretrained_words_fit_the_backbone():
    with pytest.raises(ConfigError, match="takes no default: use hub"):
        load_config(None, ["model.backbone=timm:resnet18", "model.pretrained=default"])
    with pytest.raises(ConfigError, match="convnet takes no hub: use default"):
        load_config(None, ["model.pretrained=hub"])
    for word in ("none", None):  # random init, for timm and for the convnet
        torch.manual_seed(0)
        a = build_model("timm:resnet18", 8, word).backbone.conv1.weight
        torch.manual_seed(0)
        assert torch.equal(a, build_model("timm:resnet18", 8, None).backbone.conv1.weight)
        assert build_model("convnet", 8, word, input_size=8) is not None


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.head_init=xavier", "use one of kaiming_fan_out, orthogonal"),
        ("model.freeze_bn_affine=true", "goes with model.freeze_bn=true"),
    ],
)
def test_model_keys_are_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_timm_section_is_left_out_of_a_run_of_another_backbone():
    cfg = load_config(None, ["model.timm.global_pool=avg", "model.timm.input_size=64"])
    assert cfg.model.params == load_config().model.params and "timm" not in config_text(cfg)


def test_timm_sizes_and_pooling_are_checked_at_load():
    timm_r18 = "model.backbone=timm:resnet18"
    with pytest.raises(ConfigError, match="model.timm.global_pool = 'gem'"):
        load_config(None, [timm_r18, "model.timm.global_pool=gem"])
    with pytest.raises(ConfigError, match="resize_size = 100 is smaller than .* input size 224"):
        load_config(None, [timm_r18, "model.timm.resize_size=100"])
    cfg = load_config(None, [timm_r18, "model.timm.input_size=64"])
    spec = recipe.preprocessing(cfg)
    crop_pct = timm.models.get_pretrained_cfg("resnet18").crop_pct  # 0.95 (a1_in1k)
    assert (spec.input_size, spec.resize_size) == (64, math.floor(64 / crop_pct)) == (64, 67)


def test_global_pool_reaches_the_timm_model():
    cfg = load_config(None, ["model.backbone=timm:resnet18", "model.timm.global_pool=avgmax"])
    backbone = recipe.build_model(cfg).backbone.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = backbone.forward_features(images)
        want = 0.5 * (maps.mean((2, 3)) + maps.amax((2, 3)))
        torch.testing.assert_close(backbone(images), want)
    with pytest.raises(ValueError, match="does not take global_pool='token'") as e:
        build_model("timm:resnet18", 8, global_pool="token")
    assert "\n" not in str(e.value)


def test_vit_input_size_builds_its_patch_grid():
    model = build_model("timm:vit_tiny_patch16_224", 8, input_size=32)
    assert model.backbone.patch_embed.grid_size == (2, 2)
    assert model.preprocessing.input_size == 32
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 8)


def test_head_inits():
    torch.manual_seed(0)
    ortho = build_model("timm:resnet18", 128, head_init="orthogonal").head.linear
    w = ortho.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(128), atol=1e-5, rtol=0)  # orthonormal rows
    assert not ortho.bias.any()
    kaiming = build_model("timm:resnet18", 128).head.linear.weight.detach()
    assert kaiming.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)  # fan_out = 128
    assert not torch.allclose(kaiming @ kaiming.T, torch.eye(128), atol=0.1)


def test_frozen_modules_and_batchnorm_affine_do_not_train():
    model = build_model(
        "timm:resnet18", 16, freeze_bn=True, freeze_bn_affine=True, freeze_modules=["layer1"]
    )
    params = dict(model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    bn = {
        f"backbone.{name}.{p}"
        for name, m in model.backbone.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p, _ in m.named_parameters(recurse=False)
    }
    assert frozen == bn | {n for n in params if n.startswith("backbone.layer1.")}
    cfg = load_config(None, ["model.backbone=timm:resnet18"])
    optimizer = recipe.build_optimizer(model, cfg)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in params.items() if n not in frozen}
    before = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert all(torch.equal(params[n], before[n]) for n in frozen)
    assert not torch.equal(params["backbone.conv1.weight"], before["backbone.conv1.weight"])


def test_unknown_frozen_module_is_one_line_naming_the_modules():
    with pytest.raises(
        ValueError, match="has no module 'patch_embed'; its top-level modules are"
    ) as e:
        build_model("timm:resnet18", 8, freeze_modules=["patch_embed"])
    assert "conv1, bn1" in str(e.value) and "\n" not in str(e.value)
    vit = build_model("timm:vit_tiny_patch16_224", 8, freeze_modules=["patch_embed"])
    assert not any(p.requires_grad for p in vit.backbone.patch_embed.parameters())
    assert all(p.requires_grad for p in vit.backbone.blocks.parameters())


def test_run_records_the_model_keys_and_keeps_frozen_weights(tmp_path):
    keys = [
        "model.freeze_modules=[blocks.0]",
        "model.head_init=orthogonal",
        "train.backbone_lr_mult=0.5",
        "train.iterations=2",
        "eval.floors=false",
        *QUICK,
    ]
    cfg = load_config("digits", keys)
    out = tmp_path / "run"
    engine.train(cfg, out)
    shown = (out / "config.yaml").read_text()
    assert shown == config_text(cfg) and load_config(out / "config.yaml") == cfg
    assert "freeze_modules:\n  - blocks.0" in shown and "head_init: orthogonal" in shown
    assert "backbone_lr_mult: 0.5" in shown
    first = torch.load(sorted((out / "snapshots").glob("*.pt"))[0], weights_only=True)
    last = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    key = "backbone.blocks.0.weight"
    first = first.get("model", first)
    assert torch.equal(first[key], last[key])
    assert not torch.equal(first["backbone.blocks.4.weight"], last["backbone.blocks.4.weight"])


def test_backbone_floor_is_the_loaded_features_l2_normalised(tmp_path, capsys):
    torch.manual_seed(3)
    source = ConvNetBackbone(in_channels=1, image_size=8, width=64)
    path = tmp_path / "convnet.pt"
    torch.save(source.state_dict(), path)
    out = tmp_path / "run"
    sets = _sets(f"model.pretrained={path}", "train.iterations=2", *QUICK)
    assert cli.main(["train", "--config", "digits", *sets, "--out", str(out)]) == 0
    floors = json.loads((out / "metrics.json").read_text())["floors"]
    assert set(floors) == {"raw_pixels", "untrained", "backbone"}
    # Naive reference: the file's weights in a fresh convnet, features of every eval image
    cfg = load_config(out / "config.yaml")
    source.eval()
    data = recipe.eval_data(cfg).query
    with torch.no_grad():
        feats = torch.cat([source(img[None]) for img, _, _ in data])
    want = metrics.retrieval_metrics(
        torch.nn.functional.normalize(feats, dim=1), torch.as_tensor(data.labels), ks=(1, 2, 4, 8)
    )
    for key in ("recall@1", "recall@8", "map@r"):  # one image at a time here: float noise
        assert floors["backbone"][key] == pytest.approx(want[key], abs=1e-4)
    assert floors["backbone"] != floors["untrained"]
    printed = capsys.readouterr().out
    assert "convnet as loaded (features)" in printed and "convnet + untrained head" in printed
    table = paper.results_table(out)
    assert table.loc["backbone as loaded", "R@1"] == pytest.approx(100 * want["recall@1"], abs=0.01)


def test_floors_listed_by_name(tmp_path):
    path = tmp_path / "convnet.pt"
    torch.save(ConvNetBackbone(in_channels=1, image_size=8, width=64).state_dict(), path)
    keys = [f"model.pretrained={path}", "train.iterations=1", "eval.floors=[backbone]", *QUICK]
    results = engine.train(load_config("digits", keys), tmp_path / "run")
    assert set(results["floors"]) == {"backbone"}  # no pixel pass (SOP's recipe)
    keys[0] = "model.pretrained=none"  # the backbone floor applies only to loaded weights
    assert engine.train(load_config("digits", keys), tmp_path / "none")["floors"] == {}
    with pytest.raises(ConfigError, match="use one of raw_pixels, untrained, backbone"):
        load_config("digits", ["eval.floors=[pixels]"])
    assert load_config("digits", ["eval.floors=[raw_pixels, untrained]"]).eval.floors == [
        "raw_pixels",
        "untrained",
    ]


@pytest.mark.subprocess
@pytest.mark.slow
def test_timm_is_imported_only_on_use():
    code = (
        "import sys, msl_kit, msl_kit.models, msl_kit.models.registry, msl_kit.train.config\n"
        "from msl_kit.train.config import load_config\n"
        "load_config(None)\n"
        "assert 'timm' not in sys.modules, 'timm imported'\n"
        "load_config(None, ['model.backbone=timm:resnet18'])\n"
        "assert 'timm' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
