"""BN-Inception: the Cadene layout, bit-identical features against pretrainedmodels, a forward
that frees its intermediate maps, and the input sizes it accepts (CPU, small inputs)."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msl_kit.models import build_model
from msl_kit.models.bninception import bninception_accepts

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
    theirs = {
        k: v
        for k, v in reference_bninception.state_dict().items()
        if not k.startswith("last_linear.")
    }
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_pretrainedmodels_file_loads_and_gives_identical_features(
    reference_bninception, bninception_file
):
    model = build_model("bninception", embedding_dim=32, pretrained=bninception_file).eval()
    images = torch.randn(2, 3, 227, 227) * 60
    with torch.no_grad():
        expected = reference_pooled(reference_bninception, images)
        features = model.backbone(images)
        embeddings = model(images)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    torch.testing.assert_close(embeddings, F.normalize(model.head.linear(expected), dim=1))


def test_features_are_bit_identical_to_pretrainedmodels(reference_bninception, bninception_file):
    backbone = build_model("bninception", pretrained=bninception_file).backbone.eval()
    layers = list(backbone.named_children())
    planned = list(backbone._stem) + [n for block in backbone._blocks for b in block for n in b]
    assert sorted(planned) == sorted(name for name, _ in layers)  # every layer, once
    torch.manual_seed(1)
    images = torch.randn(2, 3, 227, 227) * 60
    with torch.no_grad():
        assert torch.equal(backbone.features(images), reference_bninception.features(images))


def live_layer_bytes(network: nn.Module, run) -> int:
    """The most bytes of layer outputs alive at once while `run()` runs (seen at each layer)."""
    alive: list[weakref.ref] = []
    peak = 0

    def hook(module, inputs, output):
        nonlocal peak
        alive.append(weakref.ref(output))
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in (ref() for ref in alive)
            if t is not None
        }
        peak = max(peak, sum(storages.values()))

    handles = [m.register_forward_hook(hook) for m in network.children()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return peak


def test_forward_frees_intermediates(reference_bninception):
    backbone = build_model("bninception").backbone.eval()
    images = torch.randn(1, 3, 64, 64)
    ours = live_layer_bytes(backbone, lambda: backbone(images))
    theirs = live_layer_bytes(reference_bninception, lambda: reference_bninception.features(images))
    # pretrainedmodels keeps every map until features() returns; ours at most one block's worth
    assert ours <= 0.25 * theirs, (ours, theirs)  # measured 0.18 at 64 px, 0.19 at 227


def test_cadene_style_file_loads(reference_bninception, tmp_path):
    # Cadene's port stores BatchNorm vectors as (1, C), has no num_batches_tracked, and keeps
    # the ImageNet classifier.
    state = {
        k: (v.unsqueeze(0) if v.dim() == 1 else v)
        for k, v in reference_bninception.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert "last_linear.weight" in state
    path = tmp_path / "bn_inception-52deb4733.pth"
    torch.save(state, path)
    model = build_model("bninception", pretrained=path).eval()
    images = torch.randn(1, 3, 224, 224) * 60
    with torch.no_grad():
        torch.testing.assert_close(
            model.backbone(images), reference_pooled(reference_bninception, images)
        )


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
