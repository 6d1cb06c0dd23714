"""A faiss index kept beside FILE.npz: FILE.<kind>.faiss and its record FILE.<kind>.json (what
vectors it holds, by sha256 and count, its build knobs, the recall measured when it was built).

It is used only for the very vectors it was built over (the sha256 FILE.npz records, and the
zip CRC-32 of their bytes where known) and the same build knobs; anything else rebuilds it.
A search knob (nprobe, efSearch) needs no rebuild. A file in its place that is not a faiss
index, or a record that is not ours, is never replaced.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from msl_kit.files.atomic import atomic_write_bytes, atomic_write_text
from msl_kit.use.ann.faiss_index import AnnIndex
from msl_kit.use.ann.spec import (
    AnnError,
    IndexSpec,
    checked_params,
    import_faiss,
    vectors_sha256,
)

FORMAT = "msl-kit faiss index 1"


def index_paths(npz: str | Path, kind: str) -> tuple[Path, Path]:
    """FILE.<kind>.faiss and FILE.<kind>.json beside FILE.npz."""
    base = Path(npz)
    return base.with_suffix(f".{kind}.faiss"), base.with_suffix(f".{kind}.json")


def human_bytes(n: float) -> str:
    """1.28 GB, 35.2 MB, 812 kB, 96 B."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


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
        old = ", ".join(f"{k} {v}" for k, v in (meta.get("params") or {}).items())
        new = ", ".join(f"{k} {v}" for k, v in params.items())
        return f"was built with other knobs ({old}; asked {new})"
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


def read_faiss(path: Path, n: int, d: int) -> Any | None:
    """The faiss index in `path` when it reads and holds n vectors of dimension d, else None."""
    try:
        index = import_faiss().read_index(str(path))
    except RuntimeError:
        return None
    return index if index.ntotal == n and index.d == d else None


def write_index(made: AnnIndex) -> None:
    """The faiss index into made.path, streamed (no copy of it in memory), atomically."""
    faiss = import_faiss()

    def write(f) -> None:
        faiss.write_index(made.index, faiss.PyCallbackIOWriter(f.write))

    atomic_write_bytes(made.path, write)


def write_meta(made: AnnIndex, meta_path: Path, tie: dict) -> None:
    """FILE.<kind>.json: what the index beside it holds, how it was built, its recall."""
    meta = {
        "format": FORMAT,
        "kind": made.kind,
        "params": made.params,
        "vectors": tie,
        "faiss_bytes": made.path.stat().st_size,
        "build_seconds": round(made.build_seconds, 3),
        "faiss_version": import_faiss().__version__,
        "knob": made.knob,
        "default": made.search_value,  # picked for recall at TARGET_RECALL, or given at build
        "curve": {str(v): {str(k): r for k, r in rec.items()} for v, rec in made.curve.items()},
        "held_out": made.held_out,  # gallery vectors the recall was measured on
    }
    atomic_write_text(meta_path, json.dumps(meta))


def reopen(index: Any, meta: dict, vectors: np.ndarray, spec: IndexSpec, tie: dict) -> AnnIndex:
    """The AnnIndex of a kept faiss index and its record."""
    curve = {int(v): {int(k): r for k, r in rec.items()} for v, rec in meta["curve"].items()}
    return AnnIndex(
        spec.kind,
        meta["params"],
        index,
        vectors,
        tie["sha256"],
        curve,
        spec.search_value() or meta.get("default"),
        float(meta.get("build_seconds", 0.0)),
        int(meta.get("held_out") or 0),
    )


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
    digest FILE.npz records, computed where None; `crc32` of their bytes where known) with the
    same build knobs; else built (its recall measured), saved there, and said so to `log`."""
    spec = IndexSpec(spec) if isinstance(spec, str) else spec
    say = log or (lambda _: None)
    params = checked_params(spec, vectors)
    faiss_path, meta_path = index_paths(npz, spec.kind)
    tie = {"count": len(vectors), "dim": int(vectors.shape[1])}
    tie.update(sha256=sha256 or vectors_sha256(vectors), crc32=crc32)
    meta = read_meta(meta_path)
    why = stale(meta, tie, params, faiss_path)
    index = None if why else read_faiss(faiss_path, *vectors.shape)
    if index is None:
        refuse_foreign(faiss_path, meta_path)
        if why != "does not exist yet":
            say(f"{faiss_path} {why or 'does not read as its record says'}: rebuilding")
        made = AnnIndex.build(vectors, spec, k, sha256=tie["sha256"], log=say)
        made.path = faiss_path
        write_index(made)
        write_meta(made, meta_path, tie)
        size = human_bytes(faiss_path.stat().st_size)
        say(f"built {faiss_path} in {made.build_seconds:.1f} s, {size} on disk")
    else:
        made = reopen(index, meta, vectors, spec, tie)
        made.path = faiss_path
        say(
            f"reused {faiss_path} ({made.describe()}, built in {made.build_seconds:.1f} s, "
            f"{human_bytes(faiss_path.stat().st_size)}; vectors sha256 {tie['sha256'][:12]})"
        )
    say(made.report())
    return made
