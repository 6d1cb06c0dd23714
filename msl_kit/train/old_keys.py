"""The flat keys of configs written before each component declared its own parameters.

`loss.beta`, `loss.preset`, `model.image_size`, ... still load: each is mapped to the section
of the component it was written for (`loss.ms.beta`, `model.convnet.input_size`), judged from
the loss and backbone that the same source (a file, the `--set` list) names, or that are in
effect when it names none. A user's file or `--set` gets a one-line note per old key saying how
to write it now; a stored config (a checkpoint's, a run's config.yaml) is upgraded silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from msl_kit.losses.registry import LOSSES
from msl_kit.models.registry import backbone_section, section_params
from msl_kit.params import declared

# MS's four numbers and its presets were flat loss keys; other losses took alpha and margin too.
LOSS_KEYS = ("alpha", "beta", "lam", "margin", "preset")
# model.<key> -> (the family that took it, its name now); resize_size belonged to convnet and
# timm alike, and goes to the backbone in effect where that declares it.
SHARED = ("resize_size",)
MODEL_KEYS = {
    "image_size": ("convnet", "input_size"),
    "in_channels": ("convnet", "in_channels"),
    "width": ("convnet", "width"),
    "resize_size": ("convnet", "resize_size"),
    "global_pool": ("timm", "global_pool"),
    "input_size": ("timm", "input_size"),
}


class ConfigNote(FutureWarning):
    """An old key that still loads; the message says how to write it now (the CLI prints it as
    one `note:` line)."""


def _takes(params: type | None, key: str) -> bool:
    return params is not None and key in declared(params)


def _loss_section(key: str, loss: str) -> str:
    spec = LOSSES.get(loss)
    if key == "preset":
        return "ms"  # the MS presets were the only ones
    return loss if spec is not None and _takes(spec.params, key) else "ms"


def _model_section(key: str, backbone: str) -> tuple[str, str]:
    family, name = MODEL_KEYS[key]
    section = backbone_section(backbone)
    shared = key in SHARED and _takes(section_params(section), name)
    return (section, name) if shared else (family, name)


def new_key(key: str, loss: str, backbone: str) -> str | None:
    """The key `key` is written as now, or None if it is not an old key."""
    head, _, tail = key.partition(".")
    if head == "loss" and tail in LOSS_KEYS:
        return f"loss.{_loss_section(tail, loss)}.{tail}"
    if head == "model" and tail in MODEL_KEYS:
        section, name = _model_section(tail, backbone)
        return f"model.{section}.{name}"
    return None


def upgrade(values: Mapping[str, Any], loss: str, backbone: str, *, note: bool) -> dict:
    """`values` with every old key renamed to its section (see the module's docstring); with
    `note`, one `ConfigNote` per old key."""
    loss, backbone = values.get("loss.name", loss), values.get("model.backbone", backbone)
    out = {}
    for key, value in values.items():
        now = new_key(key, str(loss), str(backbone))
        if now is not None and note:
            warnings.warn(
                f"{key} is written {now} now (the parameter of the component it was written "
                "for); the old key still loads",
                ConfigNote,
                stacklevel=4,
            )
        out[now or key] = value
    return out
