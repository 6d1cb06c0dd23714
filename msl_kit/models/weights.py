"""Backbone weights: where the published files live, loading a bare state_dict, downloading."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from msl_kit.files.atomic import safe_load
from msl_kit.files.download import download_file
from msl_kit.models.registry import published_weights
from msl_kit.models.state_dicts import WeightsError, mismatches, without_classifier

# A backbone file may also carry its ImageNet classifier, which we drop.
CLASSIFIER_PREFIXES = ("last_linear.", "fc.")
NO_WEIGHTS = ("none", "")  # model.pretrained=none on the command line reads as this string


def uses_weights(pretrained: str | os.PathLike | None) -> bool:
    """Whether `pretrained` asks for weights: not None, "none" or ""."""
    return pretrained is not None and str(pretrained).strip().lower() not in NO_WEIGHTS


def default_weight_paths(name: str) -> list[Path]:
    """Where `pretrained="default"` looks: torch.hub's cache ($TORCH_HOME/hub/checkpoints),
    then the old model-zoo folder ~/.torch/models."""
    if name not in published_weights():
        raise WeightsError(
            f"no published weights for {name!r}; those exist for {sorted(published_weights())}"
        )
    filename = published_weights()[name].rsplit("/", 1)[1]
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
    url = published_weights().get(name)
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
        raise WeightsError(
            f"{path} is not a bare state_dict (name -> tensor); save "
            "`backbone.state_dict()` or use the published ImageNet file"
        )
    target = backbone.state_dict()
    state = without_classifier(state, target, CLASSIFIER_PREFIXES)
    for key, ours in target.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(ours)
        elif key in state and state[key].shape == (1, *ours.shape):
            state[key] = state[key].reshape(ours.shape)
    problems = mismatches(state, target)
    if problems:
        raise WeightsError(
            f"{path} does not fit this backbone: {problems}. Is it the "
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
    url = url or published_weights().get(name)
    if url is None:
        raise WeightsError(
            f"no published weights for {name!r}; those exist for {sorted(published_weights())}"
        )
    folder = Path(dest_dir) if dest_dir is not None else default_weight_paths(name)[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / url.rsplit("/", 1)[1]
    download_file(url, dest, md5=None, progress=progress)
    return dest
