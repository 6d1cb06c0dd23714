"""What an approximate index misses: recall@k against exact search, measured on a sample of the
gallery's own vectors held out of the index while it is measured (and added after), so that the
queries are vectors it has not seen, as a user's are. Rows it finds count when their true score
reaches the exact k-th neighbour's (ties count as found, as in ann-benchmarks).

The sample's vectors as queries *in* the index would overstate HNSW's recall (0.977 where new
queries got 0.932 on 10^5 x 256, docs/benchmarks.md): a vector already linked into the graph is
found through its own links.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from msl_kit import metrics

RECALL_SAMPLE = 1000  # held-out queries, at most
HOLDOUT_SHARE = 10  # and at most one row in 10
TARGET_RECALL = 0.95  # the search knob's default is the smallest that reaches this recall@k
CURVE_TOP = 0.99  # measuring stops once recall@k reaches this, or stops rising
SCORE_TOL = 1e-5  # float32 inner products of faiss and torch differ in the last bits

Curve = dict[int, dict[int, float]]  # search knob value -> {1: recall@1, k: recall@k}


@dataclass
class Holdout:
    """The rows held out of an index while its recall is measured (added after)."""

    sample: np.ndarray  # (S,) sorted gallery rows
    n: int

    @classmethod
    def draw(cls, n: int, seed: int = 0) -> Holdout:
        """min(RECALL_SAMPLE, n / HOLDOUT_SHARE) rows, drawn with a fixed seed."""
        size = min(RECALL_SAMPLE, n // HOLDOUT_SHARE)
        rng = np.random.default_rng(seed)
        return cls(np.sort(rng.choice(n, size, replace=False)).astype(np.int64), n)

    @property
    def rest(self) -> np.ndarray:
        """The rows the index holds while it is measured."""
        return np.setdiff1d(np.arange(self.n, dtype=np.int64), self.sample, assume_unique=True)

    def truth(self, vectors: np.ndarray, k: int) -> np.ndarray:
        """(S, k) exact top-k scores of the sample against the rest (the kit's chunked kNN over
        the whole gallery, the sample's rows dropped: no copy of the rest is made)."""
        held = np.zeros(self.n, bool)
        held[self.sample] = True
        queries = vectors[self.sample]
        fetch = k + 2 * math.ceil((k + 1) * len(self.sample) / self.n) + 4
        while True:
            fetch = min(fetch, self.n)
            sims, ids = metrics.knn(queries, fetch, vectors, exclude_self=False)
            sims, keep = sims.numpy(), ~held[ids.numpy()]
            if (keep.sum(1) >= k).all() or fetch == self.n:
                break
            fetch *= 2
        ranked = np.where(keep, sims, -np.inf)
        return -np.sort(-ranked, axis=1)[:, :k]


def recall_at(
    found: np.ndarray, queries: np.ndarray, vectors: np.ndarray, truth: np.ndarray
) -> dict[int, float]:
    """recall@1 and @k of `found` (Q, k) gallery rows (-1: none) against exact top-k scores."""
    k = truth.shape[1]
    true = np.stack([(queries * vectors[np.maximum(col, 0)]).sum(1) for col in found.T], 1)
    out = {}
    for kk in sorted({1, k}):
        good = (found[:, :kk] >= 0) & (true[:, :kk] >= truth[:, kk - 1, None] - SCORE_TOL)
        out[kk] = float(good.sum(1).mean() / kk)
    return out


def measure_curve(
    search: Callable[[int, np.ndarray, int], np.ndarray],
    values: list[int],
    queries: np.ndarray,
    vectors: np.ndarray,
    truth: np.ndarray,
) -> Curve:
    """Recall at each knob value, `search(value, queries, k) -> rows`, from the smallest,
    until recall@k reaches CURVE_TOP or stops rising."""
    k = truth.shape[1]
    curve: Curve = {}
    for value in values:
        got = recall_at(search(value, queries, k), queries, vectors, truth)
        last = curve[max(curve)][k] if curve else -1.0
        curve[value] = got
        if got[k] >= CURVE_TOP or got[k] < last + 0.002:
            break
    return curve


def pick(curve: Curve) -> int:
    """The smallest knob value whose recall@k reaches TARGET_RECALL, else the best one."""
    k = max(next(iter(curve.values())))
    good = [v for v in sorted(curve) if curve[v][k] >= TARGET_RECALL]
    return good[0] if good else max(curve, key=lambda v: (curve[v][k], -v))
