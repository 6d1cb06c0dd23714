"""Train / eval transforms built from a backbone's preprocessing spec, and image decoding.

`build_transform(spec, train)` does what torchvision's Resize -> RandomResizedCrop / CenterCrop
-> flip -> ToTensor -> Normalize does (resampling with `spec.interpolation`, as timm's eval
transform does with a timm model's), drawing the crop from torch's generator exactly as
torchvision does. With `spec.crop == "two_step"` (the default) the geometry is torchvision's
too: resize the whole image, crop, resample the crop. With "fused" the crop box is mapped back
onto the source and PIL resamples it once, straight to the network's input size: faster, and
zoomed-in crops keep detail that two resamplings lose (docs/models.md has the measurements).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Re-exported: the spec used to be defined here and callers still import it from here.
from msl_kit.errors import MslKitError
from msl_kit.preprocessing import CROP_MODES, Preprocessing


class CorruptImageError(MslKitError, OSError):
    """An image file that cannot be decoded; the message names the file."""


class ImageTooLargeError(CorruptImageError):
    """An image whose decoding or resizing would take more memory than the limits allow."""


# The work one image may cost, whatever the backbone and crop mode (docs/reliability.md):
MAX_PIXELS = 40_000_000  # decoded (after a JPEG's draft scaling): 160 MB as RGBA
MAX_RESIZED_PIXELS = 16_000_000  # resized, shorter side = resize_size: 244:1 at resize 256


# What `to_mode` does, by name: an export's model.json states each of these (use/description.py)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto this colour


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """`img` as "RGB" or "L": transparency composited onto white, 16-bit scaled to 8-bit."""
    if img.mode == mode:
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        # PIL's own convert clips 16-bit values at 255 (a white image); scale 0-65535 instead
        grey = np.clip(np.asarray(img, dtype=np.float32) / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert(mode)
    if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255)), rgba)
    return img.convert(mode)


def load_image(
    path: str | Path, mode: str | None = None, min_size: int | None = None
) -> Image.Image:
    """Decode an image file fully (errors name the file), optionally converted to `mode`.

    With `min_size`, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both
    sides at least `min_size` (libjpeg's DCT scaling: far cheaper than decoding, then shrinking).
    """
    try:
        with warnings.catch_warnings():  # PIL warns from 89 M pixels; ours refuses at 40 M
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if min_size and img.format == "JPEG":
                    img.draft(mode, (min_size, min_size))
                _check_pixels(path, *img.size)
                img.load()
    except ImageTooLargeError:
        raise
    except Exception as err:  # a decoder fed an arbitrary file may raise anything
        raise CorruptImageError(
            f"cannot decode image {path}: {err}. Replace or delete the file, or build the "
            "dataset with skip_corrupt=True to leave such files out"
        ) from err
    try:
        return img if mode is None else to_mode(img, mode)
    except (ValueError, OSError) as err:  # e.g. a LAB or CMYK-with-alpha TIFF
        raise CorruptImageError(
            f"cannot convert image {path} ({img.mode}) to {mode}: {err}"
        ) from err


def _check_pixels(path: str | Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(
            f"image {path} is {width} x {height} pixels, more than the {MAX_PIXELS:,} msl_kit "
            "decodes (transforms.MAX_PIXELS): shrink it first"
        )


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"Preprocessing.{what} has {len(values)} values for {channels} channel(s)")
    return values


def _resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `short`, the longer is truncated."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


class ImageTransform:
    """PIL image -> normalised float32 tensor (C, H, W) per a Preprocessing spec.

    `load_hint` = (mode, min_size) tells a dataset how to decode for this transform.
    """

    def __init__(self, spec: Preprocessing, train: bool):
        if spec.color not in ("RGB", "BGR", "L"):
            raise ValueError(f"Preprocessing.color must be 'RGB', 'BGR' or 'L', not {spec.color!r}")
        if spec.resize_size < spec.input_size:
            raise ValueError(
                f"resize_size {spec.resize_size} is smaller than input_size {spec.input_size}"
            )
        if spec.crop not in CROP_MODES:  # a spec built with object.__setattr__ or unpickled
            raise ValueError(f"Preprocessing.crop must be one of {CROP_MODES}, not {spec.crop!r}")
        self.spec, self.train = spec, train
        self.mode = "L" if spec.color == "L" else "RGB"
        channels = spec.channels
        std = _per_channel(spec.std, channels, "std")
        mean = _per_channel(spec.mean, channels, "mean")
        # (u8 * range / 255 - mean) / std as one multiply-add per pixel
        self._scale = torch.tensor([spec.value_range / 255.0 / s for s in std]).view(-1, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(-1, 1, 1)
        no_crop = tuple(spec.crop_scale) == (1.0, 1.0) and spec.resize_size == spec.input_size
        self.random_crop = train and not no_crop
        self.load_hint = (self.mode, spec.resize_size)
        # PIL's filter of that name, as torchvision's and timm's PIL transforms resample
        self.resample = Image.Resampling[spec.interpolation.upper()]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_mode(img, self.mode)
        size = self.spec.input_size
        rw, rh = _resized_size(*img.size, self.spec.resize_size)
        if rw * rh > MAX_RESIZED_PIXELS:  # every crop mode: one rule, the same images kept
            raise ImageTooLargeError(
                f"a {img.width} x {img.height} image resized to {rw} x {rh} passes "
                f"transforms.MAX_RESIZED_PIXELS ({MAX_RESIZED_PIXELS:,}): crop it nearer to square"
            )
        crop = self.draw_crop(rw, rh) if self.random_crop else self.center_crop(rw, rh)
        if self.spec.crop == "two_step":
            # torchvision's Resize, then crop + resize (RandomResizedCrop) or crop (CenterCrop)
            if (rw, rh) != img.size:
                img = img.resize((rw, rh), self.resample)
            left, top, w, h = crop
            img = img.crop((left, top, left + w, top + h))
            if img.size != (size, size):
                img = img.resize((size, size), self.resample)
        else:
            box = self._to_source(img.size, *crop)
            img = img.resize((size, size), self.resample, box=box)
        if self.train and self.spec.hflip and torch.rand(1).item() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.to_tensor(img)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """uint8 PIL image -> normalised float32 (C, H, W), channels reversed for "BGR"."""
        # PIL's band split yields contiguous planes: cheaper than permuting an HWC array
        # (half the time in measurements) and the BGR reversal comes free
        bands = img.split()
        if self.spec.color == "BGR":
            bands = bands[::-1]
        planes = np.stack([np.asarray(b) for b in bands])
        out = torch.from_numpy(planes).to(torch.float32)
        return out.mul_(self._scale).add_(self._shift)

    def _to_source(self, size: tuple[int, int], left: float, top: float, w: float, h: float):
        width, height = size
        rw, rh = _resized_size(width, height, self.spec.resize_size)
        sx, sy = width / rw, height / rh
        return (left * sx, top * sy, (left + w) * sx, (top + h) * sy)

    def center_crop(self, rw: int, rh: int) -> tuple[int, int, int, int]:
        """CenterCrop(input_size) of a (rw, rh) resized image: (left, top, width, height)."""
        s = self.spec.input_size
        return int(round((rw - s) / 2.0)), int(round((rh - s) / 2.0)), s, s

    def draw_crop(self, rw: int, rh: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop(scale, ratio) of a (rw, rh) image: (left, top, width, height).

        Draws from torch's generator in torchvision's order, so a seeded run crops alike.
        """
        area = rw * rh
        scale, ratio = self.spec.crop_scale, self.spec.crop_ratio
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= rw and 0 < h <= rh:
                top = int(torch.randint(0, rh - h + 1, size=(1,)).item())
                left = int(torch.randint(0, rw - w + 1, size=(1,)).item())
                return left, top, w, h
        in_ratio = rw / rh  # ten misses: the largest central crop within the ratio range
        if in_ratio < min(ratio):
            w, h = rw, int(round(rw / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(rh * max(ratio))), rh
        else:
            w, h = rw, rh
        return (rw - w) // 2, (rh - h) // 2, w, h

    def center_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """Resize(resize_size) -> CenterCrop(input_size), as a box in source pixels (fused)."""
        resized = _resized_size(*size, self.spec.resize_size)
        return self._to_source(size, *self.center_crop(*resized))

    def crop_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """Resize -> RandomResizedCrop as a box in source pixels (fused); draws like torchvision."""
        resized = _resized_size(*size, self.spec.resize_size)
        return self._to_source(size, *self.draw_crop(*resized))

    def __repr__(self) -> str:
        return f"ImageTransform({self.spec}, train={self.train})"


def build_transform(spec: Preprocessing, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The train (random crop + flip) or eval (center crop) transform for a backbone's spec.

    train: Resize(resize_size) -> RandomResizedCrop(input_size, crop_scale) -> flip if hflip;
    eval: Resize(resize_size) -> CenterCrop(input_size); then pixels in [0, value_range],
    normalised by mean / std, channel order per `spec.color`. With crop_scale (1, 1) and
    resize_size == input_size the train transform crops like eval (no random crop).
    `spec.crop` picks torchvision's two resamplings ("two_step") or one ("fused").
    """
    return ImageTransform(spec, train)
