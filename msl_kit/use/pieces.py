"""OUT.part/, where `embed` keeps its work until OUT is written: the job's record (job.json),
the listing of its inputs (`listing`), one piece per chunk of inputs (chunk_NNNNNN.npz: the
vectors, which inputs were kept, which failed and why), and the index assembled from them.

Every piece is written atomically by whichever rank embedded it; `assemble` reads them in
chunk order, one at a time, and streams vectors, paths, labels and skipped inputs into raw
files beside them before they are stored into OUT (`index.write_npz`): memory for one piece
and one block of paths, whatever the number of inputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msl_kit.files.atomic import atomic_write_bytes
from msl_kit.use.columns import IntsWriter, TextsWriter
from msl_kit.use.index import FORMAT, RawArray, write_npz
from msl_kit.use.listing import EmbedError, ImageList

JOB = "job.json"


def chunk_ranges(n: int, chunk: int) -> list[range]:
    """The inputs 0..n-1 cut into consecutive chunks of `chunk` (the last one shorter)."""
    return [range(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def piece_path(part: Path, index: int) -> Path:
    """Where the piece of chunk `index` is kept."""
    return part / f"chunk_{index:06d}.npz"


def save_piece(path: Path, vectors: list, kept: list, failed: list, why: list, dim: int) -> None:
    """One chunk's piece, written atomically (a kill leaves it whole or absent)."""
    block = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    arrays = dict(embeddings=block, kept=np.array(kept, np.int64))
    arrays.update(failed=np.array(failed, np.int64), why=np.array(why, dtype=str))
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def open_part(part: Path) -> None:
    """OUT.part/ ready to list into: created with an empty record where it is new (so a walk
    of a folder holding it skips it), or cleared of writes a kill cut short."""
    if not part.is_dir():
        part.mkdir(parents=True)
        atomic_write_bytes(part / JOB, lambda f: f.write(json.dumps({"job": ""}).encode()))
        return
    for tmp in part.glob(".*.tmp"):
        tmp.unlink()


def held_job(part: Path) -> str | None:
    """The fingerprint of the job OUT.part/'s record names; None where there is none."""
    try:
        return json.loads((part / JOB).read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def settle_part(part: Path, fingerprint: str, say: bool = True) -> None:
    """Keep OUT.part/'s pieces when its record names this same job; else drop them (before
    the record changes, so a kill in between never leaves pieces under another job's name)."""
    record = part / JOB
    if held_job(part) == fingerprint:
        return
    old = sorted(part.glob("chunk_*.npz"))
    if old and say:
        print(f"{part} holds another job's pieces: starting over", file=sys.stderr)
    for piece in old:
        piece.unlink()
    atomic_write_bytes(record, lambda f: f.write(json.dumps({"job": fingerprint}).encode()))


@dataclass
class Piece:
    """One chunk's piece as read back, checked to cover exactly its chunk."""

    vectors: np.ndarray
    kept: np.ndarray
    failed: np.ndarray
    why: list[str]

    @classmethod
    def read(cls, part: Path, index: int, chunk: range, n: int) -> Piece:
        path = piece_path(part, index)
        if not path.is_file():
            raise EmbedError(f"{path} is missing: rerun the same command to embed it")
        with np.load(path, allow_pickle=False) as z:
            piece = cls(z["embeddings"], z["kept"], z["failed"], z["why"].tolist())
        covered = np.sort(np.concatenate([piece.kept, piece.failed]))
        if not np.array_equal(covered, np.arange(chunk.start, chunk.stop)):
            raise EmbedError(
                f"the pieces in {part} do not cover the {n} inputs: delete it and rerun"
            )
        return piece


class _Columns:
    """The raw files an index is assembled from, appended one piece at a time."""

    def __init__(self, part: Path, labelled: bool) -> None:
        self.part = part
        self.vectors_path = part / "vectors.raw"
        self.vectors = open(self.vectors_path, "wb")  # noqa: SIM115 (closed in members())
        self.digest = hashlib.sha256()  # of the float32 rows in order: `vectors_sha256`
        self.rows, self.dim = 0, 0
        self.paths = TextsWriter(part / "paths")
        self.labels = IntsWriter(part / "labels.raw") if labelled else None
        self.skipped = TextsWriter(part / "skipped")
        self.reasons = TextsWriter(part / "reasons")

    def add(self, piece: Piece, items: ImageList, chunk: range) -> None:
        if len(piece.kept):
            block = np.ascontiguousarray(piece.vectors, np.float32)
            if self.dim and block.shape[1] != self.dim:
                raise EmbedError(f"the pieces in {self.part} disagree on the dimension: rerun")
            self.dim = block.shape[1]
            self.vectors.write(memoryview(block).cast("B"))
            self.digest.update(memoryview(block).cast("B"))
            self.rows += len(block)
        raws = items.paths.raw_range(chunk.start, chunk.stop)
        self.paths.add_raw(raws[i - chunk.start] for i in piece.kept.tolist())
        if self.labels is not None:
            self.labels.add(np.asarray(items.labels[piece.kept]))
        self.skipped.add_raw(raws[i - chunk.start] for i in piece.failed.tolist())
        self.reasons.add(piece.why)

    def members(self, classes: list[str]) -> list[tuple[str, np.ndarray | RawArray]]:
        """The index's column members, in the file's order (the files closed)."""
        self.vectors.close()
        out: list = [
            ("embeddings", RawArray(Path(self.vectors.name), "<f4", (self.rows, self.dim)))
        ]
        out += _texts("paths", self.paths)
        if self.labels is not None:
            self.labels.close()
            out += [("labels", RawArray(self.labels.path, "<i8", (self.rows,)))]
            out += [("classes", np.array(classes, dtype=str))]
        return out + _texts("skipped", self.skipped) + _texts("skipped_reasons", self.reasons)


def _texts(name: str, writer: TextsWriter) -> list[tuple[str, RawArray]]:
    writer.close()
    return [
        (name, RawArray(writer.bytes_path, "|u1", (writer.size,))),
        (f"{name}_offsets", RawArray(writer.offsets_path, "<i8", (len(writer) + 1,))),
    ]


def assemble(items: ImageList, part: Path, out: Path, chunk: int, about: list) -> None:
    """OUT from the pieces in chunk order (every input covered exactly once, or EmbedError):
    vectors, paths, labels and skipped inputs streamed through raw files in OUT.part/, then
    `about` (the job's description members) and the vectors' sha256."""
    n = len(items.paths)
    columns = _Columns(part, items.labels is not None)
    failed = 0
    for index, piece_range in enumerate(chunk_ranges(n, chunk)):
        piece = Piece.read(part, index, piece_range, n)
        failed += len(piece.failed)
        columns.add(piece, items, piece_range)
    columns.skipped.add(p for p, _ in items.refused)
    columns.reasons.add(w for _, w in items.refused)
    members = columns.members(items.classes)
    if not columns.rows:
        raise EmbedError(f"none of the {failed} file(s) in {items.where} is a readable image")
    members += [("inputs", np.array(n + len(items.refused), np.int64)), *about]
    members += [("embeddings_sha256", np.array(columns.digest.hexdigest()))]
    members += [("format", np.array(FORMAT))]
    atomic_write_bytes(out, lambda f: write_npz(f, members))


def remove_part(part: Path) -> None:
    """OUT.part/ and everything in it (once OUT holds the job)."""
    shutil.rmtree(part, ignore_errors=False)
