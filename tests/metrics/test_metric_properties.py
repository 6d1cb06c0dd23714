"""Property tests (hypothesis) of the metrics over random embeddings: in [0, 1], recall monotone
in K, invariant to permuting queries, gallery and label names (query = gallery and query /
gallery forms). Examples are derandomized so CI sees the same cases every run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msl_kit.metrics import retrieval_metrics

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], abs=1e-12) for k in a
    )


@settings(max_examples=40, **SETTINGS)
@given(
    n=st.integers(3, 40),
    dim=st.integers(1, 6),
    n_classes=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    split=st.one_of(st.none(), st.floats(0.2, 0.8)),
    data=st.data(),
)
def test_metrics_bounded_monotone_and_invariant_to_order_and_label_names(
    n, dim, n_classes, seed, split, data
):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)  # continuous: no ties to break by index
    labels = rng.integers(0, n_classes, n)
    names = rng.permutation(10**6)[:n_classes] - 500_000  # any distinct integers, negative too
    if split is None:
        q, ql, g, gl = x, labels, None, None
        size = n - 1
    else:
        cut = min(max(1, round(split * n)), n - 1)
        q, ql, g, gl = x[:cut], labels[:cut], x[cut:], labels[cut:]
        size = n - cut
    ks = tuple(sorted(set(data.draw(st.lists(st.integers(1, size), min_size=1, max_size=4)))))

    def run(qp, gp, rename=lambda y: y):
        gallery = {} if g is None else dict(gallery=g[gp], gallery_labels=rename(gl[gp]))
        return retrieval_metrics(q[qp], rename(ql[qp]), ks, max_r=None, **gallery)

    ident_q, ident_g = np.arange(len(q)), None if g is None else np.arange(len(g))
    out = run(ident_q, ident_g)
    recalls = [out[f"recall@{k}"] for k in ks]
    assert all(0.0 <= v <= 1.0 for v in recalls) and recalls == sorted(recalls)
    for key in ("map@r", "r_precision"):
        assert math.isnan(out[key]) or 0.0 <= out[key] <= 1.0
    assert math.isnan(out["r_precision"]) or out["map@r"] <= out["r_precision"] + 1e-12
    perm_q = rng.permutation(len(q))
    perm_g = None if g is None else rng.permutation(len(g))
    assert _same(run(perm_q, ident_g), out)
    if g is not None:
        assert _same(run(ident_q, perm_g), out)
    assert _same(run(perm_q, perm_g, rename=lambda y: names[y]), out)
