"""Approximate nearest neighbours with faiss: a flat (exact) index, IVF-Flat, IVF-PQ or HNSW
over a gallery's vectors, with the recall each costs measured against exact search.

Defaults follow faiss's wiki ("Guidelines to choose an index", "Indexing 1M vectors"): IVF with
nlist = 4 sqrt(N) inverted lists (the wiki's range is 4 to 16 sqrt(N)), trained on 64 vectors
per list (it asks 30 to 256, and faiss warns below 39); IVF-PQ codes of D / 4 bytes (4
dimensions per 8-bit sub-quantizer, 16x smaller than float32), its 4k best candidates re-ranked
by their true vectors (faiss's IndexRefine idea; FILE.npz holds them anyway); HNSW with M = 32
links per node (the wiki's usual value, 4 to 64) and faiss's efConstruction 40. The
search-time knob (nprobe, efSearch), unless given, is the smallest power of two whose recall@k
on a sample of the gallery's own vectors reaches 0.95: faiss's auto-tuning idea, on one knob.

Beside FILE.npz an index is kept as FILE.<kind>.faiss with FILE.<kind>.json: the sha256 of every
vector it holds (the digest FILE.npz records), its build knobs and the exact neighbours of its
recall sample. A file that was built over other vectors, or with other build knobs, is rebuilt,
never used. An index is data: faiss reads it, nothing in it runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msl_kit import metrics
from msl_kit.files.atomic import atomic_write_bytes, atomic_write_text

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
BUILD_KNOBS = {"flat": (), "ivf": ("nlist",), "ivfpq": ("nlist", "pq_bytes"), "hnsw": ("hnsw_m",)}
SEARCH_KNOB = {"flat": None, "ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "ef_search"}
KNOBS = ("nlist", "nprobe", "pq_bytes", "hnsw_m", "ef_search")
MIN_PER_LIST = 39  # faiss's k-means warns below 39 training vectors per centroid
TRAIN_PER_LIST = 64  # vectors per inverted list used to train the coarse quantizer
PQ_CENTROIDS = 256  # 8-bit codes: each sub-quantizer is a 256-centroid k-means
EF_CONSTRUCTION = 40  # faiss's default
PQ_RERANK = 4  # IVF-PQ: candidates per result re-ranked with the true vectors
HNSW_M_RANGE = (2, 256)
MAX_EF_SEARCH = 1 << 16
TARGET_RECALL = 0.95
RECALL_SAMPLE = 1000
SCORE_TOL = 1e-5  # float32 inner products of faiss and torch differ in the last bits
FORMAT = "msl-kit faiss index 1"
FAISS_MISSING = "faiss is not installed: pip install faiss-cpu (or search without --faiss)"
_HASH_ROWS = 1 << 16


class AnnError(ValueError):
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
            params.update(hnsw_m=m, ef_construction=EF_CONSTRUCTION)
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


def build_faiss(vectors: np.ndarray, kind: str, params: dict[str, int], seed: int = 0) -> Any:
    """A trained faiss index of `kind` holding `vectors` (float32, by inner product)."""
    faiss = import_faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["hnsw_m"], ip)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        nlist = params["nlist"]
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
            train = TRAIN_PER_LIST * nlist
        else:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, params["pq_bytes"], 8, ip)
            train = max(TRAIN_PER_LIST * nlist, TRAIN_PER_LIST * PQ_CENTROIDS)
        rows = np.random.default_rng(seed).choice(n, min(n, train), replace=False)
        index.train(x[np.sort(rows)])
    index.add(x)
    return index


def set_search(index: Any, kind: str, value: int | None) -> None:
    """Set nprobe (IVF) or efSearch (HNSW) on a faiss index."""
    if value is None:
        return
    if kind == "hnsw":
        index.hnsw.efSearch = int(value)
    elif kind in ("ivf", "ivfpq"):
        index.nprobe = min(int(value), index.nlist)


@dataclass
class Truth:
    """Exact neighbours of a sample of the gallery's own vectors (each without itself)."""

    sample: np.ndarray  # (S,) gallery rows used as queries
    scores: np.ndarray  # (S, k) exact top-k similarities, descending

    @property
    def k(self) -> int:
        """How many neighbours per query are known."""
        return int(self.scores.shape[1])

    @classmethod
    def measure(cls, vectors: np.ndarray, k: int, size: int = RECALL_SAMPLE) -> Truth:
        """Exact top-k (the kit's chunked kNN) of `size` rows drawn with a fixed seed."""
        n = len(vectors)
        sample = np.sort(np.random.default_rng(0).choice(n, min(size, n), replace=False))
        k = min(k, n - 1)
        sims, ids = metrics.knn(vectors[sample], k + 1, vectors, exclude_self=False)
        sims = np.where(ids.numpy() == sample[:, None], -np.inf, sims.numpy())
        return cls(sample, -np.sort(-sims, axis=1)[:, :k])

    def recall(self, search: Callable, vectors: np.ndarray, k: int) -> dict[int, float]:
        """recall@1 and @k of `search(queries, k) -> (scores, ids)`: the share of its top-k
        (self left out) that score at least the exact k-th neighbour (ties count as found)."""
        k = min(k, self.k)
        queries = vectors[self.sample]
        _, found = search(queries, k + 1)
        true = np.stack([(queries * vectors[np.maximum(col, 0)]).sum(1) for col in found.T], axis=1)
        not_self = found != self.sample[:, None]
        rank = np.cumsum(not_self, axis=1)
        out = {}
        for kk in sorted({1, k}):
            kept = not_self & (rank <= kk) & (found >= 0)
            good = kept & (true >= self.scores[:, kk - 1, None] - SCORE_TOL)
            out[kk] = float(good.sum(1).mean() / kk)
        return out

    def to_json(self) -> dict:
        """The sample and its scores, for the index's .json."""
        return {"sample": self.sample.tolist(), "scores": np.round(self.scores, 7).tolist()}

    @classmethod
    def from_json(cls, data: dict) -> Truth:
        """The inverse of `to_json`."""
        return cls(np.asarray(data["sample"], np.int64), np.asarray(data["scores"], np.float32))


def recall_text(recall: dict[int, float], knob: str | None, value: int | None) -> str:
    """`@1 0.998, @10 0.981 at ef_search 32` (or `exact` for a flat index)."""
    if not recall:
        return "exact (a flat index compares every vector)"
    at = f" at {knob} {value}" if knob else ""
    return ", ".join(f"@{k} {r:.3f}" for k, r in sorted(recall.items())) + at


def human_bytes(n: float) -> str:
    """1.28 GB, 35.2 MB, 812 kB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


@dataclass
class AnnIndex:
    """A faiss index over a gallery's vectors; call it as `(queries, k) -> (scores, ids)`
    (what `Embeddings.search(..., backend=)` takes)."""

    kind: str
    params: dict[str, int]  # build knobs
    index: Any  # the faiss index
    vectors: np.ndarray  # the gallery (rows missing from a faiss answer come from it)
    sha256: str  # of the vectors
    truth: Truth | None
    search_value: int | None  # nprobe or ef_search in use
    recall: dict[int, float]
    build_seconds: float
    path: Path | None = None  # FILE.<kind>.faiss where it is kept

    @property
    def knob(self) -> str | None:
        """The search knob's name (nprobe, ef_search), None for flat."""
        return SEARCH_KNOB[self.kind]

    def describe(self) -> str:
        """`hnsw (hnsw_m 32, ef_construction 40)`."""
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

    def raw_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's answer at the search knob in use (id -1 where it found fewer than k); IVF-PQ
        fetches PQ_RERANK x k candidates and keeps the k best by true score (its own scores
        are approximate)."""
        set_search(self.index, self.kind, self.search_value)
        pq = self.kind == "ivfpq"
        scores, ids = self.index.search(q, int(k) * (PQ_RERANK if pq else 1))
        ids = ids.astype(np.int64)
        if pq:
            true = np.stack([(q * self.vectors[np.maximum(c, 0)]).sum(1) for c in ids.T], 1)
            scores = np.where(ids >= 0, true, -np.inf).astype(np.float32)
            order = np.argsort(-scores, axis=1, kind="stable")[:, : int(k)]
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
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
        """Build an index in memory; its recall@k is measured (and the search knob tuned) on
        a sample of the gallery's own vectors. Nothing is written."""
        spec = IndexSpec(spec) if isinstance(spec, str) else spec
        params = checked_params(spec, vectors)
        n, d = vectors.shape
        if log:
            log(f"building faiss {describe(spec.kind, params)} over {n:,} x {d} vectors ...")
        t0 = time.perf_counter()
        index = build_faiss(vectors, spec.kind, params)
        seconds = time.perf_counter() - t0
        digest = sha256 or vectors_sha256(vectors)
        made = cls(spec.kind, params, index, vectors, digest, None, None, {}, seconds)
        made.measure(spec, k)
        return made

    def measure(self, spec: IndexSpec, k: int) -> None:
        """Recall@k at the requested search knob, or at the tuned one where none is given."""
        if self.kind == "flat":
            self.search_value, self.recall = None, {}
            return
        if self.truth is None or self.truth.k < min(k, len(self.vectors) - 1):
            self.truth = Truth.measure(self.vectors, max(k, 10))
        given = spec.search_value()
        if given is None:
            self.search_value, self.recall = self.tune(k)
        else:
            self.search_value = given
            self.recall = self.truth.recall(self.raw_search, self.vectors, k)

    def tune(self, k: int) -> tuple[int | None, dict[int, float]]:
        """The smallest power of two (nprobe, or efSearch) whose recall@k reaches
        TARGET_RECALL; where none does, the best one (a plateau ends the search: PQ's
        compression caps recall)."""
        if self.kind == "hnsw":
            top = min(MAX_EF_SEARCH, max(16, 2 ** math.ceil(math.log2(len(self.vectors)))))
            values = [2**i for i in range(4, int(math.log2(top)) + 1)]
        else:
            nlist = self.index.nlist
            values = sorted({min(2**i, nlist) for i in range(int(math.log2(nlist)) + 2)})
        best: tuple[int | None, dict[int, float]] = (None, {})
        for value in values:
            self.search_value = value
            got = self.truth.recall(self.raw_search, self.vectors, k)
            at_k = max(got)
            if best[0] is not None and got[at_k] < best[1][at_k] + 0.002:
                break
            best = (value, got)
            if got[at_k] >= TARGET_RECALL:
                break
        return best

    def report(self) -> str:
        """One line: the recall against exact search and how it was measured."""
        sample = 0 if self.truth is None else len(self.truth.sample)
        line = (
            f"recall against exact search: {recall_text(self.recall, self.knob, self.search_value)}"
        )
        if self.recall:
            line += f" ({sample:,} of the gallery's own vectors as queries, each without itself)"
            worst = self.recall[max(self.recall)]
            if worst < TARGET_RECALL:
                fix = "ivf or hnsw" if self.kind == "ivfpq" else f"a larger {_flag(self.knob)}"
                line += f"; below {TARGET_RECALL}: use {fix}"
        return line


def describe(kind: str, params: dict[str, int]) -> str:
    """`hnsw (hnsw_m 32, ef_construction 40)`, `flat`."""
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


def index_paths(npz: str | Path, kind: str) -> tuple[Path, Path]:
    """FILE.<kind>.faiss and FILE.<kind>.json beside FILE.npz."""
    base = Path(npz)
    return base.with_suffix(f".{kind}.faiss"), base.with_suffix(f".{kind}.json")


def read_meta(path: Path) -> dict | None:
    """An index's record, or None where there is none (or it is not one of ours)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def stale(meta: dict | None, tie: dict, params: dict, faiss_path: Path) -> str | None:
    """Why the kept index cannot serve this request (None: it can)."""
    if meta is None:
        return "has no record beside it" if faiss_path.exists() else "does not exist yet"
    was = meta.get("vectors", {})
    if was != tie:
        what = "sha256 " + str(was.get("sha256", "?"))[:12] + ", now " + tie["sha256"][:12]
        if was.get("sha256") == tie["sha256"]:
            what = "the file's vector bytes changed since its digest was recorded"
        return f"was built over other vectors ({what})"
    if meta.get("params") != params:
        was = describe("", meta.get("params") or {}).strip(" ()")
        return f"was built with other knobs ({was}; asked {describe('', params).strip(' ()')})"
    try:
        size = faiss_path.stat().st_size
    except OSError:
        return "is missing"
    return None if size == meta.get("faiss_bytes") else "does not match its record (size)"


def refuse_foreign(faiss_path: Path, meta_path: Path) -> None:
    """Never replace a file that is not a faiss index or an index record of ours."""
    if faiss_path.exists():
        with open(faiss_path, "rb") as f:
            if f.read(1) != b"I":  # every faiss index file starts with its fourcc, "I..."
                raise AnnError(f"{faiss_path} exists and is not a faiss index: move it away")
    if meta_path.exists() and read_meta(meta_path) is None:
        raise AnnError(f"{meta_path} exists and is not an msl-kit index record: move it away")


def read_faiss(path: Path, kind: str, n: int, d: int) -> Any | None:
    """The faiss index in `path` when it reads and holds n vectors of dimension d, else None."""
    faiss = import_faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:
        return None
    ok = index.ntotal == n and index.d == d and (kind != "hnsw" or hasattr(index, "hnsw"))
    return index if ok else None


def write_index(made: AnnIndex) -> None:
    """The faiss index into made.path, streamed (no copy of it in memory), atomically."""
    faiss = import_faiss()

    def write(f) -> None:
        faiss.write_index(made.index, faiss.PyCallbackIOWriter(f.write))

    atomic_write_bytes(made.path, write)


def write_meta(made: AnnIndex, meta_path: Path, tie: dict, tuned: dict | None) -> None:
    """FILE.<kind>.json: what the index beside it holds, how it was built, its recall sample."""
    meta = {
        "format": FORMAT,
        "kind": made.kind,
        "params": made.params,
        "vectors": tie,
        "faiss_bytes": made.path.stat().st_size,
        "build_seconds": round(made.build_seconds, 3),
        "faiss_version": import_faiss().__version__,
        "truth": made.truth.to_json() if made.truth is not None else None,
        "tuned": tuned,  # {"k", "value"}: the knob tuned for recall@k, the default next time
    }
    atomic_write_text(meta_path, json.dumps(meta))


def open_index(
    npz: str | Path,
    vectors: np.ndarray,
    spec: IndexSpec | str = "flat",
    k: int = 10,
    *,
    sha256: str | None = None,
    crc32: int | None = None,
    log: Callable[[str], None] | None = None,
) -> AnnIndex:
    """The index kept beside FILE.npz when it was built over these very vectors (`sha256`, the
    digest FILE.npz records, computed where None; `crc32` of its vector bytes where known)
    with the same build knobs; else built, measured and saved there."""
    spec = IndexSpec(spec) if isinstance(spec, str) else spec
    say = log or (lambda _: None)
    params = checked_params(spec, vectors)
    faiss_path, meta_path = index_paths(npz, spec.kind)
    tie = {"count": len(vectors), "dim": int(vectors.shape[1])}
    tie.update(sha256=sha256 or vectors_sha256(vectors), crc32=crc32)
    meta = read_meta(meta_path)
    why = stale(meta, tie, params, faiss_path)
    index = None if why else read_faiss(faiss_path, spec.kind, *vectors.shape)
    if index is None:
        refuse_foreign(faiss_path, meta_path)
        if why != "does not exist yet":
            say(f"{faiss_path} {why or 'does not read as its record says'}: rebuilding")
        made = AnnIndex.build(vectors, spec, k, sha256=tie["sha256"], log=say)
        made.path = faiss_path
        write_index(made)
        tuned = {"k": k, "value": made.search_value} if spec.search_value() is None else None
        write_meta(made, meta_path, tie, tuned if made.kind != "flat" else None)
        size = human_bytes(faiss_path.stat().st_size)
        say(f"built {faiss_path} in {made.build_seconds:.1f} s, {size} on disk")
    else:
        truth = Truth.from_json(meta["truth"]) if meta.get("truth") else None
        made = AnnIndex(spec.kind, params, index, vectors, tie["sha256"], truth, None, {},
                        meta.get("build_seconds", 0.0), faiss_path)  # fmt: skip
        tuned = meta.get("tuned") or {}
        if spec.search_value() is None and tuned.get("k", 0) >= k:
            spec = dataclasses.replace(spec, **{SEARCH_KNOB[spec.kind]: tuned["value"]})
        known = made.truth
        made.measure(spec, k)
        retuned = spec.search_value() is None and made.kind != "flat"
        if made.truth is not known or retuned:  # keep what was measured for the next search
            new = {"k": k, "value": made.search_value} if retuned else tuned or None
            write_meta(made, meta_path, tie, new)
        say(
            f"reused {faiss_path} ({made.describe()}, built in {made.build_seconds:.1f} s, "
            f"{human_bytes(faiss_path.stat().st_size)}; vectors sha256 {tie['sha256'][:12]})"
        )
    say(made.report())
    return made
