"""Backbones, head, preprocessing, weight loading and frozen BatchNorm (CPU, small inputs)."""

from __future__ import annotations

import dataclasses
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import BNINCEPTION
from torch import nn

from msl_kit import models
from msl_kit.files.atomic import SafeLoadError
from msl_kit.models import (
    EmbeddingModel,
    build_model,
    default_weight_paths,
    download_weights,
    preprocessing_spec,
)
from msl_kit.models.registry import BACKBONES, published_weights
from msl_kit.preprocessing import Preprocessing

torch.set_num_threads(1)


# --- building ---------------------------------------------------------------------------


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="bninception, resnet50, convnet"):
        build_model("vgg16")


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="widht"):
        build_model("convnet", widht=32)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("bninception", in_channels=1)


class Payload:
    """Stands for arbitrary pickled code: weights_only loading must refuse it."""


def test_weights_load_with_weights_only(tmp_path):
    state = build_model("convnet", input_size=8, in_channels=1).backbone.state_dict()
    path = tmp_path / "evil.pth"
    torch.save({**state, "payload": Payload()}, path)
    with pytest.raises(SafeLoadError, match="was refused"):
        build_model("convnet", input_size=8, in_channels=1, pretrained=path)


def test_wrong_file_names_the_keys(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(
        ValueError, match=r"missing keys 414 \(conv1_7x7_s2\.bias.*unexpected keys \d+ \(bn1\.bias"
    ):
        build_model("bninception", pretrained=path)
    torch.save({"backbone": resnet18().state_dict()}, path)
    with pytest.raises(ValueError, match="bare state_dict"):
        build_model("resnet50", pretrained=path)


def test_missing_file_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for name in ("bninception", "resnet50"):
        with pytest.raises(FileNotFoundError) as info:
            build_model(name, pretrained="default")
        message = str(info.value)
        assert published_weights()[name] in message and "model.pretrained" in message
        assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
        assert str(Path.home() / ".torch" / "models") in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*model.pretrained"):
        build_model("resnet50", pretrained=tmp_path / "nowhere.pth")
    assert (
        published_weights()["bninception"]
        == "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"
    )


def test_default_path_is_used(tmp_path, monkeypatch):
    from torchvision.models import resnet50

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = default_weight_paths("resnet50")[0]
    assert path == tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    path.parent.mkdir(parents=True)
    reference = resnet50().eval()
    torch.save(reference.state_dict(), path)  # with fc.*, which is dropped
    model = build_model("resnet50", pretrained="default").eval()
    reference.fc = nn.Identity()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(images), reference(images))


def test_download_weights_from_a_local_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    state = build_model("resnet50").backbone.state_dict()
    torch.save(state, served / "resnet50-11ad3fa6.pth")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/resnet50-11ad3fa6.pth"
        path = download_weights("resnet50", tmp_path / "dest", url=url, progress=False)
        from msl_kit import cli

        assert (
            cli.main(
                ["prepare", "--weights", "resnet50", "--url", url, "--root", str(tmp_path / "cli")]
            )
            == 0
        )
    finally:
        server.shutdown()
        server.server_close()
    assert path == tmp_path / "dest" / "resnet50-11ad3fa6.pth"
    assert (tmp_path / "cli" / "resnet50-11ad3fa6.pth").read_bytes() == path.read_bytes()
    model = build_model("resnet50", pretrained=path)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in state.items())


def test_head_width_mismatch_is_explained():
    saved = build_model("convnet", embedding_dim=128, input_size=8, in_channels=1).state_dict()
    with pytest.raises(ValueError, match="model.embedding_dim=128"):
        build_model("convnet", embedding_dim=64, input_size=8, in_channels=1).load_state_dict(saved)


# --- head, parameters, inputs -----------------------------------------------------------


def test_head_init_is_kaiming_fan_out_with_zero_bias():
    torch.manual_seed(0)
    model = build_model("convnet", embedding_dim=512, width=1024, input_size=8)
    weight = model.head.linear.weight
    assert torch.count_nonzero(model.head.linear.bias) == 0
    # fan_out = 512 -> std sqrt(2/512) = 0.0625; fan_in (the PyTorch default) would give 0.044
    assert abs(weight.std().item() - (2 / 512) ** 0.5) < 0.002


def test_wrong_channel_count_is_a_clear_error():
    model = build_model("convnet", in_channels=1, input_size=28)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*got \(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))


# --- preprocessing ----------------------------------------------------------------------


def test_preprocessing_specs():
    from pretrainedmodels import pretrained_settings

    settings = pretrained_settings["bninception"]["imagenet"]
    bninception = dataclasses.replace(BNINCEPTION, crop="two_step")  # the released one, by hand
    assert preprocessing_spec("bninception") == bninception
    assert build_model("bninception").preprocessing == bninception
    assert (settings["input_space"], settings["input_range"]) == ("BGR", [0, 255])
    assert settings["mean"] == [104, 117, 128] and settings["std"] == [1, 1, 1]
    resnet = Preprocessing(
        color="RGB",
        value_range=1.0,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        input_size=224,
        resize_size=256,
        crop_scale=(0.16, 1.0),
        hflip=True,
        crop="two_step",
    )
    assert preprocessing_spec("resnet50") == build_model("resnet50").preprocessing == resnet
    # the convnet options are ignored by the backbones whose spec is fixed
    assert preprocessing_spec("resnet50", input_size=8, in_channels=1) == resnet
    digits = build_model("convnet", in_channels=1, input_size=8).preprocessing
    assert digits == preprocessing_spec("convnet", in_channels=1, input_size=8)
    assert (digits.color, digits.channels, digits.input_size, digits.resize_size) == ("L", 1, 8, 8)
    assert digits.crop_scale == (1.0, 1.0) and not digits.hflip and digits.mean == (0.5,)
    omniglot = build_model("convnet", in_channels=1, input_size=28, resize_size=32).preprocessing
    assert omniglot == preprocessing_spec("convnet", in_channels=1, input_size=28, resize_size=32)
    assert omniglot.resize_size == 32 and not omniglot.hflip and omniglot.crop_scale[1] == 1.0
    cub = build_model("convnet", in_channels=3, input_size=64).preprocessing
    assert (cub.color, cub.channels, cub.crop_scale, cub.hflip) == ("RGB", 3, (0.16, 1.0), True)
    assert cub.crop == "fused"  # the CPU recipes keep the faster one-resampling crop
    assert dataclasses.replace(bninception, crop="fused").crop == "fused"
    with pytest.raises(ValueError, match="two_step"):
        dataclasses.replace(bninception, crop="bicubic")
    with pytest.raises(ValueError, match="in_channels"):
        preprocessing_spec("convnet", in_channels=2)
    with pytest.raises(ValueError, match="bninception, resnet50, convnet"):
        preprocessing_spec("vgg16")


def test_preprocessing_spec_builds_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("preprocessing_spec built a network")

    for name, spec in list(BACKBONES.items()):
        monkeypatch.setitem(BACKBONES, name, dataclasses.replace(spec, build=refuse))
    monkeypatch.setattr(models.builder, "load_backbone_weights", refuse)
    for name in BACKBONES:
        assert isinstance(preprocessing_spec(name), Preprocessing)


@pytest.mark.parametrize(
    "in_channels, size, blocks", [(1, 8, 2), (1, 28, 4), (1, 56, 5), (3, 64, 5)]
)
def test_convnet_shapes(in_channels, size, blocks):
    model = build_model(
        "convnet", embedding_dim=32, in_channels=in_channels, input_size=size, width=48
    )
    embeddings = model(torch.randn(4, in_channels, size, size))
    assert embeddings.shape == (4, 32) and model.feature_dim == 48
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.backbone.modules()) == blocks


def test_embeddings_are_float32_under_autocast():
    model = build_model("convnet", in_channels=3, input_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = model(torch.randn(4, 3, 16, 16))
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))


# --- frozen BatchNorm and channels_last -------------------------------------------------


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def train_steps(model: EmbeddingModel, images: torch.Tensor, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model.eval()
        model.train()  # every train() call must keep BN frozen, not just the first
        optimizer.zero_grad()
        embeddings = model(images)
        (embeddings @ embeddings.T).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_bn_keeps_statistics_and_learns_affine(freeze):
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, input_size=28, freeze_bn=freeze)
    before = [
        (
            bn.running_mean.clone(),
            bn.running_var.clone(),
            bn.weight.detach().clone(),
            bn.bias.detach().clone(),
        )
        for bn in bn_layers(model)
    ]
    train_steps(model, torch.randn(8, 1, 28, 28) * 2 + 1)
    assert model.training
    for bn, (mean, var, weight, bias) in zip(bn_layers(model), before):
        assert bn.training is not freeze
        assert torch.equal(bn.running_mean, mean) is freeze
        assert torch.equal(bn.running_var, var) is freeze
        assert not torch.equal(bn.weight, weight) and not torch.equal(bn.bias, bias)


def test_frozen_bn_on_bninception():
    model = build_model("bninception", embedding_dim=16, freeze_bn=True)
    stats = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    first_bn = model.backbone.conv1_7x7_s2_bn
    gamma = first_bn.weight.detach().clone()
    train_steps(model, torch.randn(4, 3, 64, 64) * 50, steps=1)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in stats.items())
    assert not torch.equal(first_bn.weight, gamma)


@pytest.mark.parametrize(
    "name, shape", [("convnet", (2, 3, 64, 64)), ("bninception", (2, 3, 64, 64))]
)
def test_channels_last_matches_contiguous(name, shape):
    torch.manual_seed(0)
    options = {"in_channels": 3, "input_size": 64} if name == "convnet" else {}
    model = build_model(name, embedding_dim=16, **options)
    images = torch.randn(shape)
    expected = model(images)
    model = model.to(memory_format=torch.channels_last)
    embeddings = model(images.to(memory_format=torch.channels_last))
    embeddings.sum().backward()
    torch.testing.assert_close(embeddings, expected, rtol=1e-3, atol=1e-4)
