"""What the losses refuse, in one line naming the fix: string or float labels, an empty batch,
numbers out of range (the MS loss's four and the GPW losses' own)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msl_kit import losses
from msl_kit.losses import (
    MultiSimilarityLoss,
    gpw,  # noqa: I001
    multi_similarity_loss,
)

STRING_LABELS = ["cat", "cat", "dog", "dog"]


@pytest.mark.parametrize(
    "labels",
    [
        STRING_LABELS,
        np.array(STRING_LABELS),
        tuple(STRING_LABELS),
        torch.tensor([0.0, 0.0, 1.0, 1.0]),
        np.array([0.0, 0.0, 1.0, 1.0]),
        [0.5, 0.5, 1.5, 1.5],
    ],
    ids=["str-list", "str-numpy", "str-tuple", "float-tensor", "float-numpy", "float-list"],
)
def test_loss_rejects_string_and_float_labels_with_the_fix(labels):
    x = nn.functional.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(
        TypeError, match=r"integer class ids.*np\.unique\(labels, return_inverse=True\)"
    ):
        losses.MultiSimilarityLoss()(x, labels)


def test_loss_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="empty batch; the loss needs at least one sample"):
        losses.MultiSimilarityLoss()(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        losses.multi_similarity_loss(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize(
    "params, error",
    [
        (dict(alpha=-2.0), ValueError),
        (dict(beta=0.0), ValueError),
        (dict(beta=math.inf), ValueError),
        (dict(beta=1001.0), ValueError),
        (dict(lam=math.nan), ValueError),
        (dict(lam=1.5), ValueError),
        (dict(margin=-0.1), ValueError),
        (dict(alpha=True), TypeError),
        (dict(alpha="2"), TypeError),
    ],
)
def test_ms_loss_checks_its_numbers(params, error):
    name = next(iter(params))
    with pytest.raises(error, match=name) as e:
        MultiSimilarityLoss(**params)
    assert "\n" not in str(e.value)
    x = F.normalize(torch.randn(8, 4), dim=1)
    with pytest.raises(error, match=name):
        multi_similarity_loss(x @ x.T, torch.arange(8) // 2, **params)


@pytest.mark.parametrize(
    "cls, params",
    [
        (gpw.ContrastiveLoss, dict(neg_margin=math.nan)),
        (gpw.ContrastiveLoss, dict(pos_margin=-1.0)),
        (gpw.ContrastiveLoss, dict(mining_margin=math.inf)),
        (gpw.TripletLoss, dict(margin=-0.1)),
        (gpw.BinomialDevianceLoss, dict(alpha=0.0)),
        (gpw.BinomialDevianceLoss, dict(beta=math.inf)),
        (gpw.BinomialDevianceLoss, dict(lam=2.0)),
        (gpw.LiftedStructureLoss, dict(margin=math.nan)),
    ],
)
def test_gpw_losses_check_their_numbers(cls, params):
    with pytest.raises(ValueError, match=next(iter(params))):
        cls(**params)
