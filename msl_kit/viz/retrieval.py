"""Retrieval grids: each query (black frame) beside its top-k neighbours, framed green where a
neighbour shares the query's class, red where not, grey where labels are unknown.

One drawing, two ways in: `hits_grid(hits)` draws the `Hits` that `msl_kit.use` search returns
(images read from their stored paths, titles with rank, score and class; `msl-kit search
--grid` and notebook 07 call it), `retrieval_grid(emb, labels, images)` draws embeddings held
in memory (notebook 04). viz sits beside use and does not import it: a hits value is read
through the attributes `HitsLike` names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from torch import Tensor

from msl_kit import metrics
from msl_kit.datasets.registry import item_image
from msl_kit.datasets.transforms import CorruptImageError, load_image, to_mode
from msl_kit.files.tree import printable
from msl_kit.viz.common import NEG_COLOR, POS_COLOR, QUERY_COLOR, new_figure, show_image, to_numpy

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLAIN = "#999999"  # a neighbour whose class is unknown
THUMB = 160  # thumbnail side in pixels
_GREY = ("1", "L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageSet(Protocol):
    """A query or gallery set as `hits_grid` reads it (`msl_kit.use.index.Embeddings`)."""

    paths: np.ndarray
    checkpoint: str

    def class_names(self) -> np.ndarray | None: ...


class HitsLike(Protocol):
    """A search result as `hits_grid` reads it (`msl_kit.use.index.Hits`)."""

    scores: np.ndarray
    indices: np.ndarray
    query: ImageSet
    gallery: ImageSet

    def hits(self) -> np.ndarray | None: ...


Cell = tuple[Any, str, str]  # (image or None, frame colour, title)


def thumbnail(path: str) -> np.ndarray | None:
    """An image to draw for a stored path (a file, or an item of a shipped set), within
    the decoding limits of `transforms.load_image`; None where it cannot be read."""
    try:
        img = item_image(path)  # "omniglot_small:<member>": its dataset's store decodes it
        if img is None:
            img = load_image(path, None, THUMB)  # a decompression bomb is refused here
        img = to_mode(img, "L" if img.mode in _GREY else "RGB")
        img.thumbnail((THUMB, THUMB))
        return np.asarray(img)
    except (CorruptImageError, OSError, ValueError):
        return None


def short(text: str, width: int = 20) -> str:
    """`text` within `width` characters for a thumbnail's title: a path-like class name keeps
    its last part whole and shortens what comes before it; anything else is cut in the middle."""
    if len(text) <= width:
        return text
    head, sep, last = text.rpartition("/")
    room = width - len(last) - 3
    if sep and room >= 3:
        return f"{head[:room]}..{sep}{last}"
    half = (width - 2) // 2
    return f"{text[:half]}..{text[-half:]}"


def _cell(ax: Axes, image: Any, frame: str, title: str) -> None:
    if image is None:
        ax.text(0.5, 0.5, "not\nreadable", ha="center", va="center", fontsize=7, color=PLAIN)
        ax.set_xticks([]), ax.set_yticks([])
    else:
        show_image(ax, image, frame)
    if title:
        ax.set_title(title, fontsize=6.5, pad=3)
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(frame), spine.set_linewidth(4)


def _grid(rows: list[list[Cell]], title: str = "", width: float = 1.45) -> Figure:
    cols = max(len(r) for r in rows)
    fig = new_figure(width * cols, (width + 0.15) * len(rows) + (0.3 if title else 0))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for row, cells in zip(axes, rows):
        for ax, cell in zip(row, cells):
            _cell(ax, *cell)
    if title:
        fig.suptitle(title, fontsize=8)
    return fig


def spread_queries(n: int, n_queries: int) -> np.ndarray:
    """`n_queries` indices spread evenly over `n` queries (not the first few of one class)."""
    return np.unique(np.linspace(0, n - 1, min(n_queries, n)).round().astype(int))


def model_name(checkpoint: str) -> str:
    """A checkpoint path as a grid title names it: its run folder and file."""
    parts = Path(printable(checkpoint)).parts
    return "/".join(parts[-2:]) if parts else "an unnamed model"


def hits_grid(
    hits: HitsLike,
    queries: Sequence[int] | None = None,
    n_queries: int = 6,
    k: int | None = None,
    title: str | None = None,
) -> Figure:
    """Each query beside its top-k gallery images with rank and score. The title names the
    model (`title`, or the gallery's checkpoint) and, where labels are known, the colours."""
    if queries is None:
        queries = spread_queries(len(hits.scores), n_queries)
    k = min(k or hits.scores.shape[1], hits.scores.shape[1])
    same = hits.hits()
    q_names, g_names = hits.query.class_names(), hits.gallery.class_names()
    rows = []
    for q in queries:
        path = str(hits.query.paths[q])
        name = "query " + short(printable(os.path.basename(path.split(":", 1)[-1])), 14)
        if q_names is not None:
            name += f"\n{short(str(q_names[q]))}"
        cells = [(thumbnail(path), QUERY_COLOR, name)]
        for col in range(k):
            j = int(hits.indices[q, col])
            frame = PLAIN if same is None else (POS_COLOR if same[q, col] else NEG_COLOR)
            label = f"#{col + 1}  {hits.scores[q, col]:.3f}"
            if g_names is not None:
                label += f"\n{short(str(g_names[j]))}"
            cells.append((thumbnail(str(hits.gallery.paths[j])), frame, label))
        rows.append(cells)
    head = title or f"searched with {model_name(hits.gallery.checkpoint)}"
    if same is not None:
        head += "\ngreen: same class as the query, red: another class"
    return _grid(rows, head)


def retrieval_grid(
    emb: Tensor,
    labels: Tensor,
    images: Sequence,
    *,
    n_queries: int = 6,
    k: int = 5,
    queries: Sequence[int] | None = None,
    seed: int = 0,
    title: str = "",
) -> Figure:
    """Queries and their top-k neighbours among embeddings in memory (query = gallery, the
    query itself excluded): green frame same class, red not."""
    _, neighbours = metrics.knn(emb, k)
    labels = to_numpy(labels)
    if queries is None:
        rng = np.random.default_rng(seed)
        queries = sorted(rng.choice(len(labels), min(n_queries, len(labels)), replace=False))
    rows = []
    for row, q in enumerate(queries):
        cells = [(images[q], QUERY_COLOR, "query" if row == 0 else "")]
        for col, j in enumerate(neighbours[q].tolist(), start=1):
            frame = POS_COLOR if labels[j] == labels[q] else NEG_COLOR
            cells.append((images[j], frame, f"top {col}" if row == 0 else ""))
        rows.append(cells)
    return _grid(rows, title, width=1.25)
