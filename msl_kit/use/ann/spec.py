"""What a faiss index is asked for: its kind and knobs (`IndexSpec`), their defaults from the
gallery's size and their checks, one line per bad value; faiss imported or its absence said.

Defaults follow faiss's wiki ("Guidelines to choose an index", "Indexing 1M vectors"): IVF with
nlist = 4 sqrt(N) inverted lists (the wiki's range is 4 to 16 sqrt(N)), trained on 64 vectors
per list (it asks 30 to 256, and faiss warns below 39); IVF-PQ codes of D / 4 bytes (4
dimensions per 8-bit sub-quantizer, 16x smaller than float32); HNSW with M = 32 links per node
(the wiki's usual value, 4 to 64) and faiss's efConstruction 40, over 8-bit scalar-quantized
codes (`sq_bits` in its record, so a kept index built otherwise is rebuilt). The search-time
knob (nprobe, efSearch) has no fixed default: `recall` measures it and picks the smallest that
reaches 0.95.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from msl_kit.errors import MslKitError

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
BUILD_KNOBS = {"flat": (), "ivf": ("nlist",), "ivfpq": ("nlist", "pq_bytes"), "hnsw": ("hnsw_m",)}
SEARCH_KNOB = {"flat": None, "ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "ef_search"}
KNOBS = ("nlist", "nprobe", "pq_bytes", "hnsw_m", "ef_search")
MIN_PER_LIST = 39  # faiss's k-means warns below 39 training vectors per centroid
PQ_CENTROIDS = 256  # 8-bit codes: each sub-quantizer is a 256-centroid k-means
EF_CONSTRUCTION = 40  # faiss's default
SQ_TYPES = {8: "QT_8bit"}  # HNSW's code per dimension: sq_bits -> faiss's ScalarQuantizer type
HNSW_SQ_BITS = 8
HNSW_M_RANGE = (2, 256)
MAX_EF_SEARCH = 1 << 16
FAISS_MISSING = "faiss is not installed: pip install faiss-cpu (or search without --faiss)"
_HASH_ROWS = 1 << 16


class AnnError(MslKitError, ValueError):
    """A request an index cannot serve; the message says what to do."""


def import_faiss() -> Any:
    """The faiss module, or one line naming `pip install faiss-cpu`."""
    try:
        import faiss
    except ImportError:
        raise AnnError(FAISS_MISSING) from None
    return faiss


def vectors_sha256(vectors: np.ndarray | Iterable[np.ndarray]) -> str:
    """sha256 of the vectors' float32 bytes, row after row (an array, or its row blocks in
    order): the digest an embeddings file records and a faiss index is tied to."""
    digest = hashlib.sha256()
    blocks = (
        (vectors[i : i + _HASH_ROWS] for i in range(0, len(vectors), _HASH_ROWS))
        if isinstance(vectors, np.ndarray)
        else vectors
    )
    for block in blocks:
        digest.update(memoryview(np.ascontiguousarray(block, dtype=np.float32)).cast("B"))
    return digest.hexdigest()


def check_finite(vectors: np.ndarray, what: str = "the gallery") -> None:
    """Refuse NaN or inf rows in one line (faiss would answer them with id -1)."""
    rows = vectors.sum(axis=1, dtype=np.float64)  # float64: finite rows never overflow
    bad = np.flatnonzero(~np.isfinite(rows))
    if len(bad):
        raise AnnError(
            f"{what} holds {len(bad)} vector(s) with NaN or inf (first: row {bad[0]}): "
            "re-embed those images or drop those rows; search refuses them, exact or faiss"
        )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class IndexSpec:
    """What to build and how to search it; a knob left None takes its default."""

    kind: str = "flat"
    nlist: int | None = None  # ivf, ivfpq: inverted lists (build)
    nprobe: int | None = None  # ivf, ivfpq: lists visited per query (search)
    pq_bytes: int | None = None  # ivfpq: bytes per vector (build)
    hnsw_m: int | None = None  # hnsw: links per node (build)
    ef_search: int | None = None  # hnsw: candidates kept per query (search)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AnnError(f"faiss index {self.kind!r} is not one of {', '.join(KINDS)}")
        own = (*BUILD_KNOBS[self.kind], SEARCH_KNOB[self.kind])
        for name in KNOBS:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in own:
                users = [k for k in KINDS if name in (*BUILD_KNOBS[k], SEARCH_KNOB[k])]
                raise AnnError(
                    f"{_flag(name)} applies to --faiss {' or '.join(users)}, not {self.kind}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise AnnError(f"{_flag(name)} must be a positive integer, got {value!r}")

    def build_params(self, n: int, d: int) -> dict[str, int]:
        """The build knobs for n vectors of dimension d: given ones checked, others defaulted."""
        params: dict[str, int] = {}
        if self.kind in ("ivf", "ivfpq"):
            params["nlist"] = _nlist(None if self.nlist is None else int(self.nlist), n)
        if self.kind == "ivfpq":
            pq = None if self.pq_bytes is None else int(self.pq_bytes)
            params["pq_bytes"] = _pq_bytes(pq, n, d)
        if self.kind == "hnsw":
            m = 32 if self.hnsw_m is None else int(self.hnsw_m)
            if not HNSW_M_RANGE[0] <= m <= HNSW_M_RANGE[1]:
                raise AnnError(f"--hnsw-m {m} is outside {HNSW_M_RANGE}: faiss's wiki uses 4-64")
            params.update(hnsw_m=m, ef_construction=EF_CONSTRUCTION, sq_bits=HNSW_SQ_BITS)
        return params

    def search_value(self) -> int | None:
        """The search knob the request gives (nprobe or ef_search), None for the default."""
        value = None if SEARCH_KNOB[self.kind] is None else getattr(self, SEARCH_KNOB[self.kind])
        return None if value is None else int(value)


def _nlist(given: int | None, n: int) -> int:
    most = n // MIN_PER_LIST
    if most < 1:
        raise AnnError(
            f"an IVF index needs at least {MIN_PER_LIST} vectors to train, the gallery has "
            f"{n}: use --faiss flat or hnsw"
        )
    if given is None:
        return max(1, min(most, round(4 * math.sqrt(n))))
    if given > most:
        raise AnnError(
            f"--nlist {given} is too many lists for {n} vectors: faiss trains each on at least "
            f"{MIN_PER_LIST}, so use at most {most}"
        )
    return given


def _pq_bytes(given: int | None, n: int, d: int) -> int:
    if n < PQ_CENTROIDS * MIN_PER_LIST:
        raise AnnError(
            f"an IVF-PQ index needs at least {PQ_CENTROIDS * MIN_PER_LIST} vectors to train its "
            f"codebooks, the gallery has {n}: use --faiss ivf or hnsw"
        )
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    if given is None:
        return max(m for m in divisors if m <= max(1, d // 4))
    if given not in divisors:
        raise AnnError(
            f"--pq-bytes {given} must divide the dimension {d}: use one of "
            f"{', '.join(map(str, divisors))}"
        )
    return given


def describe(kind: str, params: dict[str, int]) -> str:
    """`hnsw (hnsw_m 32, ef_construction 40, sq_bits 8)`, `flat`."""
    knobs = ", ".join(f"{k} {v}" for k, v in params.items())
    return f"{kind} ({knobs})" if knobs else kind


def checked_params(spec: IndexSpec, vectors: np.ndarray) -> dict[str, int]:
    """The build knobs of `spec` for these vectors, every value checked (one line each), faiss
    imported (or its absence said) before anything is read or built."""
    import_faiss()
    if vectors.ndim != 2 or not len(vectors):
        raise AnnError(f"a faiss index needs (N, D) vectors, got shape {vectors.shape}")
    check_finite(vectors)
    params = spec.build_params(*vectors.shape)
    if spec.nprobe is not None and spec.nprobe > params["nlist"]:
        raise AnnError(
            f"--nprobe {spec.nprobe} is more than the {params['nlist']} lists (--nlist) there are"
        )
    if spec.ef_search is not None and spec.ef_search > MAX_EF_SEARCH:
        raise AnnError(f"--ef-search {spec.ef_search} is above the limit {MAX_EF_SEARCH}")
    return params
