"""Backbones, head, preprocessing, weight loading and frozen BatchNorm (CPU, small inputs)."""
from __future__ import annotations

import http.server
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msl_kit.checkpoint import CheckpointError
from msl_kit.models import (WEIGHT_URLS, EmbeddingModel, bninception_accepts, build_model,
                            default_weight_paths, download_weights)
from msl_kit.transforms import Preprocessing

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference_bninception() -> nn.Module:
    """pretrainedmodels' own BN-Inception with random (seeded, non-trivial) weights and BN stats."""
    import pretrainedmodels

    torch.manual_seed(0)
    ref = pretrainedmodels.bninception(pretrained=None)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, nn.BatchNorm2d):  # make eval-mode BN do something visible
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return ref.eval()


@pytest.fixture(scope="module")
def bninception_file(reference_bninception, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "bninception_ref.pth"
    torch.save(reference_bninception.state_dict(), path)
    return path


def reference_pooled(ref: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return F.adaptive_max_pool2d(ref.features(images), 1).flatten(1)


# --- building ---------------------------------------------------------------------------

def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="bninception, resnet50, convnet"):
        build_model("vgg16")


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="widht"):
        build_model("convnet", widht=32)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("bninception", in_channels=1)


def test_bninception_shapes_and_unit_norm():
    model = build_model("bninception", embedding_dim=64).eval()
    images = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        features = model.backbone(images)
        embeddings = model(images)
    assert features.shape == (2, 1024) and model.feature_dim == 1024
    assert embeddings.shape == (2, 64)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))


def test_bninception_keys_are_the_cadene_layout(reference_bninception):
    ours = build_model("bninception").backbone.state_dict()
    theirs = {k: v for k, v in reference_bninception.state_dict().items()
              if not k.startswith("last_linear.")}
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_pretrainedmodels_file_loads_and_gives_identical_features(reference_bninception, bninception_file):
    model = build_model("bninception", embedding_dim=32, pretrained=bninception_file).eval()
    images = torch.randn(2, 3, 227, 227) * 60
    with torch.no_grad():
        expected = reference_pooled(reference_bninception, images)
        features = model.backbone(images)
        embeddings = model(images)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    torch.testing.assert_close(embeddings, F.normalize(model.head.linear(expected), dim=1))


def test_cadene_style_file_loads(reference_bninception, tmp_path):
    # Cadene's port stores BatchNorm vectors as (1, C), has no num_batches_tracked, and keeps
    # the ImageNet classifier.
    state = {k: (v.unsqueeze(0) if v.dim() == 1 else v) for k, v in reference_bninception.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    assert "last_linear.weight" in state
    path = tmp_path / "bn_inception-52deb4733.pth"
    torch.save(state, path)
    model = build_model("bninception", pretrained=path).eval()
    images = torch.randn(1, 3, 224, 224) * 60
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(images), reference_pooled(reference_bninception, images))


class Payload:
    """Stands for arbitrary pickled code: weights_only loading must refuse it."""


def test_weights_load_with_weights_only(tmp_path):
    state = build_model("convnet", image_size=8, in_channels=1).backbone.state_dict()
    path = tmp_path / "evil.pth"
    torch.save({**state, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="was refused"):
        build_model("convnet", image_size=8, in_channels=1, pretrained=path)


def test_wrong_file_names_the_keys(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys 414 \(conv1_7x7_s2\.bias.*unexpected keys \d+ \(bn1\.bias"):
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
        assert WEIGHT_URLS[name] in message and "model.pretrained" in message
        assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
        assert str(Path.home() / ".torch" / "models") in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*model.pretrained"):
        build_model("resnet50", pretrained=tmp_path / "nowhere.pth")
    assert WEIGHT_URLS["bninception"] == "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"


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
        from msl_kit import cli  # the same through `msl-kit prepare --weights`

        assert cli.main(["prepare", "--weights", "resnet50", "--url", url, "--root", str(tmp_path / "cli")]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert path == tmp_path / "dest" / "resnet50-11ad3fa6.pth"
    assert (tmp_path / "cli" / "resnet50-11ad3fa6.pth").read_bytes() == path.read_bytes()
    model = build_model("resnet50", pretrained=path)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in state.items())


def test_head_width_mismatch_is_explained():
    saved = build_model("convnet", embedding_dim=128, image_size=8, in_channels=1).state_dict()
    with pytest.raises(ValueError, match="model.embedding_dim=128"):
        build_model("convnet", embedding_dim=64, image_size=8, in_channels=1).load_state_dict(saved)


# --- head, parameters, inputs -----------------------------------------------------------

def test_head_init_is_kaiming_fan_out_with_zero_bias():
    torch.manual_seed(0)
    model = build_model("convnet", embedding_dim=512, width=1024, image_size=8)
    weight = model.head.linear.weight
    assert torch.count_nonzero(model.head.linear.bias) == 0
    # fan_out = 512 -> std sqrt(2/512) = 0.0625; fan_in (the PyTorch default) would give 0.044
    assert abs(weight.std().item() - (2 / 512) ** 0.5) < 0.002


def test_every_parameter_is_in_exactly_one_group():
    model = build_model("resnet50")
    backbone = [id(p) for p in model.backbone_parameters()]
    head = [id(p) for p in model.head_parameters()]
    assert len(set(backbone) & set(head)) == 0
    assert sorted(backbone + head) == sorted(id(p) for p in model.parameters())


def test_wrong_channel_count_is_a_clear_error():
    model = build_model("convnet", in_channels=1, image_size=28)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*got \(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))


def test_bninception_size_check_matches_the_network(reference_bninception):
    for side in range(30, 72):
        try:
            with torch.no_grad():
                reference_bninception.features(torch.zeros(1, 3, side, side))
            runs = True
        except RuntimeError:
            runs = False
        assert bninception_accepts(side) == runs, side
    with pytest.raises(ValueError, match="227"):
        build_model("bninception")(torch.zeros(1, 3, 240, 240))


# --- preprocessing ----------------------------------------------------------------------

def test_preprocessing_specs():
    from pretrainedmodels import pretrained_settings

    settings = pretrained_settings["bninception"]["imagenet"]
    assert build_model("bninception").preprocessing == Preprocessing(
        color="BGR", value_range=255.0, mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0),
        input_size=227, resize_size=256, crop_scale=(0.16, 1.0), hflip=True)
    assert settings["input_space"] == "BGR" and settings["mean"] == [104, 117, 128]
    assert build_model("resnet50").preprocessing == Preprocessing(
        color="RGB", value_range=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        input_size=224, resize_size=256, crop_scale=(0.16, 1.0), hflip=True)
    digits = build_model("convnet", in_channels=1, image_size=8).preprocessing
    assert (digits.color, digits.channels, digits.input_size, digits.resize_size) == ("L", 1, 8, 8)
    assert digits.crop_scale == (1.0, 1.0) and not digits.hflip and digits.mean == (0.5,)
    omniglot = build_model("convnet", in_channels=1, image_size=28, resize_size=32).preprocessing
    assert omniglot.resize_size == 32 and not omniglot.hflip and omniglot.crop_scale[1] == 1.0
    cub = build_model("convnet", in_channels=3, image_size=64).preprocessing
    assert (cub.color, cub.channels, cub.crop_scale, cub.hflip) == ("RGB", 3, (0.16, 1.0), True)


@pytest.mark.parametrize("in_channels, size, blocks", [(1, 8, 2), (1, 28, 4), (1, 56, 5), (3, 64, 5)])
def test_convnet_shapes(in_channels, size, blocks):
    model = build_model("convnet", embedding_dim=32, in_channels=in_channels, image_size=size, width=48)
    embeddings = model(torch.randn(4, in_channels, size, size))
    assert embeddings.shape == (4, 32) and model.feature_dim == 48
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.backbone.modules()) == blocks


def test_embeddings_are_float32_under_autocast():
    model = build_model("convnet", in_channels=3, image_size=16)
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
    model = build_model("convnet", in_channels=1, image_size=28, freeze_bn=freeze)
    before = [(bn.running_mean.clone(), bn.running_var.clone(), bn.weight.detach().clone(),
               bn.bias.detach().clone()) for bn in bn_layers(model)]
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


@pytest.mark.parametrize("name, shape", [("convnet", (2, 3, 64, 64)), ("bninception", (2, 3, 64, 64))])
def test_channels_last_matches_contiguous(name, shape):
    torch.manual_seed(0)
    model = build_model(name, embedding_dim=16)
    images = torch.randn(shape)
    expected = model(images)
    model = model.to(memory_format=torch.channels_last)
    embeddings = model(images.to(memory_format=torch.channels_last))
    embeddings.sum().backward()
    torch.testing.assert_close(embeddings, expected, rtol=1e-3, atol=1e-4)
