"""Losses: the Multi-Similarity loss (readable form, then its fast path), what its mining keeps,
the other pair losses of the General Pair Weighting view, cross-batch memory, one registry.

Import names from here (`from msl_kit.losses import MultiSimilarityLoss, pair_weights`); each is
defined in the module named beside it below.
"""

from msl_kit.losses.gpw import (
    BinomialDevianceLoss,
    BinomialParams,
    ContrastiveLoss,
    ContrastiveParams,
    LiftedParams,
    LiftedStructureLoss,
    TripletLoss,
    TripletParams,
)
from msl_kit.losses.gpw_weights import gpw_pair_weights
from msl_kit.losses.memory import CrossBatchMemory, xbm_step_loss
from msl_kit.losses.mining import (
    STAT_KEYS,
    mined_pairs,
    mining_stats,
    ms_pair_weights,
    pair_weights,
)
from msl_kit.losses.multi_similarity import (
    PRESETS,
    MSParams,
    MultiSimilarityLoss,
    PairWeights,
    ms_per_anchor,
    multi_similarity_loss,
    pair_masks,
)
from msl_kit.losses.proxy_anchor import ProxyAnchorLoss, ProxyAnchorParams, proxy_weights
from msl_kit.losses.registry import LOSSES, LossSpec, build_loss, loss_spec, register_loss

__all__ = [
    "PRESETS",
    "LOSSES",
    "STAT_KEYS",
    "BinomialDevianceLoss",
    "BinomialParams",
    "ContrastiveLoss",
    "ContrastiveParams",
    "CrossBatchMemory",
    "LiftedParams",
    "LiftedStructureLoss",
    "LossSpec",
    "MSParams",
    "MultiSimilarityLoss",
    "PairWeights",
    "ProxyAnchorLoss",
    "ProxyAnchorParams",
    "TripletLoss",
    "TripletParams",
    "build_loss",
    "gpw_pair_weights",
    "loss_spec",
    "mined_pairs",
    "mining_stats",
    "ms_pair_weights",
    "ms_per_anchor",
    "multi_similarity_loss",
    "pair_masks",
    "pair_weights",
    "proxy_weights",
    "register_loss",
    "xbm_step_loss",
]
