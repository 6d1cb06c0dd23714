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
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from msl_kit.files.atomic import safe_load
from msl_kit.preprocessing import Preprocessing

__all__ = [
    "HUB",
    "build_timm_backbone",
    "check_timm_name",
    "load_timm_weights",
    "timm_preprocessing",
    "weights_source",
]

HUB = "hub"  # pretrained=HUB: timm's own download (Hugging Face hub or the config's url)
# Classifier module names timm uses; a weights file saved with a classifier carries these.
CLASSIFIER_NAMES = ("head", "fc", "classifier", "head_dist", "last_linear")


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
    raise ValueError(
        f"timm has no model {name!r} ({hint}); see timm.list_models('*pattern*', pretrained=True)"
    )


def _pretrained_cfg(name: str) -> dict:
    """The pretrained config timm would attach to `name`'s model, as a dict (no network built)."""
    cfg = _timm().models.get_pretrained_cfg(check_timm_name(name))
    return cfg.to_dict() if cfg is not None else {}


def timm_preprocessing(name: str) -> Preprocessing:
    """The preprocessing spec of timm model `name`, from its pretrained config.

    Input size, interpolation, mean and std are `resolve_data_config`'s; the resize before the
    center crop is timm's eval transform's floor(input_size / crop_pct). Values in [0, 1], RGB.
    Augmentation fields (crop scale, flip) keep the Preprocessing defaults: recipes set them.
    """
    timm = _timm()
    data = timm.data.resolve_data_config(pretrained_cfg=_pretrained_cfg(name))
    channels, height, width = data["input_size"]
    if height != width:
        raise ValueError(
            f"timm model {name!r} expects {height}x{width} inputs; msl_kit crops squares only: "
            "pick a model with a square input size"
        )
    return Preprocessing(
        color="L" if channels == 1 else "RGB",
        value_range=1.0,
        mean=tuple(float(m) for m in data["mean"]),
        std=tuple(float(s) for s in data["std"]),
        input_size=int(height),
        resize_size=math.floor(height / data["crop_pct"]),  # as timm's transforms_factory
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
    name: str, pretrained: str | os.PathLike | None = None, *, global_pool: str | None = None
) -> nn.Module:
    """timm model `name` without classifier (images -> pooled features), `.feature_dim` set.

    `pretrained`: None (random init), a weights file (.safetensors or torch) in timm's layout,
    or "hub" (timm's own download; offline, one line says which file to fetch). `global_pool`
    overrides the model's own pooling where timm allows it (CNNs: "avg", "max", "avgmax" =
    (avg + max) / 2; ViTs: "token", "avg"). The model carries `.preprocessing` too.
    """
    timm = _timm()
    check_timm_name(name)
    kwargs = {"num_classes": 0} | ({"global_pool": global_pool} if global_pool else {})
    if pretrained is not None and str(pretrained) == HUB:
        model = _from_hub(name, kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if pretrained is not None:
            load_timm_weights(model, pretrained)
    # Models with a pre-logits layer (MobileNetV3, some ConvNeXts) output head_hidden_size.
    model.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    model.preprocessing = timm_preprocessing(name)
    return model


def _from_hub(name: str, kwargs: dict) -> nn.Module:
    """timm's own pretrained download; a failure (offline) is one line saying what to fetch."""
    try:
        return _timm().create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # hub, urllib and file errors differ by source and version
        raise RuntimeError(
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
            raise ValueError(
                f"weights file {path} is not a readable safetensors file ({e})"
            ) from None
    state = safe_load(path, "weights file")
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights file {path} is not a state_dict (name -> tensor)")
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
    classifier = tuple(f"{n}." for n in CLASSIFIER_NAMES)
    state = {k: v for k, v in state.items() if k in target or not k.startswith(classifier)}
    problems = _mismatches(state, target)
    if problems:
        raise ValueError(
            f"weights file {path} does not fit timm model {type(model).__name__}: {problems}. "
            "Is it this model's timm weights file (the same model.backbone name)?"
        )
    model.load_state_dict(state, strict=True)


def _mismatches(state: Mapping, target: Mapping) -> str:
    """Missing keys, unexpected keys and shape mismatches, a few named of each; '' if none."""
    shape = sorted(k for k in state.keys() & target.keys() if state[k].shape != target[k].shape)
    kinds = {
        "missing": sorted(target.keys() - state.keys()),
        "unexpected": sorted(state.keys() - target.keys()),
        "wrong shape": shape,
    }
    return "; ".join(
        f"{len(keys)} {kind} ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})"
        for kind, keys in kinds.items()
        if keys
    )
