"""The embedding head (Linear + L2 normalisation) and the model every backbone becomes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msl_kit.preprocessing import Preprocessing

HEAD_INITS = ("kaiming_fan_out", "orthogonal")


class EmbeddingHead(nn.Module):
    """Linear(features -> dim) with Kaiming (or orthogonal) init and zero bias, then L2 norm."""

    def __init__(self, feature_dim: int, embedding_dim: int, init: str = "kaiming_fan_out") -> None:
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"head init must be one of {HEAD_INITS}, not {init!r}")
        self.linear = nn.Linear(feature_dim, embedding_dim)
        if init == "orthogonal":  # Hyp-ViT's head (and Proxy-Anchor's ViT successors')
            nn.init.orthogonal_(self.linear.weight)
        else:  # the released recipe: kaiming_normal_(a=0, mode="fan_out")
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
