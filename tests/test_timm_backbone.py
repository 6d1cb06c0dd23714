"""timm backbones: the spec equals timm's resolved data config, weights written to a file load
and reproduce timm's features exactly, and every user error is one line. No network."""

from __future__ import annotations

import math
import time

import pytest
import torch

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from msl_kit.models.timm_backbones import (  # noqa: E402
    build_timm_backbone,
    check_timm_name,
    load_timm_weights,
    timm_preprocessing,
    weights_source,
)

SMALL = ["resnet18", "vit_tiny_patch16_224"]  # fast on the CPU


@pytest.mark.parametrize(
    "name", ["vit_small_patch16_224.dino", "resnet18", "convnext_tiny", "resnet50.a1_in1k"]
)
def test_spec_equals_resolve_data_config_of_the_model(name):
    model = timm.create_model(name, pretrained=False)
    want = timm.data.resolve_data_config({}, model=model)
    spec = timm_preprocessing(name)
    assert (3, spec.input_size, spec.input_size) == want["input_size"]
    assert spec.interpolation == want["interpolation"]
    assert spec.mean == pytest.approx(want["mean"]) and spec.std == pytest.approx(want["std"])
    assert spec.resize_size == math.floor(want["input_size"][1] / want["crop_pct"])
    assert spec.color == "RGB" and spec.value_range == 1.0


def test_dino_spec_values():
    spec = timm_preprocessing("vit_small_patch16_224.dino")
    # timm's config for DINO ViT-S/16: 224 px, bicubic, crop_pct 0.9, ImageNet mean / std
    assert (spec.input_size, spec.resize_size, spec.interpolation) == (224, 248, "bicubic")
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))


def test_spec_does_not_build_the_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("timm_preprocessing built a model")

    monkeypatch.setattr(timm, "create_model", refuse)
    assert timm_preprocessing("vit_small_patch16_224.dino").input_size == 224


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_reproduces_timm_features_exactly(tmp_path, name, suffix):
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False)  # with its classifier, as files have
    state = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(1)  # a different random init, so loading must change the weights
    backbone = build_timm_backbone(name, pretrained=str(path)).eval()
    source.eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = source.forward_head(source.forward_features(images), pre_logits=True)
        got = backbone(images)
    assert got.shape == (2, backbone.feature_dim) == want.shape
    assert torch.equal(got, want)


def test_random_init_and_feature_dim():
    backbone = build_timm_backbone("resnet18", pretrained=None)
    assert backbone.feature_dim == 512 and backbone.preprocessing.input_size == 224
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_global_pool_override():
    # Proxy-Anchor's ResNet-50 adds average and max pooling; timm's "avgmax" is their mean.
    backbone = build_timm_backbone("resnet18", global_pool="avgmax").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = backbone.forward_features(images)
        want = 0.5 * (maps.mean((2, 3)) + maps.amax((2, 3)))
        torch.testing.assert_close(backbone(images), want)


def test_feature_dim_follows_a_pre_logits_layer():
    backbone = build_timm_backbone("mobilenetv3_small_050")  # 1024-wide pre-logits layer
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, backbone.feature_dim) and backbone.feature_dim != backbone.num_features


def test_a_checkpoint_wrapped_by_ddp_and_a_dict_loads(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    load_timm_weights(model, path)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values())
    )


def test_bad_name_lists_close_names_quickly():
    start = time.perf_counter()
    with pytest.raises(ValueError) as e:
        build_timm_backbone("vit_small_patch16_224.dinoo", pretrained=None)
    elapsed = time.perf_counter() - start
    message = str(e.value)
    assert "\n" not in message and "vit_small_patch16_224.dino" in message
    assert elapsed < 2.0, elapsed
    with pytest.raises(ValueError, match="close names: .*resnet50"):
        check_timm_name("resnet5O")
    with pytest.raises(ValueError, match="no model 'resnet18.no_such_tag'"):
        timm_preprocessing("resnet18.no_such_tag")


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass the path") as e:
        build_timm_backbone("resnet18", pretrained=str(tmp_path / "nope.safetensors"))
    assert "\n" not in str(e.value)


def test_wrong_keys_are_listed(tmp_path):
    state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    path = tmp_path / "bad.safetensors"
    safetensors_torch.save_file(state, str(path))
    with pytest.raises(ValueError) as e:
        build_timm_backbone("resnet18", pretrained=str(path))
    message = str(e.value)
    assert "\n" not in message
    assert "missing keys 1 (layer4.1.bn2.weight)" in message
    assert "unexpected keys 1 (extra.weight)" in message
    assert "shape mismatches 1 (conv1.weight)" in message


def test_another_models_file_is_refused(tmp_path):
    path = tmp_path / "vit.safetensors"
    safetensors_torch.save_file(
        timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), str(path)
    )
    with pytest.raises(ValueError, match="does not fit timm model ResNet"):
        build_timm_backbone("resnet18", pretrained=str(path))


def test_corrupt_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        build_timm_backbone("resnet18", pretrained=str(bad))
    pickled = tmp_path / "obj.pt"
    torch.save({"weights": object()}, pickled)  # would run code if unpickled freely
    with pytest.raises(Exception, match="refused"):
        build_timm_backbone("resnet18", pretrained=str(pickled))


def test_offline_hub_says_which_file_to_fetch(monkeypatch):
    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return original(name, pretrained=False, **kwargs)

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConnectionError) as e:
        build_timm_backbone("vit_small_patch16_224.dino", pretrained="hub")
    message = str(e.value)
    assert "\n" not in message and "model.pretrained=PATH" in message
    assert (
        "https://huggingface.co/timm/vit_small_patch16_224.dino/resolve/main/model.safetensors"
        in message
    )
    assert weights_source("vit_small_patch16_224.dino") in message
