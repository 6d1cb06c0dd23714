"""Search an embeddings file: `search(index, query, k)`, a results table, CSV, and the grid file.

Exact search by default (the kit's chunked kNN); `use_faiss` searches a faiss index instead
(flat, IVF, IVF-PQ or HNSW, see `ann`), kept beside FILE.npz and tied to its vectors.
The grid figure itself is drawn by `msl_kit.viz.retrieval.hits_grid` from the `Hits` returned
here; `write_grid` saves it marked as a search grid (see `outputs`).
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msl_kit.files.atomic import atomic_write_bytes
from msl_kit.files.download import sha256sum
from msl_kit.files.tree import printable
from msl_kit.use.ann.faiss_index import AnnIndex
from msl_kit.use.ann.kept import open_index
from msl_kit.use.ann.spec import IndexSpec
from msl_kit.use.embedding import EmbedError, checkpoint_file, embed
from msl_kit.use.index import Embeddings, Hits, is_index
from msl_kit.use.outputs import CSV_HEADER, GRID_MARK


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


def vectors_crc32(index_file: str | Path) -> int | None:
    """The zip CRC-32 of FILE.npz's vector bytes (free to read, checked by every load): a
    file rewritten with new vectors but its old `embeddings_sha256` still differs here."""
    try:
        with zipfile.ZipFile(index_file) as zf:
            return zf.getinfo("embeddings.npy").CRC
    except (OSError, KeyError, zipfile.BadZipFile):
        return None


def faiss_backend(
    index_file: str | Path,
    gallery: Embeddings,
    spec: IndexSpec | str = "flat",
    k: int = 10,
    log: Callable[[str], None] | None = None,
) -> AnnIndex:
    """The faiss index of `spec` over the gallery in FILE.npz: the one kept beside it while it
    was built over these vectors with these knobs, else built (recall printed) and kept."""
    return open_index(
        index_file,
        gallery.embeddings,
        spec,
        k,
        sha256=gallery.embeddings_sha256 or None,
        crc32=vectors_crc32(index_file),
        log=log,
    )


def search(
    index: str | Path | Embeddings,
    query: str | Path | Embeddings,
    k: int = 10,
    *,
    checkpoint: str | Path | None = None,
    use_faiss: bool | str | IndexSpec = False,
    exclude_self: bool = True,
    log: Callable[[str], None] | None = None,
) -> Hits:
    """Top-k gallery images of each query image (a file, folder, CSV or embeddings file).

    `use_faiss`: True (a flat index), a kind ("ivf", "ivfpq", "hnsw") or an `IndexSpec` with
    knobs; the index is kept beside the index file (FILE.<kind>.faiss) and tied to its
    vectors. `log` receives what was built or reused and the recall it measured.
    """
    gallery = index if isinstance(index, Embeddings) else Embeddings.load(index)
    queries = load_query(query, gallery, checkpoint)
    if not use_faiss:
        return gallery.search(queries, k, exclude_self=exclude_self)
    spec = "flat" if use_faiss is True else use_faiss
    if isinstance(index, Embeddings):  # nowhere to keep it: built for this search only
        return gallery.search(queries, k, exclude_self=exclude_self, index=spec)
    ann = faiss_backend(index, gallery, spec, k, log)
    return gallery.search(queries, k, exclude_self=exclude_self, index=ann)


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
