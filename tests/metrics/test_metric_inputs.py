"""What the metrics refuse, in one line naming the fix: float or string labels, NaN, empty
input, ks that are not positive integers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msl_kit import metrics

NAN = float("nan")


def test_metrics_reject_float_labels_nan_and_empty_input():
    x = nn.functional.normalize(torch.randn(6, 4), dim=1)
    with pytest.raises(ValueError, match="must be integers.*map class names to ints first"):
        metrics.recall_at_k(x, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0], ks=(1,))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.recall_at_k(torch.zeros(0, 4), [], ks=(1,))
    with pytest.raises(ValueError, match="NaN.*fix \\(or rescale\\) the model output"):
        metrics.recall_at_k(torch.full((6, 4), NAN), [0, 0, 1, 1, 2, 2], ks=(1,))


def test_metrics_reject_string_labels_with_the_fix():
    x = nn.functional.normalize(torch.randn(6, 4), dim=1)
    with pytest.raises((TypeError, ValueError), match="map class names to ints"):
        metrics.recall_at_k(x, ["a", "a", "b", "b", "c", "c"], ks=(1,))


@pytest.mark.parametrize(
    "ks, error",
    [(1.5, TypeError), (True, TypeError), ([1, True], TypeError), ("1", TypeError)]
    + [([1, 2.0], TypeError), (0, ValueError), ([], ValueError), ([2, -1], ValueError)],
)
def test_recall_ks_is_a_positive_int_or_a_sequence_of_them(ks, error):
    x, y = F.normalize(torch.randn(12, 4), dim=1), torch.arange(12) // 3
    for fn in (metrics.recall_at_k, metrics.retrieval_metrics):
        with pytest.raises(error, match="ks must be") as e:
            fn(x, y, ks=ks)
        assert "\n" not in str(e.value)
    assert metrics.recall_at_k(x, y, ks=2).keys() == {2}
