"""Build a model by name: the backbone from the registry, its preprocessing spec, the head.

Every model is an `EmbeddingModel`: `.backbone` maps images to pooled features, `.head` maps
features to L2-normalised embeddings, `.preprocessing` says what input the backbone expects.
`preprocessing_spec(name)` gives that spec without building the network.
"""

from __future__ import annotations

import os
from typing import Any

from msl_kit.models.head import EmbeddingHead, EmbeddingModel
from msl_kit.models.registry import backbone_spec
from msl_kit.models.weights import load_backbone_weights, resolve_weights
from msl_kit.preprocessing import Preprocessing


def _options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options `name` takes; ValueError for any other."""
    allowed = backbone_spec(name).options
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{name} takes no option(s) {unknown}"
            + (f"; it accepts {sorted(allowed)}" if allowed else "")
        )
    return {k: v for k, v in options.items() if v is not None}


def preprocessing_spec(backbone: str, **options: Any) -> Preprocessing:
    """The preprocessing spec of `backbone`, without building the network or reading weights.

    Options are the backbone's own (convnet: in_channels 1 or 3, image_size, resize_size
    (default image_size), width); backbones with a fixed spec ignore them.
    """
    spec = backbone_spec(backbone)
    taken = {k: v for k, v in options.items() if k in spec.options and v is not None}
    return spec.preprocessing(**taken)


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
    spec = backbone_spec(name)
    options = _options(name, options)
    preprocessing = spec.preprocessing(**options)
    backbone = spec.build(preprocessing, **options)
    if pretrained is not None:
        load_backbone_weights(backbone, resolve_weights(name, pretrained))
    head = EmbeddingHead(int(backbone.feature_dim), embedding_dim)
    return EmbeddingModel(backbone, head, preprocessing, name=name, freeze_bn=freeze_bn)
