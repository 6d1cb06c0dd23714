"""Fitting a weights file's state dict to a backbone: what every weights loader checks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from msl_kit.errors import MslKitError


class WeightsError(MslKitError, ValueError):
    """A weights file that does not fit the backbone (or holds no state dict); says which keys."""


def without_classifier(state: Mapping, target: Mapping, prefixes: tuple[str, ...]) -> dict:
    """`state` minus the keys under a classifier (`prefixes`) that the backbone lacks."""
    return {k: v for k, v in state.items() if k in target or not k.startswith(prefixes)}


def mismatches(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str:
    """Missing keys, unexpected keys and shape mismatches, a few named of each; '' if none."""
    shapes = sorted(k for k in state.keys() & target.keys() if state[k].shape != target[k].shape)
    kinds = {
        "missing keys": sorted(target.keys() - state.keys()),
        "unexpected keys": sorted(state.keys() - target.keys()),
        "shape mismatches": shapes,
    }
    return "; ".join(
        f"{kind} {len(keys)} ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})"
        for kind, keys in kinds.items()
        if keys
    )
