"""An embeddings file (FILE.npz from `msl-kit embed`): what it holds, how it is read and searched.

FILE.npz is a plain numpy archive (`np.load` reads it, no pickle): `embeddings` (N x D float32,
L2-normalised), `paths` (N), `labels` (N, indices into `classes`; absent where unknown),
`classes`, `skipped` (inputs that were not embedded) with `skipped_reasons`, `inputs` (how many
inputs were listed: paths + skipped), `checkpoint` (its absolute path) and
`checkpoint_relative` (from the index's folder), `checkpoint_sha256`,
`preprocessing` (JSON of the model's spec), `inputs_sha256` (what was embedded, how) and
`embeddings_sha256` (of the vectors' float32 bytes: what a faiss index beside it is tied to).
The writer fixes member order and zip timestamps, so the same inputs give the same bytes.

An index is data from anywhere: before any array is read, every member's .npy header is
parsed and checked against the file (`check_members`): no object arrays, declared shapes that
match the member's size, and compressed members within `MAX_INFLATE` times their size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from msl_kit import metrics
from msl_kit.errors import MslKitError
from msl_kit.use.ann.faiss_index import AnnIndex
from msl_kit.use.ann.spec import IndexSpec

FORMAT = "msl-kit embeddings 1"
REQUIRED = ("embeddings", "paths", "checkpoint_sha256", "format")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: no clock in the bytes
_COPY = 1 << 22  # bytes per read when streaming a member into the archive
MAX_INFLATE = 100  # a compressed member may declare at most this many times its stored size
MAX_INDEX_BYTES = 64 << 30  # all members together, as read into memory
_KINDS = "fiubU"  # numbers, booleans and text: an index holds nothing else


class IndexFileError(MslKitError, ValueError):
    """An embeddings file that cannot be used as one, or a query it cannot answer; the message
    names it and says what to do."""


def is_index(path: str | Path) -> bool:
    """Whether `path` is an embeddings file written by `msl-kit embed`."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return all(f"{n}.npy" in names for n in REQUIRED)


def check_members(path: str | Path) -> None:
    """Every member of the .npz at `path` read as far as its .npy header, never further: its
    dtype is numbers or text (no objects, no pickle), its declared shape fills exactly its
    declared size, and that size fits the file (`MAX_INFLATE`, `MAX_INDEX_BYTES`)."""
    path = Path(path)
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            archive = path.stat().st_size
            for info in zf.infolist():
                total += info.file_size
                _check_member(zf, info, archive)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        if isinstance(e, IndexFileError):
            raise IndexFileError(f"{path}: {e}; it was not read") from None
        raise IndexFileError(f"{path} is damaged ({e}); it was not read") from None
    if total > MAX_INDEX_BYTES:
        raise IndexFileError(
            f"{path} declares {total:,} bytes of arrays, more than index.MAX_INDEX_BYTES "
            f"({MAX_INDEX_BYTES:,}); it was not read"
        )


def _check_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: int) -> None:
    name = info.filename
    stored = info.compress_type == zipfile.ZIP_STORED
    room = archive if stored else MAX_INFLATE * max(info.compress_size, 1)
    if info.file_size > room:
        limit = (
            f"the {archive:,} bytes of the whole file"
            if stored
            else f"{MAX_INFLATE} times its {info.compress_size:,} compressed bytes (MAX_INFLATE)"
        )
        raise IndexFileError(f"member {name} declares {info.file_size:,} bytes, more than {limit}")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        body = info.file_size - f.tell()
    if dtype.hasobject or dtype.kind not in _KINDS:
        raise IndexFileError(f"member {name} holds {dtype} values, not numbers or text")
    if math.prod(shape) * dtype.itemsize != body:
        raise IndexFileError(
            f"member {name} declares shape {shape} of {dtype} but holds {body:,} bytes"
        )


def write_npz(f: BinaryIO, members: Iterable[tuple[str, np.ndarray | Path]]) -> None:
    """A .npz into `f`, members in the given order with fixed timestamps (same input, same
    bytes). A member given as a Path is a .npy file streamed in, never loaded whole."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in members:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as dst:
                if isinstance(value, Path):
                    with open(value, "rb") as src:
                        for block in iter(lambda: src.read(_COPY), b""):
                            dst.write(block)
                else:
                    np.lib.format.write_array(dst, np.asanyarray(value), allow_pickle=False)


@dataclass
class Embeddings:
    """Vectors of a set of images with their paths, labels and the checkpoint that made them."""

    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    paths: np.ndarray  # (N,) str: file paths, or "<dataset>:<item>" for a prepared split
    labels: np.ndarray | None = None  # (N,) int64 indices into `classes`; None where unknown
    classes: tuple[str, ...] = ()
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    preprocessing: dict = dataclasses.field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # inputs not embedded (undecodable, refused links ...)
    inputs_sha256: str = ""
    skipped_reasons: tuple[str, ...] = ()  # one per skipped path, where the file records them
    inputs: int = -1  # inputs listed when embedded (len(paths) + len(skipped)); -1: unknown
    checkpoint_relative: str = ""  # the checkpoint's path from the index file's folder
    source: str = ""  # the file this was read from (not stored)
    embeddings_sha256: str = ""  # as recorded in the file ("" where it records none)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        """The embedding dimension D."""
        return int(self.embeddings.shape[1])

    def class_names(self) -> np.ndarray | None:
        """Each item's class name (labels are compared by name across files), or None."""
        if self.labels is None:
            return None
        return np.asarray(self.classes, dtype=str)[self.labels]

    @classmethod
    def load(cls, path: str | Path) -> Embeddings:
        """Read FILE.npz; a file that is not one, or not a consistent one, says so in one line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no embeddings file {path}: make one with `msl-kit embed`")
        if not is_index(path):
            raise IndexFileError(f"{path} is not an embeddings file made by `msl-kit embed`")
        check_members(path)
        with np.load(path, allow_pickle=False) as z:
            get = {k: z[k] for k in z.files}

        def text(key: str) -> str:
            return str(get.get(key, ""))

        emb = cls(
            embeddings=get["embeddings"],
            paths=get["paths"],
            labels=get.get("labels"),
            classes=tuple(get["classes"].tolist()) if "classes" in get else (),
            checkpoint=text("checkpoint"),
            checkpoint_sha256=text("checkpoint_sha256"),
            preprocessing=json.loads(text("preprocessing") or "{}"),
            skipped=tuple(get["skipped"].tolist()) if "skipped" in get else (),
            inputs_sha256=text("inputs_sha256"),
            skipped_reasons=tuple(get["skipped_reasons"].tolist())
            if "skipped_reasons" in get
            else (),
            inputs=int(get["inputs"]) if "inputs" in get else -1,
            checkpoint_relative=text("checkpoint_relative"),
            source=str(path),
            embeddings_sha256=text("embeddings_sha256"),
        )
        emb.check_arrays(path)
        return emb

    def check_arrays(self, path: str | Path) -> None:
        """Refuse, in one line, arrays that do not fit together (a hand-edited or foreign file)."""
        x, n = self.embeddings, len(self.paths)
        bad = ""
        if x.ndim != 2 or x.dtype != np.float32 or self.paths.ndim != 1 or len(x) != n:
            bad = f"embeddings {x.dtype}{list(x.shape)} for {n} paths"
        elif self.paths.dtype.kind != "U":
            bad = f"paths of dtype {self.paths.dtype}"
        elif self.labels is not None:
            lab = self.labels
            if lab.ndim != 1 or len(lab) != n or lab.dtype.kind not in "iu":
                bad = f"labels {lab.dtype}{list(lab.shape)} for {n} paths"
            elif n and (lab.min() < 0 or lab.max() >= len(self.classes)):
                bad = f"labels outside the {len(self.classes)} classes"
        if bad:
            raise IndexFileError(f"{path} is not a consistent embeddings file ({bad}): re-embed it")

    def check_query(self, query: Embeddings | np.ndarray) -> None:
        """Refuse, in one line, a query of another dimension or embedded by another checkpoint."""
        vectors = query.embeddings if isinstance(query, Embeddings) else np.asarray(query)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexFileError(
                f"the query vectors have shape {tuple(vectors.shape)} but the index holds "
                f"{self.dim}-d vectors: embed the query with the index's checkpoint"
            )
        other = getattr(query, "checkpoint_sha256", "")
        if other and self.checkpoint_sha256 and other != self.checkpoint_sha256:
            raise IndexFileError(
                f"the query was embedded by another checkpoint ({query.checkpoint}, sha256 "
                f"{other[:12]}) than the index ({self.checkpoint}, sha256 "
                f"{self.checkpoint_sha256[:12]}): embed both with the same checkpoint"
            )

    def search(
        self,
        query: Embeddings | np.ndarray,
        k: int = 10,
        *,
        exclude_self: bool = True,
        backend: Backend | None = None,
        index: str | IndexSpec | AnnIndex | None = None,
    ) -> Hits:
        """Top-k of this gallery for each query, by inner product: exact with the kit's chunked
        kNN, or `backend(query_vectors, k) -> (scores, indices)`, or a faiss `index`: a kind
        ("flat", "ivf", "ivfpq", "hnsw") or an `IndexSpec` built now in memory, or an
        `AnnIndex` over these vectors (`msl_kit.use.ann.open_index` keeps one beside a file).

        A query whose path is also in this gallery finds none of the gallery's rows with that
        path (a file listed twice is still itself) unless `exclude_self=False`; other queries
        are a separate set (In-Shop style).
        """
        self.check_query(query)
        if not isinstance(query, Embeddings):
            vectors = np.asarray(query, dtype=np.float32)
            query = Embeddings(vectors, np.array([f"query {i}" for i in range(len(vectors))]))
        gallery_ids, query_ids = path_ids(self.paths, query.paths)
        copies = np.append(np.bincount(gallery_ids), 0)  # rows per path; 0 for absent ones
        extra = int(copies[query_ids].max(initial=0)) if exclude_self else 0
        k = min(int(k), len(self) - extra)
        if k < 1:
            raise IndexFileError("the gallery holds no image other than the query itself")
        if index is not None:
            if not isinstance(index, AnnIndex):
                index = AnnIndex.build(self.embeddings, index, k)
            elif not index.matches(self.embeddings):
                raise IndexFileError("that faiss index holds other vectors than this gallery's")
            backend = index
        backend = backend or exact_backend(self.embeddings)
        scores, indices = backend(np.ascontiguousarray(query.embeddings), k + extra)
        if extra:
            own = gallery_ids[indices] == query_ids[:, None]
            scores, indices = drop_own(scores, indices, own, k)
        return Hits(scores, indices, query, self)

    def positions(self, paths: np.ndarray) -> np.ndarray:
        """Each path's index in this gallery, -1 where absent."""
        where = {p: i for i, p in enumerate(self.paths.tolist())}
        return np.array([where.get(p, -1) for p in np.asarray(paths).tolist()], dtype=np.int64)


def path_ids(gallery: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One integer per distinct path: gallery rows and queries with the same path share it;
    a query path absent from the gallery gets an id no gallery row has."""
    names, inverse = np.unique(np.asarray(gallery), return_inverse=True)
    query = np.asarray(query)
    at = np.searchsorted(names, query).clip(0, max(len(names) - 1, 0))
    found = names[at] == query if len(names) else np.zeros(len(query), bool)
    return inverse.reshape(-1).astype(np.int64), np.where(found, at, len(names)).astype(np.int64)


Backend = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def exact_backend(gallery: np.ndarray) -> Backend:
    """Exact search with `metrics.knn` (chunked, ties to the lower index)."""

    def search(query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, idx = metrics.knn(query, k, gallery, exclude_self=False)
        return sims.numpy(), idx.numpy()

    return search


def drop_own(
    scores: np.ndarray, indices: np.ndarray, own: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first k neighbours that are not the query's own rows (`own` marks them),
    in rank order; the search asked for enough extra neighbours to leave k."""
    order = np.argsort(own, axis=1, kind="stable")[:, :k]  # unmarked first, ranks kept
    return np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)


@dataclass
class Hits:
    """The result of a search: (Q, k) scores and gallery indices, with both sets."""

    scores: np.ndarray
    indices: np.ndarray
    query: Embeddings
    gallery: Embeddings

    def hits(self) -> np.ndarray | None:
        """(Q, k) booleans: the neighbour shares the query's class (by name); None if unknown."""
        q, g = self.query.class_names(), self.gallery.class_names()
        if q is None or g is None:
            return None
        return g[self.indices] == q[:, None]

    def recall_at_1(self) -> float | None:
        """Share of queries whose top hit shares their class; None without labels."""
        hits = self.hits()
        return None if hits is None else float(hits[:, 0].mean())

    def rows(self) -> list[dict]:
        """One row per (query, rank): query, rank, score, path, and hit where labels are known."""
        hits = self.hits()
        out = []
        for q, (sc, ix) in enumerate(zip(self.scores, self.indices)):
            for rank, (s, i) in enumerate(zip(sc.tolist(), ix.tolist()), start=1):
                row = {"query": str(self.query.paths[q]), "rank": rank, "score": round(s, 6)}
                row["path"] = str(self.gallery.paths[i])
                if hits is not None:
                    row["hit"] = bool(hits[q, rank - 1])
                out.append(row)
        return out
