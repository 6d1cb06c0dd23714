"""Any timm model as a backbone: its preprocessing spec, its constructor, its weights.

`timm_preprocessing(name)` reads the spec from timm's pretrained config, exactly as
`timm.data.resolve_data_config` resolves it, without building the network (the config is a
registry lookup, `timm.models.get_pretrained_cfg`). `build_timm_backbone(name, pretrained)`
builds `timm.create_model(name, pretrained=False, num_classes=0)`: images -> pooled features
with the model's own pooling, `.feature_dim` wide. Weights come from a local file
(.safetensors, or a torch file read weights-only), or from timm's own hub download with
`pretrained="hub"` where a network exists. timm is imported on first use, so the rest of
msl_kit works without it.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from msl_kit.files.atomic import safe_load
from msl_kit.models.state_dicts import WeightsError, mismatches, without_classifier
from msl_kit.params import ParamError, param
from msl_kit.preprocessing import Preprocessing

__all__ = [
    "GLOBAL_POOLS",
    "HUB",
    "TimmParams",
    "build_timm",
    "build_timm_backbone",
    "check_timm_name",
    "load_timm_weights",
    "timm_preprocessing",
    "weights_source",
]

HUB = "hub"  # pretrained=HUB: timm's own download (Hugging Face hub or the config's url)
# Poolings that keep the width timm reports (num_features): "catavgmax" doubles it and "map"
# adds an attention pool that no weights file holds. CNNs take avg / max / avgmax; ViTs also
# "token" (the class token) and avg / avgmax / max over the patch tokens.
GLOBAL_POOLS = ("avg", "max", "avgmax", "token")
# Classifier module names timm uses; a weights file saved with a classifier carries these.
CLASSIFIER_NAMES = ("head", "fc", "classifier", "head_dist", "last_linear")


@dataclass(frozen=True)
class TimmParams:
    """The options of every `timm:<name>` backbone (`model.timm.*`); 0 / None: timm's own."""

    input_size: int = param(
        0, "side the network sees, px", ge=16, le=1024, off=0, off_means="timm's config"
    )
    resize_size: int = param(
        0,
        "eval resize before the center crop, px",
        ge=16,
        le=2048,
        off=0,
        off_means="input_size / crop_pct",
    )
    global_pool: str | None = param(
        None, "pooling (None: the model's own)", choices=(None, *GLOBAL_POOLS)
    )


def _timm() -> ModuleType:
    """The timm package, or one line saying how to get it."""
    try:
        import timm
    except ImportError:
        raise ImportError("timm backbones need the timm package: pip install timm") from None
    return timm


def check_timm_name(name: str) -> str:
    """`name` if timm knows it ("arch" or "arch.tag"), else one ValueError naming close names."""
    timm = _timm()
    arch, tag = timm.models.split_model_name_tag(name)
    if timm.is_model(arch) and (not tag or name in timm.list_models(pretrained=True)):
        return name
    names = sorted(set(timm.list_models()) | set(timm.list_models(pretrained=True)))
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.6)
    close = close or difflib.get_close_matches(name, names, n=6, cutoff=0.4)
    hint = f"close names: {', '.join(close)}" if close else "no close name"
    raise ParamError(
        f"timm has no model {name!r} ({hint}); see timm.list_models('*pattern*', pretrained=True)"
    )


def _pretrained_cfg(name: str) -> dict:
    """The pretrained config timm would attach to `name`'s model, as a dict (no network built)."""
    cfg = _timm().models.get_pretrained_cfg(check_timm_name(name))
    return cfg.to_dict() if cfg is not None else {}


def timm_preprocessing(
    name: str,
    input_size: int | None = None,
    resize_size: int | None = None,
    global_pool: str | None = None,
) -> Preprocessing:
    """The preprocessing spec of timm model `name`, from its pretrained config.

    Input size, interpolation, mean and std are `resolve_data_config`'s; the resize before the
    center crop is timm's eval transform's floor(input_size / crop_pct). Values in [0, 1], RGB.
    `input_size` replaces the config's side (CPU runs at 64 px), the resize following it by
    crop_pct; `resize_size` replaces the resize (Hyp-ViT evaluates CUB at 256, not 248).
    `global_pool` is the registry's other option: the input does not depend on it.
    Augmentation fields (crop scale, flip) keep the Preprocessing defaults: recipes set them.
    """
    timm = _timm()
    data = timm.data.resolve_data_config(pretrained_cfg=_pretrained_cfg(name))
    channels, height, width = data["input_size"]
    if height != width:
        raise ParamError(
            f"timm model {name!r} expects {height}x{width} inputs; msl_kit crops squares only: "
            "pick a model with a square input size"
        )
    side = int(input_size or height)
    resize = int(resize_size or math.floor(side / data["crop_pct"]))  # as transforms_factory
    if resize < side:
        raise ParamError(
            f"model.timm.resize_size = {resize} is smaller than timm:{name}'s input size {side}; "
            f"use {side} or more (timm's own: {math.floor(side / data['crop_pct'])})"
        )
    return Preprocessing(
        color="L" if channels == 1 else "RGB",
        value_range=1.0,
        mean=tuple(float(m) for m in data["mean"]),
        std=tuple(float(s) for s in data["std"]),
        input_size=side,
        resize_size=resize,
        interpolation=data["interpolation"],
    )


def weights_source(name: str) -> str:
    """Where timm downloads `name`'s weights from: the Hugging Face file, else the config's url."""
    cfg = _pretrained_cfg(name)
    if cfg.get("hf_hub_id"):
        filename = cfg.get("hf_hub_filename") or "model.safetensors"
        return f"https://huggingface.co/{cfg['hf_hub_id']}/resolve/main/{filename}"
    return cfg.get("url") or cfg.get("file") or "(timm lists no published weights for it)"


def build_timm_backbone(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    global_pool: str | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """timm model `name` without classifier (images -> pooled features), `.feature_dim` set.

    `pretrained`: None (random init), a weights file (.safetensors or torch) in timm's layout,
    or "hub" (timm's own download; offline, one line says which file to fetch). `global_pool`
    overrides the model's own pooling where timm allows it (CNNs: "avg", "max", "avgmax" =
    (avg + max) / 2; ViTs: "token", "avg"). `input_size` other than the config's builds models
    with a fixed patch grid (ViTs) for that side; CNNs take any side as they are. The model
    carries `.preprocessing` too.
    """
    check_timm_name(name)
    if pretrained is not None and str(pretrained) == "default":
        raise ParamError(
            f"timm:{name} has no 'default' weights path: use model.pretrained=hub (timm's "
            "download) or model.pretrained=PATH (a .safetensors or torch file)"
        )
    kwargs = {"num_classes": 0} | ({"global_pool": global_pool} if global_pool else {})
    if global_pool and global_pool not in GLOBAL_POOLS:
        raise ParamError(f"global_pool {global_pool!r} is not one of {GLOBAL_POOLS}")
    spec = timm_preprocessing(name, input_size)
    if input_size and input_size != timm_preprocessing(name).input_size:
        kwargs["img_size"] = int(input_size)
    if pretrained is not None and str(pretrained) == HUB:
        model = _create(name, kwargs, hub=True)
    else:
        model = _create(name, kwargs, hub=False)
        if pretrained is not None:
            load_timm_weights(model, pretrained)
    # Models with a pre-logits layer (MobileNetV3, some ConvNeXts) output head_hidden_size.
    model.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    model.preprocessing = spec
    return model


def build_timm(
    name: str,
    spec: Preprocessing,
    pretrained: str | os.PathLike | None = None,
    *,
    global_pool: str | None = None,
    input_size: int | None = None,
    resize_size: int | None = None,
) -> nn.Module:
    """The registry's constructor for "timm:<name>": `build_timm_backbone` carrying `spec`
    (which already holds `input_size` and `resize_size`)."""
    model = build_timm_backbone(name, pretrained, global_pool=global_pool, input_size=input_size)
    model.preprocessing = spec
    return model


def _create(name: str, kwargs: dict, hub: bool) -> nn.Module:
    """timm.create_model; `img_size` only where the model takes it (CNNs take any size)."""

    def make(args: dict) -> nn.Module:
        return _from_hub(name, args) if hub else _timm().create_model(name, **args)

    try:
        try:
            return make(kwargs)
        except TypeError as e:  # "unexpected keyword argument 'img_size'": a CNN
            if "img_size" not in kwargs or "img_size" not in str(e):
                raise
        return make({k: v for k, v in kwargs.items() if k != "img_size"})
    except AssertionError as e:  # timm asserts on a pooling the model does not have
        raise ParamError(
            f"timm:{name} does not take global_pool={kwargs.get('global_pool')!r} ({e}); CNNs "
            "take avg, max or avgmax, ViTs also token"
        ) from None


def _from_hub(name: str, kwargs: dict) -> nn.Module:
    """timm's own pretrained download; a failure (offline) is one line saying what to fetch."""
    try:
        return _timm().create_model(name, pretrained=True, **kwargs)
    except TypeError:  # an argument the model does not take (img_size): _create retries
        raise
    except Exception as e:  # hub, urllib and file errors differ by source and version
        raise ConnectionError(  # an OSError: the CLI prints it as one `error:` line
            f"could not download timm weights for {name} ({type(e).__name__}); fetch "
            f"{weights_source(name)} where a network exists and pass model.pretrained=PATH"
        ) from None


def _read_state(path: Path) -> Mapping:
    """A state dict from a .safetensors file or a torch file (weights-only), unwrapped."""
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; pass the path of a downloaded timm weights "
            "file (model.pretrained=PATH)"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise WeightsError(
                f"weights file {path} is not a readable safetensors file ({e})"
            ) from None
    state = safe_load(path, "weights file")
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"weights file {path} is not a state_dict (name -> tensor)")
    return state


def load_timm_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a timm-layout weights file into `model` in place, dropping classifier weights.

    Keys under a classifier (head., fc., classifier., ...) that `model` lacks are dropped, and
    a DDP "module." prefix is removed; any other missing or unexpected key, or a shape
    mismatch, raises ValueError listing them.
    """
    path = Path(path).expanduser()
    state = _read_state(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    target = model.state_dict()
    state = without_classifier(state, target, tuple(f"{n}." for n in CLASSIFIER_NAMES))
    problems = mismatches(state, target)
    if problems:
        raise WeightsError(
            f"weights file {path} does not fit timm model {type(model).__name__}: {problems}. "
            "Is it this model's timm weights file (the same model.backbone name)?"
        )
    model.load_state_dict(state, strict=True)
