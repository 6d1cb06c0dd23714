"""Input checks shared by the pair losses (multi_similarity, gpw, proxy losses), and the float32
working precision they compute in. Errors name the argument and say what to do next."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

MINING = ("ms", "none")  # MS mining with margin eps, or every pair


def check_embeddings(embeddings: Tensor, name: str = "embeddings") -> None:
    if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch tensor of shape (B, D)")
    if embeddings.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (B, D), got shape {tuple(embeddings.shape)}; "
            "flatten or pool the features first"
        )
    if embeddings.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch; the loss needs at least one sample")


_LABEL_HINT = "map them to integers first, e.g. np.unique(labels, return_inverse=True)[1]"


def check_labels(labels: object, n: int, device: torch.device, name: str = "labels") -> Tensor:
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be integer class ids; {_LABEL_HINT}") from None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"{name} must be integer class ids, got dtype {labels.dtype}; {_LABEL_HINT}"
        )
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{name} must be 1-D with {n} entries (one per row), got shape {tuple(labels.shape)}"
        )
    return labels if labels.device == device else labels.to(device)


def check_sim(
    sim: Tensor, labels: object, ref_labels: object, ignore: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    if not isinstance(sim, Tensor) or not sim.is_floating_point() or sim.dim() != 2:
        raise TypeError("sim must be a 2-D floating-point tensor (anchors x references)")
    if sim.shape[0] == 0:
        raise ValueError("sim has no rows (empty batch); the loss needs at least one anchor")
    labels = check_labels(labels, sim.shape[0], sim.device)
    if ref_labels is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(
                f"sim is {tuple(sim.shape)} but ref_labels is None; pass "
                "ref_labels for a non-square (anchors x references) matrix"
            )
    else:
        ref_labels = check_labels(ref_labels, sim.shape[1], sim.device, "ref_labels")
    check_ignore(ignore, tuple(sim.shape))
    return labels, ref_labels


def check_ignore(ignore: Tensor | None, shape: tuple[int, int]) -> None:
    """`ignore` must be None or a bool tensor of the (anchors, references) shape."""
    if ignore is not None and (ignore.dtype != torch.bool or tuple(ignore.shape) != shape):
        raise ValueError(f"ignore must be a bool tensor of shape {shape}")


def check_mining(mining: object) -> str:
    """`mining` must be exactly "ms" (MS mining) or "none" (every pair)."""
    if not isinstance(mining, str) or mining not in MINING:
        raise ValueError(f"mining must be 'ms' (MS mining) or 'none' (all pairs), got {mining!r}")
    return mining


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast so that S = X R^T is formed in float32, not fp16 / bf16."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = (
            torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
        )
    if enabled:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32
