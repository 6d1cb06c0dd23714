"""A faiss index over a gallery (`AnnIndex`): built with its recall measured and its search knob
picked, searched as `(queries, k) -> (scores, ids)` with gallery rows as ids, never id -1.

Both compressed kinds fetch more candidates than asked and keep the k best by their true
vectors (faiss's IndexRefine idea; the gallery's vectors are at hand anyway), so their scores are
true inner products too: IVF-PQ 4k, HNSW 2k. HNSW links 8-bit scalar-quantized codes of the
vectors (faiss's IndexHNSWSQ), not the float vectors (IndexHNSWFlat): at 10^6 x 256 a query
then reads a quarter of the bytes: 1,000 queries in 0.18 s against 0.22 s at recall@10 0.96
once re-ranked, in less than half the memory (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msl_kit import metrics
from msl_kit.use.ann.recall import (
    TARGET_RECALL,
    Curve,
    Holdout,
    measure_curve,
    pick,
)
from msl_kit.use.ann.spec import (
    MAX_EF_SEARCH,
    MIN_PER_LIST,
    PQ_CENTROIDS,
    SEARCH_KNOB,
    SQ_TYPES,
    IndexSpec,
    check_finite,
    checked_params,
    describe,
    import_faiss,
    vectors_sha256,
)

TRAIN_PER_LIST = 64  # vectors per inverted list that train the coarse quantizer
TRAIN_SQ = 1 << 16  # vectors that train HNSW's scalar quantizer (each dimension's range)
RERANK = {"ivfpq": 4, "hnsw": 2}  # candidates per result re-ranked by their true vectors
_ADD_ROWS = 1 << 16  # rows copied per add


def build_faiss(
    vectors: np.ndarray, kind: str, params: dict[str, int], rows: np.ndarray | None = None
) -> Any:
    """A trained faiss index of `kind` (inner product) holding `rows` of `vectors` (all when
    None) with their gallery row as faiss id, whatever the order they are added in (HNSW in an
    IndexIDMap), so that a user of the file in faiss alone gets gallery rows too; IVF trains on
    a seeded sample of those rows."""
    faiss = import_faiss()
    d = vectors.shape[1]
    rows = np.arange(len(vectors), dtype=np.int64) if rows is None else rows
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return index
    if kind == "hnsw":
        codes = getattr(faiss.ScalarQuantizer, SQ_TYPES[params["sq_bits"]])
        inner = faiss.IndexHNSWSQ(d, codes, params["hnsw_m"], ip)
        inner.hnsw.efConstruction = params["ef_construction"]
        index, train = faiss.IndexIDMap(inner), TRAIN_SQ
    else:
        nlist, quantizer = params["nlist"], faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
            train = TRAIN_PER_LIST * nlist
        else:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, params["pq_bytes"], 8, ip)
            train = max(TRAIN_PER_LIST * nlist, MIN_PER_LIST * PQ_CENTROIDS)
    picked = np.random.default_rng(0).choice(rows, min(len(rows), train), replace=False)
    index.train(np.ascontiguousarray(vectors[np.sort(picked)], dtype=np.float32))
    add_rows(index, vectors, rows)
    return index


def add_rows(index: Any, vectors: np.ndarray, rows: np.ndarray) -> None:
    """Add `rows` of `vectors` to a faiss index, each with its row as id, a block at a time."""
    for i in range(0, len(rows), _ADD_ROWS):
        block = rows[i : i + _ADD_ROWS]
        index.add_with_ids(np.ascontiguousarray(vectors[block], dtype=np.float32), block)


def set_search(index: Any, kind: str, value: int | None) -> None:
    """Set nprobe (IVF) or efSearch (HNSW, inside its IndexIDMap) on a faiss index."""
    if value is None:
        return
    if kind == "hnsw":
        inner = import_faiss().downcast_index(index.index) if hasattr(index, "id_map") else index
        inner.hnsw.efSearch = int(value)
    elif kind in ("ivf", "ivfpq"):
        index.nprobe = min(int(value), index.nlist)


def knob_values(kind: str, index: Any, n: int) -> list[int]:
    """The search knob values tried, from the smallest, in steps of 1.25x to 1.33x (1, 2, 3,
    4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...): efSearch from 16 up to the gallery size, nprobe
    from 1 up to nlist. Fine steps: each step up costs search time for every query after."""
    top = index.nlist if kind != "hnsw" else min(MAX_EF_SEARCH, max(16, n))
    octaves = range(int(math.log2(max(top, 1))) + 1)
    steps = sorted({int(m * 2**i) for i in octaves for m in (1, 1.25, 1.5, 1.75)})
    values = [v for v in steps if (kind != "hnsw" or v >= 16) and v < top]
    return values + [top]


@dataclass
class AnnIndex:
    """A faiss index over a gallery's vectors; call it as `(queries, k) -> (scores, ids)`
    (what `Embeddings.search(..., backend=)` takes)."""

    kind: str
    params: dict[str, int]  # build knobs
    index: Any  # the faiss index
    vectors: np.ndarray  # the gallery
    sha256: str  # of the vectors
    curve: Curve  # recall measured at build, per search knob value
    search_value: int | None  # nprobe or ef_search in use
    build_seconds: float
    held_out: int = 0  # queries the recall was measured on
    path: Path | None = None  # FILE.<kind>.faiss where it is kept

    @property
    def knob(self) -> str | None:
        """The search knob's name (nprobe, ef_search), None for flat."""
        return SEARCH_KNOB[self.kind]

    @property
    def recall(self) -> dict[int, float]:
        """{1: recall@1, k: recall@k} measured at the knob in use ({} where not measured)."""
        return self.curve.get(self.search_value, {})

    def describe(self) -> str:
        """`hnsw (hnsw_m 32, ef_construction 40, sq_bits 8)`."""
        return describe(self.kind, self.params)

    def __call__(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(query, dtype=np.float32)
        check_finite(q, "the query")
        scores, ids = self.raw_search(q, k)
        short = np.flatnonzero((ids < 0).any(axis=1))
        if len(short):  # faiss found fewer than k (a small nprobe): answer those rows exactly
            s, i = metrics.knn(q[short], int(k), self.vectors, exclude_self=False)
            scores[short], ids[short] = s.numpy(), i.numpy()
        return scores, ids

    def raw_search(
        self, q: np.ndarray, k: int, value: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """faiss's answer at the knob in use (or `value`) as gallery rows, -1 where it found
        fewer than k; the candidates of IVF-PQ and HNSW re-ranked by true score."""
        set_search(self.index, self.kind, self.search_value if value is None else value)
        rerank = RERANK.get(self.kind, 1)
        scores, ids = self.index.search(q, int(k) * rerank)
        ids = ids.astype(np.int64)
        if rerank > 1:
            true = np.stack([(q * self.vectors[np.maximum(c, 0)]).sum(1) for c in ids.T], 1)
            scores = np.where(ids >= 0, true, -np.inf).astype(np.float32)
            best = np.argsort(-scores, axis=1, kind="stable")[:, : int(k)]
            scores, ids = np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)
        return scores, ids

    def matches(self, vectors: np.ndarray) -> bool:
        """Whether this index was built over exactly these vectors."""
        if vectors is self.vectors:
            return True
        return vectors.shape == self.vectors.shape and vectors_sha256(vectors) == self.sha256

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        spec: IndexSpec | str = "flat",
        k: int = 10,
        *,
        sha256: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> AnnIndex:
        """Build an index in memory. An approximate one is built without a held-out sample of
        the gallery, its recall@max(k, 10) measured on that sample at each search knob value
        (the knob's default: the smallest reaching 0.95), then the sample is added."""
        spec = IndexSpec(spec) if isinstance(spec, str) else spec
        params = checked_params(spec, vectors)
        n, d = vectors.shape
        if log:
            log(f"building faiss {describe(spec.kind, params)} over {n:,} x {d} vectors ...")
        hold = Holdout.draw(n) if spec.kind != "flat" else None
        t0 = time.perf_counter()
        index = build_faiss(vectors, spec.kind, params, None if hold is None else hold.rest)
        seconds = time.perf_counter() - t0
        digest = sha256 or vectors_sha256(vectors)
        made = cls(spec.kind, params, index, vectors, digest, {}, None, seconds)
        if hold is not None and len(hold.sample):
            made.measure(hold, min(max(k, 10), n - len(hold.sample)), spec.search_value())
            t0 = time.perf_counter()
            add_rows(index, vectors, hold.sample)
            made.build_seconds += time.perf_counter() - t0
        elif hold is not None:  # too few vectors to hold any out: search them all
            made.search_value = spec.search_value() or knob_values(spec.kind, index, n)[-1]
        return made

    def measure(self, hold: Holdout, k: int, given: int | None) -> None:
        """The recall curve on the held-out rows (the given knob value measured too), and the
        knob in use: the given one, else the smallest reaching TARGET_RECALL."""
        values = knob_values(self.kind, self.index, len(self.vectors))
        truth, queries = hold.truth(self.vectors, k), self.vectors[hold.sample]

        def rows(value: int, q: np.ndarray, kk: int) -> np.ndarray:
            return self.raw_search(q, kk, value)[1]

        self.curve = measure_curve(rows, values, queries, self.vectors, truth)
        if given is not None and given not in self.curve:
            self.curve.update(measure_curve(rows, [given], queries, self.vectors, truth))
        self.search_value = given if given is not None else pick(self.curve)
        self.held_out = len(hold.sample)

    def report(self) -> str:
        """One line: the recall against exact search, and how it was measured."""
        if self.kind == "flat":
            return "recall against exact search: 1 (a flat index compares every vector)"
        at = f"at {self.knob} {self.search_value}"
        if not self.curve:
            return f"recall not measured (too few vectors to hold any out); {at}: every vector"
        if not self.recall:
            seen = ", ".join(f"{v}: {r[max(r)]:.3f}" for v, r in sorted(self.curve.items()))
            k = max(next(iter(self.curve.values())))
            return f"recall not measured {at}; recall@{k} by {self.knob} at build: {seen}"
        got = ", ".join(f"@{k} {r:.3f}" for k, r in sorted(self.recall.items()))
        line = f"recall against exact search: {got} {at} ({self.held_out:,} of the gallery's "
        line += "vectors as queries, held out of the index while it was measured)"
        if self.recall[max(self.recall)] < TARGET_RECALL:
            more = f"a larger --{str(self.knob).replace('_', '-')}"
            line += f"; below {TARGET_RECALL}: use " + (
                "ivf or hnsw" if self.kind == "ivfpq" else more
            )
        return line
