"""Search an embeddings file: `search(index, query, k)`, a results table, CSV, and the grid file.

Exact search by default (the kit's chunked kNN); `use_faiss=True` builds a faiss IndexFlatIP,
saves it beside FILE.npz as FILE.faiss and reuses it while it still matches the vectors.
The grid figure itself is drawn by `msl_kit.viz.retrieval.hits_grid` from the `Hits` returned
here; `write_grid` saves it marked as a search grid (see `outputs`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from msl_kit.files.atomic import atomic_write_bytes
from msl_kit.files.download import sha256sum
from msl_kit.files.tree import printable
from msl_kit.use.embedding import EmbedError, checkpoint_file, embed
from msl_kit.use.index import Backend, Embeddings, Hits, is_index
from msl_kit.use.outputs import CSV_HEADER, GRID_MARK

FAISS_MISSING = "faiss is not installed: pip install faiss-cpu (or search without --faiss)"


def load_query(
    query: str | Path | Embeddings,
    index: Embeddings,
    checkpoint: str | Path | None = None,
    progress: bool = False,
) -> Embeddings:
    """The query set: an Embeddings, an embeddings file, or images embedded by the index's
    checkpoint. A given `checkpoint` must be that same file (sha256), whatever the query."""
    if checkpoint is None and isinstance(query, Embeddings):
        return query
    path = None if isinstance(query, Embeddings) else Path(query)
    if checkpoint is None and path.suffix == ".npz" and is_index(path):
        return Embeddings.load(path)
    ckpt = checkpoint_file(checkpoint) if checkpoint is not None else find_checkpoint(index)
    if not ckpt.is_file():
        raise EmbedError(
            f"the index's checkpoint {ckpt} is gone: give the same file with --checkpoint"
        )
    if sha256sum(ckpt) != index.checkpoint_sha256:
        raise EmbedError(
            f"{ckpt} is not the checkpoint that embedded the index (sha256 differs): "
            f"search with {index.checkpoint} or re-embed the gallery"
        )
    if path is None:  # a given checkpoint was checked above; the vectors are the query's own
        return query
    if path.suffix == ".npz" and is_index(path):
        return Embeddings.load(path)  # its own sha256 is checked against the index's next
    return embed(ckpt, path, None, progress=progress)


def find_checkpoint(index: Embeddings) -> Path:
    """The checkpoint that embedded `index`, found by either path the file stores: the
    absolute one, or the one relative to the index file (a project moved as a whole); each
    candidate must have the index's sha256. None matching: the stored path as it is."""
    stored = Path(index.checkpoint)
    candidates = [stored]
    if index.source and index.checkpoint_relative:
        candidates.append(Path(index.source).resolve().parent / index.checkpoint_relative)
    elif index.source and not stored.is_absolute():  # a file from before absolute paths
        candidates.append(Path(index.source).resolve().parent / stored)
    for candidate in candidates:
        ckpt = checkpoint_file(candidate)
        if ckpt.is_file() and sha256sum(ckpt) == index.checkpoint_sha256:
            return ckpt
    return checkpoint_file(stored)


def faiss_backend(index_file: Path, gallery: Embeddings) -> tuple[Backend, str]:
    """A faiss IndexFlatIP over the gallery, read from FILE.faiss when it matches, else built
    and saved there; returns the search function and what was done."""
    try:
        import faiss
    except ImportError:
        raise EmbedError(FAISS_MISSING) from None
    path = Path(index_file).with_suffix(".faiss")
    vectors = np.ascontiguousarray(gallery.embeddings, dtype=np.float32)
    index, note = None, f"built faiss index {path}"
    if path.is_file():
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            index = None
        if index is not None and matches(index, vectors):
            note = f"reused faiss index {path}"
        else:
            index = None
    if index is None:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        blob = faiss.serialize_index(index)
        atomic_write_bytes(path, lambda f: f.write(blob.tobytes()))

    def search(query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = index.search(np.ascontiguousarray(query, dtype=np.float32), k)
        return scores, ids.astype(np.int64)

    return search, note


def matches(index, vectors: np.ndarray) -> bool:
    """Whether a flat faiss index holds these vectors (size, dimension, first and last rows)."""
    if index.ntotal != len(vectors) or index.d != vectors.shape[1] or not len(vectors):
        return False
    ends = [0, len(vectors) - 1]
    return all(np.array_equal(index.reconstruct(i), vectors[i]) for i in ends)


def search(
    index: str | Path | Embeddings,
    query: str | Path | Embeddings,
    k: int = 10,
    *,
    checkpoint: str | Path | None = None,
    use_faiss: bool = False,
    exclude_self: bool = True,
) -> Hits:
    """Top-k gallery images of each query image (a file, folder, CSV or embeddings file)."""
    gallery = index if isinstance(index, Embeddings) else Embeddings.load(index)
    queries = load_query(query, gallery, checkpoint)
    backend = None
    if use_faiss:
        if isinstance(index, Embeddings):
            raise EmbedError("use_faiss needs the index's file name (FILE.faiss is kept beside it)")
        backend, _ = faiss_backend(Path(index), gallery)
    return gallery.search(queries, k, exclude_self=exclude_self, backend=backend)


def table(hits: Hits, max_queries: int | None = 5, more: str = "") -> str:
    """Per query, its rank / score / path rows (a mark where labels are known); past
    `max_queries`, one line counting the rest, followed by `more` (where to find them)."""
    rows = hits.rows()
    marks = {True: "same class", False: "other class"}
    lines, shown = [], 0
    for q in range(len(hits.scores)):
        if max_queries is not None and shown >= max_queries:
            rest = f"... and {len(hits.scores) - shown} more queries"
            lines.append(f"{rest} ({more})" if more else rest)
            break
        lines.append(f"query {printable(hits.query.paths[q])}")
        lines.append(f"  {'rank':>4}  {'score':>7}  path")
        for r in rows[q * hits.scores.shape[1] : (q + 1) * hits.scores.shape[1]]:
            mark = f"  ({marks[r['hit']]})" if "hit" in r else ""
            lines.append(f"  {r['rank']:>4}  {r['score']:>7.4f}  {printable(r['path'])}{mark}")
        shown += 1
    return "\n".join(lines)


def write_csv(hits: Hits, path: str | Path) -> None:
    """The rows of `hits` as CSV: query, rank, score, path[, hit]. File names that are not
    UTF-8 are written as the bytes they were (surrogate escapes), so they read back the same."""
    rows = hits.rows()
    buf = io.StringIO()
    fields = [*CSV_HEADER] + (["hit"] if rows and "hit" in rows[0] else [])
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode("utf-8", "surrogateescape")
    atomic_write_bytes(path, lambda f: f.write(data))


def write_grid(figure: Any, path: str | Path, dpi: int = 120) -> None:
    """Save a grid figure (`viz.retrieval.hits_grid`) as a PNG marked as a search grid, so a
    later `--grid` may replace it and `embed` never takes it as an input."""
    atomic_write_bytes(
        path,
        lambda f: figure.savefig(f, format="png", dpi=dpi, metadata={"Software": GRID_MARK}),
    )
