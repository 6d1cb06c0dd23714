"""What every layout reader shares: records, confined paths, list-file checks, folder search.

Every path read from a list file is confined to the dataset folder before it is used.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import NamedTuple

from msl_kit.errors import MslKitError

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)


class LayoutError(MslKitError, FileNotFoundError):
    """A dataset folder that does not hold the files of the official layout."""


class DatasetError(MslKitError, ValueError):
    """A dataset name, split or labelling that cannot be used; the message says what to do."""


class Record(NamedTuple):
    path: str  # relative to the dataset folder, '/'-separated, confined to it
    key: object  # sortable class key (class id, (alphabet, character), item id...)
    cls: str  # class name shown to people
    split: str


def inside(*parts: str) -> str:
    """Join '/'-paths relative to the dataset folder; refuse any that leave it."""
    path = posixpath.normpath(posixpath.join(*(p.replace("\\", "/") for p in parts)))
    if path.startswith(("/", "../")) or path == ".." or re.match(r"[A-Za-z]:", path):
        raise LayoutError(
            f"listed path {parts[-1]!r} points outside the dataset folder; the list "
            "file is damaged or malicious"
        )
    return path


def folder_holding(ddir: Path, filename: str, depth: int = 3) -> str | None:
    """The folder (relative to ddir) holding `filename`, searched breadth-first, sorted; or None."""
    level = [ddir]
    for _ in range(depth + 1):
        for folder in level:
            if (folder / filename).is_file():
                return folder.relative_to(ddir).as_posix()
        level = [folder / name for folder in level for name in subfolders(folder)]
    return None


def subfolders(folder: Path) -> list[str]:
    """Sorted names of the folders in `folder` but downloads/. scandir knows which entries are
    folders without a stat each: Cars holds 8,144 images in one folder, SOP 120k in 12."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and e.name != "downloads")


def find(ddir: Path, filename: str, depth: int = 3) -> str:
    """Like `folder_holding`, but a LayoutError when `filename` is nowhere."""
    found = folder_holding(ddir, filename, depth)
    if found is None:
        raise LayoutError(f"{ddir} has no {filename}; is this the right archive?")
    return found


def read_rows(path: Path, expected: str, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows with as many fields as `expected` names (blank lines skipped);
    a LayoutError naming the file, the line and the expected fields otherwise."""
    width = len(expected.split())
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise LayoutError(
            f"{path} is not a text list file ({err.reason}); expected rows of '{expected}'"
        ) from None
    rows = []
    for number, line in enumerate(lines[skip:], start=skip + 1):
        fields = line.split()
        if fields and len(fields) != width:
            raise LayoutError(f"{path}, line {number}: expected '{expected}'; got {line.strip()!r}")
        if fields:
            rows.append(fields)
    return rows


def to_int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LayoutError(f"{path}: {what} must be an integer; got {value!r}") from None


def check_records(reader_name: str, read: object, ddir: Path) -> list[Record]:
    """`read(ddir)`, with a malformed list file or an empty one turned into a LayoutError."""
    try:
        records = read(ddir)  # type: ignore[operator]
    except (KeyError, ValueError, IndexError) as err:
        raise LayoutError(
            f"{ddir}: a list file of {reader_name} is malformed ({err!r}); "
            "prepare it again from a full copy"
        ) from err
    if not records:
        raise LayoutError(f"{ddir}: the {reader_name} list files name no images")
    return records
