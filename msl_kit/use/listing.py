"""What `embed` is asked to embed, listed straight into a column on disk: a folder (class
sub-folders = labels), a CSV of `path[,label]`, one image, or a registered dataset's split.

The paths go to INTO/inputs.offsets + INTO/inputs.bytes (`columns.TextsWriter`) as they are
found, and the labels to INTO/inputs.labels, so a listing of ten million files never lives in
memory as a list. What is held: one folder's entries while it is read (sorted by name), the
class names, and one block of labels. A dataset's split is the exception: the dataset object
holds its own items (as it does for training).
"""

from __future__ import annotations

import array
import csv
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from msl_kit.datasets.dataset import build
from msl_kit.datasets.layouts.official import natural
from msl_kit.errors import MslKitError
from msl_kit.files import tree
from msl_kit.use import outputs
from msl_kit.use.columns import BLOCK, IntsWriter, Texts, TextsError, TextsWriter

STEM = "inputs"  # INTO/inputs.offsets, INTO/inputs.bytes, INTO/inputs.labels


class EmbedError(MslKitError, ValueError):
    """A problem with what the user asked to embed; the message says what to do."""


@dataclass
class ImageList:
    """What to embed: one path (or dataset item name) per image in a `Texts` column, labels
    where known, and the entries that were refused before embedding (a link leaving the
    folder, ...) with why."""

    paths: Texts
    labels: np.ndarray | None
    classes: list[str]
    dataset: Dataset | None = None  # a prepared split: items are loaded from it by index
    where: str = ""
    refused: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def listed(into: Path) -> Texts:
    """The paths a listing wrote into `into` (what another rank reads instead of listing)."""
    return Texts.open(into / STEM)


class _Listing:
    """Paths and their class names appended as they are found; classes get their natural
    order (and labels their final numbers) once every path is in."""

    def __init__(self, into: Path) -> None:
        self.into = into
        self.paths = TextsWriter(into / STEM)
        self.first_seen = IntsWriter(into / f"{STEM}.seen")  # class ids in order of discovery
        self.names: dict[str, int] = {}
        self.block = array.array("q")  # one block of class ids, 8 bytes each

    def add(self, path: str, name: str | None = None) -> None:
        try:
            self.paths.add((path,))
        except TextsError as e:
            raise EmbedError(f"cannot embed {e}") from None
        if name is not None:
            self.block.append(self.names.setdefault(name, len(self.names)))
            if len(self.block) >= BLOCK:
                self.first_seen.add(np.frombuffer(self.block, np.int64))
                self.block = array.array("q")

    def close(self, labelled: bool, where: str, refused: list | None = None) -> ImageList:
        paths = self.paths.close()
        self.first_seen.add(np.frombuffer(self.block, np.int64))
        seen = self.first_seen.close()
        if not labelled or not len(paths):
            os.unlink(self.first_seen.path)
            return ImageList(paths, None, [], where=where, refused=refused or [])
        classes = sorted(self.names, key=natural)
        renumber = np.empty(len(classes), np.int64)
        renumber[[self.names[c] for c in classes]] = np.arange(len(classes))
        labels = IntsWriter(self.into / f"{STEM}.labels")
        for start in range(0, len(seen), BLOCK):
            labels.add(renumber[seen[start : start + BLOCK]])
        del seen
        os.unlink(self.first_seen.path)
        return ImageList(paths, labels.close(), classes, None, where, refused or [])


def folder_images(folder: Path, into: Path) -> ImageList:
    """A folder of class sub-folders (labels = folder names) or a flat folder (no labels).

    Links inside the folder are followed (`files.tree.entries`); msl-kit's own outputs
    (indexes, their pieces, faiss files, search CSVs and grids) are never inputs, so they do
    not make a tree of class folders look flat."""
    folder = folder.resolve()
    listing, refused, flat = _Listing(into), [], False
    top = len(str(folder).rstrip(os.sep)) + 1
    for path, why in tree.entries(folder, skip=outputs.is_kit_output):
        if why:
            refused.append((str(path), why))
            continue
        text = str(path)
        name, sep, _ = text[top:].partition(os.sep)
        flat = flat or not sep  # a file right in the folder: every file, no labels
        listing.add(text, name)
    return listing.close(not flat, str(folder), refused)


def _csv_rows(path: Path) -> Iterator[list[str]]:
    """The non-empty rows of a CSV, header dropped, every row 'path' or every one 'path,label'."""
    width, first = None, True
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        for row in csv.reader(f):
            if not any(c.strip() for c in row):
                continue
            header, first = first and row[0].strip().lower() == "path", False
            if header:
                continue
            width = len(row) if width is None else width
            if len(row) != width or width not in (1, 2):
                raise EmbedError(f"{path}: every row must be 'path' or every row 'path,label'")
            yield row


def csv_images(path: Path, into: Path) -> ImageList:
    """A CSV of `path[,label]` rows (a header row is optional; paths relative to the CSV).

    Read as UTF-8 with or without a byte-order mark (spreadsheets' "CSV UTF-8" writes one);
    bytes that are not UTF-8 stay as they were in the file names (surrogate escapes)."""
    base = str(path.resolve().parent)
    listing, labelled = _Listing(into), None
    for row in _csv_rows(path):
        labelled = len(row) == 2
        if "\0" in row[0]:  # realpath would raise a bare ValueError
            raise EmbedError(
                f"{path}: the path {row[0].strip()!r} holds a NUL byte, which no file name can: "
                "fix that row"
            )
        # os.path, not pathlib: a Path interns every name it parses (a dict as big as the list)
        where = os.path.realpath(os.path.join(base, row[0].strip()))
        listing.add(where, row[1].strip() if labelled else None)
    return listing.close(bool(labelled), str(path))


def dataset_images(
    name: str, root: str | None, split: str, transform: Callable, into: Path
) -> ImageList:
    """A registered dataset's split (`datasets.build`), items named as its store names them."""
    ds = build(name, root, split, transform)
    listing = _Listing(into)
    for item in ds.item_names():  # files' real paths (searchable, shown), or "<name>:<item>"
        listing.add(item)
    items = listing.close(False, f"{name}/{split}")
    labels = np.asarray(ds.labels)  # the dataset holds them already
    return dataclasses.replace(items, labels=labels, classes=list(ds.classes), dataset=ds)


def image_list(
    images: str | Path | None,
    *,
    dataset: str | None,
    root: str | None,
    split: str,
    transform: Callable,
    into: Path,
) -> ImageList:
    """The images named by a folder, a CSV file, one image file, or a prepared dataset split,
    their paths listed into the folder `into`."""
    if dataset is not None:
        return dataset_images(dataset, root, split, transform, into)
    if images is None:
        raise EmbedError("say what to embed: a folder, a CSV file of path[,label], or --dataset")
    path = Path(images).expanduser()
    if path.is_dir():
        return folder_images(path, into)
    if path.suffix.lower() == ".csv" and path.is_file():
        return csv_images(path, into)
    if path.is_file():
        listing = _Listing(into)
        listing.add(str(path.resolve()))
        return listing.close(False, str(path))
    raise EmbedError(f"no such folder or file: {path}")
