"""Train / eval transforms built from a backbone's preprocessing spec."""
from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3
