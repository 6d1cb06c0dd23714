"""BN-Inception as pretrainedmodels defines it, with a forward that frees each feature map as
soon as no later layer reads it (bit-identical features, the Cadene state_dict layout).

`msl_kit.models.build_model("bninception")` wraps it; the spec and the published weights'
address live here beside it.
"""

from __future__ import annotations

import torch
from torch import nn

from msl_kit.preprocessing import Preprocessing

BNINCEPTION_WEIGHTS = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"


def bninception_preprocessing() -> Preprocessing:
    """pretrainedmodels' settings for its ImageNet weights (BGR, 0-255, mean 104/117/128, std 1;
    a test checks them against its table) with the released recipe's sizes (256 -> 227) instead
    of the table's 224, and the released two-step crop."""
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


def build_bninception(spec: Preprocessing) -> BNInceptionBackbone:
    """BN-Inception features, max-pooled: images -> (B, 1024)."""
    return BNInceptionBackbone()


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
        self._stem, self._blocks = bninception_plan(list(self._modules))

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


def bninception_plan(names: list[str]) -> tuple[tuple[str, ...], tuple]:
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
