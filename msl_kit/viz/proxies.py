"""The General Pair Weighting view of a proxy loss: Proxy-Anchor's weights on data-to-proxy
similarities beside MS's weights on data-to-data pairs, for one batch (notebook 03).

Proxy-Anchor scores each sample against one proxy per class; its weight on a pair (x, p) is
dL/ds(x, p) (`losses.proxy_anchor.proxy_weights`), the analogue of MS's w+ / w-. Like the rest
of msl_kit.viz, the figure is pyplot-free and matplotlib is imported inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from msl_kit.losses.mining import ms_pair_weights
from msl_kit.losses.multi_similarity import MSParams
from msl_kit.losses.proxy_anchor import ALPHA, MARGIN, proxy_weights
from msl_kit.viz.common import NEG_COLOR, POS_COLOR, new_figure, to_numpy
from msl_kit.viz.mining import weight_heatmap, weight_scatter

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def batch_proxies(
    embeddings: Tensor, labels: Tensor, proxies: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, str]:
    """(similarities (B, C), labels in 0..C-1, the columns of the batch's classes, a note).

    With learned `proxies` (C, D) the batch is scored against all of them, as the loss does (its
    negative term averages over every proxy), and `labels` index them. Without, each class's
    normalised mean embedding stands in (C = the batch's classes), so a model trained with MS
    can be shown the proxy view too.
    """
    x = F.normalize(embeddings.float(), dim=1)
    labels = torch.as_tensor(labels)
    if proxies is None:
        classes, local = torch.unique(labels, return_inverse=True)
        centres = torch.stack([x[local == c].mean(0) for c in range(len(classes))])
        note = "stand-in proxies: class means"
        return x @ F.normalize(centres, dim=1).T, local, torch.arange(len(classes)), note
    note = f"learned proxies of the batch's classes (of {len(proxies)})"
    return x @ F.normalize(proxies.float(), dim=1).T, labels, torch.unique(labels), note


def proxy_weight_scatter(
    sim: Tensor, labels: Tensor, *, alpha: float, margin: float, ax: Axes
) -> None:
    """Each data-to-proxy pair's Proxy-Anchor weight against its similarity."""
    w = proxy_weights(sim, labels, margin=margin, alpha=alpha)
    s, pos = to_numpy(sim), np.eye(sim.shape[1], dtype=bool)[to_numpy(labels)]
    ax.scatter(s[pos], to_numpy(w.pos)[pos], s=12, c=POS_COLOR, label="own proxy  −∂L/∂s")
    neg = ~pos
    ax.scatter(s[neg], to_numpy(w.neg)[neg], s=12, c=NEG_COLOR, marker="x", label="other  ∂L/∂s")
    ax.axvline(margin, color=POS_COLOR, ls=":", lw=1)
    ax.axvline(-margin, color=NEG_COLOR, ls=":", lw=1)
    ax.set_xlabel("similarity s(x, proxy)"), ax.set_ylabel("weight")
    ax.legend(fontsize=8)


def proxy_vs_ms_figure(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor | None = None,
    *,
    alpha: float = ALPHA,
    margin: float = MARGIN,
    ms: MSParams | None = None,
) -> Figure:
    """MS's pair weights (left) beside Proxy-Anchor's data-to-proxy weights (right) on one
    batch: weight against similarity above, the signed weight matrix below (green pulls, red
    pushes). `ms` are MS's numbers (default: the released preset)."""
    from matplotlib.colors import LinearSegmentedColormap

    labels = torch.as_tensor(labels)
    x = F.normalize(embeddings.float(), dim=1)
    ms = ms or MSParams()
    sim_pp = x @ x.T
    fig = new_figure(11, 7.6)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(2, 2)
    title = f"MS: data-to-data pairs (α={ms.alpha:g} β={ms.beta:g} λ={ms.lam:g})"
    weights = ms_pair_weights(sim_pp, labels, ms)
    weight_scatter(sim_pp, labels, weights, title=title, ax=axes[0, 0])
    weight_heatmap(weights, labels, ax=axes[1, 0])
    axes[1, 0].set_xlabel("sample"), axes[1, 0].set_ylabel("sample")

    sim, proxy_labels, shown, note = batch_proxies(embeddings, labels, proxies)
    proxy_weight_scatter(sim, proxy_labels, alpha=alpha, margin=margin, ax=axes[0, 1])
    title = f"Proxy-Anchor: data-to-proxy pairs, {sim.shape[1]} proxies (α={alpha:g} δ={margin:g})"
    axes[0, 1].set_title(title, fontsize=9)
    w = proxy_weights(sim, proxy_labels, margin=margin, alpha=alpha)
    signed = to_numpy(w.pos - w.neg)[:, to_numpy(shown)]
    classes = labels.unique()
    vmax = float(np.abs(signed).max()) or 1.0
    cmap = LinearSegmentedColormap.from_list("gpw", [NEG_COLOR, "white", POS_COLOR])
    axes[1, 1].imshow(signed, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    axes[1, 1].set_xticks(range(len(classes)), [str(int(c)) for c in classes], fontsize=7)
    axes[1, 1].set_xlabel("proxy (class)"), axes[1, 1].set_ylabel("sample")
    axes[1, 1].set_title(f"w⁺ − w⁻ (max {vmax:.2g}); {note}", fontsize=8)
    fig.suptitle(
        "General Pair Weighting: MS weighs pairs of samples, Proxy-Anchor weighs each sample "
        "against every proxy",
        fontsize=10,
    )
    return fig
