"""Sensitivity heatmaps of a sweep (`msl-kit sweep`): mean R@1 over two config keys, with the
released and the paper's MS presets marked. Reached as `msl_kit.viz.sensitivity_heatmap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msl_kit.losses.multi_similarity import PRESETS
from msl_kit.viz.common import fig_ax

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _axis_position(values: Sequence[float], v: float) -> float:
    """Where `v` falls on an axis whose ticks are `values` at 0, 1, ... (log-spaced if positive);
    a value beyond the grid sits on the border of the outer cell."""
    xs = np.asarray(values, dtype=float)
    if len(xs) < 2:
        return 0.0
    if (xs > 0).all() and v > 0:  # grids like beta 10, 40, 160 are spaced on a log scale
        xs, v = np.log(xs), float(np.log(v))
    edges = np.r_[xs[0] - (xs[1] - xs[0]) / 2, xs, xs[-1] + (xs[-1] - xs[-2]) / 2]
    return float(np.interp(v, edges, np.r_[-0.5, np.arange(len(xs)), len(xs) - 0.5]))


def sensitivity_heatmap(
    table: Any,
    x: str = "loss.ms.beta",
    y: str = "loss.ms.lam",
    value: str = "recall@1",
    *,
    mark: Sequence[str] = ("released", "paper"),
    ax: Axes | None = None,
) -> Figure:
    """Mean `value` (%) over seeds on the x-by-y grid of a sweep (its folder, sweep.csv or rows),
    with the MS presets marked where they fall on the axes (at the edge when outside the grid)."""
    import pandas as pd

    if isinstance(table, (str, Path)):
        table = Path(table) / "sweep.csv" if Path(table).is_dir() else Path(table)
    df = pd.read_csv(table) if isinstance(table, Path) else pd.DataFrame(table)
    grid = df.groupby([y, x])[value].mean().unstack(x).sort_index().sort_index(axis=1)
    fig, ax = fig_ax(ax, 5.2, 4)
    image = ax.imshow(100 * grid.to_numpy(), origin="lower", cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(100 * grid.to_numpy()):
        ax.text(
            j,
            i - 0.3,
            "" if np.isnan(v) else f"{v:.1f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if v < np.nanmean(100 * grid.to_numpy()) else "black",
        )
    ax.set_xticks(range(grid.shape[1]), [f"{v:g}" for v in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{v:g}" for v in grid.index])
    names = {k: k.rsplit(".", 1)[-1] for k in (x, y)}  # loss.ms.beta -> the preset's "beta"
    for preset, marker in zip(mark, "*P^s"):
        p = PRESETS[preset]
        if all(n in p for n in names.values()):
            px = _axis_position(grid.columns, p[names[x]])
            py = _axis_position(grid.index, p[names[y]])
            ax.plot(
                px,
                py,
                marker=marker,
                markersize=14,
                color="white",
                markeredgecolor="black",
                linestyle="",
                clip_on=False,
                label=f"{preset} ({names[x]}={p[names[x]]:g}, {names[y]}={p[names[y]]:g})",
            )
    if ax.lines:
        ax.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False
        )
    fig.colorbar(image, ax=ax, label=f"{value} (%), mean over seeds")
    ax.set(xlabel=x, ylabel=y, title=f"{value} over {names[x]} x {names[y]}")
    return fig
