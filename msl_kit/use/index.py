"""An embeddings file (FILE.npz from `msl-kit embed`): what it holds, how it is read and searched.

FILE.npz is a plain, uncompressed numpy archive (`np.load` reads it, no pickle):
`embeddings` (N x D float32, L2-normalised), `paths` with `paths_offsets` (the N paths as one
bytes blob, each path's UTF-8 bytes and a NUL, and N + 1 offsets into it: see `columns.Texts`;
`bytes(z["paths"]).split(b"\0")[:-1]` lists them), `labels` (N int64, indices into `classes`;
absent where unknown), `classes`, `skipped` with `skipped_offsets` (inputs that were not
embedded) and `skipped_reasons` with `skipped_reasons_offsets`, `inputs` (how many inputs were
listed: paths + skipped), `checkpoint` (its absolute path) and `checkpoint_relative` (from the
index's folder), `checkpoint_sha256`, `preprocessing` (JSON of the model's spec),
`inputs_sha256` (what was embedded, how) and `embeddings_sha256` (of the vectors' float32
bytes: what a faiss index beside it is tied to). The writer fixes member order and zip
timestamps, so the same inputs give the same bytes.

Why one zip and not a folder: the file stays one thing to copy, `np.load` still reads it, and
the kit's tie of a faiss index to the zip CRC of its vectors holds. What makes it open lazily:
every member is stored (no compression) with its data aligned to 64 bytes (padding in the zip
local header's extra field, as Android's zipalign does), so `Embeddings.load` maps the vectors,
the paths, their offsets and the labels straight from the file (`np.memmap` at the member's
offset) and reads a path only when it is asked for. Only the small members are read.

Files of format 1 ("msl-kit embeddings 1": `paths` and `skipped` as fixed-width str arrays, and
files from before `embeddings_sha256`, `inputs` or `skipped_reasons` existed) still load, into
memory as before.

An index is data from anywhere: before any array is read or mapped, every member's .npy header
is parsed and checked against the file (`check_members`): no object arrays, declared shapes that
match the member's size, and compressed members within `MAX_INFLATE` times their size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from msl_kit import metrics
from msl_kit.errors import MslKitError
from msl_kit.use.ann.faiss_index import AnnIndex
from msl_kit.use.ann.spec import IndexSpec
from msl_kit.use.columns import Texts, raw_at, raw_blocks

FORMAT = "msl-kit embeddings 2"
REQUIRED = ("embeddings", "paths", "checkpoint_sha256", "format")
MAPPED = ("embeddings", "paths", "paths_offsets", "labels")  # opened lazily, never read whole
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: no clock in the bytes
_COPY = 1 << 22  # bytes per read when streaming a member into the archive
_ALIGN = 64  # where each member's data starts (numpy pads .npy headers to 64 too)
_PAD_ID = 0xD935  # the zip extra-field id zipalign uses for padding
MAX_INFLATE = 100  # a compressed member may declare at most this many times its stored size
MAX_INDEX_BYTES = 64 << 30  # all members read into memory together (mapped ones not counted)
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


def check_members(path: str | Path, mapped: Iterable[str] = ()) -> None:
    """Every member of the .npz at `path` read as far as its .npy header, never further: its
    dtype is numbers or text (no objects, no pickle), its declared shape fills exactly its
    declared size, and that size fits the file (`MAX_INFLATE`); the members that will be read
    into memory (all but the stored ones named in `mapped`) within `MAX_INDEX_BYTES`."""
    path = Path(path)
    total, mapped = 0, {f"{name}.npy" for name in mapped}
    try:
        with zipfile.ZipFile(path) as zf:
            archive = path.stat().st_size
            for info in zf.infolist():
                stored = info.compress_type == zipfile.ZIP_STORED
                total += 0 if stored and info.filename in mapped else info.file_size
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
        shape, dtype, start = _npy_header(f)
        body = info.file_size - start
    if dtype.hasobject or dtype.kind not in _KINDS:
        raise IndexFileError(f"member {name} holds {dtype} values, not numbers or text")
    if math.prod(shape) * dtype.itemsize != body:
        raise IndexFileError(
            f"member {name} declares shape {shape} of {dtype} but holds {body:,} bytes"
        )


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes before the data) of the .npy starting at `f`'s position."""
    at = f.tell()
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran and len(shape) > 1:
        raise ValueError("a Fortran-ordered array")
    return shape, dtype, f.tell() - at


@dataclass(frozen=True)
class RawArray:
    """A member given as a raw file of its values' bytes (little-endian, C order), streamed
    into the archive under a .npy header made from `dtype` and `shape`."""

    path: Path
    dtype: str
    shape: tuple[int, ...]


def _padding(at: int, name: bytes) -> bytes:
    """The local header's extra field that puts the member's data at a multiple of _ALIGN:
    one padding record (4 bytes at least), after which zipfile adds its 20-byte zip64 record."""
    start = at + 30 + len(name) + 20  # local header, name, zip64 sizes
    size = (-start - 4) % _ALIGN + 4
    return struct.pack("<HH", _PAD_ID, size - 4) + bytes(size - 4)


def write_npz(f: BinaryIO, members: Iterable[tuple[str, np.ndarray | Path | RawArray]]) -> None:
    """A .npz into `f`, members stored uncompressed in the given order, each one's data aligned
    to 64 bytes, with fixed timestamps (same input, same bytes). A member given as a Path is a
    .npy file, and a `RawArray` a raw file, streamed in, never loaded whole."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in members:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.extra = _padding(zf.fp.tell(), info.filename.encode())
            with zf.open(info, "w", force_zip64=True) as dst:
                if isinstance(value, (Path, RawArray)):
                    source = value if isinstance(value, Path) else value.path
                    if isinstance(value, RawArray):
                        header = {"descr": value.dtype, "fortran_order": False}
                        header["shape"] = value.shape
                        np.lib.format.write_array_header_1_0(dst, header)
                    with open(source, "rb") as src:
                        for block in iter(lambda: src.read(_COPY), b""):
                            dst.write(block)
                else:
                    np.lib.format.write_array(dst, np.asanyarray(value), allow_pickle=False)


def _mapped(path: Path, f: BinaryIO, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A stored member's array mapped from the file (copy-on-write: writable, never written
    back); None where it cannot be (compressed, empty, or its data not aligned for its dtype)."""
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
        return None
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise IndexFileError(f"{path}: member {info.filename} has no local header; re-embed it")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    f.seek(start)
    shape, dtype, header = _npy_header(f)
    offset, size = start + header, math.prod(shape) * dtype.itemsize
    if start + info.file_size > path.stat().st_size or header + size != info.file_size:
        raise IndexFileError(f"{path}: member {info.filename} runs past the file; re-embed it")
    if size == 0 or offset % dtype.itemsize:
        return None
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)


def _read_members(path: Path, lazy: bool) -> dict[str, np.ndarray | Texts]:
    """Every member of a checked file: the `MAPPED` ones mapped where `lazy` (and possible),
    the others read; a string column (NAME + NAME_offsets) as `Texts`."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        arrays = {}
        for name, info in infos.items():
            array = _mapped(path, f, info) if lazy and name in MAPPED else None
            if array is None:
                with zf.open(info) as member:
                    array = np.lib.format.read_array(member, allow_pickle=False)
            arrays[name] = array
    for name in [n for n in arrays if f"{n}_offsets" in arrays and arrays[n].dtype == np.uint8]:
        where = f"{path} ({name})"
        arrays[name] = Texts(arrays.pop(f"{name}_offsets"), arrays[name], where=where)
    return arrays


def _strings(value: np.ndarray | Texts | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, Texts) else tuple(value.tolist())


@dataclass
class Embeddings:
    """Vectors of a set of images with their paths, labels and the checkpoint that made them.

    Read from a file, `embeddings` and `labels` are memory-mapped and `paths` is a `Texts`
    column (a path is decoded when it is asked for); built in memory, they are numpy arrays."""

    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    paths: np.ndarray | Texts  # (N,) str: file paths, or "<dataset>:<item>" for a prepared split
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

    def class_names(self, rows: np.ndarray | None = None) -> np.ndarray | None:
        """Each item's class name (labels are compared by name across files), or those of
        `rows` (an int array of any shape) only; None where labels are unknown."""
        if self.labels is None:
            return None
        labels = self.labels if rows is None else np.asarray(self.labels)[np.asarray(rows)]
        return np.asarray(self.classes, dtype=str)[labels]

    @classmethod
    def load(cls, path: str | Path, *, lazy: bool = True) -> Embeddings:
        """Read FILE.npz; a file that is not one, or not a consistent one, says so in one line.
        `lazy`: map the vectors, paths and labels from the file (format 2) instead of reading
        them; the file must then stay where it is while they are used."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no embeddings file {path}: make one with `msl-kit embed`")
        if not is_index(path):
            raise IndexFileError(f"{path} is not an embeddings file made by `msl-kit embed`")
        check_members(path, MAPPED if lazy else ())
        get = _read_members(path, lazy)

        def text(key: str) -> str:
            return str(get.get(key, ""))

        emb = cls(
            embeddings=get["embeddings"],
            paths=get["paths"],
            labels=get.get("labels"),
            classes=_strings(get.get("classes")),
            checkpoint=text("checkpoint"),
            checkpoint_sha256=text("checkpoint_sha256"),
            preprocessing=json.loads(text("preprocessing") or "{}"),
            skipped=_strings(get.get("skipped")),
            inputs_sha256=text("inputs_sha256"),
            skipped_reasons=_strings(get.get("skipped_reasons")),
            inputs=int(get["inputs"]) if "inputs" in get else -1,
            checkpoint_relative=text("checkpoint_relative"),
            source=str(path),
            embeddings_sha256=text("embeddings_sha256"),
        )
        emb.check_arrays(path)
        return emb

    def check_arrays(self, path: str | Path) -> None:
        """Refuse, in one line, arrays that do not fit together (a hand-edited or foreign file,
        a paths blob cut short): read a block at a time, never whole."""
        bad = self._mismatch()
        if bad:
            raise IndexFileError(f"{path} is not a consistent embeddings file ({bad}): re-embed it")

    def _mismatch(self) -> str:
        x, n = self.embeddings, len(self.paths)
        if isinstance(self.paths, Texts):
            why = self.paths.check()
            if why:
                return f"paths: {why}"
        elif self.paths.ndim != 1 or self.paths.dtype.kind != "U":
            return f"paths of dtype {self.paths.dtype}{list(self.paths.shape)}"
        if x.ndim != 2 or x.dtype != np.float32 or len(x) != n:
            return f"embeddings {x.dtype}{list(x.shape)} for {n} paths"
        lab = self.labels
        if lab is None:
            return ""
        if lab.ndim != 1 or len(lab) != n or lab.dtype.kind not in "iu":
            return f"labels {lab.dtype}{list(lab.shape)} for {n} paths"
        if n and (lab.min() < 0 or lab.max() >= len(self.classes)):
            return f"labels outside the {len(self.classes)} classes"
        return ""

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
        are a separate set (In-Shop style). Only the paths of the rows found are read: the
        search asks for k + 1 neighbours, and again for more where a query's own rows left it
        short.
        """
        self.check_query(query)
        if not isinstance(query, Embeddings):
            vectors = np.asarray(query, dtype=np.float32)
            query = Embeddings(vectors, np.array([f"query {i}" for i in range(len(vectors))]))
        if index is not None:
            if not isinstance(index, AnnIndex):
                index = AnnIndex.build(self.embeddings, index, min(int(k), len(self)))
            elif not index.matches(self.embeddings):
                raise IndexFileError("that faiss index holds other vectors than this gallery's")
            backend = index
        backend = backend or exact_backend(self.embeddings)
        vectors = np.ascontiguousarray(query.embeddings)
        k = min(int(k), len(self))
        if exclude_self:
            scores, indices = leave_own_out(backend, vectors, k, query.paths, self.paths)
        else:
            scores, indices = backend(vectors, k)
        return Hits(scores, indices, query, self)

    def positions(self, paths: Sequence[str]) -> np.ndarray:
        """Each path's index in this gallery (its last row where it is listed twice), -1 where
        absent; the gallery's paths are scanned a block at a time."""
        shared = SharedPaths.find(self.paths, paths)
        last = np.full(shared.distinct, -1, np.int64)
        np.maximum.at(last, shared.row_ids, shared.rows)
        return last[shared.query_ids]


@dataclass
class SharedPaths:
    """Which gallery rows hold one of the queries' paths: each distinct query path has an id
    (`query_ids`, one per query), and `rows` (increasing) hold the paths with ids `row_ids`."""

    query_ids: np.ndarray
    rows: np.ndarray
    row_ids: np.ndarray
    distinct: int

    @classmethod
    def find(cls, gallery: Sequence[str], queries: Sequence[str]) -> SharedPaths:
        """Scan the gallery's paths (a `Texts` column or an array) block by block against a
        set of the queries' paths, compared as stored bytes: memory for the queries' paths and
        one block, whatever the gallery's size."""
        ids: dict[bytes, int] = {}
        query_raw = [r for _, block in raw_blocks(queries) for r in block]
        query_ids = np.fromiter(
            (ids.setdefault(r, len(ids)) for r in query_raw), np.int64, len(query_raw)
        )
        del query_raw
        rows, row_ids = [], []
        for start, block in raw_blocks(gallery):
            found = np.fromiter(map(ids.__contains__, block), bool, len(block))
            at = np.flatnonzero(found)
            rows.append(at + start)
            row_ids.append(np.fromiter((ids[block[i]] for i in at), np.int64, len(at)))
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        return cls(query_ids, cat(rows), cat(row_ids), len(ids))


Backend = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def exact_backend(gallery: np.ndarray) -> Backend:
    """Exact search with `metrics.knn` (chunked, ties to the lower index)."""

    def search(query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, idx = metrics.knn(query, k, gallery, exclude_self=False)
        return sims.numpy(), idx.numpy()

    return search


def leave_own_out(
    backend: Backend,
    vectors: np.ndarray,
    k: int,
    query_paths: Sequence[str],
    gallery_paths: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's first k neighbours whose gallery path is not the query's own, in rank
    order. Asks `backend` for k + 1 (a query listed once in the gallery), then, for the queries
    its own rows left short, for twice as many, until each has k or the gallery is exhausted;
    then every query gets as many as the shortest has (an error if that is none)."""
    n, count = len(gallery_paths), len(vectors)
    own_raw = [r for _, block in raw_blocks(query_paths) for r in block]
    scores = np.zeros((count, k), np.float32)
    indices = np.zeros((count, k), np.int64)
    kept = np.zeros(count, np.int64)  # neighbours that are not the query's own, at most k
    todo, fetch = np.arange(count), min(k + 1, n)
    while len(todo):
        found_scores, found = backend(vectors[todo], fetch)
        found_raw = raw_at(gallery_paths, found.reshape(-1))
        mine = np.fromiter(
            (g == own_raw[q] for q, g in zip(np.repeat(todo, found.shape[1]), found_raw)),
            bool,
            found.size,
        ).reshape(found.shape)
        order = np.argsort(mine, axis=1, kind="stable")[:, :k]  # not own first, ranks kept
        width = order.shape[1]
        scores[todo, :width] = np.take_along_axis(found_scores, order, 1)
        indices[todo, :width] = np.take_along_axis(found, order, 1)
        kept[todo] = np.minimum((~mine).sum(1), k)
        if fetch == n:
            break
        todo, fetch = todo[kept[todo] < k], min(2 * fetch, n)
    k = int(kept.min(initial=k))
    if k < 1:
        raise IndexFileError("the gallery holds no image other than the query itself")
    return scores[:, :k], indices[:, :k]


@dataclass
class Hits:
    """The result of a search: (Q, k) scores and gallery indices, with both sets."""

    scores: np.ndarray
    indices: np.ndarray
    query: Embeddings
    gallery: Embeddings

    def hits(self) -> np.ndarray | None:
        """(Q, k) booleans: the neighbour shares the query's class (by name); None if unknown."""
        q, g = self.query.class_names(), self.gallery.class_names(self.indices)
        if q is None or g is None:
            return None
        return g == q[:, None]

    def recall_at_1(self) -> float | None:
        """Share of queries whose top hit shares their class; None without labels."""
        hits = self.hits()
        return None if hits is None else float(hits[:, 0].mean())

    def rows(self) -> list[dict]:
        """One row per (query, rank): query, rank, score, path, and hit where labels are known."""
        hits = self.hits()
        queries = self.query.paths[np.arange(len(self.scores))]
        found = self.gallery.paths[self.indices]  # only the paths shown are decoded
        out = []
        for q, (sc, names) in enumerate(zip(self.scores, found)):
            for rank, (s, name) in enumerate(zip(sc.tolist(), names.tolist()), start=1):
                row = {"query": str(queries[q]), "rank": rank, "score": round(s, 6)}
                row["path"] = str(name)
                if hits is not None:
                    row["hit"] = bool(hits[q, rank - 1])
                out.append(row)
        return out
