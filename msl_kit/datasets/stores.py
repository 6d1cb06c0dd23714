"""Where a dataset's images are kept: each registry entry's `store` (`DatasetInfo.store`).

A store owns how a dataset is read and what it needs, so that nothing else tests a dataset's
name: the records of its images and the folder they are relative to (`records`), whether it
is ready and how to make it so (`ready`, `prepare`), how one item is opened (`open`), what
`embed` calls an item and what a search grid draws for that name (`item_name`, `item_image`),
and which items a `skip_corrupt` run keeps (`usable`).

`Store` itself is the base: image files under a folder. `UserFolder` reads a folder or CSV of
the user's in place; `Shipped` serves images that come with a package (msl_kit's Omniglot-small,
scikit-learn's digits, a plugin's own set), decoded by that package's function, with nothing to
prepare; `PreparedFolder` (in `preparation.py`, beside the machinery it drives) is a dataset
`prepare` downloads and unpacks into `root/<name>/`, read by the entry's layout reader.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from PIL import Image

from msl_kit.datasets.layouts.common import DatasetError, Record
from msl_kit.datasets.layouts.official import read_folder
from msl_kit.datasets.transforms import CorruptImageError, load_image, to_mode

if TYPE_CHECKING:
    from msl_kit.datasets.registry import DatasetInfo


@dataclass(frozen=True)
class PrepareOptions:
    """How `prepare` may get a dataset's files; only a store that fetches files reads them."""

    archive: str | Path | Sequence[str | Path] | None = None  # local archives, not downloads
    url: str | Sequence[str] | None = None  # instead of the official URLs
    md5: str | Sequence[str] | None = None  # of those URLs' files, in order
    progress: bool = True
    max_bytes: int | None = None  # archives declaring more are refused (None: the default)
    max_members: int | None = None

    def __post_init__(self) -> None:
        for value, what in ((self.max_bytes, "max_bytes"), (self.max_members, "max_members")):
            if value is not None and value <= 0:
                raise DatasetError(f"{what} must be positive, not {value}")


@dataclass(frozen=True)
class Store:
    """Image files under a folder: what every store does unless its kind says otherwise."""

    any_split: ClassVar[bool] = False  # True: the splits are whatever the user's files name
    fetched: ClassVar[bool] = False  # True: `prepare` fetches files (a URL, or your own copy)

    def records(self, name: str, root: str | Path | None) -> tuple[Path, list[Record]]:
        """The folder item paths are relative to, and a record of every image of `name`."""
        raise DatasetError(f"{name} has no images to read: give its entry a store that has")

    def read_layout(self, name: str, ddir: Path) -> list[Record]:
        """The records of `name`'s official file layout in `ddir` (prepared sets only)."""
        raise DatasetError(f"{name} has no official file layout to read")

    def ready(self, name: str, root: str | Path | None) -> bool:
        """Whether `records` can be read without preparing anything first."""
        return True

    def prepare(self, meta: DatasetInfo, root: str | Path | None, how: PrepareOptions) -> Path:
        """Make `meta` ready under `root`; returns the folder it is read from."""
        print(f"{meta.name} needs no preparation")
        return Path(root or ".")

    def open(self, base: Path, path: str, mode: str | None, min_size: int | None) -> Image.Image:
        """One item, decoded in `mode` (None: as stored) within `transforms.load_image`'s
        limits; `min_size` lets a JPEG decode at a reduced scale."""
        return load_image(base / path, mode, min_size)

    def item_name(self, name: str, base: Path, path: str) -> str:
        """What `embed` calls an item: the file's resolved path (searchable, drawn as is)."""
        return str((base / path).resolve())

    def item_image(self, item: str) -> Image.Image | None:
        """The image an item name of this store stands for; None: the name is a file's path."""
        return None

    def usable(self, base: Path, records: list[Record], where: str) -> list[Record]:
        """The records whose image decodes; the others are counted in one warning."""

        def ok(rec: Record) -> bool:
            try:
                self.open(base, rec.path, None, 1)  # 1/8-scale JPEG decode still reads every byte
                return True
            except CorruptImageError:
                return False

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL: no GIL
            keep = list(pool.map(ok, records, chunksize=64))
        bad = [r.path for r, k in zip(records, keep) if not k]
        if bad:
            warnings.warn(
                f"skipped {len(bad)} unreadable image(s) of {len(records)} in {where} "
                f"(first: {', '.join(bad[:3])})",
                RuntimeWarning,
                stacklevel=3,
            )
        return [r for r, k in zip(records, keep) if k]


FILES = Store()  # an ImageDataset's store when none is given: plain files


@dataclass(frozen=True)
class UserFolder(Store):
    """The user's own images, read in place: root/<split>/<class>/*.jpg, or a CSV file of
    path,label,split rows; the split names are the folders' or the CSV's."""

    any_split: ClassVar[bool] = True

    def records(self, name: str, root: str | Path | None) -> tuple[Path, list[Record]]:
        if root is None:
            raise DatasetError(
                f"the {name} dataset needs root: a folder of <split>/<class>/ images or a CSV file"
            )
        return read_folder(Path(root).expanduser())

    def prepare(self, meta: DatasetInfo, root: str | Path | None, how: PrepareOptions) -> Path:
        if root is None:
            raise DatasetError(f"prepare {meta.name} needs a root folder, e.g. --root data")
        base, records = read_folder(Path(root))
        print(
            f"{meta.name} needs no preparation: {len(records)} images of "
            f"{len({r.key for r in records})} classes under {base}"
        )
        return Path(root)


@dataclass(frozen=True)
class Shipped(Store):
    """Images that come with a package: `read()` lists them as records whose paths are item
    names inside the package, `load(path)` decodes one (a CorruptImageError for an unknown
    name). `root` is not used and nothing is prepared; the package vouches for the bytes (an
    md5 check, an array in memory), so `skip_corrupt` has nothing to check. `embed` names an
    item "<dataset>:<path>", and a search grid draws it from that name."""

    read: Callable[[], list[Record]]
    load: Callable[[str], Image.Image]
    ships_with: str  # who ships it, for `prepare`'s message: "msl_kit", "scikit-learn"...

    def records(self, name: str, root: str | Path | None) -> tuple[Path, list[Record]]:
        return Path("."), self.read()

    def prepare(self, meta: DatasetInfo, root: str | Path | None, how: PrepareOptions) -> Path:
        print(f"{meta.name} ships with {self.ships_with}: nothing to prepare")
        return Path(root or ".")

    def open(self, base: Path, path: str, mode: str | None, min_size: int | None) -> Image.Image:
        image = self.load(path)
        return image if mode is None else to_mode(image, mode)

    def item_name(self, name: str, base: Path, path: str) -> str:
        return f"{name}:{path}"

    def item_image(self, item: str) -> Image.Image | None:
        return self.load(item)

    def usable(self, base: Path, records: list[Record], where: str) -> list[Record]:
        return records
