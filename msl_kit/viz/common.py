"""What every figure module shares: colours, a pyplot-free Figure, PNG bytes, image arrays.

matplotlib is imported inside the functions, so importing msl_kit.viz loads none of it.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

POS_COLOR = "#1a9850"  # positives, hits
NEG_COLOR = "#d73027"  # negatives, misses
QUERY_COLOR = "#222222"
SPLIT_COLORS = {"train": "#2166ac", "val": "#762a83", "test": "#b35806", "query": "#b35806"}


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free Figure with constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def to_png(fig: Figure, dpi: int = 80) -> bytes:
    """The figure rendered as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def fig_ax(ax: Axes | None, width: float, height: float) -> tuple[Figure, Axes]:
    """`ax` and its figure, or a new figure of that size with one axes."""
    if ax is None:
        fig = new_figure(width, height)
        return fig, fig.add_subplot()
    return ax.figure, ax


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array of a tensor (detached, on the CPU, half floats widened) or array-like."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def as_image_array(image: Any) -> np.ndarray:
    """(H, W) or (H, W, 3) floats in [0, 1] from a PIL image, uint8 array or (C, H, W) tensor."""
    if isinstance(image, Tensor):  # a transformed tensor: undo the normalisation by min-max
        a = image.detach().float().cpu().numpy()
        a = a.transpose(1, 2, 0) if a.ndim == 3 else a
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    else:
        a = np.asarray(image)
        a = a / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    return a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a


def show_image(ax: Axes, image: Any, frame: str | None = None, title: str = "") -> None:
    """Draw `image` on `ax` without ticks, framed in colour `frame` when given."""
    img = as_image_array(image)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_edgecolor(frame), spine.set_linewidth(4)
