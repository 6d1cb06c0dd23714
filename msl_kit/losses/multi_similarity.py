"""Multi-Similarity loss (Wang et al., CVPR 2019): the definition and its fast path.

Read `multi_similarity_loss` first: it is the loss of DESIGN.md written as the paper's
equations (pair masks, mining, a masked log-sum-exp). Everything below the "fast path" line
computes the same numbers (tested equal in value and gradient) in fewer passes; every caller
uses it. The other General Pair Weighting losses live in `msl_kit.losses.gpw`; pair weights,
mined pairs and mining statistics of a batch in `msl_kit.losses.mining`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from msl_kit.losses.inputs import (  # input checks and float32 working precision
    check_embeddings,
    check_ignore,
    check_labels,
    check_mining,
    check_sim,
    no_autocast,
    work_dtype,
)
from msl_kit.params import Params, param

PRESETS: dict[str, dict[str, float]] = {
    "released": dict(alpha=2.0, beta=40.0, lam=0.5, margin=0.1),  # the released code
    "paper": dict(alpha=2.0, beta=50.0, lam=1.0, margin=0.1),  # the paper's text
}
DEFAULTS = PRESETS["released"]  # every default below (and in gpw, mining) comes from here


@dataclass(frozen=True)
class MSParams(Params):
    """The MS loss's four numbers, checked when made: `MSParams()` is the released preset,
    `MSParams.preset("paper")` the paper's. The loss, its pair weights, the mining statistics of
    a run, the config's `loss.ms` section and the notebooks' sliders all read this one
    declaration (the ranges are where the loss is defined; `ui` is a slider's min, max, step)."""

    alpha: float = param(
        DEFAULTS["alpha"],
        "scale of the positive term",
        gt=0,
        hint="released recipe: 2",
        ui=(0.1, 10.0, 0.1),
    )
    beta: float = param(
        DEFAULTS["beta"],
        "scale of the negative term",
        gt=0,
        le=1000,
        hint="released: 40",
        ui=(1.0, 200.0, 1.0),
    )
    lam: float = param(
        DEFAULTS["lam"],
        "similarity threshold lambda",
        ge=-1,
        le=1,
        allowed="similarities lie in [-1, 1]: use a value there",
        ui=(-0.5, 1.0, 0.05),
    )
    margin: float = param(
        DEFAULTS["margin"],
        "mining margin epsilon (2 and above keep every pair)",
        ge=0,
        le=2,
        hint="released: 0.1",
        ui=(0.0, 0.5, 0.01),
    )
    PRESETS: ClassVar[dict[str, dict[str, float]]] = PRESETS

    @classmethod
    def preset(cls, name: str) -> MSParams:
        """The numbers of a named preset: "released" (the code release) or "paper"."""
        if name not in PRESETS:
            raise ValueError(f"unknown MS preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])


def multi_similarity_loss(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None = None,
    *,
    alpha: float = DEFAULTS["alpha"],
    beta: float = DEFAULTS["beta"],
    lam: float = DEFAULTS["lam"],
    margin: float = DEFAULTS["margin"],
    ignore: Tensor | None = None,
    mining: str = "ms",
) -> Tensor:
    """MS loss of a (B, M) similarity matrix, sum_i L_i / B: the readable definition.

    ref_labels (M,) label the columns; when None, sim is the batch against itself and the
    diagonal (an anchor with itself) is no pair. `ignore` (B, M) bool drops pairs from the
    mining and the loss (e.g. an anchor's own copy in a memory bank). A NaN among an anchor's
    pairs makes the loss NaN. mining="none" keeps every pair. Training code uses
    `MultiSimilarityLoss` (same numbers, faster).
    """
    labels, ref_labels = check_sim(sim, labels, ref_labels, ignore)
    ms = MSParams(alpha, beta, lam, margin)  # checked, as floats
    alpha, beta, lam, margin = ms.alpha, ms.beta, ms.lam, ms.margin
    sim = sim.to(work_dtype(sim))  # fp16 / bf16 inputs: float32 maths
    pos, neg = pair_masks(labels, ref_labels, ignore)  # same label / different label
    # Mining (no gradient flows through it): compare each pair with the anchor's hardest
    # pair of the other kind, both taken from the un-mined sets.
    min_pos = torch.where(pos, sim, math.inf).amin(1, keepdim=True).detach()
    max_neg = torch.where(neg, sim, -math.inf).amax(1, keepdim=True).detach()
    mine = check_mining(mining) == "ms"
    kept_pos = pos & (sim - margin < max_neg) if mine else pos  # not far above every negative
    kept_neg = neg & (sim + margin > min_pos) if mine else neg  # close to the hardest positive
    # mined: an anchor counts only with both kinds; unmined: each term alone (paper, PML)
    valid = kept_pos.any(1) & kept_neg.any(1) if mine else kept_pos.any(1) | kept_neg.any(1)
    # 1/a log(1 + sum e^(a z)) as a log-sum-exp with an extra zero: finite for any beta
    pos_term = _log1p_sum_exp(-alpha * (sim - lam), kept_pos) / alpha
    neg_term = _log1p_sum_exp(beta * (sim - lam), kept_neg) / beta
    rows = torch.where(valid, pos_term + neg_term, 0.0)
    rows = torch.where((min_pos.isnan() | max_neg.isnan()).squeeze(1), math.nan, rows)
    return rows.sum() / sim.shape[0]


def _log1p_sum_exp(z: Tensor, keep: Tensor) -> Tensor:
    """Row-wise log(1 + sum_{keep} e^z), by logsumexp over [0, z_kept] (no NaN gradient)."""
    z = torch.where(keep, z, -math.inf)
    return torch.logsumexp(torch.cat((torch.zeros_like(z[:, :1]), z), 1), 1)


class PairWeights(NamedTuple):
    """Per-pair weights: `.pos` = -dL/dS on mined positives, `.neg` = dL/dS on mined negatives."""

    pos: Tensor
    neg: Tensor


def pair_masks(
    labels: Tensor, ref_labels: Tensor | None = None, ignore: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(B, M) positive and negative masks; the diagonal is no pair when ref_labels is None."""
    masks = stacked_masks(labels, ref_labels, ignore)
    return masks[0], masks[1]


# ============================================================================= fast path
# One no-grad pass gives the per-anchor losses and every pair's weight, so the gradient
# dL/dS = w- - w+ comes for free (no autograd graph over B x M intermediates). Positives and
# negatives are stacked as kind 0 and 1 of a (2, B, M) tensor holding u = +S and u = -S:
# one amin gives (min_pos, -max_neg) and each later op serves both kinds, which halves the
# number of kernels (the B = 80 call is mostly per-kernel overhead).
@functools.lru_cache(maxsize=64)
def _constants(
    device: torch.device, dtype: torch.dtype, alpha: float, beta: float, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Cached (2, 1, 1) per-kind sign, exponent scale and shift: exponents are
    scale * (shift - u), i.e. alpha (lam - S) and beta (S - lam). Cached because building
    small tensors costs as much as a kernel at B = 80."""
    table = torch.tensor([[1.0, alpha, lam], [-1.0, beta, -lam]], dtype=dtype, device=device)
    return table[:, 0].view(2, 1, 1), table[:, 1].view(2, 1, 1), table[:, 2].view(2, 1, 1)


@functools.lru_cache(maxsize=8)
def _kinds(device: torch.device) -> Tensor:
    return torch.tensor([False, True], device=device).view(2, 1, 1)


def stacked_masks(labels: Tensor, ref_labels: Tensor | None, ignore: Tensor | None) -> Tensor:
    """(2, B, M) bool: [positive pairs, negative pairs]."""
    same = labels[:, None] == (labels if ref_labels is None else ref_labels)[None, :]
    masks = same.unsqueeze(0) != _kinds(labels.device)
    if ref_labels is None:
        masks[0].fill_diagonal_(False)
    if ignore is not None:
        masks &= ~ignore.to(masks.device, non_blocking=True)
    return masks


class MSCore(NamedTuple):
    rows: Tensor  # (B,) L_i; 0 for anchors without both kept sets, NaN if a pair is NaN
    e: Tensor  # (2, B, M) shifted exponentials; the weights are e * coef
    coef: Tensor  # (2, B, 1) 1 / denominator for valid anchors, 0 otherwise
    kept: Tensor  # (2, B, M) bool: the pairs kept by mining (before the validity rule)


def ms_core(sim: Tensor, masks: Tensor, ms: MSParams, mining: str = "ms") -> MSCore:
    """The MS loss of each anchor and the weights of its pairs, no autograd."""
    sign, scale, shift = _constants(sim.device, sim.dtype, ms.alpha, ms.beta, ms.lam)
    margin = ms.margin
    u = torch.where(masks, sim * sign, math.inf)
    bound = u.amin(-1, keepdim=True)  # (min_pos, -max_neg)
    # margin - u is -(S - margin) for positives and S + margin for negatives, exactly as in
    # floating point: the released comparisons S - eps < max_neg and S + eps > min_pos.
    kept = (margin - u) > bound.flip(0) if mining == "ms" else masks
    expo = torch.where(kept, torch.sub(shift, u).mul_(scale), -math.inf)
    row_max = expo.amax(-1, keepdim=True)
    # log(1 + sum e^z) = m + log(e^-m + sum e^(z - m)) with m = max(0, max z): never overflows
    top = row_max.clamp_min(0)
    e = expo.sub_(top).exp_()
    denom = e.sum(-1, keepdim=True).add_((-top).exp_())
    # MS mining: both kept sets non-empty; none: any pair (see multi_similarity_loss)
    valid = (row_max > -math.inf).all(0) if mining == "ms" else (row_max > -math.inf).any(0)
    coef = valid / denom
    rows = ((denom.log_().add_(top) / scale) * valid).sum(0).squeeze(-1)
    # a NaN pair fails every comparison and would vanish from the loss: surface it
    rows = rows.masked_fill(bound.isnan().any(0).squeeze(-1), math.nan)
    return MSCore(rows, e, coef, kept)


def _signed_grad(core: MSCore, sim: Tensor) -> Tensor:
    """dL/dS = w- - w+ (B, M), with L = sum_i L_i; consumes core.e."""
    sign = _constants(sim.device, sim.dtype, 1.0, 1.0, 0.0)[0]
    return core.e.mul_(core.coef * sign).sum(0).neg_()


class _MSRowsFn(torch.autograd.Function):
    """Per-anchor losses L_i of a given sim (B, M), gradient from the pair weights."""

    @staticmethod
    def forward(
        ctx,
        sim: Tensor,
        masks: Tensor,
        ms: MSParams,
        mining: str,
    ) -> Tensor:
        core = ms_core(sim, masks, ms, mining)
        ctx.save_for_backward(_signed_grad(core, sim))
        return core.rows

    @staticmethod
    def backward(ctx, grad_rows: Tensor):  # type: ignore[override]
        (grad_sim,) = ctx.saved_tensors
        return grad_sim * grad_rows[:, None], None, None, None


class _MSEmbeddingsFn(torch.autograd.Function):
    """Loss of embeddings and its analytic gradient in one pass: G = (w- - w+) / B,
    dL/dX = G R (+ G^T X when R = X), dL/dR = G^T X; no (B, M) autograd graph."""

    @staticmethod
    def forward(
        ctx,
        emb: Tensor,
        ref: Tensor | None,
        masks: Tensor,
        ms: MSParams,
        mining: str,
    ) -> Tensor:
        dtype = work_dtype(emb)
        with no_autocast(emb.device.type):
            x = emb if emb.dtype == dtype else emb.to(dtype)
            r = x if ref is None else ref if ref.dtype == dtype else ref.to(dtype)
            sim = x @ r.T
            core = ms_core(sim, masks, ms, mining)
        n = x.shape[0]
        ctx.save_for_backward(x, None if ref is None else r, _signed_grad(core, sim).div_(n))
        ctx.dtypes = (emb.dtype, None if ref is None else ref.dtype)
        return core.rows.sum() / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, r, grad_sim = ctx.saved_tensors
        grad_emb = grad_ref = None
        with no_autocast(x.device.type):
            if r is None:
                grad_emb = ((grad_sim + grad_sim.T) @ x).mul_(grad_out)
            else:
                grad_sim = grad_sim * grad_out
                if ctx.needs_input_grad[0]:
                    grad_emb = grad_sim @ r
                if ctx.needs_input_grad[1]:
                    grad_ref = (grad_sim.T @ x).to(ctx.dtypes[1])
        if grad_emb is not None and grad_emb.dtype != ctx.dtypes[0]:
            grad_emb = grad_emb.to(ctx.dtypes[0])
        return grad_emb, grad_ref, None, None, None


def ms_per_anchor(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None = None,
    *,
    alpha: float = DEFAULTS["alpha"],
    beta: float = DEFAULTS["beta"],
    lam: float = DEFAULTS["lam"],
    margin: float = DEFAULTS["margin"],
    ignore: Tensor | None = None,
    mining: str = "ms",
) -> Tensor:
    """Per-anchor MS losses L_i, shape (B,), zero for anchors without both kept sets."""
    return ms_rows(sim, labels, ref_labels, ignore, MSParams(alpha, beta, lam, margin), mining)


def ms_rows(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None,
    ignore: Tensor | None,
    ms: MSParams,
    mining: str = "ms",
) -> Tensor:
    """`ms_per_anchor` with the numbers as one checked `MSParams`."""
    labels, ref_labels = check_sim(sim, labels, ref_labels, ignore)
    masks = stacked_masks(labels, ref_labels, ignore)
    return _MSRowsFn.apply(sim.to(work_dtype(sim)), masks, ms, check_mining(mining))


# ----------------------------------------------------------------------------- module
class MultiSimilarityLoss(nn.Module):
    """Multi-Similarity loss (DESIGN.md); dot products, no normalisation.

    Mining is the released code's, except how an anchor is kept from being its own positive:
    the released loss drops same-label pairs with S >= 1 - 1e-5, msl_kit drops the diagonal
    by index. For a P x K batch of distinct images with unit embeddings the two agree unless
    two different images embed within distance 0.0045 (S >= 1 - 1e-5): the diagonal is then
    the only such pair. They differ for duplicate images or identical embeddings (msl_kit keeps
    the copy as a positive of S = 1, mined only if a negative exceeds 1 - margin) and for
    unnormalised rows (S_ii != 1). An anchor left with no positive (a one-image class, or only
    copies) crashes the released code (min of an empty set); here a one-image class's anchor
    does not count and copies stay ordinary positives.
    A NaN in the embeddings gives a NaN loss (never a finite number). mining="none" keeps
    every pair (the paper's ablation "MS weighting without mining"); an anchor without a
    positive keeps its negative term (the paper's equation, PML). alpha > 0, 0 < beta <= 1000,
    lam in [-1, 1], margin >= 0, all finite.
    """

    def __init__(
        self,
        alpha: float = DEFAULTS["alpha"],
        beta: float = DEFAULTS["beta"],
        lam: float = DEFAULTS["lam"],
        margin: float = DEFAULTS["margin"],
        mining: str = "ms",
    ) -> None:
        super().__init__()
        self.params = MSParams(alpha, beta, lam, margin)
        self.alpha, self.beta, self.lam, self.margin = (
            self.params.alpha,
            self.params.beta,
            self.params.lam,
            self.params.margin,
        )
        self.mining = check_mining(mining)

    @classmethod
    def from_preset(cls, name: str) -> MultiSimilarityLoss:
        """Build from a named preset: "released" (default recipe) or "paper"."""
        return cls.from_params(MSParams.preset(name))

    @classmethod
    def from_params(cls, ms: MSParams, mining: str = "ms") -> MultiSimilarityLoss:
        """Build from one `MSParams` value."""
        return cls(ms.alpha, ms.beta, ms.lam, ms.margin, mining)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, lam={self.lam}, margin={self.margin}" + (
            f", mining={self.mining!r}" if self.mining != "ms" else ""
        )

    def per_anchor(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> Tensor:
        """Per-anchor L_i of a (B, B) or (B, M) similarity matrix."""
        return ms_rows(sim, labels, ref_labels, ignore, self.params, self.mining)

    def from_sim(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> Tensor:
        """The loss of a (B, M) similarity matrix (`ref_labels` when M is a memory bank, e.g.
        `CrossBatchMemory.loss(ms.from_sim, ...)`); the fast path of `multi_similarity_loss`."""
        rows = ms_rows(sim, labels, ref_labels, ignore, self.params, self.mining)
        return rows.sum() / rows.shape[0]

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> Tensor:
        """Loss of (B, D) embeddings against themselves or against (M, D) ref_embeddings."""
        check_embeddings(embeddings)
        labels = check_labels(labels, embeddings.shape[0], embeddings.device)
        if (ref_embeddings is None) != (ref_labels is None):
            raise ValueError("pass ref_embeddings and ref_labels together (or neither)")
        if ref_embeddings is not None:
            check_embeddings(ref_embeddings, "ref_embeddings")
            if ref_embeddings.shape[1] != embeddings.shape[1]:
                raise ValueError(
                    f"ref_embeddings has dim {ref_embeddings.shape[1]}, "
                    f"embeddings {embeddings.shape[1]}; they must match"
                )
            ref_labels = check_labels(
                ref_labels, ref_embeddings.shape[0], embeddings.device, "ref_labels"
            )
        n_refs = embeddings.shape[0] if ref_embeddings is None else ref_embeddings.shape[0]
        check_ignore(ignore, (embeddings.shape[0], n_refs))
        masks = stacked_masks(labels, ref_labels, ignore)
        return _MSEmbeddingsFn.apply(embeddings, ref_embeddings, masks, self.params, self.mining)
