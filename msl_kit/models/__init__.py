"""Models: one module per backbone family (its constructor, preprocessing spec and weights'
address), the embedding head, weight loading, one registry, and `build_model`."""

from msl_kit.models.builder import build_model, preprocessing_spec
from msl_kit.models.convnet import ConvNetParams
from msl_kit.models.head import EmbeddingHead, EmbeddingModel
from msl_kit.models.registry import (
    BACKBONES,
    BackboneSpec,
    backbone_names,
    backbone_spec,
    register_backbone,
)
from msl_kit.models.state_dicts import WeightsError
from msl_kit.models.timm_backbones import TimmParams
from msl_kit.models.weights import (
    default_weight_paths,
    download_weights,
    load_backbone_weights,
    resolve_weights,
)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "ConvNetParams",
    "EmbeddingHead",
    "EmbeddingModel",
    "TimmParams",
    "WeightsError",
    "backbone_names",
    "backbone_spec",
    "build_model",
    "default_weight_paths",
    "download_weights",
    "load_backbone_weights",
    "preprocessing_spec",
    "register_backbone",
    "resolve_weights",
]
