"""Per-pair weights of any registered pair loss, by autograd: the GPW view of the MS paper."""

from __future__ import annotations

import torch
from torch import Tensor

from msl_kit.losses.inputs import check_sim, work_dtype
from msl_kit.losses.multi_similarity import PairWeights, pair_masks
from msl_kit.losses.registry import build_loss


def gpw_pair_weights(name: str, sim: Tensor, labels: Tensor, **params: object) -> PairWeights:
    """Each loss's per-pair weights by autograd on a leaf copy of a (B, B) sim.

    pos = -dL/dS on positive pairs, neg = dL/dS on negative pairs, with L = sum_i L_i
    (each row its own input), zero elsewhere; for "ms" this equals `pair_weights`.
    """
    loss = build_loss(name, **params)
    labels, _ = check_sim(sim, labels, None, None)
    leaf = sim.detach().to(work_dtype(sim)).requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss.per_anchor(leaf, labels).sum(), leaf)
    pos_mask, neg_mask = pair_masks(labels)
    return PairWeights(torch.where(pos_mask, -grad, 0.0), torch.where(neg_mask, grad, 0.0))
