"""The files `embed` and `search` write, told apart from everything else.

An index (FILE.npz, see `index.is_index`), its pieces (FILE.npz.part/ with job.json), its faiss
file (FILE.faiss), its lock (.FILE.npz.lock, hidden), a search CSV (its header is
`CSV_HEADER`) and a search grid (a PNG whose `Software` text is `GRID_MARK`). `embed` never
takes one of them as an input, so they never change whether a folder is read as class
folders or as a flat folder; and `--out` / `--grid` replace a file only when it is of their
own kind.
"""

from __future__ import annotations

from pathlib import Path

from msl_kit.errors import MslKitError
from msl_kit.use.index import is_index

CSV_HEADER = ("query", "rank", "score", "path")
GRID_MARK = "msl-kit search --grid"
_PNG = b"\x89PNG\r\n\x1a\n"
_HEAD = 4096  # PNG text chunks written before the pixels sit in the first bytes


class OutputError(MslKitError, ValueError):
    """An output path msl-kit will not write; the message says what to choose instead."""


def lock_path(out: Path) -> Path:
    """The lock file that marks `out` as being written (beside it, hidden)."""
    return out.with_name(f".{out.name}.lock")


def _head(path: Path, size: int = _HEAD) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def is_search_csv(path: str | Path) -> bool:
    """Whether `path` is a CSV written by `msl-kit search --out`."""
    first = _head(Path(path), 64).split(b"\n", 1)[0].rstrip(b"\r")
    return first.split(b",")[:4] == [c.encode() for c in CSV_HEADER]


def is_search_grid(path: str | Path) -> bool:
    """Whether `path` is a PNG written by `msl-kit search --grid`."""
    head = _head(Path(path))
    return head.startswith(_PNG) and b"Software\x00" + GRID_MARK.encode() in head


def is_kit_output(path: Path) -> bool:
    """Whether `path` is a file or folder `embed` or `search` wrote (never an input)."""
    suffix = path.suffix.lower()
    if suffix == ".part":
        return (path / "job.json").is_file()
    if suffix == ".faiss":
        return True
    if suffix == ".npz":
        return is_index(path)
    if suffix == ".csv":
        return is_search_csv(path)
    if suffix == ".png":
        return is_search_grid(path)
    return False


_KINDS = {
    "index": (".npz", is_index, "an embeddings file"),
    "csv": (".csv", is_search_csv, "a CSV written by msl-kit search"),
    "grid": (".png", is_search_grid, "a grid written by msl-kit search"),
}


def check_replaceable(path: str | Path, kind: str, flag: str = "--out") -> Path:
    """`path` if msl-kit may write `kind` ("index", "csv" or "grid") there: its suffix, an
    existing folder to hold it, and nothing there but an earlier file of the same kind."""
    path = Path(path)
    suffix, same_kind, what = _KINDS[kind]
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder: give a file name such as {path}/x{suffix}")
    if path.suffix.lower() != suffix:
        raise OutputError(f"{flag} must end in {suffix}, not {path.name!r}")
    if not path.parent.is_dir():
        raise OutputError(
            f"{flag} {path}: the folder {path.parent} does not exist; create it or choose another"
        )
    if path.exists() and not same_kind(path):
        raise OutputError(
            f"{path} exists and is not {what}: choose another {flag} (nothing replaced)"
        )
    return path
