"""An embeddings file (FILE.npz from `msl-kit embed`): what it holds, how it is read and searched.

FILE.npz is a plain numpy archive (`np.load` reads it, no pickle): `embeddings` (N x D float32,
L2-normalised), `paths` (N), `labels` (N, indices into `classes`; absent where unknown),
`classes`, `skipped` (files that could not be decoded), `checkpoint`, `checkpoint_sha256`,
`preprocessing` (JSON of the model's spec), `inputs_sha256` (what was embedded, how) and
`embeddings_sha256` (of the vectors' float32 bytes: what a faiss index beside it is tied to).
The writer fixes member order and zip timestamps, so the same inputs give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from msl_kit import metrics
from msl_kit.use.ann.faiss_index import AnnIndex
from msl_kit.use.ann.spec import IndexSpec

FORMAT = "msl-kit embeddings 1"
REQUIRED = ("embeddings", "paths", "checkpoint_sha256", "format")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: no clock in the bytes
_COPY = 1 << 22  # bytes per read when streaming a member into the archive


def is_index(path: str | Path) -> bool:
    """Whether `path` is an embeddings file written by `msl-kit embed`."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return all(f"{n}.npy" in names for n in REQUIRED)


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
    skipped: tuple[str, ...] = ()  # inputs that could not be decoded
    inputs_sha256: str = ""
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
        """Read FILE.npz; a file that is not one says so in one line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no embeddings file {path}: make one with `msl-kit embed`")
        if not is_index(path):
            raise ValueError(f"{path} is not an embeddings file made by `msl-kit embed`")
        with np.load(path, allow_pickle=False) as z:
            get = {k: z[k] for k in z.files}
        return cls(
            embeddings=get["embeddings"],
            paths=get["paths"],
            labels=get.get("labels"),
            classes=tuple(get["classes"].tolist()) if "classes" in get else (),
            checkpoint=str(get.get("checkpoint", "")),
            checkpoint_sha256=str(get["checkpoint_sha256"]),
            preprocessing=json.loads(str(get.get("preprocessing", "{}"))),
            skipped=tuple(get["skipped"].tolist()) if "skipped" in get else (),
            inputs_sha256=str(get.get("inputs_sha256", "")),
            embeddings_sha256=str(get.get("embeddings_sha256", "")),
        )

    def check_query(self, query: Embeddings | np.ndarray) -> None:
        """Refuse, in one line, a query of another dimension or embedded by another checkpoint."""
        vectors = query.embeddings if isinstance(query, Embeddings) else np.asarray(query)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(
                f"the query vectors have shape {tuple(vectors.shape)} but the index holds "
                f"{self.dim}-d vectors: embed the query with the index's checkpoint"
            )
        other = getattr(query, "checkpoint_sha256", "")
        if other and self.checkpoint_sha256 and other != self.checkpoint_sha256:
            raise ValueError(
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

        A query whose path is also in this gallery does not find itself unless
        `exclude_self=False`; other queries are a separate set (In-Shop style).
        """
        self.check_query(query)
        if not isinstance(query, Embeddings):
            vectors = np.asarray(query, dtype=np.float32)
            query = Embeddings(vectors, np.array([f"query {i}" for i in range(len(vectors))]))
        self_index = self.positions(query.paths) if exclude_self else None
        extra = int(self_index is not None and bool((self_index >= 0).any()))
        k = min(int(k), len(self) - extra)
        if k < 1:
            raise ValueError("the gallery holds no image other than the query itself")
        if index is not None:
            if not isinstance(index, AnnIndex):
                index = AnnIndex.build(self.embeddings, index, k)
            elif not index.matches(self.embeddings):
                raise ValueError("that faiss index holds other vectors than this gallery's")
            backend = index
        backend = backend or exact_backend(self.embeddings)
        scores, indices = backend(np.ascontiguousarray(query.embeddings), k + extra)
        if extra:
            scores, indices = drop_self(scores, indices, self_index, k)
        return Hits(scores, indices, query, self)

    def positions(self, paths: np.ndarray) -> np.ndarray:
        """Each path's index in this gallery, -1 where absent."""
        where = {p: i for i, p in enumerate(self.paths.tolist())}
        return np.array([where.get(p, -1) for p in np.asarray(paths).tolist()], dtype=np.int64)


Backend = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def exact_backend(gallery: np.ndarray) -> Backend:
    """Exact search with `metrics.knn` (chunked, ties to the lower index)."""

    def search(query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, idx = metrics.knn(query, k, gallery, exclude_self=False)
        return sims.numpy(), idx.numpy()

    return search


def drop_self(
    scores: np.ndarray, indices: np.ndarray, self_index: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 neighbours per row, the k left after removing the row's own gallery item
    (or the last one where the query is not in the gallery)."""
    own = indices == self_index[:, None]
    keep = ~own
    keep[~own.any(axis=1), -1] = False  # rows without themselves drop their (k+1)-th
    rows = len(indices)
    return scores[keep].reshape(rows, k), indices[keep].reshape(rows, k)


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
