"""The other pair losses of the MS paper's General Pair Weighting view, on similarities.

Contrastive, triplet, binomial deviance and lifted structure, each a function of the
similarity matrix S, boolean pair masks and row-wise reductions (no loop over anchors), with
`msl_kit.losses.gpw_weights` giving each loss's per-pair weights by autograd. Contrastive and
binomial take `mining="ms"` to restrict them to the pairs MS mining keeps (the paper's ablation
"MS mining with other weightings").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msl_kit.losses.inputs import (
    check_embeddings,
    check_labels,
    check_mining,
    check_sim,
    no_autocast,
    work_dtype,
)
from msl_kit.losses.mining import mined_pairs
from msl_kit.losses.multi_similarity import DEFAULTS, pair_masks
from msl_kit.params import Params, param

UNIT = "similarities lie in [-1, 1]: use a value there"


def _mining_margin() -> float:
    return param(DEFAULTS["margin"], "MS mining's margin, with loss.mining=ms", ge=0, lt=2)


@dataclass(frozen=True)
class ContrastiveParams(Params):
    """Contrastive loss: the margins of its two hinges and of MS mining."""

    pos_margin: float = param(0.0, "positives pulled above 1 - pos_margin", ge=0, lt=2)
    neg_margin: float = param(0.5, "negatives pushed below it", ge=-1, le=1, allowed=UNIT)
    mining_margin: float = _mining_margin()


@dataclass(frozen=True)
class TripletParams(Params):
    """Triplet loss: the hinge margin and which triplets count."""

    margin: float = param(0.1, "hinge margin", ge=0)
    mining: str = param("semihard", "triplets kept", choices=("all", "hard", "semihard"))


@dataclass(frozen=True)
class BinomialParams(Params):
    """Binomial deviance in the MS paper's notation (Yi et al.'s alpha 2, beta 0.5, C 25)."""

    alpha: float = param(2.0, "scale of the positive term", gt=0)
    beta: float = param(50.0, "scale of the negative term", gt=0, le=1000)
    lam: float = param(0.5, "similarity threshold", ge=-1, le=1, allowed=UNIT)
    mining_margin: float = _mining_margin()


@dataclass(frozen=True)
class LiftedParams(Params):
    """Lifted structure: the margin inside its log-sum-exp (any finite number)."""

    margin: float = param(1.0, "margin of the positive log-sum-exp")


def _self_sim(embeddings: Tensor) -> Tensor:
    """S = X X^T in float32 (float64 stays), differentiable, outside autocast."""
    with no_autocast(embeddings.device.type):
        x = embeddings.to(work_dtype(embeddings))
        return x @ x.T


class _PairLoss(nn.Module):
    """Base: forward(embeddings, labels) = from_sim(X X^T, labels); sum_i L_i / B by default."""

    def per_anchor(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def from_sim(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> Tensor:
        """The loss on a (B, B) similarity matrix, or on (B, M) anchors against references
        labelled `ref_labels` with `ignore`d pairs (a cross-batch memory)."""
        rows = self.per_anchor(sim, labels, ref_labels, ignore)
        return rows.sum() / rows.shape[0]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Loss of L2-normalised (B, D) embeddings with (B,) integer labels; a 0-dim tensor."""
        check_embeddings(embeddings)
        labels = check_labels(labels, embeddings.shape[0], embeddings.device)
        return self.from_sim(_self_sim(embeddings), labels)


def _masked_lse(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise log-sum-exp over `mask` and whether each row has any entry.

    Empty rows are filled with zeros before the reduction, so neither the value nor the
    gradient of a discarded row can be NaN.
    """
    has_any = mask.any(1)
    filled = torch.where(mask, values, -math.inf)
    filled = torch.where(has_any[:, None], filled, 0.0)
    return torch.logsumexp(filled, 1), has_any


def _self_masks(
    sim: Tensor,
    labels: object,
    ref_labels: object = None,
    ignore: Tensor | None = None,
    mining: str = "none",
    mining_margin: float = DEFAULTS["margin"],
) -> tuple[Tensor, Tensor, Tensor]:
    """sim in float32/64 and its (positive, negative) masks: all pairs, or the MS-mined ones
    (anchors without both kept sets then have no pair at all, as in the MS loss). Without
    `ref_labels`, sim is the batch against itself and the diagonal is no pair."""
    labels, ref_labels = check_sim(sim, labels, ref_labels, ignore)
    if mining == "ms":
        pos_mask, neg_mask = mined_pairs(
            sim, labels, ref_labels, margin=mining_margin, ignore=ignore
        )
    else:
        pos_mask, neg_mask = pair_masks(labels, ref_labels, ignore)
    return sim.to(work_dtype(sim)), pos_mask, neg_mask


class ContrastiveLoss(_PairLoss):
    """Contrastive loss on similarities (Hadsell et al. 2006, as the MS paper writes it).

    L_i = sum_pos relu(1 - pos_margin - S_ij) + sum_neg relu(S_ik - neg_margin); loss =
    sum_i L_i / B. With pos_margin = 0 and unit vectors the positive term is 1 - S_ij, so
    every positive weighs 1 and every negative above neg_margin weighs 1 (the GPW view).
    mining="ms" sums over the MS-mined pairs only (margin `mining_margin`).
    """

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 0.5,
        mining: str = "none",
        mining_margin: float = DEFAULTS["margin"],
    ) -> None:
        super().__init__()
        self.params = ContrastiveParams(pos_margin, neg_margin, mining_margin)
        self.pos_margin, self.neg_margin = self.params.pos_margin, self.params.neg_margin
        self.mining_margin = self.params.mining_margin
        self.mining = check_mining(mining)

    def per_anchor(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> Tensor:
        """Per-anchor L_i of a (B, B) or (B, M) similarity matrix."""
        sim, pos_mask, neg_mask = _self_masks(
            sim, labels, ref_labels, ignore, self.mining, self.mining_margin
        )
        pos = torch.where(pos_mask, F.relu(1.0 - self.pos_margin - sim), 0.0)
        neg = torch.where(neg_mask, F.relu(sim - self.neg_margin), 0.0)
        return (pos + neg).sum(1)


class TripletLoss(_PairLoss):
    """Triplet margin loss on similarities: relu(S_ik - S_ij + margin) per (i, j, k).

    Mining (per triplet, as in FaceNet / PML's TripletMarginMiner): "all" every triplet,
    "hard" negatives at least as similar as the positive (S_ik >= S_ij), "semihard"
    negatives less similar than the positive but within the margin
    (S_ij - margin < S_ik < S_ij). Loss = mean over mined triplets with a positive hinge.
    Builds a (B, B, B) tensor: meant for batches of a few hundred.
    """

    def __init__(self, margin: float = 0.1, mining: str = "semihard") -> None:
        super().__init__()
        self.params = TripletParams(margin, mining)
        self.margin, self.mining = self.params.margin, self.params.mining

    def _hinges(
        self, sim: Tensor, labels: Tensor, ref_labels: Tensor | None, ignore: Tensor | None
    ) -> Tensor:
        sim, pos_mask, neg_mask = _self_masks(sim, labels, ref_labels, ignore)
        sim_ap, sim_an = sim[:, :, None], sim[:, None, :]
        mined = pos_mask[:, :, None] & neg_mask[:, None, :]
        if self.mining == "hard":
            mined = mined & (sim_an >= sim_ap)
        elif self.mining == "semihard":
            mined = mined & (sim_an < sim_ap) & (sim_an > sim_ap - self.margin)
        return torch.where(mined, F.relu(sim_an - sim_ap + self.margin), 0.0)

    def per_anchor(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> Tensor:
        """Per-anchor sum of mined triplet hinges (the GPW weights count active triplets)."""
        return self._hinges(sim, labels, ref_labels, ignore).sum((1, 2))

    def from_sim(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> Tensor:
        """Mean hinge over mined triplets with a positive hinge; 0 (with grad) if none."""
        hinges = self._hinges(sim, labels, ref_labels, ignore)
        n_active = (hinges.detach() > 0).sum().clamp_min(1)
        return hinges.sum() / n_active


class BinomialDevianceLoss(_PairLoss):
    """Binomial deviance (Yi et al. 2014) in the MS paper's notation.

    L_i = 1/P_i sum_pos log(1 + e^{alpha (lam - S_ij)})
        + 1/N_i sum_neg log(1 + e^{beta (S_ik - lam)}); loss = sum_i L_i / B.
    Defaults alpha=2, beta=50, lam=0.5 are Yi et al.'s alpha=2, beta=0.5, negative cost C=25
    (beta here = alpha C). mining="ms" keeps only the MS-mined pairs (margin
    `mining_margin`); P_i and N_i then count the kept pairs (a mean over what the loss sees).
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        lam: float = 0.5,
        mining: str = "none",
        mining_margin: float = DEFAULTS["margin"],
    ) -> None:
        super().__init__()
        self.params = BinomialParams(alpha, beta, lam, mining_margin)
        self.alpha, self.beta, self.lam = self.params.alpha, self.params.beta, self.params.lam
        self.mining_margin = self.params.mining_margin
        self.mining = check_mining(mining)

    def per_anchor(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> Tensor:
        """Per-anchor L_i of a (B, B) or (B, M) similarity matrix."""
        sim, pos_mask, neg_mask = _self_masks(
            sim, labels, ref_labels, ignore, self.mining, self.mining_margin
        )
        pos = torch.where(pos_mask, F.softplus(self.alpha * (self.lam - sim)), 0.0)
        neg = torch.where(neg_mask, F.softplus(self.beta * (sim - self.lam)), 0.0)
        n_pos = pos_mask.sum(1).clamp_min(1)
        n_neg = neg_mask.sum(1).clamp_min(1)
        return pos.sum(1) / n_pos + neg.sum(1) / n_neg


class LiftedStructureLoss(_PairLoss):
    """Generalised lifted structure loss on similarities, as the MS paper writes it.

    L_i = relu(log sum_pos e^{margin - S_ij} + log sum_neg e^{S_ik}) for anchors with both
    positives and negatives (else 0); loss = sum_i L_i / B. The weights are softmaxes:
    w+ = softmax over positives of -S, w- = softmax over negatives of S.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        # any finite margin: it shifts a log-sum-exp (negative values clamp some anchors to 0)
        self.params = LiftedParams(margin)
        self.margin = self.params.margin

    def per_anchor(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> Tensor:
        """Per-anchor L_i of a (B, B) or (B, M) similarity matrix."""
        sim, pos_mask, neg_mask = _self_masks(sim, labels, ref_labels, ignore)
        pos_lse, has_pos = _masked_lse(self.margin - sim, pos_mask)
        neg_lse, has_neg = _masked_lse(sim, neg_mask)
        return torch.where(has_pos & has_neg, F.relu(pos_lse + neg_lse), 0.0)
