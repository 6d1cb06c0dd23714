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


class BNInceptionBackbone(nn.Module):
    """pretrainedmodels' BN-Inception without its classifier, then global max pooling: (B, 1024).

    The layers are those of `pretrainedmodels.models.bninception.BNInception`, registered under
    the same names, so the state_dict keys are those of Cadene's bn_inception-52deb4733.pth
    minus `last_linear.*`. `features()` runs the same layers in the same order as that class's
    `features()` (bit-identical output), but drops each intermediate map as soon as no later
    layer reads it: under `no_grad` only the current inception block's input, its branch
    outputs and their concatenation are alive at once, where pretrainedmodels keeps all ~200
    maps until it returns. With gradients, autograd keeps what backward needs either way.
    """

    feature_dim = 1024

    def __init__(self) -> None:
        super().__init__()
        # Imported here: pretrainedmodels pulls in its whole model zoo (seconds at import).
        from pretrainedmodels.models.bninception import BNInception

        reference = BNInception(num_classes=1000)
        for name, layer in reference.named_children():
            if name not in ("last_linear", "global_pool"):  # classifier and its average pool
                self.add_module(name, layer)
        self._stem, self._blocks = _bninception_plan(list(self._modules))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        bad = [side for side in images.shape[-2:] if not bninception_accepts(int(side))]
        if bad:
            raise ValueError(
                f"BN-Inception cannot take {tuple(images.shape[-2:])} px images: its strided "
                "conv and ceil-mode pool branches disagree at that size. Use sides of 32k-1 to "
                "32k+6 px, e.g. 224, 227 (the recipe's), 256"
            )
        return self.features(images).amax(dim=(2, 3))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The last inception block's output map, (B, 1024, h, w), as pretrainedmodels'."""
        layers = self._modules
        x = images
        for name in self._stem:
            x = layers[name](x)  # rebinding x frees the previous map (no_grad)
        for block in self._blocks:
            outs = []
            for branch in block:
                y = x
                for name in branch:
                    y = layers[name](y)
                outs.append(y)
            # The block's input is read by no later layer: drop it before the concatenation
            # allocates its output, then drop the branch outputs once concatenated.
            del x, y
            x = torch.cat(outs, 1)
            del outs
        return x


def _bninception_plan(names: list[str]) -> tuple[tuple[str, ...], tuple]:
    """Layer names of the stem, then per inception block its branches, in concatenation order.

    pretrainedmodels registers each block's layers branch by branch (1x1; 3x3 reduce + 3x3;
    double 3x3; pool + projection), which is also the order its `features()` concatenates in.
    """
    stem = tuple(n for n in names if not n.startswith("inception_"))
    blocks: dict[str, list[tuple[str, list[str]]]] = {}
    for name in names:
        if not name.startswith("inception_"):
            continue
        _, block, layer = name.split("_", 2)
        layer = layer.removeprefix("relu_")
        kind = next(k for k in ("double_3x3", "3x3", "1x1", "pool") if layer.startswith(k))
        branches = blocks.setdefault(block, [])
        if not branches or branches[-1][0] != kind:
            branches.append((kind, []))
        branches[-1][1].append(name)
    plan = tuple(tuple(tuple(layers) for _, layers in branches) for branches in blocks.values())
    return stem, plan


def bninception_accepts(side: int) -> bool:
    """Whether BN-Inception's parallel branches agree in size for an input side of `side` px."""

    def ceil_pool(h: int) -> int:  # MaxPool2d(3, stride 2, ceil_mode=True), as PyTorch sizes it
        out = -(-(h - 3) // 2) + 1
        return out - 1 if (out - 1) * 2 >= h else out

    h = ceil_pool(ceil_pool((side - 1) // 2 + 1))
    for _ in range(2):  # inception_3c and inception_4e: stride-2 conv beside a ceil-mode pool
        if (h - 1) // 2 + 1 != ceil_pool(h):
            return False
        h = (h - 1) // 2 + 1
    return True


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
