"""ResNet-50 from torchvision, average-pooled (2048-d), with ImageNet preprocessing."""

from __future__ import annotations

from torch import nn

from msl_kit.preprocessing import Preprocessing

RESNET50_WEIGHTS = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"


def resnet50_preprocessing() -> Preprocessing:
    """torchvision's ImageNet normalisation at 224 px (Resize 256), the released two-step crop."""
    return Preprocessing(
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


def build_resnet50(spec: Preprocessing) -> nn.Module:
    """torchvision's ResNet-50 with `fc` replaced by Identity: images -> (B, 2048)."""
    from torchvision.models import resnet50  # imported on use: torchvision's model zoo is large

    model = resnet50(weights=None)
    model.fc = nn.Identity()  # keeps torchvision's key layout minus fc.*; output = average pool
    model.feature_dim = 2048
    return model
