"""The backbone registry: every backbone a config can name (`model.backbone`), in one table.

Each backbone family lives in its own module with its constructor, its preprocessing spec
and where its published weights are (timm-style); this table names them. A new backbone is
one new file plus one `BACKBONES` line (or `register_backbone` from your own module, named in
the config's `plugins`). Config validation, the recipe and the CLI read their choices here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from msl_kit.models.bninception import (
    BNINCEPTION_WEIGHTS,
    bninception_preprocessing,
    build_bninception,
)
from msl_kit.models.convnet import ConvNetParams, build_convnet, convnet_preprocessing
from msl_kit.models.resnet import RESNET50_WEIGHTS, build_resnet50, resnet50_preprocessing
from msl_kit.models.timm_backbones import (
    TimmParams,
    build_timm,
    check_timm_name,
    timm_preprocessing,
)
from msl_kit.params import ParamError
from msl_kit.preprocessing import Preprocessing


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone: `build(spec, **options)` -> a module mapping images to pooled
    features with a `.feature_dim`; `preprocessing(**options)` -> its input spec without
    building the network. `params` declares the options both take (a dataclass of
    `msl_kit.params.param` fields: the config's `model.<backbone>.*` keys, every field passed);
    `weights_url` the published weights that `model.pretrained=default` looks for. With
    `takes_pretrained`, `build(spec, pretrained=..., **options)` loads weights itself (a file
    path or "hub")."""

    build: Callable[..., nn.Module]
    preprocessing: Callable[..., Preprocessing]
    params: type | None = None
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
        params=ConvNetParams,
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
        params=TimmParams,
        description=f"timm's {name} without classifier, its own pooling",
        takes_pretrained=True,
    )


# Families named by a prefix, "family:model" (e.g. "timm:resnet18"): name -> spec maker.
BACKBONE_FAMILIES: dict[str, Callable[[str], BackboneSpec]] = {"timm": timm_backbone}
# The options every model of a family takes (`model.<family>.*`), known without a model name.
FAMILY_PARAMS: dict[str, type | None] = {"timm": TimmParams}


def register_backbone(name: str, spec: BackboneSpec) -> None:
    """Add a backbone under `name` (from a plugin module); an existing name is refused, and so
    is a name that cannot be a config section (`model.<name>.<key>`)."""
    if name in BACKBONES and BACKBONES[name] != spec:
        raise ParamError(f"a backbone named {name!r} is already registered; pick another name")
    if not name.isidentifier():
        raise ParamError(f"a backbone name must be a Python identifier (it names model.{name}.*)")
    if spec.params is not None and not dataclasses.is_dataclass(spec.params):
        raise ParamError(f"backbone {name!r}: BackboneSpec.params must be a dataclass")
    BACKBONES[name] = spec


def backbone_section(name: str) -> str:
    """The config section of backbone `name`: its family for "family:model" ("timm"), else the
    name itself (`model.convnet.input_size`, `model.timm.input_size`)."""
    family, sep, _ = name.partition(":")
    return family if sep else name


def is_section(section: str) -> bool:
    """Whether `model.<section>.*` can name options: a registered backbone or a family."""
    return section in BACKBONES or section in BACKBONE_FAMILIES


def section_params(section: str) -> type | None:
    """The params class behind `model.<section>.*` (None where the backbone takes none)."""
    if section in BACKBONES:
        return BACKBONES[section].params
    return FAMILY_PARAMS.get(section)


def backbone_names() -> list[str]:
    """Every name `model.backbone` accepts, families as "family:<name>"."""
    return [*BACKBONES, *(f"{family}:<name>" for family in BACKBONE_FAMILIES)]


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of `name`; ParamError (a ValueError) naming the valid ones otherwise."""
    if name in BACKBONES:
        return BACKBONES[name]
    family, sep, model = name.partition(":")
    if sep and family in BACKBONE_FAMILIES:
        return BACKBONE_FAMILIES[family](model)
    raise ParamError(f"unknown model {name!r}; choose one of {', '.join(backbone_names())}")


def published_weights() -> dict[str, str]:
    """Backbone name -> URL of its published ImageNet weights, where there are some."""
    return {name: spec.weights_url for name, spec in BACKBONES.items() if spec.weights_url}
