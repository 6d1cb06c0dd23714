"""build_transform against torchvision's own Resize / RandomResizedCrop / CenterCrop / ToTensor /
Normalize composition, and image decoding for every PIL mode a dataset may hold."""

from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BNINCEPTION
from PIL import Image
from torchvision import transforms as tv

from msl_kit.datasets.transforms import (
    CorruptImageError,
    ImageTransform,
    build_transform,
    load_image,
    to_mode,
)
from msl_kit.models import preprocessing_spec
from msl_kit.preprocessing import Preprocessing

RESNET = Preprocessing()  # RGB, ImageNet mean / std, 224 / 256
DIGITS = Preprocessing(
    color="L",
    mean=(0.5,),
    std=(0.5,),
    input_size=8,
    resize_size=8,
    crop_scale=(1.0, 1.0),
    hflip=False,
)


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth gradients plus a few blobs (resampling differences stay small)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for c in range(3):
        a, b, f = rng.uniform(0.5, 2, size=3)
        channels.append(
            0.5 + 0.25 * np.sin(a * 6 * x + c) * np.cos(b * 5 * y) + 0.2 * np.sin(f * 9 * (x + y))
        )
    return Image.fromarray((np.clip(np.stack(channels, -1), 0, 1) * 255).astype(np.uint8), "RGB")


def torchvision_pipeline(spec: Preprocessing, train: bool) -> tv.Compose:
    """The plain composition build_transform must match."""
    geometry = (
        [
            tv.Resize(spec.resize_size),
            tv.RandomResizedCrop(spec.input_size, scale=spec.crop_scale),
            tv.RandomHorizontalFlip(),
        ]
        if train
        else [tv.Resize(spec.resize_size), tv.CenterCrop(spec.input_size)]
    )
    post = [tv.ToTensor()]
    if spec.color == "BGR":
        post.append(tv.Lambda(lambda t: t.flip(0)))
    post += [tv.Lambda(lambda t: t * spec.value_range), tv.Normalize(spec.mean, spec.std)]
    return tv.Compose(geometry + post)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (227, 227), (500, 375), (120, 400)])
@pytest.mark.parametrize("scale", [(0.16, 1.0), (1.0, 1.0)])
def test_crop_box_draws_what_torchvision_draws(size, scale):
    spec = Preprocessing(crop_scale=scale)
    ours, reference = (
        ImageTransform(spec, train=True),
        tv.Resize(spec.resize_size)(Image.new("RGB", size)),
    )
    rw, rh = reference.size
    for seed in range(20):
        torch.manual_seed(seed)
        box = ours.crop_box(size)
        torch.manual_seed(seed)
        i, j, h, w = tv.RandomResizedCrop.get_params(reference, list(scale), [3 / 4, 4 / 3])
        sx, sy = size[0] / rw, size[1] / rh
        assert box == pytest.approx((j * sx, i * sy, (j + w) * sx, (i + h) * sy))


# two_step is torchvision's geometry: equal up to float rounding. fused resamples once: on
# smooth synthetic images within these bounds (real photos differ more, see below).
TOLERANCE = {"two_step": (1e-6, 1e-6, 1e-6), "fused": (0.002, 0.03, 0.006)}


@pytest.mark.parametrize("crop", ["two_step", "fused"])
@pytest.mark.parametrize("spec", [BNINCEPTION, RESNET], ids=["bninception", "resnet"])
@pytest.mark.parametrize("size", [(320, 240), (227, 227), (180, 260)])
def test_eval_matches_torchvision(spec, size, crop):
    spec = dataclasses.replace(spec, crop=crop)
    img = smooth_image(*size)
    ours = build_transform(spec, train=False)(img)
    ref = torchvision_pipeline(spec, train=False)(img)
    assert ours.shape == ref.shape == (3, spec.input_size, spec.input_size)
    assert ours.dtype == torch.float32
    unit = spec.value_range / np.mean(spec.std)  # one full pixel range, in normalised units
    diff = (ours - ref).abs() / unit
    mean_bound, max_bound, _ = TOLERANCE[crop]
    assert diff.mean() <= mean_bound and diff.max() <= max_bound


@pytest.mark.parametrize("crop", ["two_step", "fused"])
@pytest.mark.parametrize("spec", [BNINCEPTION, RESNET], ids=["bninception", "resnet"])
def test_train_matches_torchvision_with_the_same_seed(spec, crop):
    spec = dataclasses.replace(spec, crop=crop)
    img = smooth_image(400, 300, seed=3)
    ours_t, ref_t = build_transform(spec, train=True), torchvision_pipeline(spec, train=True)
    unit = spec.value_range / np.mean(spec.std)
    for seed in range(8):
        torch.manual_seed(seed)
        ours = ours_t(img)
        torch.manual_seed(seed)
        ref = ref_t(img)
        diff = (ours - ref).abs() / unit
        assert diff.mean() <= TOLERANCE[crop][2], (seed, diff.mean())


# --- real photos (the CUB subset) ---------------------------------------------------------


@pytest.fixture(scope="session")
def cub_photos(shared_data) -> dict[str, Image.Image]:
    """Six real CUB photos (227 px, from three species), and two of them rescaled to 500x375
    and 640x427 so that Resize(256) shrinks rather than enlarges."""
    archive = shared_data / "CUB_200_2011_subset100.tgz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent")
    photos: dict[str, Image.Image] = {}
    per_class: dict[str, int] = {}
    with tarfile.open(archive, "r:gz") as tar:  # the first species come first: a short read
        for member in tar:
            species = Path(member.name).parent.name
            if not member.name.endswith(".jpg") or per_class.get(species, 0) == 2:
                continue
            with Image.open(tar.extractfile(member)) as img:
                photos[Path(member.name).name] = img.convert("RGB")
            per_class[species] = per_class.get(species, 0) + 1
            if len(photos) == 6:
                break
    first, second = list(photos.values())[:2]
    photos["wide500"] = first.resize((500, 375), Image.Resampling.LANCZOS)
    photos["wide640"] = second.resize((640, 427), Image.Resampling.LANCZOS)
    return photos


def _mean_abs_diffs(spec: Preprocessing, photo: Image.Image, seeds: int = 20) -> list[float]:
    """Mean |ours - torchvision two-step| per seed, as a fraction of the pixel range."""
    ours_t, ref_t = build_transform(spec, train=True), torchvision_pipeline(spec, train=True)
    unit = spec.value_range / np.mean(spec.std)
    diffs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        ours = ours_t(photo)
        torch.manual_seed(seed)
        diffs.append(float((ours - ref_t(photo)).abs().mean() / unit))
    return diffs


@pytest.mark.parametrize("backbone", ["bninception", "resnet50"])
def test_recipe_train_crop_is_torchvisions_two_step_on_real_photos(cub_photos, backbone):
    spec = preprocessing_spec(backbone)
    assert spec.crop == "two_step"
    assert {p.size for p in cub_photos.values()} == {(227, 227), (500, 375), (640, 427)}
    for name, photo in cub_photos.items():
        diffs = _mean_abs_diffs(spec, photo)
        assert max(diffs) <= 0.005, (name, max(diffs))  # measured: 0 (BGR), 1e-7 (RGB)


def test_fused_crop_differs_from_two_step_on_real_photos(cub_photos):
    spec = dataclasses.replace(preprocessing_spec("bninception"), crop="fused")
    diffs = [d for photo in cub_photos.values() for d in _mean_abs_diffs(spec, photo, 5)]
    # the same crop box, resampled once: close on average, never equal (docs/models.md)
    assert 0 < np.median(diffs) < 0.03 and max(diffs) < 0.1, (np.median(diffs), max(diffs))


def test_bninception_is_bgr_in_0_255_minus_mean():
    red = Image.new("RGB", (300, 300), (200, 10, 20))
    out = build_transform(BNINCEPTION, train=False)(red)
    expected = torch.tensor([20 - 104.0, 10 - 117.0, 200 - 128.0]).view(3, 1, 1).expand(3, 227, 227)
    assert torch.allclose(out, expected, atol=1e-3)


def test_resnet_is_rgb_in_0_1_normalised():
    colour = Image.new("RGB", (256, 256), (255, 0, 128))
    out = build_transform(RESNET, train=False)(colour)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), RESNET.mean, RESNET.std)]
    assert torch.allclose(out[:, 5, 5], torch.tensor(expected), atol=1e-5)


def test_grey_spec_gives_one_channel_and_digits_train_crops_nothing():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    img = Image.fromarray(pixels, "L")
    train, test = build_transform(DIGITS, train=True), build_transform(DIGITS, train=False)
    expected = torch.from_numpy(pixels / 255.0 * 2 - 1).float().unsqueeze(0)
    for seed in range(5):
        torch.manual_seed(seed)
        assert torch.allclose(train(img), expected, atol=1e-6)
    assert torch.allclose(test(img), expected, atol=1e-6)
    colour = build_transform(DIGITS, train=False)(Image.new("RGB", (8, 8), (0, 255, 0)))
    assert colour.shape == (1, 8, 8) and torch.allclose(
        colour, torch.full((1, 8, 8), 0.587 * 2 - 1), atol=0.01
    )


def test_hflip_flips_about_half_the_time_and_never_when_off():
    asym = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), "L")
    spec = Preprocessing(
        color="L", mean=(0.0,), std=(1.0,), input_size=64, resize_size=64, crop_scale=(1.0, 1.0)
    )
    torch.manual_seed(0)
    flips = [bool(build_transform(spec, True)(asym)[0, 0, 0] > 0.5) for _ in range(400)]
    assert 0.4 < np.mean(flips) < 0.6
    no_flip = build_transform(Preprocessing(**{**spec.__dict__, "hflip": False}), True)
    assert not any(no_flip(asym)[0, 0, 0] > 0.5 for _ in range(50))


def test_transform_pickles_for_dataloader_workers():
    t = build_transform(BNINCEPTION, train=True)
    img = smooth_image(300, 260)
    clone = pickle.loads(pickle.dumps(t))
    torch.manual_seed(1)
    a = t(img)
    torch.manual_seed(1)
    assert torch.equal(a, clone(img))


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="color"):
        build_transform(Preprocessing(color="HSV"), True)
    with pytest.raises(ValueError, match="smaller than input_size"):
        build_transform(Preprocessing(resize_size=200, input_size=224), True)
    with pytest.raises(ValueError, match="2 values for 3"):
        build_transform(Preprocessing(mean=(0.5, 0.5)), True)


# ----------------------------------------------------------------------------- decoding


def _saved(img: Image.Image, path, fmt: str, **kw):
    img.save(path, fmt, **kw)
    return path


def test_modes_convert_as_a_viewer_shows_them(tmp_path):
    palette = Image.new("P", (6, 6))
    palette.putpalette([10, 200, 30] + [0] * 765)
    transparent_p = palette.copy()
    transparent_p.info["transparency"] = 0
    rgba = Image.new("RGBA", (6, 6), (255, 0, 0, 128))
    rgba.putpixel((0, 0), (0, 0, 255, 0))
    sixteen = Image.fromarray(np.array([[0, 128 * 257], [65535, 1000]], dtype=np.uint16))
    cases = {
        "grey.png": (
            _saved(Image.new("L", (6, 6), 77), tmp_path / "grey.png", "PNG"),
            (77, 77, 77),
            77,
        ),
        "palette.png": (_saved(palette, tmp_path / "palette.png", "PNG"), (10, 200, 30), None),
        "palette_transparent.png": (
            _saved(transparent_p, tmp_path / "pt.png", "PNG", transparency=0),
            (255, 255, 255),
            255,
        ),
        "rgba.png": (_saved(rgba, tmp_path / "rgba.png", "PNG"), (255, 127, 127), None),
        "la.png": (
            _saved(Image.new("LA", (6, 6), (0, 0)), tmp_path / "la.png", "PNG"),
            (255, 255, 255),
            255,
        ),
        "bilevel.png": (
            _saved(Image.new("1", (6, 6), 1), tmp_path / "one.png", "PNG"),
            (255, 255, 255),
            255,
        ),
        "cmyk.jpg": (
            _saved(
                Image.new("CMYK", (16, 16), (0, 255, 255, 0)),
                tmp_path / "cmyk.jpg",
                "JPEG",
                quality=100,
            ),
            (255, 0, 0),
            None,
        ),
        "cmyk.tif": (
            _saved(Image.new("CMYK", (6, 6), (0, 0, 0, 255)), tmp_path / "cmyk.tif", "TIFF"),
            (0, 0, 0),
            0,
        ),
    }
    for name, (path, rgb, grey) in cases.items():
        got = load_image(path, "RGB")
        assert got.mode == "RGB", name
        assert np.abs(np.asarray(got)[2, 2].astype(int) - rgb).max() <= 3, (
            name,
            np.asarray(got)[2, 2],
        )
        if grey is not None:
            assert load_image(path, "L").mode == "L"
            assert abs(int(np.asarray(load_image(path, "L"))[2, 2]) - grey) <= 3, name
    corner = np.asarray(load_image(tmp_path / "rgba.png", "RGB"))[0, 0]
    assert tuple(corner) == (255, 255, 255)  # fully transparent: the white background, not blue
    path16 = _saved(sixteen, tmp_path / "sixteen.png", "PNG")
    assert Image.open(path16).mode.startswith("I")  # really 16-bit on disk
    assert np.asarray(load_image(path16, "L")).tolist() == [
        [0, 128],
        [255, 4],
    ]  # scaled, not clipped
    assert np.asarray(load_image(path16, "RGB"))[1, 0].tolist() == [255, 255, 255]


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    buf = io.BytesIO()
    smooth_image(200, 150).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("truncated.jpg", "garbage.jpg", "empty.png"):
        for min_size in (None, 1, 64):
            with pytest.raises(CorruptImageError, match=f"{name}.*skip_corrupt=True"):
                load_image(tmp_path / name, "RGB", min_size)


def test_jpeg_draft_decodes_smaller_without_changing_the_result(tmp_path):
    big = smooth_image(1024, 768, seed=5)
    path = _saved(big, tmp_path / "big.jpg", "JPEG", quality=95)
    drafted, full = load_image(path, "RGB", 256), load_image(path, "RGB")
    assert drafted.size == (512, 384) and full.size == (1024, 768)  # 1/2 keeps both sides >= 256
    assert load_image(path, "L", 256).mode == "L"
    t = build_transform(RESNET, train=False)
    diff = (t(drafted) - t(full)).abs().mean() * np.mean(RESNET.std)
    assert diff < 0.01


def test_to_mode_is_identity_for_the_right_mode():
    img = Image.new("RGB", (4, 4))
    assert to_mode(img, "RGB") is img


# --- interpolation: timm's eval transform, torchvision's with the same filter ----------------


def _embedded_character() -> Image.Image:
    """A real image: the first test character of the embedded Omniglot zips (grey, 105 px)."""
    from msl_kit.datasets.dataset import build

    return build("omniglot_small", None, "test")[0][0]


@pytest.mark.parametrize("name", ["vit_small_patch16_224.dino", "resnet18", "resnet50.tv_in1k"])
@pytest.mark.parametrize("crop", ["two_step", "fused"])
def test_eval_equals_timms_own_eval_transform(name, crop):
    timm = pytest.importorskip("timm")
    from msl_kit.models.timm_backbones import timm_preprocessing

    spec = dataclasses.replace(timm_preprocessing(name), crop=crop)
    config = timm.data.resolve_data_config(model=timm.create_model(name, pretrained=False))
    assert spec.interpolation == config["interpolation"]
    reference = timm.data.create_transform(**config, is_training=False)
    character = _embedded_character()
    assert character.mode in ("1", "L")  # grey: our transform makes it RGB for an RGB model
    other = "bilinear" if spec.interpolation == "bicubic" else "bicubic"
    for img in (character, smooth_image(320, 240), smooth_image(180, 260, seed=1)):
        ours = build_transform(spec, train=False)(img)
        ref = reference(img.convert("RGB"))
        assert ours.shape == ref.shape == (3, spec.input_size, spec.input_size)
        if crop == "two_step":  # timm's Resize -> CenterCrop, the same PIL filter
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        else:  # one resampling of the same box with the same filter (naive reference)
            t = ImageTransform(spec, train=False)
            rgb = img.convert("RGB")
            size = (spec.input_size,) * 2
            once = rgb.resize(
                size, Image.Resampling[spec.interpolation.upper()], box=t.center_box(rgb.size)
            )
            torch.testing.assert_close(ours, t.to_tensor(once), atol=1e-6, rtol=0)
        # the filter matters: the other one gives a different tensor
        changed = build_transform(dataclasses.replace(spec, interpolation=other), train=False)
        assert (changed(img) - ours).abs().max() > 1e-3


def test_train_crop_with_bicubic_matches_torchvision_with_the_same_seed():
    spec = dataclasses.replace(RESNET, interpolation="bicubic")
    bicubic = tv.InterpolationMode.BICUBIC
    reference = tv.Compose(
        [
            tv.Resize(spec.resize_size, interpolation=bicubic),
            tv.RandomResizedCrop(spec.input_size, scale=spec.crop_scale, interpolation=bicubic),
            tv.RandomHorizontalFlip(),
            tv.ToTensor(),
            tv.Normalize(spec.mean, spec.std),
        ]
    )
    ours_t, img = build_transform(spec, train=True), smooth_image(400, 300, seed=3)
    for seed in range(6):
        torch.manual_seed(seed)
        ours = ours_t(img)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, reference(img), atol=1e-5, rtol=0)
