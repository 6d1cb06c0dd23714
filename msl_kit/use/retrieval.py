"""Search an embeddings file: `search(index, query, k)`, a results table, CSV, and a grid figure.

Exact search by default (the kit's chunked kNN); `use_faiss` searches a faiss index instead
(flat, IVF, IVF-PQ or HNSW, see `ann`), kept beside FILE.npz and tied to its vectors.
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from msl_kit.datasets import embedded
from msl_kit.files.atomic import atomic_write_text
from msl_kit.files.download import sha256sum
from msl_kit.use.ann.faiss_index import AnnIndex
from msl_kit.use.ann.kept import open_index
from msl_kit.use.ann.spec import IndexSpec
from msl_kit.use.embedding import EmbedError, checkpoint_file, embed
from msl_kit.use.index import Embeddings, Hits, is_index

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HIT, MISS, QUERY, PLAIN = "#1a9850", "#d73027", "#222222", "#999999"


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
    ckpt = checkpoint_file(checkpoint or index.checkpoint)
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


def table(hits: Hits, max_queries: int | None = 5) -> str:
    """Per query, its rank / score / path rows (a mark where labels are known)."""
    rows = hits.rows()
    marks = {True: "same class", False: "other class"}
    lines, shown = [], 0
    for q in range(len(hits.scores)):
        if max_queries is not None and shown >= max_queries:
            lines.append(f"... and {len(hits.scores) - shown} more queries (all in --out)")
            break
        lines.append(f"query {hits.query.paths[q]}")
        lines.append(f"  {'rank':>4}  {'score':>7}  path")
        for r in rows[q * hits.scores.shape[1] : (q + 1) * hits.scores.shape[1]]:
            mark = f"  ({marks[r['hit']]})" if "hit" in r else ""
            lines.append(f"  {r['rank']:>4}  {r['score']:>7.4f}  {r['path']}{mark}")
        shown += 1
    return "\n".join(lines)


def write_csv(hits: Hits, path: str | Path) -> None:
    """The rows of `hits` as CSV: query, rank, score, path[, hit]."""
    rows = hits.rows()
    buf = io.StringIO()
    fields = ["query", "rank", "score", "path"] + (["hit"] if rows and "hit" in rows[0] else [])
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def thumbnail(path: str) -> np.ndarray | None:
    """An image to draw for a stored path: a file, or an item of the embedded set; else None."""
    from PIL import Image

    try:
        if path.startswith("omniglot_small:"):
            img = embedded.load(path.split(":", 1)[1])
        else:
            with Image.open(path) as im:
                im.load()
                img = im
        img = img.convert("L" if img.mode in ("1", "L", "I;16", "I") else "RGB")
        img.thumbnail((160, 160))
        return np.asarray(img)
    except (OSError, ValueError):
        return None


def _cell(ax, path: str, frame: str, title: str, width: int = 4) -> None:
    img = thumbnail(path)
    if img is None:
        ax.text(0.5, 0.5, "not\nreadable", ha="center", va="center", fontsize=7, color=PLAIN)
    else:
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=6.5, pad=3)
    for spine in ax.spines.values():
        spine.set_edgecolor(frame), spine.set_linewidth(width)


def short(text: str, width: int = 20) -> str:
    """`text` within `width` characters for a thumbnail's title: a path-like class name keeps
    its last part whole and shortens what comes before it; anything else is cut in the middle."""
    if len(text) <= width:
        return text
    head, sep, last = text.rpartition("/")
    room = width - len(last) - 3
    if sep and room >= 3:
        return f"{head[:room]}..{sep}{last}"
    half = (width - 2) // 2
    return f"{text[:half]}..{text[-half:]}"


def _query_title(path: str, classes: np.ndarray | None, i: int) -> str:
    name = "query " + short(os.path.basename(path.split(":", 1)[-1]), 14)
    return f"{name}\n{short(str(classes[i]))}" if classes is not None else name


def grid(
    hits: Hits, queries: Sequence[int] | None = None, n_queries: int = 6, k: int | None = None
) -> Figure:
    """Each query (left, black frame) beside its top-k images with rank and score; frames are
    green for the query's class and red for another where labels are known, grey otherwise."""
    from matplotlib.figure import Figure

    n_q = len(hits.scores)
    if queries is None:  # spread over the set rather than the first few of one class
        queries = np.unique(np.linspace(0, n_q - 1, min(n_queries, n_q)).round().astype(int))
    k = min(k or hits.scores.shape[1], hits.scores.shape[1])
    same = hits.hits()
    q_names, g_names = hits.query.class_names(), hits.gallery.class_names()
    fig = Figure(figsize=(1.45 * (k + 1), 1.6 * len(queries)), layout="constrained")
    axes = fig.subplots(len(queries), k + 1, squeeze=False)
    for row, q in enumerate(queries):
        _cell(
            axes[row, 0],
            str(hits.query.paths[q]),
            QUERY,
            _query_title(str(hits.query.paths[q]), q_names, q),
        )
        for col in range(k):
            j = int(hits.indices[q, col])
            frame = PLAIN if same is None else (HIT if same[q, col] else MISS)
            title = f"#{col + 1}  {hits.scores[q, col]:.3f}"
            if g_names is not None:
                title += f"\n{short(str(g_names[j]))}"
            _cell(axes[row, col + 1], str(hits.gallery.paths[j]), frame, title)
    if same is not None:
        fig.suptitle("green: same class as the query, red: another class", fontsize=8)
    return fig
