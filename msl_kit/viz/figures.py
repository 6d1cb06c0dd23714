"""Figures for the notebooks: data, similarities, GPW pair weights, training curves, embeddings.

Every plotting function returns a matplotlib Figure built without pyplot, so nothing is shown
twice in a notebook or kept alive by pyplot's registry (`%matplotlib inline` displays a
returned Figure). matplotlib, pandas and umap are imported inside the functions, so importing
msl_kit.viz loads none of them, and umap's first import (numba compilation, ~10 s) is paid only
when a UMAP is drawn.
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from msl_kit import metrics
from msl_kit.datasets.registry import DatasetInfo, list_datasets
from msl_kit.train.rundir import RunFolder
from msl_kit.viz.common import (
    SPLIT_COLORS,
    as_image_array,
    fig_ax,
    new_figure,
    show_image,
    to_numpy,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# ----------------------------------------------------------------------------- data (01)
def dataset_overview() -> pd.DataFrame:
    """Every registered dataset: name, what it is, size, licence, split rule, where from."""
    import pandas as pd

    def where(d: DatasetInfo) -> str:
        return d.url or ("bring your own" if d.store.fetched else "none needed")

    return pd.DataFrame(
        [
            {
                "name": d.name,
                "description": d.description,
                "size": d.size,
                "licence": d.licence,
                "split": d.split_rule,
                "download": where(d),
            }
            for d in list_datasets()
        ]
    )


def class_counts(splits: dict[str, Dataset]) -> pd.DataFrame:
    """Per split: images, classes and the smallest / median / largest class."""
    import pandas as pd

    rows = []
    for name, ds in splits.items():
        counts = np.bincount(np.asarray(ds.labels))
        counts = counts[counts > 0]
        rows.append(
            {
                "split": name,
                "images": int(counts.sum()),
                "classes": len(counts),
                "min/class": int(counts.min()),
                "median/class": float(np.median(counts)),
                "max/class": int(counts.max()),
            }
        )
    return pd.DataFrame(rows)


def class_group(name: str) -> str:
    """The group a class name belongs to: Omniglot's alphabet ("Greek/character03" -> "Greek");
    a name without "/" is its own group."""
    return str(name).split("/", 1)[0]


def class_groups(splits: dict[str, Dataset]) -> pd.DataFrame:
    """Per split and class group (Omniglot: alphabet): how many classes and images it holds."""
    import pandas as pd

    rows = []
    for split, ds in splits.items():
        counts = np.bincount(np.asarray(ds.labels), minlength=len(ds.classes))
        for c, n in enumerate(counts):
            rows.append({"split": split, "group": class_group(ds.classes[c]), "images": int(n)})
    table = pd.DataFrame(rows)
    return (
        table.assign(classes=1)
        .groupby(["split", "group"], sort=False)[["classes", "images"]]
        .sum()
        .reset_index()
    )


def sample_grid(
    splits: dict[str, Dataset],
    *,
    per_class: int = 6,
    max_classes: int = 5,
    one_per_group: bool = False,
) -> Figure:
    """Rows of sample images per class, the first `max_classes` classes of each split, labelled
    by split. `one_per_group` takes each row's class from a different group (Omniglot: one
    character per alphabet), so the grid shows how the train and test alphabets differ."""
    rows = []
    for split, ds in splits.items():
        labels = np.asarray(ds.labels)
        classes = np.unique(labels)
        if one_per_group:  # the first class of each group, in class order
            seen: dict[str, int] = {}
            for c in classes:
                seen.setdefault(class_group(ds.classes[c]), int(c))
            classes = np.array(list(seen.values()))
        for c in classes[:max_classes]:
            rows.append((split, ds, int(c), np.flatnonzero(labels == c)[:per_class]))
    fig = new_figure(1.1 * per_class + 1.2, 1.1 * len(rows))
    axes = fig.subplots(len(rows), per_class, squeeze=False)
    for r, (split, ds, c, idx) in enumerate(rows):
        name = ds.classes[c] if hasattr(ds, "classes") else str(c)
        for col, ax in enumerate(axes[r]):
            if col < len(idx):
                show_image(ax, ds[int(idx[col])][0])
            else:
                ax.axis("off")
        short = "\n".join(textwrap.wrap(name.replace("_", " "), 14)[:2])
        axes[r, 0].set_ylabel(f"{split}\n{short}", color=SPLIT_COLORS.get(split, "k"), fontsize=7)
    return fig


# ----------------------------------------------------------------------------- training curves (05)
def recall_curves(
    runs: str | Path | Iterable[str | Path], metric: str = "recall@1", *, ax: Axes | None = None
) -> Figure:
    """`metric` (%) against iteration for each run folder, read from its history.csv."""
    import pandas as pd

    from msl_kit.reports.paper import find_runs

    fig, ax = fig_ax(ax, 6, 3.6)
    for run in find_runs(runs):
        path = RunFolder(run).history
        history = pd.read_csv(path) if path.is_file() else pd.DataFrame()
        if metric in history:
            points = history.dropna(subset=[metric])
            ax.plot(points["iteration"], 100 * points[metric], marker="o", label=run.name)
    if not ax.lines:
        raise ValueError(f"no run under {runs} has {metric!r} in its history.csv")
    ax.set(xlabel="iteration", ylabel=f"{metric} (%)", title=f"{metric} during training")
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- embeddings (04)
def embedding_2d(
    emb: Any, method: str = "umap", *, seed: int = 0, **umap_options: Any
) -> np.ndarray:
    """(N, 2) coordinates of (N, D) embeddings by UMAP (cosine) or PCA (no umap import).

    For UMAP on up to `EXACT_KNN_MAX` points with a cosine or euclidean metric, the neighbours
    are found exactly by `metrics.knn` and handed to UMAP: the same graph UMAP's own exact
    search builds below 4,096 points, without the ~5 s its numba kernels take to compile in
    every new process (and exact, not NN-descent, up to `EXACT_KNN_MAX`)."""
    x = to_numpy(emb).astype(np.float32)
    if method == "pca":
        x = x - x.mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        return x @ vt[:2].T
    if method == "umap":
        import umap  # heavy: numba compiles on first import

        options = {
            "n_neighbors": min(15, len(x) - 1),
            "min_dist": 0.1,
            "metric": "cosine",
            "random_state": seed,
            **umap_options,
        }
        if "precomputed_knn" not in options:
            options["precomputed_knn"] = exact_knn_graph(
                x, options["n_neighbors"], options["metric"]
            )
        with warnings.catch_warnings():
            # a seed makes UMAP single-threaded, and it says so each time; a precomputed graph
            # has no search index for UMAP.transform, which is never called here
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
            return umap.UMAP(n_components=2, **options).fit_transform(x)
    raise ValueError(f"method must be 'umap' or 'pca', not {method!r}")


EXACT_KNN_MAX = 50_000  # beyond this, UMAP's approximate search is quicker than an exact one


def exact_knn_graph(
    x: np.ndarray, n_neighbors: int, metric: str
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None, None]:
    """UMAP's `precomputed_knn`: each point's `n_neighbors` nearest, itself first at distance
    0, as (int32 indices, float32 distances) under `metric` ("cosine": 1 - cos, "euclidean");
    (None, None, None), which tells UMAP to search itself, for another metric, fewer than two
    points or more than `EXACT_KNN_MAX`."""
    n = len(x)
    if metric not in ("cosine", "euclidean") or not 2 <= n <= EXACT_KNN_MAX or n_neighbors < 2:
        return None, None, None
    k = min(n_neighbors, n) - 1
    if metric == "cosine":
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims, idx = metrics.knn(unit, k)
        dists = (1.0 - sims).clamp_(min=0.0)
    else:
        neg_sq, idx = metrics.knn(x, k, metric="euclidean")
        dists = (-neg_sq).clamp_(min=0.0).sqrt_()
    own = np.arange(n, dtype=np.int32)[:, None]
    indices = np.concatenate([own, idx.numpy().astype(np.int32)], axis=1)
    distances = np.concatenate([np.zeros((n, 1), np.float32), dists.numpy()], axis=1)
    return indices, distances


def spread_points(points: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """Up to n indices of points at least 8% of the plot's span apart (greedy, seeded), so that
    thumbnails placed there do not overlap; fewer where the points do not allow n."""
    points = np.asarray(points, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(points))
    span = float(np.ptp(points, 0).max()) or 1.0
    chosen: list[int] = []
    # wide spacing first, then as close as thumbnails allow
    for min_dist in (0.15 * span, 0.08 * span):
        for i in order:
            if len(chosen) >= n:
                return chosen
            far = not chosen or np.hypot(*(points[chosen] - points[i]).T).min() > min_dist
            if i not in chosen and far:
                chosen.append(int(i))
    return chosen


def embedding_figure(
    points: np.ndarray,
    labels: Any,
    images: Sequence | None = None,
    *,
    n_thumbnails: int = 40,
    title: str = "",
    seed: int = 0,
    ax: Axes | None = None,
) -> Figure:
    """2-D points coloured by class, with image thumbnails (framed in the class colour) at some
    points."""
    import matplotlib
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig, ax = fig_ax(ax, 6, 6)
    points, labels = np.asarray(points), to_numpy(labels)
    classes = np.unique(labels)
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    colors = cmap(np.searchsorted(classes, labels) % cmap.N)
    ax.scatter(points[:, 0], points[:, 1], c=colors, s=8)
    for i in spread_points(points, n_thumbnails if images is not None else 0, seed):
        img = as_image_array(images[i])
        box = OffsetImage(img, zoom=28 / max(img.shape[:2]), cmap="gray" if img.ndim == 2 else None)
        frame = {"edgecolor": colors[i], "lw": 1.5}
        ax.add_artist(AnnotationBbox(box, points[i], pad=0.1, bboxprops=frame))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return fig


def embeddings_before_after(
    before: Tensor,
    after: Tensor,
    labels: Tensor,
    images: Sequence | None = None,
    *,
    method: str = "umap",
    n_thumbnails: int = 30,
    seed: int = 0,
) -> Figure:
    """Two 2-D maps of the same items, untrained model (left) and trained (right), with R@1."""
    fig = new_figure(12, 6)
    names = ("before training", "after training")
    for ax, emb, name in zip(fig.subplots(1, 2), (before, after), names):
        r1 = metrics.recall_at_k(emb, labels, ks=(1,))[1]
        embedding_figure(
            embedding_2d(emb, method, seed=seed),
            labels,
            images,
            n_thumbnails=n_thumbnails,
            title=f"{name} ({method.upper()}, R@1 {100 * r1:.1f}%)",
            seed=seed,
            ax=ax,
        )
    return fig
