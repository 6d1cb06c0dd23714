"""What MS mining and weighting do: on one batch (notebook 03) and over training (02, 03).

One batch: its similarity matrix, the similarity histograms with the mining thresholds, the
weight w+ / w- of every mined pair, and the other GPW losses side by side. Over training: the
mining statistics that `history.csv` records every `log_every` iterations (`mining_dynamics`),
and the same batch's weights at each of a run's snapshots (`weights_over_training`).
Like msl_kit.viz, every function returns a pyplot-free Figure; matplotlib and pandas are
imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from msl_kit.losses.gpw_weights import gpw_pair_weights
from msl_kit.losses.mining import STAT_KEYS, mined_pairs, ms_pair_weights
from msl_kit.losses.multi_similarity import PRESETS, MSParams, PairWeights, pair_masks
from msl_kit.losses.registry import LOSSES, loss_spec
from msl_kit.train.rundir import RunFolder
from msl_kit.viz.common import NEG_COLOR, POS_COLOR, fig_ax, new_figure, to_numpy

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def other_pair_losses() -> list[str]:
    """The registered pair losses besides MS, in registry order: the GPW comparison's columns."""
    return [name for name, spec in LOSSES.items() if spec.pairs and name != "ms"]


# ----------------------------------------------------------------------------- one batch (03)
def _class_lines(ax: Axes, labels: Any) -> None:
    """White lines between class blocks; the class ids as ticks at block centres."""
    y = to_numpy(labels)
    starts = np.r_[0, np.flatnonzero(np.diff(y)) + 1, len(y)]
    for e in starts[1:-1] - 0.5:
        ax.axhline(e, color="w", lw=0.6), ax.axvline(e, color="w", lw=0.6)
    centres = (starts[:-1] + starts[1:] - 1) / 2
    names = [str(v) for v in y[starts[:-1]]] if len(centres) <= 20 else []
    ax.set_xticks(centres[: len(names)], names, fontsize=7)
    ax.set_yticks(centres[: len(names)], names, fontsize=7)


def similarity_heatmap(sim: Tensor, labels: Tensor, *, ax: Axes | None = None) -> Figure:
    """The (B, B) similarity matrix with class blocks outlined (labels sorted)."""
    fig, ax = fig_ax(ax, 4.4, 3.8)
    im = ax.imshow(to_numpy(sim), cmap="viridis", vmin=-1, vmax=1)
    _class_lines(ax, labels)
    ax.set_title("similarity S = X Xᵀ", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def similarity_histograms(
    sim: Tensor, labels: Tensor, *, lam: float = 0.5, margin: float = 0.1, ax: Axes | None = None
) -> Figure:
    """Positive and negative similarities (all pairs outlined, mined pairs filled) with the
    MS thresholds: lambda and the median per-anchor mining bounds."""
    fig, ax = fig_ax(ax, 5.0, 3.4)
    s = to_numpy(sim)
    pos_mask, neg_mask = (m.numpy() for m in pair_masks(torch.as_tensor(labels)))
    kept = mined_pairs(torch.as_tensor(s), torch.as_tensor(labels), margin=margin)
    kept_pos, kept_neg = (m.numpy() for m in kept)
    bins = np.linspace(min(s.min(), lam) - 0.05, max(s.max(), lam) + 0.05, 41)
    for mask, kept, color, name in (
        (pos_mask, kept_pos, POS_COLOR, "positive"),
        (neg_mask, kept_neg, NEG_COLOR, "negative"),
    ):
        ax.hist(s[mask], bins, color=color, histtype="step", lw=1.5, label=f"{name} pairs")
        ax.hist(s[kept], bins, color=color, alpha=0.35, label=f"mined {name}s")
    with np.errstate(all="ignore"):
        min_pos = np.where(pos_mask, s, np.inf).min(1)
        max_neg = np.where(neg_mask, s, -np.inf).max(1)
    ax.axvline(lam, color="k", ls="--", label=f"λ = {lam:g}")
    if np.isfinite(min_pos).any() and np.isfinite(max_neg).any():  # a batch with both kinds of pair
        ax.axvline(
            np.median(min_pos[np.isfinite(min_pos)]) - margin,
            color=NEG_COLOR,
            ls=":",
            label="negatives kept above\n(median min S⁺ − ε)",
        )
        ax.axvline(
            np.median(max_neg[np.isfinite(max_neg)]) + margin,
            color=POS_COLOR,
            ls=":",
            label="positives kept below\n(median max S⁻ + ε)",
        )
    ax.set_yscale("log"), ax.set_xlabel("similarity"), ax.set_ylabel("pairs")
    ax.legend(fontsize=6.5, loc="upper left")
    return fig


def weight_scatter(
    sim: Tensor,
    labels: Tensor,
    weights: PairWeights,
    *,
    title: str = "",
    ax: Axes | None = None,
) -> Figure:
    """Each pair's weight against its similarity: w+ of positives (green), w- of negatives (red)."""
    fig, ax = fig_ax(ax, 4.0, 3.2)
    s = to_numpy(sim)
    pos_mask, neg_mask = (m.numpy() for m in pair_masks(torch.as_tensor(labels)))
    ax.scatter(s[pos_mask], to_numpy(weights.pos)[pos_mask], s=9, c=POS_COLOR, label="positive w⁺")
    ax.scatter(
        s[neg_mask],
        to_numpy(weights.neg)[neg_mask],
        s=9,
        c=NEG_COLOR,
        marker="x",
        label="negative w⁻",
    )
    if not (weights.pos.any() or weights.neg.any()):
        ax.text(
            0.5,
            0.5,
            "no pair mined: every anchor's pairs\nare already separated (weights 0)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
        )
    ax.set_xlabel("similarity"), ax.set_ylabel("pair weight")
    ax.set_title(title, fontsize=9), ax.legend(fontsize=7)
    return fig


def weight_heatmap(
    weights: PairWeights,
    labels: Tensor | None = None,
    *,
    title: str = "",
    ax: Axes | None = None,
) -> Figure:
    """w+ - w- as a (B, B) image: green pulls a pair together, red pushes it apart, white is
    unmined."""
    from matplotlib.colors import LinearSegmentedColormap

    fig, ax = fig_ax(ax, 4.0, 3.6)
    signed = to_numpy(weights.pos) - to_numpy(weights.neg)
    vmax = float(np.abs(signed).max()) or 1.0
    cmap = LinearSegmentedColormap.from_list("gpw", [NEG_COLOR, "white", POS_COLOR])
    ax.imshow(signed, cmap=cmap, vmin=-vmax, vmax=vmax)
    if labels is not None:
        _class_lines(ax, labels)
    ax.set_title(title or f"w⁺ − w⁻ (max {vmax:.2g})", fontsize=9)
    return fig


def pair_weight_figure(
    sim: Tensor,
    labels: Tensor,
    ms: MSParams | None = None,
    *,
    weights: PairWeights | None = None,
    title: str = "",
    sim_range: tuple[float, float] | None = None,
) -> Figure:
    """The MS view of one batch: similarity histograms with thresholds, w vs S, weight matrix.

    `ms` are the MS numbers (the released preset when None). `weights` are the batch's
    `pair_weights` under them when the caller already has them (the explorers compute them
    once per slider move); else computed here. `sim_range` fixes the similarity axes, so
    figures of several snapshots line up.
    """
    ms = ms or MSParams()
    fig = new_figure(13, 3.6)
    axes = fig.subplots(1, 3, width_ratios=[1.3, 1, 0.9])
    if weights is None:
        weights = ms_pair_weights(sim, labels, ms)
    similarity_histograms(sim, labels, lam=ms.lam, margin=ms.margin, ax=axes[0])
    weight_scatter(sim, labels, weights, title="MS pair weights", ax=axes[1])
    weight_heatmap(weights, labels, ax=axes[2])
    if sim_range is not None:
        axes[0].set_xlim(*sim_range), axes[1].set_xlim(*sim_range)
    params = f"α={ms.alpha:g}  β={ms.beta:g}  λ={ms.lam:g}  ε={ms.margin:g}"
    fig.suptitle(f"{title} · {params}" if title else params, fontsize=10)
    return fig


def gpw_figure(sim: Tensor, labels: Tensor, loss_params: dict[str, dict] | None = None) -> Figure:
    """General Pair Weighting side by side: per loss, weight vs similarity above, weight matrix
    below (MS at the released preset, the others at their defaults unless `loss_params`)."""
    others = {n: {} for n in other_pair_losses()}
    loss_params = loss_params or {"ms": PRESETS["released"], **others}
    fig = new_figure(3.2 * len(loss_params), 6.2)
    axes = fig.subplots(2, len(loss_params), squeeze=False)
    for col, (name, params) in enumerate(loss_params.items()):
        weights = gpw_pair_weights(name, sim, labels, **params)
        weight_scatter(sim, labels, weights, title=loss_spec(name).title, ax=axes[0, col])
        weight_heatmap(weights, labels, ax=axes[1, col])
    return fig


def mined_fractions(sim: Tensor, labels: Tensor, margin: float) -> tuple[float, float]:
    """The fraction of positive and of negative pairs of a (B, B) batch that MS mining keeps."""
    sim, labels = torch.as_tensor(sim), torch.as_tensor(labels)
    kept = mined_pairs(sim, labels, margin=margin)
    masks = pair_masks(labels)
    return tuple(float(k.sum()) / max(int(m.sum()), 1) for k, m in zip(kept, masks))  # type: ignore


def weights_over_training(
    sims: Mapping[int, Tensor], labels: Tensor, ms: MSParams | None = None
) -> Figure:
    """The same batch at several points of training, one column per snapshot iteration: each
    pair's weight against its similarity (top) and the weight matrix (bottom), with the share
    of positive and negative pairs that mining keeps in the title (`ms`: the run's MS numbers,
    the released preset when None)."""
    ms = ms or MSParams()
    fig = new_figure(3.3 * len(sims), 6.4)
    axes = fig.subplots(2, len(sims), squeeze=False)
    for col, (iteration, sim) in enumerate(sorted(sims.items())):
        weights = ms_pair_weights(sim, labels, ms)
        pos, neg = mined_fractions(sim, labels, ms.margin)
        title = f"iteration {iteration}\nmined: {pos:.0%} of positives, {neg:.0%} of negatives"
        weight_scatter(sim, labels, weights, title=title, ax=axes[0, col])
        weight_heatmap(weights, labels, ax=axes[1, col])
    for ax in axes[0]:  # one similarity axis for all columns: the drift is the story
        ax.set_xlim(-0.3, 1.02)
    return fig


# ----------------------------------------------------------------------------- over training (02)
def mining_history(history: pd.DataFrame | Iterable[dict] | str | Path) -> pd.DataFrame:
    """The rows of a training history that carry mining statistics, by iteration.

    `history` is a DataFrame, on_step records, a history.csv or a run folder. A history
    without the STAT_KEYS (a run from before they were recorded) raises ValueError.
    """
    import pandas as pd

    if isinstance(history, (str, Path)):
        path = RunFolder(history).history if Path(history).is_dir() else Path(history)
        history = pd.read_csv(path)
    elif not isinstance(history, pd.DataFrame):
        history = pd.DataFrame(list(history))
    missing = [c for c in STAT_KEYS if c not in history]
    if missing:
        raise ValueError(
            f"this history has no mining statistics (missing {', '.join(missing)}); "
            "runs record them every train.log_every iterations: train a new one"
        )
    return history.dropna(subset=["pos_kept", "neg_kept"]).sort_values("iteration")


def mining_dynamics(
    history: pd.DataFrame | Iterable[dict] | str | Path,
    *,
    lam: float | None = None,
    total: int | None = None,
) -> Figure:
    """What MS is looking at as it learns, against iteration (see `mining_history` for the
    accepted histories): the share of positive / negative pairs mining keeps (left); mean
    (solid) and max (dashed) w+ / w- over the kept pairs, log scale (middle); the 10-90 %
    band and median of positive / negative similarities, with λ when given (right).
    `total` fixes the x range (a live panel of a run that is still going)."""
    rows = mining_history(history)
    fig = new_figure(13, 3.4)
    ax_kept, ax_w, ax_sim = fig.subplots(1, 3)
    it = rows["iteration"].to_numpy()
    for kind, color, name, sign in (
        ("pos", POS_COLOR, "positive", "⁺"),
        ("neg", NEG_COLOR, "negative", "⁻"),
    ):
        ax_kept.plot(
            it, 100 * rows[f"{kind}_kept"], color=color, marker="o", ms=3, label=f"{name} pairs"
        )
        ax_w.plot(it, rows[f"w_{kind}_mean"], color=color, marker="o", ms=3, label=f"mean w{sign}")
        ax_w.plot(it, rows[f"w_{kind}_max"], color=color, ls="--", label=f"max w{sign}")
        q10, q50, q90 = (rows[f"sim_{kind}_q{q}"] for q in (10, 50, 90))
        ax_sim.fill_between(it, q10, q90, color=color, alpha=0.25, label=f"{name}s 10-90 %")
        ax_sim.plot(it, q50, color=color, label=f"{name}s median")
    if lam is not None:
        ax_sim.axhline(lam, color="k", ls="--", lw=1, label=f"λ = {lam:g}")
    ax_kept.set(ylabel="% of pairs kept", title="pairs MS mining keeps", ylim=(0, 102))
    ax_w.set(ylabel="weight", title="weights of the kept pairs", yscale="log")
    ax_sim.set(ylabel="similarity", title="similarities in the batch")
    for ax in (ax_kept, ax_w, ax_sim):
        ax.set_xlabel("iteration")
        if total:
            ax.set_xlim(0, total)
        ax.legend(fontsize=7)
    return fig
