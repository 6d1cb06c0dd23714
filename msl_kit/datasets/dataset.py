"""Class-disjoint splits of prepared datasets as torch Datasets (`build`).

`build(name, root, split, transform)` reads the official list files and returns items
`(image, label, index)`; labels are contiguous per split. The registry lives in
`msl_kit.datasets.registry` and `prepare` in `msl_kit.datasets.preparation`; the package
gathers the public names (`from msl_kit.datasets import build, prepare`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from msl_kit.datasets import embedded
from msl_kit.datasets.layouts.common import DatasetError, LayoutError, Record
from msl_kit.datasets.layouts.official import read_folder
from msl_kit.datasets.preparation import dataset_dir, is_complete
from msl_kit.datasets.registry import (
    info,
    read_layout,
)
from msl_kit.datasets.transforms import CorruptImageError, load_image, to_mode


class ImageDataset(torch.utils.data.Dataset):
    """Images listed by path under `root`; items are (image, label, index).

    Images are decoded in the mode the transform asks for (its `load_hint`), else in the
    dataset's native mode ("RGB", or "L" for digits and Omniglot).
    """

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        labels: np.ndarray,
        classes: list[str],
        transform: Callable | None = None,
        mode: str = "RGB",
    ):
        self.root = Path(root)
        self.paths = np.array(paths, dtype=str)  # one numpy array: no per-item refcounts in workers
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = int(index) % len(self)
        mode, min_size = getattr(self.transform, "load_hint", (self.mode, None))
        image = self._load(index, mode, min_size)
        return (self.transform(image) if self.transform else image), int(self.labels[index]), index

    def _load(self, index: int, mode: str, min_size: int | None) -> Image.Image:
        return load_image(self.root / self.paths[index], mode, min_size)


class DigitsDataset(ImageDataset):
    """scikit-learn's digits as 8x8 "L" images (0-16 scaled to 0-255)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], transform=None):
        super().__init__(Path("."), [""] * len(labels), labels, classes, transform, mode="L")
        self.images = images

    def _load(self, index: int, mode: str, min_size: int | None) -> Image.Image:
        return to_mode(Image.fromarray(self.images[index], mode="L"), mode)


class EmbeddedDataset(ImageDataset):
    """Images decoded straight from the archives shipped in the package (msl_kit.embedded)."""

    def _load(self, index: int, mode: str, min_size: int | None) -> Image.Image:
        return to_mode(embedded.load(str(self.paths[index])), mode)


def _digits_records() -> tuple[np.ndarray, list[Record]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    splits = ["train" if t < 5 else "test" for t in digits.target]
    return images, [
        Record(str(i), int(t), str(int(t)), s)
        for i, (t, s) in enumerate(zip(digits.target, splits))
    ]


def _select(records: list[Record], split: str, val_fraction: float, seed: int) -> list[Record]:
    """The records of `split`; "val" is a seeded, class-disjoint share of the training classes."""
    if split not in ("train", "val") or (split == "train" and val_fraction <= 0):
        return [r for r in records if r.split == split]
    if any(r.split == "val" for r in records):
        if val_fraction > 0:
            raise DatasetError("this dataset has its own val split; leave val_fraction at 0")
        return [r for r in records if r.split == split]
    if not 0 < val_fraction < 1:
        raise DatasetError(
            f"split 'val' is carved from the training classes: pass 0 < val_fraction < 1 "
            f"(e.g. 0.2), not {val_fraction}"
        )
    keys = sorted({r.key for r in records if r.split == "train"})
    n_val = min(max(1, round(val_fraction * len(keys))), len(keys) - 1)
    order = np.random.default_rng(seed).permutation(len(keys))
    val_keys = {keys[i] for i in order[:n_val]}
    return [r for r in records if r.split == "train" and (r.key in val_keys) == (split == "val")]


def _readable(root: Path, records: list[Record], where: str) -> list[Record]:
    """Records whose image decodes; the others are counted in a warning."""

    def ok(rec: Record) -> bool:
        try:
            load_image(root / rec.path, None, 1)  # 1/8-scale JPEG decode still reads every byte
            return True
        except CorruptImageError:
            return False

    with ThreadPoolExecutor(
        max_workers=min(8, os.cpu_count() or 1)
    ) as pool:  # PIL decodes without the GIL
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


def build(
    name: str,
    root: str | Path | None,
    split: str,
    transform: Callable | None = None,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_corrupt: bool = False,
) -> ImageDataset:
    """The `split` of a prepared dataset as a torch Dataset of (image, label, index).

    `.labels` (int64, contiguous 0..C-1 in this split; In-Shop query and gallery share one label
    space) and `.classes` (names in label order). With val_fraction > 0, "val" holds that share
    of the training classes (seeded) and "train" the rest.
    """
    meta = info(name)
    if split not in meta.splits and not (name == "folder"):
        raise DatasetError(f"{name} has splits {', '.join(meta.splits)}, not {split!r}")
    images = None
    if name == "digits":
        images, records = _digits_records()
        base = Path(".")
    elif name == "omniglot_small":
        base, records = Path("."), embedded.records()
    elif name == "folder":
        if root is None:
            raise DatasetError(
                "the folder dataset needs root: a folder of <split>/<class>/ images or a CSV file"
            )
        base, records = read_folder(Path(root).expanduser())
    else:
        if root is None:
            raise DatasetError(f"{name} needs root, the folder it was prepared in")
        base = dataset_dir(name, root)
        if not is_complete(base, name):
            raise LayoutError(
                f"{name} is not prepared in {base}: run `msl-kit prepare {name} --root {root}` "
                f"(or msl_kit.datasets.prepare({name!r}, {str(root)!r}))"
            )
        records = read_layout(name, base)
    chosen = _select(records, split, val_fraction, seed)
    if not chosen:
        have = sorted({r.split for r in records})
        raise DatasetError(
            f"{name} has no images in split {split!r} (splits found: {', '.join(have)})"
        )
    if skip_corrupt and images is None and name != "omniglot_small":  # shipped, md5-checked
        chosen = _readable(base, chosen, f"{name}/{split}")
    space = chosen  # the classes that get labels; query and gallery share theirs
    if meta.query_gallery and split in ("query", "gallery"):
        space = [r for r in records if r.split in ("query", "gallery")]
    keys = sorted({r.key for r in space})
    label_of = {k: i for i, k in enumerate(keys)}
    names = {r.key: r.cls for r in space}
    labels = np.array([label_of[r.key] for r in chosen], dtype=np.int64)
    classes = [names[k] for k in keys]
    if name == "omniglot_small":
        return EmbeddedDataset(base, [r.path for r in chosen], labels, classes, transform, "L")
    if images is not None:
        return DigitsDataset(images[[int(r.path) for r in chosen]], labels, classes, transform)
    return ImageDataset(
        base, [r.path for r in chosen], labels, classes, transform, "L" if meta.grey else "RGB"
    )
