"""The backbone registry: every backbone a config can name (`model.backbone`), in one table.

Each backbone family lives in its own module with its constructor, its preprocessing spec
and where its published weights are (timm-style); this table names them. A new backbone is
one new file plus one `BACKBONES` line (or `register_backbone` from your own module, named in
the config's `plugins`). Config validation, the recipe and the CLI read their choices here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from msl_kit.models.bninception import (
    BNINCEPTION_WEIGHTS,
    bninception_preprocessing,
    build_bninception,
)
from msl_kit.models.convnet import build_convnet, convnet_preprocessing
from msl_kit.models.resnet import RESNET50_WEIGHTS, build_resnet50, resnet50_preprocessing
from msl_kit.models.timm_backbones import build_timm, check_timm_name, timm_preprocessing
from msl_kit.preprocessing import Preprocessing


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone: `build(spec, **options)` -> a module mapping images to pooled
    features with a `.feature_dim`; `preprocessing(**options)` -> its input spec without
    building the network; `options` are the `model.*` config keys both take; `weights_url`
    the published weights that `model.pretrained=default` looks for. With `takes_pretrained`,
    `build(spec, pretrained=..., **options)` loads weights itself (a file path or "hub")."""

    build: Callable[..., nn.Module]
    preprocessing: Callable[..., Preprocessing]
    options: tuple[str, ...] = ()
    weights_url: str | None = None
    description: str = ""
    takes_pretrained: bool = False


BACKBONES: dict[str, BackboneSpec] = {
    "bninception": BackboneSpec(
        build_bninception,
        bninception_preprocessing,
        weights_url=BNINCEPTION_WEIGHTS,
        description="BN-Inception (pretrainedmodels' layout), max-pooled 1024-d: the paper's",
    ),
    "resnet50": BackboneSpec(
        build_resnet50,
        resnet50_preprocessing,
        weights_url=RESNET50_WEIGHTS,
        description="torchvision ResNet-50, average-pooled 2048-d",
    ),
    "convnet": BackboneSpec(
        build_convnet,
        convnet_preprocessing,
        options=("in_channels", "image_size", "resize_size", "width"),
        description="small Conv-BN-ReLU-pool stack for the CPU recipes",
    ),
}


@functools.lru_cache(maxsize=64)  # config checks, the recipe and build_model each ask
def timm_backbone(name: str) -> BackboneSpec:
    """The entry of "timm:<name>"; ValueError naming close timm names if timm has no `name`.

    timm is imported here, on first use: `import msl_kit` and the registry stay without it.
    """
    check_timm_name(name)
    return BackboneSpec(
        functools.partial(build_timm, name),
        functools.partial(timm_preprocessing, name),
        options=("global_pool", "input_size", "resize_size"),
        description=f"timm's {name} without classifier, its own pooling",
        takes_pretrained=True,
    )


# Families named by a prefix, "family:model" (e.g. "timm:resnet18"): name -> spec maker.
BACKBONE_FAMILIES: dict[str, Callable[[str], BackboneSpec]] = {"timm": timm_backbone}


def register_backbone(name: str, spec: BackboneSpec) -> None:
    """Add a backbone under `name` (from a plugin module); an existing name is refused."""
    if name in BACKBONES and BACKBONES[name] != spec:
        raise ValueError(f"a backbone named {name!r} is already registered; pick another name")
    BACKBONES[name] = spec


def backbone_names() -> list[str]:
    """Every name `model.backbone` accepts, families as "family:<name>"."""
    return [*BACKBONES, *(f"{family}:<name>" for family in BACKBONE_FAMILIES)]


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of `name`; ValueError naming the valid backbones otherwise."""
    if name in BACKBONES:
        return BACKBONES[name]
    family, sep, model = name.partition(":")
    if sep and family in BACKBONE_FAMILIES:
        return BACKBONE_FAMILIES[family](model)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(backbone_names())}")


def published_weights() -> dict[str, str]:
    """Backbone name -> URL of its published ImageNet weights, where there are some."""
    return {name: spec.weights_url for name, spec in BACKBONES.items() if spec.weights_url}
