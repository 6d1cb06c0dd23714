"""The preprocessing spec: what a backbone expects of its input images.

A bottom module with no msl_kit imports: `models` owns each backbone's spec
(`models.preprocessing_spec`), `transforms` turns a spec into a transform.
"""

from __future__ import annotations

from dataclasses import dataclass

CROP_MODES = ("two_step", "fused")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")  # PIL resampling filters


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects of its input images, and how to crop them.

    `mean` and `std` are in the units of `value_range` (BN-Inception: 0-255, BGR, mean
    104/117/128, std 1; torchvision ResNets: 0-1, RGB, ImageNet mean/std).

    `crop` says how Resize(resize_size) -> RandomResizedCrop / CenterCrop(input_size) is done:
    "two_step" resizes the whole image, then crops and resamples the crop, as torchvision and
    the released MS-loss code do (two resamplings); "fused" maps the crop box back onto the
    source image and resamples once (faster; zoomed-in crops keep more detail). Change it with
    `dataclasses.replace(spec, crop="fused")`.
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
    crop: str = "two_step"  # "two_step" (torchvision, the released recipe) or "fused"
    interpolation: str = "bilinear"  # resampling filter; timm's pretrained configs give theirs

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"Preprocessing.crop must be one of {CROP_MODES}, not {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Preprocessing.interpolation must be one of {INTERPOLATIONS}, "
                f"not {self.interpolation!r}"
            )

    @property
    def channels(self) -> int:
        """Number of input channels: 1 for "L", else 3."""
        return 1 if self.color == "L" else 3
