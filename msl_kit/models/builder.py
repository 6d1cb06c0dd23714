"""Backbones (BN-Inception, ResNet-50, a small convnet), their preprocessing specs, the
embedding head, and weight loading.

Every model is an `EmbeddingModel`: `.backbone` maps images to pooled features, `.head` maps
features to L2-normalised embeddings, `.preprocessing` says what input the backbone expects.
`preprocessing_spec(name)` gives that spec without building the network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msl_kit.bninception import BNInceptionBackbone, bninception_accepts  # noqa: F401
from msl_kit.download import download_file
from msl_kit.fileio import safe_load
from msl_kit.preprocessing import Preprocessing

MODEL_NAMES = ("bninception", "resnet50", "convnet")

# Published ImageNet weights; a backbone file may also carry these classifiers, which we drop.
WEIGHT_URLS = {
    "bninception": "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}
_CLASSIFIER_PREFIXES = ("last_linear.", "fc.")


def _resnet50_backbone() -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.fc = nn.Identity()  # keeps torchvision's key layout minus fc.*; output = average pool
    model.feature_dim = 2048
    return model


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


class EmbeddingHead(nn.Module):
    """Linear(features -> dim) with Kaiming init and zero bias, then L2 normalisation."""

    def __init__(self, feature_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(feature_dim, embedding_dim)
        # The released recipe: kaiming_normal_(a=0, mode="fan_out") on the weight, zero bias.
        nn.init.kaiming_normal_(self.linear.weight, a=0, mode="fan_out")
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: under fp16 autocast the squared norm of a 512-d vector can
        # overflow, and the loss (beta=40) magnifies rounding in the similarities.
        embeddings = self.linear(features)
        if embeddings.dtype in (torch.float16, torch.bfloat16):
            embeddings = embeddings.float()
        return F.normalize(embeddings, dim=1)


class EmbeddingModel(nn.Module):
    """images -> backbone (pooled features) -> head (L2-normalised embeddings)."""

    def __init__(
        self,
        backbone: nn.Module,
        head: EmbeddingHead,
        preprocessing: Preprocessing,
        name: str = "",
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.preprocessing = preprocessing
        self.name = name
        self.feature_dim = int(head.linear.in_features)
        self.embedding_dim = int(head.linear.out_features)
        self.freeze_bn = freeze_bn
        self.train(self.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        want = self.preprocessing.channels
        if images.dim() != 4 or images.shape[1] != want:
            raise ValueError(
                f"{self.name or 'model'} expects images of shape (B, {want}, H, W) "
                f"(color {self.preprocessing.color!r}), got {tuple(images.shape)}; build the "
                "transforms from model.preprocessing, or pick a backbone with the right "
                "in_channels"
            )
        return self.head(self.backbone(images))

    def train(self, mode: bool = True) -> EmbeddingModel:
        """Set train/eval mode; with `freeze_bn` every BatchNorm stays in eval mode.

        In eval mode BatchNorm uses and keeps its running statistics; its weight and bias
        are still parameters, so they keep their gradients and learn.
        """
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        """`nn.Module.load_state_dict`, first checking that the head widths match."""
        theirs = state_dict.get("head.linear.weight")
        if theirs is not None and tuple(theirs.shape) != tuple(self.head.linear.weight.shape):
            raise ValueError(
                f"checkpoint head is {theirs.shape[1]} -> {theirs.shape[0]} (features -> "
                f"embedding), this model is {self.feature_dim} -> {self.embedding_dim}; set "
                f"model.embedding_dim={theirs.shape[0]} (and the checkpoint's model.backbone) "
                "to load it"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def preprocessing_spec(
    backbone: str, *, image_size: int = 64, resize_size: int | None = None, in_channels: int = 3
) -> Preprocessing:
    """The preprocessing spec of `backbone`, without building the network or reading weights.

    `image_size`, `resize_size` (default: `image_size`) and `in_channels` (1 or 3) matter only
    for "convnet"; the other backbones have fixed specs and ignore them. `build_model` sets
    `model.preprocessing` from this function.
    """
    if backbone == "bninception":
        # pretrainedmodels' settings table for its ImageNet weights (BGR, 0-255, mean
        # 104/117/128, std 1; a test checks these against it) with the released recipe's sizes
        # (256 -> 227) instead of the table's 224, and the released two-step crop.
        return Preprocessing(
            color="BGR",
            value_range=255.0,
            mean=(104.0, 117.0, 128.0),
            std=(1.0, 1.0, 1.0),
            input_size=227,
            resize_size=256,
            crop_scale=(0.16, 1.0),
            hflip=True,
            crop="two_step",
        )
    if backbone == "resnet50":
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
    if backbone != "convnet":
        raise ValueError(f"unknown model {backbone!r}; choose one of {', '.join(MODEL_NAMES)}")
    if in_channels not in (1, 3):
        raise ValueError(f"convnet in_channels must be 1 (grey) or 3 (RGB), got {in_channels}")
    image_size = int(image_size)
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


def build_model(
    name: str,
    embedding_dim: int = 512,
    pretrained: str | os.PathLike | None = None,
    *,
    freeze_bn: bool = False,
    **options: Any,
) -> EmbeddingModel:
    """Build backbone + head. `pretrained`: a backbone weights file, "default", or None.

    Options (convnet only): in_channels (1 or 3, default 3), image_size (64), resize_size
    (= image_size), width (64). `.preprocessing` is `preprocessing_spec(name, **options)`.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    allowed = {"in_channels", "image_size", "resize_size", "width"} if name == "convnet" else set()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"{name} takes no option(s) {unknown}"
            + (f"; it accepts {sorted(allowed)}" if allowed else "")
        )
    sizes = {k: int(options[k]) for k in ("in_channels", "image_size") if k in options}
    preprocessing = preprocessing_spec(name, resize_size=options.get("resize_size"), **sizes)
    if name == "bninception":
        backbone: nn.Module = BNInceptionBackbone()
    elif name == "resnet50":
        backbone = _resnet50_backbone()
    else:
        backbone = ConvNetBackbone(
            preprocessing.channels, preprocessing.input_size, int(options.get("width", 64))
        )
    if pretrained is not None:
        load_backbone_weights(backbone, resolve_weights(name, pretrained))
    head = EmbeddingHead(int(backbone.feature_dim), embedding_dim)
    return EmbeddingModel(backbone, head, preprocessing, name=name, freeze_bn=freeze_bn)


def default_weight_paths(name: str) -> list[Path]:
    """Where `pretrained="default"` looks: torch.hub's cache ($TORCH_HOME/hub/checkpoints),
    then the old model-zoo folder ~/.torch/models."""
    if name not in WEIGHT_URLS:
        raise ValueError(
            f"no published weights for {name!r}; those exist for {sorted(WEIGHT_URLS)}"
        )
    filename = WEIGHT_URLS[name].rsplit("/", 1)[1]
    return [
        Path(torch.hub.get_dir()) / "checkpoints" / filename,
        Path.home() / ".torch" / "models" / filename,
    ]


def resolve_weights(name: str, pretrained: str | os.PathLike) -> Path:
    """The weights file for `pretrained` (a path or "default").

    A missing file raises FileNotFoundError saying where to get it.
    """
    if str(pretrained) == "default":
        candidates = default_weight_paths(name)
    else:
        candidates = [Path(pretrained).expanduser()]
    for path in candidates:
        if path.is_file():
            return path
    url = WEIGHT_URLS.get(name)
    where = url or "(no published weights; use a file saved from this backbone)"
    defaults = ", ".join(str(p) for p in default_weight_paths(name)) if url else "none"
    raise FileNotFoundError(
        f"{name} weights not found at {', '.join(str(p) for p in candidates)}. Get them from "
        f"{where} (`msl-kit prepare --weights {name}` downloads it where a network exists), "
        f"place the file in one of the default paths ({defaults}) and set "
        "model.pretrained=default, or set model.pretrained=/path/to/file.pth"
    )


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a bare backbone state_dict (Cadene / torchvision layout) from `path`, in place.

    Classifier keys (`last_linear.*`, `fc.*`) are dropped; Cadene's BatchNorm tensors stored as
    (1, C) are reshaped to (C,); a file without `num_batches_tracked` (older torch) is fine.
    Any other missing or unexpected key, or a shape mismatch, raises ValueError naming them.
    """
    state = safe_load(Path(path), "weights file")
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            f"{path} is not a bare state_dict (name -> tensor); save "
            "`backbone.state_dict()` or use the published ImageNet file"
        )
    target = backbone.state_dict()
    state = {
        k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES) or k in target
    }
    for key, ours in target.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(ours)
        elif key in state and state[key].shape == (1, *ours.shape):
            state[key] = state[key].reshape(ours.shape)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    problems = [
        f"{label} {len(keys)} ({', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"{path} does not fit this backbone: {'; '.join(problems)}. Is it the "
            "weights file of this backbone (model.backbone), saved as a bare "
            "state_dict?"
        )
    backbone.load_state_dict(state, strict=True)


def download_weights(
    name: str,
    dest_dir: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    progress: bool = True,
) -> Path:
    """Download the published ImageNet weights of `name` into `dest_dir` (default: the first
    default path's folder) and return the file's path. Needs a network; nothing else does."""
    url = url or WEIGHT_URLS.get(name)
    if url is None:
        raise ValueError(
            f"no published weights for {name!r}; those exist for {sorted(WEIGHT_URLS)}"
        )
    folder = Path(dest_dir) if dest_dir is not None else default_weight_paths(name)[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / url.rsplit("/", 1)[1]
    download_file(url, dest, md5=None, progress=progress)
    return dest
