"""Build a model by name: the backbone from the registry, its preprocessing spec, the head.

Every model is an `EmbeddingModel`: `.backbone` maps images to pooled features, `.head` maps
features to L2-normalised embeddings, `.preprocessing` says what input the backbone expects.
`preprocessing_spec(name)` gives that spec without building the network.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from msl_kit.models import packaged
from msl_kit.models.head import EmbeddingHead, EmbeddingModel
from msl_kit.models.registry import backbone_spec
from msl_kit.models.timm_backbones import HUB
from msl_kit.models.weights import load_backbone_weights, resolve_weights, uses_weights
from msl_kit.params import ParamError, checked, declared
from msl_kit.preprocessing import Preprocessing


def backbone_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option backbone `name` declares, from `options` (None: the declared default),
    checked against its declaration; ParamError for a value out of range or an option it lacks."""
    spec = backbone_spec(name)
    given = {k: v for k, v in options.items() if v is not None}
    if spec.params is None:
        if given:
            raise ParamError(f"{name} takes no option(s) {sorted(given)}")
        return {}
    try:
        return checked(spec.params, given)
    except ParamError as e:
        raise type(e)(f"{name}: {e}") from None


def preprocessing_spec(backbone: str, **options: Any) -> Preprocessing:
    """The preprocessing spec of `backbone`, without building the network or reading weights.

    Options are the backbone's own (convnet: in_channels 1 or 3, input_size, resize_size
    (default input_size), width); options it does not declare are ignored.
    """
    spec = backbone_spec(backbone)
    names = declared(spec.params) if spec.params is not None else {}
    return spec.preprocessing(
        **backbone_options(backbone, {k: options[k] for k in names if k in options})
    )


def check_pretrained(backbone: str, pretrained: str | None) -> None:
    """`hub` only where the backbone downloads its own weights (timm), `default` (the published
    file's cache path) only where it does not, packaged weights (`efficientnet_lite0`) only
    with their timm model; ParamError naming what it takes otherwise."""
    own_download = backbone_spec(backbone).takes_pretrained
    word = "default" if own_download else HUB
    allowed = (
        "use hub (timm's own download), a weights file path, or none"
        if own_download
        else "use default (the published file's cache path), a weights file path, or none"
    )
    if pretrained == word:
        raise ParamError(
            f"model.pretrained = {pretrained!r} is not allowed: {backbone} takes no {word}: "
            f"{allowed}"
        )
    if packaged.is_packaged(pretrained):
        try:
            packaged.check_backbone(backbone, str(pretrained))
        except packaged.PackagedWeightsError as e:
            raise ParamError(str(e)) from None


def build_model(
    name: str,
    embedding_dim: int = 512,
    pretrained: str | os.PathLike | None = None,
    *,
    freeze_bn: bool = False,
    head_init: str = "kaiming_fan_out",
    freeze_bn_affine: bool = False,
    freeze_modules: tuple[str, ...] | list[str] = (),
    **options: Any,
) -> EmbeddingModel:
    """Build backbone + head. `pretrained`: a backbone weights file, "default", or None / "none"
    ("hub" for timm backbones: timm's own download; a name of `packaged.PACKAGED`, e.g.
    "efficientnet_lite0": weights a pip package installed, converted by `msl-kit prepare`).

    Options are the backbone's declared params (convnet: in_channels, input_size, resize_size,
    width; timm: global_pool, input_size, resize_size); undeclared ones are refused.
    `head_init`: "kaiming_fan_out" (the released recipe) or "orthogonal". `freeze_bn_affine`
    stops BatchNorm weight / bias training; `freeze_modules` names backbone modules (e.g.
    "patch_embed") whose parameters stay fixed.
    """
    spec = backbone_spec(name)
    options = backbone_options(name, options)
    preprocessing = spec.preprocessing(**options)
    pretrained = pretrained if uses_weights(pretrained) else None
    if packaged.is_packaged(pretrained):
        packaged.check_backbone(name, str(pretrained))
        pretrained = packaged.resolve(str(pretrained))
    if spec.takes_pretrained:
        backbone = spec.build(preprocessing, pretrained=pretrained, **options)
    else:
        backbone = spec.build(preprocessing, **options)
        if pretrained is not None:
            load_backbone_weights(backbone, resolve_weights(name, pretrained))
    freeze(backbone, name, freeze_modules, bn_affine=freeze_bn_affine)
    head = EmbeddingHead(int(backbone.feature_dim), embedding_dim, init=head_init)
    return EmbeddingModel(backbone, head, preprocessing, name=name, freeze_bn=freeze_bn)


def freeze(
    backbone: nn.Module, name: str, modules: tuple[str, ...] | list[str], bn_affine: bool = False
) -> None:
    """Stop training the parameters of `backbone`'s named `modules` (and BatchNorm's weight and
    bias with `bn_affine`): requires_grad False, so no optimizer group holds them."""
    found = dict(backbone.named_modules())
    missing = [m for m in modules if m not in found or not m]
    if missing:
        top = ", ".join(n for n, _ in backbone.named_children())
        raise ParamError(
            f"model.freeze_modules: {name} has no module {missing[0]!r}; its top-level modules "
            f"are {top}"
        )
    for module_name in modules:
        found[module_name].requires_grad_(False)
    if bn_affine:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(False)
