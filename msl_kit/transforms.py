"""Train / eval transforms built from a backbone's preprocessing spec, and image decoding.

`build_transform(spec, train)` does what torchvision's Resize -> RandomResizedCrop / CenterCrop
-> flip -> ToTensor -> Normalize does, with one resampling instead of two: the crop box is
drawn in the coordinates of the resized image (with the same random draws as torchvision) and
mapped back onto the source, which PIL resamples straight to the network's input size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects of its input images.

    `mean` and `std` are in the units of `value_range` (BN-Inception: 0-255, BGR, mean
    104/117/128, std 1; torchvision ResNets: 0-1, RGB, ImageNet mean/std).
    """

    color: str = "RGB"  # "RGB", "BGR" or "L" (one grey channel)
    value_range: float = 1.0  # 1.0: pixels in [0, 1]; 255.0: pixels in [0, 255]
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    input_size: int = 224  # side of the square crop the network sees
    resize_size: int = 256  # shorter side before cropping
    crop_scale: tuple[float, float] = (0.16, 1.0)  # RandomResizedCrop area range (released recipe)
    hflip: bool = True  # random horizontal flip at train time (off for digits and characters)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3


class CorruptImageError(OSError):
    """An image file that cannot be decoded; the message names the file."""


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """`img` as "RGB" or "L": transparency composited onto white, 16-bit scaled to 8-bit."""
    if img.mode == mode:
        return img
    if img.mode in _SIXTEEN_BIT:
        # PIL's own convert clips 16-bit values at 255 (a white image); scale 0-65535 instead
        grey = np.clip(np.asarray(img, dtype=np.float32) / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert(mode)
    if img.mode in _ALPHA or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert(mode)


def load_image(path: str | Path, mode: str | None = None, min_size: int | None = None) -> Image.Image:
    """Decode an image file fully (errors name the file), optionally converted to `mode`.

    With `min_size`, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both
    sides at least `min_size` (libjpeg's DCT scaling: far cheaper than decoding, then shrinking).
    """
    try:
        with Image.open(path) as img:
            if min_size and img.format == "JPEG":
                img.draft(mode, (min_size, min_size))
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}. Replace or delete the file, or "
                                "build the dataset with skip_corrupt=True to leave such files out") from err
    return img if mode is None else to_mode(img, mode)


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
            raise ValueError(f"resize_size {spec.resize_size} is smaller than input_size {spec.input_size}")
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

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_mode(img, self.mode)
        size = self.spec.input_size
        box = self.crop_box(img.size) if self.random_crop else self.center_box(img.size)
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
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

    def center_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """Resize(resize_size) -> CenterCrop(input_size), as a box in source pixels."""
        rw, rh = _resized_size(*size, self.spec.resize_size)
        s = self.spec.input_size
        return self._to_source(size, int(round((rw - s) / 2.0)), int(round((rh - s) / 2.0)), s, s)

    def crop_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """Resize(resize_size) -> RandomResizedCrop(scale, ratio), as a box in source pixels.

        Draws from torch's generator in torchvision's order, so a seeded run crops alike.
        """
        rw, rh = _resized_size(*size, self.spec.resize_size)
        area = rw * rh
        scale, ratio = self.spec.crop_scale, self.spec.crop_ratio
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= rw and 0 < h <= rh:
                top = torch.randint(0, rh - h + 1, size=(1,)).item()
                left = torch.randint(0, rw - w + 1, size=(1,)).item()
                return self._to_source(size, left, top, w, h)
        in_ratio = rw / rh  # ten misses: the largest central crop within the ratio range
        if in_ratio < min(ratio):
            w, h = rw, int(round(rw / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(rh * max(ratio))), rh
        else:
            w, h = rw, rh
        return self._to_source(size, (rw - w) // 2, (rh - h) // 2, w, h)

    def __repr__(self) -> str:
        return f"ImageTransform({self.spec}, train={self.train})"


def build_transform(spec: Preprocessing, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The train (random crop + flip) or eval (center crop) transform for a backbone's spec.

    train: Resize(resize_size) -> RandomResizedCrop(input_size, crop_scale) -> flip if hflip;
    eval: Resize(resize_size) -> CenterCrop(input_size); then pixels in [0, value_range],
    normalised by mean / std, channel order per `spec.color`. With crop_scale (1, 1) and
    resize_size == input_size the train transform crops like eval (no random crop).
    """
    return ImageTransform(spec, train)
