"""Proxy-Anchor loss (Kim, Kim, Cho, Kwak: CVPR 2020), the proxy baseline MS is compared with.

One learnable proxy per training class. Each proxy is an anchor: it pulls the batch's samples
of its class and pushes the others, weighting each sample by its relative hardness (a
log-sum-exp over the batch), so the loss sees data-to-proxy pairs instead of data-to-data pairs.

    s(x, p) = cosine similarity of embedding x and proxy p (both L2-normalised here)
    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - margin)))
      + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + margin)))

P+ = proxies whose class has a sample in the batch; X_p+ / X_p- = the batch's samples of /
not of p's class. Facts taken from the paper and its released code (CC-BY-NC, nothing copied):
margin 0.1 and alpha 32 by default; proxies drawn with Kaiming-normal, fan_out mode (std
sqrt(2 / num_classes)); the released recipe gives them 100x the backbone's learning rate.

`proxy_anchor_loss` is the loss of a (B, C) similarity matrix; `ProxyAnchorLoss` owns the
proxies; `proxy_weights` is the General Pair Weighting view (a `PairWeights`, as MS's): the
weight the loss puts on each data-to-proxy pair, to show beside MS's pair weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from msl_kit.losses.inputs import check_labels, no_autocast, work_dtype
from msl_kit.losses.multi_similarity import PairWeights
from msl_kit.params import Params, param

MARGIN = 0.1  # the paper's delta
ALPHA = 32.0  # the paper's scale


@dataclass(frozen=True)
class ProxyAnchorParams(Params):
    """Proxy-Anchor's margin and scale (the paper's 0.1 and 32)."""

    margin: float = param(MARGIN, "margin delta", hint="0.1 published")
    alpha: float = param(ALPHA, "scale of both terms", gt=0, hint="32 published")


def _check_params(margin: object, alpha: object) -> tuple[float, float]:
    """The margin and scale as floats: finite, alpha > 0; else one line."""
    checked = ProxyAnchorParams(margin, alpha)
    return checked.margin, checked.alpha


def _check_sim(sim: Tensor, labels: object) -> Tensor:
    """A (B, C) floating similarity matrix and B integer labels in [0, C), else one line."""
    if not isinstance(sim, Tensor) or sim.dim() != 2 or not sim.is_floating_point():
        raise TypeError("similarities must be a floating-point (B, C) tensor (samples x proxies)")
    labels = check_labels(labels, sim.shape[0], sim.device)
    if labels.numel():
        low, high = (int(v) for v in torch.aminmax(labels))  # one sync, not two
        if low < 0 or high >= sim.shape[1]:
            raise ValueError(
                f"labels must lie in [0, {sim.shape[1]}) (one proxy per training class), got "
                f"{low}..{high}: map the training classes to 0..C-1 and build the loss with "
                "num_classes = their count"
            )
    return labels


def _logits(sim: Tensor, labels: Tensor, margin: float, alpha: float) -> tuple[Tensor, Tensor]:
    """Exponents of both terms, (B, C) each, -inf outside their pairs (fp32 or wider)."""
    sim = sim.to(work_dtype(sim))  # fp16 / bf16: fp32 maths
    pos = F.one_hot(labels.long(), sim.shape[1]).bool()
    minus_inf = torch.tensor(-math.inf, dtype=sim.dtype, device=sim.device)
    pos_logits = torch.where(pos, -alpha * (sim - margin), minus_inf)
    neg_logits = torch.where(pos, minus_inf, alpha * (sim + margin))
    return pos_logits, neg_logits


def _log1p_sum_exp(logits: Tensor) -> Tensor:
    """log(1 + sum_rows exp(logits)) per column, stable for any alpha (the 1 is a zero logit)."""
    zero = logits.new_zeros(1, logits.shape[1])
    return torch.logsumexp(torch.cat([zero, logits]), dim=0)


def proxy_anchor_loss(
    sim: Tensor, labels: Tensor, *, margin: float = MARGIN, alpha: float = ALPHA
) -> Tensor:
    """Proxy-Anchor loss of a (B, C) data-to-proxy similarity matrix; a 0-dim tensor.

    `sim` holds cosine similarities (rows: samples, columns: proxies); `labels` (B,) are the
    samples' classes in [0, C). Computed in float32 (float64 stays float64). An empty batch
    gives 0 that still back-propagates.
    """
    margin, alpha = _check_params(margin, alpha)
    labels = _check_sim(sim, labels)
    pos_logits, neg_logits = _logits(sim, labels, margin, alpha)
    if sim.shape[0] == 0:
        return pos_logits.sum() * 0.0
    n_with_pos = torch.bincount(labels.long(), minlength=sim.shape[1]).gt(0).sum()
    pos_term = _log1p_sum_exp(pos_logits).sum() / n_with_pos  # columns without pos give log 1
    neg_term = _log1p_sum_exp(neg_logits).sum() / sim.shape[1]
    return pos_term + neg_term


def proxy_weights(
    sim: Tensor, labels: Tensor, *, margin: float = MARGIN, alpha: float = ALPHA
) -> PairWeights:
    """The GPW view of Proxy-Anchor: `.pos` = -dL/dS on positive pairs, `.neg` = dL/dS on
    negative pairs of a (B, C) data-to-proxy similarity matrix, zero elsewhere (closed form).

    L is `proxy_anchor_loss(sim, labels)`, so the weights include its 1/|P+| and 1/C: a
    sample's weight on its proxy is alpha / |P+| times its softmax share (against a constant
    1) among the proxy's positives, the hardest positive getting the most.
    """
    margin, alpha = _check_params(margin, alpha)
    labels = _check_sim(sim, labels)
    with torch.no_grad():
        pos_logits, neg_logits = _logits(sim, labels, margin, alpha)
        n_with_pos = torch.bincount(labels.long(), minlength=sim.shape[1]).gt(0).sum().clamp(min=1)
        # d/dz log(1 + sum exp z) = exp(z - lse): a softmax with the "1" as an extra entry.
        pos = (pos_logits - _log1p_sum_exp(pos_logits)).exp() * (alpha / n_with_pos)
        neg = (neg_logits - _log1p_sum_exp(neg_logits)).exp() * (alpha / sim.shape[1])
    return PairWeights(pos.to(sim.dtype), neg.to(sim.dtype))


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss with its own proxies: `loss(embeddings, labels)` -> 0-dim tensor.

    `proxies` (num_classes x dim) is an nn.Parameter: give it to the optimizer (published:
    100x the backbone's learning rate) and it travels in `state_dict()`. Embeddings and
    proxies are L2-normalised here, so raw embeddings work too. Computes in float32 under
    fp16 / bf16 autocast.
    """

    def __init__(
        self, num_classes: int, dim: int, margin: float = MARGIN, alpha: float = ALPHA
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"ProxyAnchorLoss {name} must be an integer >= 1, not {value!r}"
                    + (": pass the number of training classes" if name == "num_classes" else "")
                )
        self.margin, self.alpha = _check_params(margin, alpha)
        self.num_classes, self.dim = num_classes, dim
        self.proxies = nn.Parameter(torch.empty(num_classes, dim))
        # The released code's init: Kaiming normal, fan_out (= num_classes for this shape).
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def extra_repr(self) -> str:
        """Shown by print(loss)."""
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, "
            f"margin={self.margin}, alpha={self.alpha}"
        )

    def similarities(self, embeddings: Tensor) -> Tensor:
        """(B, C) cosine similarities of the embeddings to the proxies, in float32 or wider."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"embeddings must be (batch, {self.dim}) to match the proxies, not "
                f"{tuple(embeddings.shape)}: build the loss with dim = the embedding size"
            )
        dtype = work_dtype(embeddings)
        # autocast would run the matmul in half precision; the loss's exponents need fp32.
        with no_autocast(embeddings.device.type):
            x = F.normalize(embeddings.to(dtype), dim=1)
            p = F.normalize(self.proxies.to(dtype), dim=1)
            return x @ p.T

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Loss of a batch: embeddings (B, dim), labels (B,) integers in [0, num_classes)."""
        sim = self.similarities(embeddings)
        with no_autocast(embeddings.device.type):
            return proxy_anchor_loss(sim, labels, margin=self.margin, alpha=self.alpha)
