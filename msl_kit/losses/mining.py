"""What MS mining and weighting do to a batch: pair weights, kept pairs, statistics for logs.

Closed forms on top of the fast path of `msl_kit.losses.multi_similarity` (the same mining and
weights, in the same pass), for notebook figures and widgets (`pair_weights`, `mined_pairs`) and
training logs (`mining_stats`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from msl_kit.losses.inputs import check_sim, work_dtype
from msl_kit.losses.multi_similarity import (
    DEFAULTS,
    MSParams,
    PairWeights,
    ms_core,
    stacked_masks,
)


def pair_weights(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None = None,
    *,
    alpha: float = DEFAULTS["alpha"],
    beta: float = DEFAULTS["beta"],
    lam: float = DEFAULTS["lam"],
    margin: float = DEFAULTS["margin"],
    ignore: Tensor | None = None,
) -> PairWeights:
    """The paper's w+ and w- for every mined pair, in closed form (no autograd).

    `.pos[i, j]` = -dL/dS_ij and `.neg[i, j]` = dL/dS_ij with L = sum_i L_i, each row its
    own input; zero where a pair is not mined, not of that kind, or its anchor is invalid.
    """
    return ms_pair_weights(sim, labels, MSParams(alpha, beta, lam, margin), ref_labels, ignore)


def ms_pair_weights(
    sim: Tensor,
    labels: Tensor,
    ms: MSParams,
    ref_labels: Tensor | None = None,
    ignore: Tensor | None = None,
) -> PairWeights:
    """`pair_weights` with the four numbers as one `MSParams`."""
    labels, ref_labels = check_sim(sim, labels, ref_labels, ignore)
    masks = stacked_masks(labels, ref_labels, ignore)
    with torch.no_grad():
        core = ms_core(sim.detach().to(work_dtype(sim)), masks, ms)
        weights = core.e.mul_(core.coef)
    return PairWeights(weights[0], weights[1])


def mined_pairs(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None = None,
    *,
    margin: float = DEFAULTS["margin"],
    ignore: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The pairs MS mining keeps, (kept_pos, kept_neg) as (B, M) bool; rows of anchors that
    lack either kept set are all False (those anchors do not count in the loss)."""
    labels, ref_labels = check_sim(sim, labels, ref_labels, ignore)
    masks = stacked_masks(labels, ref_labels, ignore)
    with torch.no_grad():
        # alpha, beta and lam do not change which pairs mining keeps
        core = ms_core(sim.detach().to(work_dtype(sim)), masks, MSParams(1.0, 1.0, 0.0, margin))
    kept = core.kept & (core.coef > 0)
    return kept[0], kept[1]


# The keys of `mining_stats`, in the order history.csv shows them (the engine logs them every
# train.log_every iterations; viz_mining plots them).
STAT_KEYS = (
    "pos_kept",
    "neg_kept",
    "w_pos_mean",
    "w_pos_max",
    "w_neg_mean",
    "w_neg_max",
    "sim_pos_q10",
    "sim_pos_q50",
    "sim_pos_q90",
    "sim_neg_q10",
    "sim_neg_q50",
    "sim_neg_q90",
)


def mining_stats(sim: Tensor, labels: Tensor, ms: MSParams | None = None) -> dict[str, float]:
    """What MS mining does to one batch's (B, B) similarity matrix, for training logs.

    pos_kept / neg_kept: fraction of all positive / negative pairs that mining keeps (pairs
    of anchors without both kept sets count as dropped, as in the loss); w_{pos,neg}_{mean,max}:
    the `pair_weights` w+ / w- over the kept pairs; sim_{pos,neg}_q{10,50,90}: quantiles of
    every positive / negative similarity. NaN where a set is empty. No forward pass needed.
    `ms`: the MS numbers to mine and weigh with (the released preset when None).
    """
    labels, _ = check_sim(sim, labels, None, None)
    masks = stacked_masks(labels, None, None)
    with torch.no_grad():  # few kernels, every reduction over both kinds at once
        s = sim.detach().to(work_dtype(sim))
        core = ms_core(s, masks, ms or MSParams())
        kept = core.kept & (core.coef > 0)
        w = core.e.mul_(core.coef)  # zero off the kept pairs
        n_pairs, n_kept = masks.sum((1, 2)), kept.sum((1, 2))
        w_max = torch.where(n_kept > 0, w.amax((1, 2)), math.nan)
        ordered = torch.where(masks, s, math.inf).flatten(1).sort(1).values
        table = torch.cat(
            [
                torch.stack([n_kept / n_pairs, w.sum((1, 2)) / n_kept, w_max], 1),
                _quantiles(ordered, n_pairs, (0.1, 0.5, 0.9)),
            ],
            1,
        ).tolist()
    stats = {}
    for name, col in (
        ("{}_kept", 0),
        ("w_{}_mean", 1),
        ("w_{}_max", 2),
        ("sim_{}_q10", 3),
        ("sim_{}_q50", 4),
        ("sim_{}_q90", 5),
    ):
        stats.update({name.format(kind): table[k][col] for k, kind in enumerate(("pos", "neg"))})
    return {key: stats[key] for key in STAT_KEYS}


def _quantiles(ordered: Tensor, counts: Tensor, qs: tuple[float, ...]) -> Tensor:
    """(rows, len(qs)) linear-interpolation quantiles (numpy's default) of the first
    counts[i] values of each sorted row; NaN for empty rows."""
    q = torch.tensor(qs, dtype=ordered.dtype, device=ordered.device)
    pos = (counts[:, None] - 1).clamp_min(0) * q
    lo, hi = pos.floor().long(), pos.ceil().long()
    low, high = ordered.gather(1, lo), ordered.gather(1, hi)
    return torch.where(counts[:, None] > 0, low + (high - low) * (pos - lo), math.nan)
