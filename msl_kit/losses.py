"""Multi-Similarity loss (Wang et al., CVPR 2019), its pair weights, and the GPW family.

Every loss here is a function of a similarity matrix S (rows = anchors, columns =
references), boolean pair masks and row-wise reductions; nothing loops over anchors.
Losses are computed in float32 (float64 stays float64) whatever the input dtype, so
fp16 / bf16 autocast cannot overflow the exponentials; exponentials are always
max-shifted, so beta = 200 stays finite.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PRESETS: dict[str, dict[str, float]] = {
    "released": dict(alpha=2.0, beta=40.0, lam=0.5, margin=0.1),
    "paper": dict(alpha=2.0, beta=50.0, lam=1.0, margin=0.1),
}
_NEG_INF = float("-inf")


class PairWeights(NamedTuple):
    """Per-pair weights: `.pos` = -dL/dS on mined positives, `.neg` = dL/dS on mined negatives."""

    pos: Tensor
    neg: Tensor


# ----------------------------------------------------------------------------- validation
def _check_embeddings(embeddings: Tensor, name: str = "embeddings") -> None:
    if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch tensor of shape (B, D)")
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, D), got shape {tuple(embeddings.shape)}; "
                         "flatten or pool the features first")
    if embeddings.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch; the loss needs at least one sample")


def _check_labels(labels: object, n: int, device: torch.device, name: str = "labels") -> Tensor:
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be integer class ids; map string or other labels to "
                            "integers first, e.g. np.unique(labels, return_inverse=True)[1]") from None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class ids, got dtype {labels.dtype}; map them "
                        "to integers first, e.g. np.unique(labels, return_inverse=True)[1]")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per row), "
                         f"got shape {tuple(labels.shape)}")
    return labels if labels.device == device else labels.to(device)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast so that S = X R^T is formed in float32, not fp16 / bf16."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = (torch.is_autocast_cpu_enabled() if device_type == "cpu"
                   else torch.is_autocast_enabled())
    if enabled:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pair_masks(labels: Tensor, ref_labels: Tensor | None = None,
               ignore: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, M) positive and negative masks; the diagonal is no pair when ref_labels is None."""
    masks = _stacked_masks(labels, ref_labels, ignore)
    return masks[0], masks[1]


@functools.lru_cache(maxsize=64)
def _constants(device: torch.device, dtype: torch.dtype, alpha: float, beta: float, lam: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Cached (2, 1, 1) per-kind constants: sign, exponent scale, exponent shift.

    Kind 0 holds positives as u = +S, kind 1 negatives as u = -S, so that a single amin
    and a single comparison serve both kinds; the exponents are scale * (shift - u):
    alpha (lam - S) and beta (S - lam). Cached because building small tensors costs as
    much as a kernel on the B = 80 path, which is all overhead.
    """
    table = torch.tensor([[1.0, alpha, lam], [-1.0, beta, -lam]], dtype=dtype, device=device)
    return table[:, 0].view(2, 1, 1), table[:, 1].view(2, 1, 1), table[:, 2].view(2, 1, 1)


@functools.lru_cache(maxsize=8)
def _kinds(device: torch.device) -> Tensor:
    return torch.tensor([False, True], device=device).view(2, 1, 1)


def _stacked_masks(labels: Tensor, ref_labels: Tensor | None, ignore: Tensor | None) -> Tensor:
    """(2, B, M) bool: [positive pairs, negative pairs]."""
    same = labels[:, None] == (labels if ref_labels is None else ref_labels)[None, :]
    masks = same.unsqueeze(0) != _kinds(labels.device)
    if ref_labels is None:
        masks[0].fill_diagonal_(False)
    if ignore is not None:
        masks &= ~ignore.to(masks.device, non_blocking=True)
    return masks


def _check_sim(sim: Tensor, labels: object, ref_labels: object,
               ignore: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not isinstance(sim, Tensor) or not sim.is_floating_point() or sim.dim() != 2:
        raise TypeError("sim must be a 2-D floating-point tensor (anchors x references)")
    if sim.shape[0] == 0:
        raise ValueError("sim has no rows (empty batch); the loss needs at least one anchor")
    labels = _check_labels(labels, sim.shape[0], sim.device)
    if ref_labels is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"sim is {tuple(sim.shape)} but ref_labels is None; pass ref_labels "
                             "for a non-square (anchors x references) matrix")
    else:
        ref_labels = _check_labels(ref_labels, sim.shape[1], sim.device, "ref_labels")
    if ignore is not None and (ignore.dtype != torch.bool or ignore.shape != sim.shape):
        raise ValueError(f"ignore must be a bool tensor of shape {tuple(sim.shape)}")
    return labels, ref_labels


# ----------------------------------------------------------------------------- MS core
def _ms_mine(sim: Tensor, masks: Tensor, sign: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """u = (+S, -S) on the (2, B, M) pair masks (+inf elsewhere) and the kept masks: positives with S - margin < max_neg, negatives with
    S + margin > min_pos, both against the un-mined sets.

    With u = (+S, -S) one amin gives (min_pos, -max_neg); margin - u equals -(S - margin)
    and S + margin exactly in floating point, so this is the released comparison.
    """
    u = torch.where(masks, sim * sign, float("inf"))
    return u, (margin - u) > u.amin(-1, keepdim=True).flip(0)


def _ms_core(sim: Tensor, masks: Tensor, alpha: float, beta: float, lam: float,
             margin: float) -> tuple[Tensor, Tensor, Tensor]:
    """One no-grad pass: (sum_i L_i, e (2, B, M), coef (2, B, 1)); weights W = e * coef."""
    sign, scale, shift = _constants(sim.device, sim.dtype, alpha, beta, lam)
    u, kept = _ms_mine(sim, masks, sign, margin)
    expo = torch.where(kept, torch.sub(shift, u).mul_(scale), _NEG_INF)
    row_max = expo.amax(-1, keepdim=True)
    # log(1 + sum e^z) = m + log(e^-m + sum e^(z - m)) with m = max(0, max z): never overflows
    top = row_max.clamp_min(0)
    e = expo.sub_(top).exp_()
    denom = e.sum(-1, keepdim=True).add_((-top).exp_())
    valid = (row_max > _NEG_INF).all(0)          # both kept sets non-empty
    coef = valid / denom
    total = ((denom.log_().add_(top) / scale) * valid).sum()
    return total, e, coef


def _ms_rows_autograd(sim: Tensor, masks: Tensor, alpha: float, beta: float, lam: float,
                      margin: float) -> Tensor:
    """Differentiable per-anchor L_i (autograd through plain ops; used for a given sim)."""
    sign, scale, shift = _constants(sim.device, sim.dtype, alpha, beta, lam)
    with torch.no_grad():
        _, kept = _ms_mine(sim.detach(), masks, sign, margin)
        valid = kept.any(-1).all(0)
    expo = torch.where(kept, (shift - sim * sign) * scale, _NEG_INF)
    # a zero column makes logsumexp = log(1 + sum e^z), finite even for empty rows
    expo = torch.cat((expo, expo.new_zeros(2, expo.shape[1], 1)), -1)
    terms = torch.logsumexp(expo, -1) / scale.view(2, 1)
    return torch.where(valid, terms.sum(0), 0.0)


def ms_per_anchor(sim: Tensor, labels: Tensor, ref_labels: Tensor | None = None, *,
                  alpha: float = 2.0, beta: float = 40.0, lam: float = 0.5,
                  margin: float = 0.1, ignore: Tensor | None = None) -> Tensor:
    """Per-anchor MS losses L_i, shape (B,), zero for anchors without both kept sets."""
    labels, ref_labels = _check_sim(sim, labels, ref_labels, ignore)
    masks = _stacked_masks(labels, ref_labels, ignore)
    return _ms_rows_autograd(sim.to(_work_dtype(sim)), masks, alpha, beta, lam, margin)


def multi_similarity_loss(sim: Tensor, labels: Tensor, ref_labels: Tensor | None = None, *,
                          alpha: float = 2.0, beta: float = 40.0, lam: float = 0.5,
                          margin: float = 0.1, ignore: Tensor | None = None) -> Tensor:
    """MS loss on a (B, M) similarity matrix: sum_i L_i / B (B = rows), a 0-dim tensor.

    ref_labels (M,) labels the columns; when None, sim is (B, B) against the batch itself
    and the diagonal is excluded by index. `ignore` (B, M) bool drops pairs from both the
    mining sets and the loss (e.g. an anchor's own copy in a memory bank).
    """
    rows = ms_per_anchor(sim, labels, ref_labels, alpha=alpha, beta=beta, lam=lam,
                         margin=margin, ignore=ignore)
    return rows.sum() / rows.shape[0]


def pair_weights(sim: Tensor, labels: Tensor, ref_labels: Tensor | None = None, *,
                 alpha: float = 2.0, beta: float = 40.0, lam: float = 0.5, margin: float = 0.1,
                 ignore: Tensor | None = None) -> PairWeights:
    """The paper's w+ and w- for every mined pair, in closed form (no autograd).

    `.pos[i, j]` = -dL/dS_ij and `.neg[i, j]` = dL/dS_ij with L = sum_i L_i, each row its
    own input; zero where a pair is not mined, not of that kind, or its anchor is invalid.
    """
    labels, ref_labels = _check_sim(sim, labels, ref_labels, ignore)
    masks = _stacked_masks(labels, ref_labels, ignore)
    with torch.no_grad():
        _, e, coef = _ms_core(sim.detach().to(_work_dtype(sim)), masks, alpha, beta, lam, margin)
        weights = e.mul_(coef)
    return PairWeights(weights[0], weights[1])


def mined_pairs(sim: Tensor, labels: Tensor, ref_labels: Tensor | None = None, *, margin: float = 0.1,
                ignore: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The pairs MS mining keeps, (kept_pos, kept_neg) as (B, M) bool; rows of anchors that lack
    either kept set are all False (those anchors do not count in the loss)."""
    labels, ref_labels = _check_sim(sim, labels, ref_labels, ignore)
    masks = _stacked_masks(labels, ref_labels, ignore)
    with torch.no_grad():
        s = sim.detach().to(_work_dtype(sim))
        _, kept = _ms_mine(s, masks, _constants(s.device, s.dtype, 1.0, 1.0, 0.0)[0], margin)
    valid = kept.any(-1).all(0)[:, None]
    return kept[0] & valid, kept[1] & valid


class _MSEmbeddingsFn(torch.autograd.Function):
    """Loss and analytic gradient in one pass: G = (w- - w+) / B, dL/dX = G R (+ G^T X)."""

    @staticmethod
    def forward(ctx, emb: Tensor, ref: Tensor | None, masks: Tensor, alpha: float, beta: float,
                lam: float, margin: float) -> Tensor:
        dtype = _work_dtype(emb)
        with _no_autocast(emb.device.type):
            x = emb if emb.dtype == dtype else emb.to(dtype)
            r = x if ref is None else ref if ref.dtype == dtype else ref.to(dtype)
            sim = x @ r.T
            total, e, coef = _ms_core(sim, masks, alpha, beta, lam, margin)
        n = x.shape[0]
        sign = _constants(sim.device, dtype, alpha, beta, lam)[0]
        # dL/dS = (w- - w+) / n: kind 0 (positives) enters with -1, kind 1 with +1
        grad_sim = e.mul_(coef * sign).sum(0).div_(-n)
        ctx.save_for_backward(x, None if ref is None else r, grad_sim)
        ctx.dtypes = (emb.dtype, None if ref is None else ref.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, r, grad_sim = ctx.saved_tensors
        grad_emb = grad_ref = None
        with _no_autocast(x.device.type):
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
        return grad_emb, grad_ref, None, None, None, None, None


def _self_sim(embeddings: Tensor) -> Tensor:
    """S = X X^T in float32 (float64 stays), differentiable, outside autocast."""
    with _no_autocast(embeddings.device.type):
        x = embeddings.to(_work_dtype(embeddings))
        return x @ x.T


class _PairLoss(nn.Module):
    """Base: forward(embeddings, labels) = from_sim(X X^T, labels); sum_i L_i / B by default."""

    def per_anchor(self, sim: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def from_sim(self, sim: Tensor, labels: Tensor) -> Tensor:
        """The loss on a (B, B) similarity matrix."""
        rows = self.per_anchor(sim, labels)
        return rows.sum() / rows.shape[0]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Loss of L2-normalised (B, D) embeddings with (B,) integer labels; a 0-dim tensor."""
        _check_embeddings(embeddings)
        labels = _check_labels(labels, embeddings.shape[0], embeddings.device)
        return self.from_sim(_self_sim(embeddings), labels)


class MultiSimilarityLoss(_PairLoss):
    """Multi-Similarity loss with the released code's mining; dot products, no normalisation."""

    def __init__(self, alpha: float = 2.0, beta: float = 40.0, lam: float = 0.5,
                 margin: float = 0.1) -> None:
        super().__init__()
        self.alpha, self.beta, self.lam, self.margin = alpha, beta, lam, margin

    @classmethod
    def from_preset(cls, name: str) -> "MultiSimilarityLoss":
        """Build from a named preset: "released" (default recipe) or "paper"."""
        if name not in PRESETS:
            raise ValueError(f"unknown MS preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, lam={self.lam}, margin={self.margin}"

    def _params(self) -> dict[str, float]:
        return dict(alpha=self.alpha, beta=self.beta, lam=self.lam, margin=self.margin)

    def per_anchor(self, sim: Tensor, labels: Tensor) -> Tensor:
        """Per-anchor L_i of a (B, B) similarity matrix (autograd path)."""
        return ms_per_anchor(sim, labels, **self._params())

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None = None,
                ref_labels: Tensor | None = None, ignore: Tensor | None = None) -> Tensor:
        """Loss of (B, D) embeddings against themselves or against (M, D) ref_embeddings."""
        _check_embeddings(embeddings)
        labels = _check_labels(labels, embeddings.shape[0], embeddings.device)
        if (ref_embeddings is None) != (ref_labels is None):
            raise ValueError("pass ref_embeddings and ref_labels together (or neither)")
        if ref_embeddings is not None:
            _check_embeddings(ref_embeddings, "ref_embeddings")
            if ref_embeddings.shape[1] != embeddings.shape[1]:
                raise ValueError(f"ref_embeddings has dim {ref_embeddings.shape[1]}, "
                                 f"embeddings {embeddings.shape[1]}; they must match")
            ref_labels = _check_labels(ref_labels, ref_embeddings.shape[0], embeddings.device,
                                       "ref_labels")
        n_refs = embeddings.shape[0] if ref_embeddings is None else ref_embeddings.shape[0]
        if ignore is not None and (ignore.dtype != torch.bool
                                   or ignore.shape != (embeddings.shape[0], n_refs)):
            raise ValueError(f"ignore must be a bool tensor of shape ({embeddings.shape[0]}, "
                             f"{n_refs})")
        masks = _stacked_masks(labels, ref_labels, ignore)
        return _MSEmbeddingsFn.apply(embeddings, ref_embeddings, masks,
                                     self.alpha, self.beta, self.lam, self.margin)


# ----------------------------------------------------------------------------- GPW family
def _masked_lse(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise log-sum-exp over `mask` and whether each row has any entry.

    Empty rows are filled with zeros before the reduction, so neither the value nor the
    gradient of a discarded row can be NaN.
    """
    has_any = mask.any(1)
    filled = torch.where(mask, values, _NEG_INF)
    filled = torch.where(has_any[:, None], filled, 0.0)
    return torch.logsumexp(filled, 1), has_any


def _self_masks(sim: Tensor, labels: object) -> tuple[Tensor, Tensor, Tensor]:
    labels, _ = _check_sim(sim, labels, None, None)
    pos_mask, neg_mask = pair_masks(labels)
    return sim.to(_work_dtype(sim)), pos_mask, neg_mask


class ContrastiveLoss(_PairLoss):
    """Contrastive loss on similarities (Hadsell et al. 2006, as the MS paper writes it).

    L_i = sum_pos relu(1 - pos_margin - S_ij) + sum_neg relu(S_ik - neg_margin); loss =
    sum_i L_i / B. With pos_margin = 0 and unit vectors the positive term is 1 - S_ij, so
    every positive weighs 1 and every negative above neg_margin weighs 1 (the GPW view).
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 0.5) -> None:
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def per_anchor(self, sim: Tensor, labels: Tensor) -> Tensor:
        """Per-anchor L_i of a (B, B) similarity matrix."""
        sim, pos_mask, neg_mask = _self_masks(sim, labels)
        pos = torch.where(pos_mask, F.relu(1.0 - self.pos_margin - sim), 0.0)
        neg = torch.where(neg_mask, F.relu(sim - self.neg_margin), 0.0)
        return (pos + neg).sum(1)


_TRIPLET_MINING = ("all", "hard", "semihard")


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
        if mining not in _TRIPLET_MINING:
            raise ValueError(f"unknown triplet mining {mining!r}; choose one of {_TRIPLET_MINING}")
        self.margin, self.mining = margin, mining

    def _hinges(self, sim: Tensor, labels: Tensor) -> Tensor:
        sim, pos_mask, neg_mask = _self_masks(sim, labels)
        sim_ap, sim_an = sim[:, :, None], sim[:, None, :]
        mined = pos_mask[:, :, None] & neg_mask[:, None, :]
        if self.mining == "hard":
            mined = mined & (sim_an >= sim_ap)
        elif self.mining == "semihard":
            mined = mined & (sim_an < sim_ap) & (sim_an > sim_ap - self.margin)
        return torch.where(mined, F.relu(sim_an - sim_ap + self.margin), 0.0)

    def per_anchor(self, sim: Tensor, labels: Tensor) -> Tensor:
        """Per-anchor sum of mined triplet hinges (the GPW weights count active triplets)."""
        return self._hinges(sim, labels).sum((1, 2))

    def from_sim(self, sim: Tensor, labels: Tensor) -> Tensor:
        """Mean hinge over mined triplets with a positive hinge; 0 (with grad) if none."""
        hinges = self._hinges(sim, labels)
        n_active = (hinges.detach() > 0).sum().clamp_min(1)
        return hinges.sum() / n_active


class BinomialDevianceLoss(_PairLoss):
    """Binomial deviance (Yi et al. 2014) in the MS paper's notation.

    L_i = 1/P_i sum_pos log(1 + e^{alpha (lam - S_ij)}) + 1/N_i sum_neg log(1 + e^{beta (S_ik - lam)});
    loss = sum_i L_i / B. Defaults alpha=2, beta=50, lam=0.5 are Yi et al.'s alpha=2,
    beta=0.5, negative cost C=25 (beta here = alpha C).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, lam: float = 0.5) -> None:
        super().__init__()
        self.alpha, self.beta, self.lam = alpha, beta, lam

    def per_anchor(self, sim: Tensor, labels: Tensor) -> Tensor:
        """Per-anchor L_i of a (B, B) similarity matrix."""
        sim, pos_mask, neg_mask = _self_masks(sim, labels)
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
        self.margin = margin

    def per_anchor(self, sim: Tensor, labels: Tensor) -> Tensor:
        """Per-anchor L_i of a (B, B) similarity matrix."""
        sim, pos_mask, neg_mask = _self_masks(sim, labels)
        pos_lse, has_pos = _masked_lse(self.margin - sim, pos_mask)
        neg_lse, has_neg = _masked_lse(sim, neg_mask)
        return torch.where(has_pos & has_neg, F.relu(pos_lse + neg_lse), 0.0)


LOSSES: dict[str, type[_PairLoss]] = {
    "ms": MultiSimilarityLoss,
    "contrastive": ContrastiveLoss,
    "triplet": TripletLoss,
    "binomial": BinomialDevianceLoss,
    "lifted": LiftedStructureLoss,
}


def build_loss(name: str, **params: object) -> _PairLoss:
    """Instantiate a loss from LOSSES by name, e.g. build_loss("ms", beta=50.0)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    try:
        return LOSSES[name](**params)
    except TypeError as err:
        raise TypeError(f"bad parameters for loss {name!r}: {err}") from None


def gpw_pair_weights(name: str, sim: Tensor, labels: Tensor, **params: object) -> PairWeights:
    """Each loss's per-pair weights by autograd on a leaf copy of a (B, B) sim.

    pos = -dL/dS on positive pairs, neg = dL/dS on negative pairs, with L = sum_i L_i
    (each row its own input), zero elsewhere; for "ms" this equals `pair_weights`.
    """
    loss = build_loss(name, **params)
    labels, _ = _check_sim(sim, labels, None, None)
    leaf = sim.detach().to(_work_dtype(sim)).requires_grad_(True)
    with torch.enable_grad():
        grad, = torch.autograd.grad(loss.per_anchor(leaf, labels).sum(), leaf)
    pos_mask, neg_mask = pair_masks(labels)
    return PairWeights(torch.where(pos_mask, -grad, 0.0), torch.where(neg_mask, grad, 0.0))
