"""The small convnet of the CPU recipes (Conv4 on 28 px characters) and its preprocessing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msl_kit.params import param
from msl_kit.preprocessing import Preprocessing


@dataclass(frozen=True)
class ConvNetParams:
    """The convnet's options (`model.convnet.*`); the defaults are the embedded demo's."""

    in_channels: int = param(1, "1 (grey) or 3 (RGB)", choices=(1, 3))
    input_size: int = param(28, "side the network sees, px", ge=8, le=1024)
    resize_size: int = param(
        0,
        "side the image is resized to before the crop",
        ge=8,
        le=2048,
        off=0,
        off_means="= input_size",
    )
    width: int = param(64, "channels of every block (= the feature width)", ge=1, le=1024)


class ConvNetBackbone(nn.Module):
    """Conv3x3-BN-ReLU-MaxPool blocks while the map is larger than 2 px, then global average pool.

    8 px input: 2 blocks; 28 px: 4 (the classic Conv4 for Omniglot); 64 px: 5. Features = width.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 64, width: int = 64) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"convnet needs image_size >= 4, got {image_size}")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        while size > 2:  # floor pooling: 28 -> 14 -> 7 -> 3 -> 1, 8 -> 4 -> 2
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels, size = width, size // 2
        self.blocks = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(images).mean(dim=(2, 3))


def convnet_preprocessing(
    in_channels: int = 1, input_size: int = 28, resize_size: int | None = 0, width: int = 64
) -> Preprocessing:
    """The convnet's spec: grey or RGB at `input_size`, mean / std 0.5 (`width` is unused)."""
    if in_channels not in (1, 3):
        raise ValueError(f"convnet in_channels must be 1 (grey) or 3 (RGB), got {in_channels}")
    image_size = int(input_size)
    grey = in_channels == 1
    # Tiny digits are not cropped at all; characters get a mild crop (a 16% crop can cut a
    # stroke away); photos get the recipe's. Characters and digits are not mirror-symmetric.
    # The CPU recipes keep the faster one-resampling crop: they reproduce no released numbers.
    scale = (1.0, 1.0) if image_size <= 16 else (0.64, 1.0) if grey else (0.16, 1.0)
    return Preprocessing(
        color="L" if grey else "RGB",
        value_range=1.0,
        mean=(0.5,) * in_channels,
        std=(0.5,) * in_channels,
        input_size=image_size,
        resize_size=int(resize_size or image_size),
        crop_scale=scale,
        hflip=not grey,
        crop="fused",
    )


def build_convnet(spec: Preprocessing, width: int = 64, **_sizes: int) -> ConvNetBackbone:
    """The convnet for `spec`'s channels and input size (the sizes are already in the spec)."""
    return ConvNetBackbone(spec.channels, spec.input_size, int(width))
