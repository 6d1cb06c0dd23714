"""Class-disjoint splits of registered datasets as torch Datasets (`build`).

`build(name, root, split, transform)` reads the dataset's records through its registry entry's
store and returns items `(image, label, index)`; labels are contiguous per split. The registry
lives in `msl_kit.datasets.registry` (with `prepare`), the stores in `msl_kit.datasets.stores`;
the package gathers the public names (`from msl_kit.datasets import build, prepare`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from msl_kit.datasets.layouts.common import DatasetError, Record
from msl_kit.datasets.registry import info
from msl_kit.datasets.stores import FILES, Store


class ImageDataset(torch.utils.data.Dataset):
    """Images listed by path under `root`, opened by `store` (files, unless the dataset's store
    says otherwise); items are (image, label, index).

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
        *,
        store: Store = FILES,
        name: str = "",
    ):
        self.root = Path(root)
        self.paths = np.array(paths, dtype=str)  # one numpy array: no per-item refcounts in workers
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform
        self.mode = mode
        self.store = store
        self.name = name  # the registry name, which names a shipped set's items

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = int(index) % len(self)
        mode, min_size = getattr(self.transform, "load_hint", (self.mode, None))
        image = self.store.open(self.root, str(self.paths[index]), mode, min_size)
        return (self.transform(image) if self.transform else image), int(self.labels[index]), index

    def item_names(self) -> list[str]:
        """What `embed` calls each item: a file's resolved path, or "<name>:<item>" for an item
        of a set shipped with a package (which a search grid draws from that name)."""
        return [self.store.item_name(self.name, self.root, str(p)) for p in self.paths]


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
    """The `split` of a registered dataset as a torch Dataset of (image, label, index).

    `.labels` (int64, contiguous 0..C-1 in this split; In-Shop query and gallery share one label
    space) and `.classes` (names in label order). With val_fraction > 0, "val" holds that share
    of the training classes (seeded) and "train" the rest. `root` is where the dataset's store
    reads (a prepared set's parent folder, your folder or CSV); a shipped set ignores it.
    """
    meta = info(name)
    store = meta.store
    if split not in meta.splits and not store.any_split:
        raise DatasetError(f"{name} has splits {', '.join(meta.splits)}, not {split!r}")
    base, records = store.records(name, root)
    chosen = _select(records, split, val_fraction, seed)
    if not chosen:
        have = sorted({r.split for r in records})
        raise DatasetError(
            f"{name} has no images in split {split!r} (splits found: {', '.join(have)})"
        )
    if skip_corrupt:
        chosen = store.usable(base, chosen, f"{name}/{split}")
    space = chosen  # the classes that get labels; query and gallery share theirs
    if meta.query_gallery and split in ("query", "gallery"):
        space = [r for r in records if r.split in ("query", "gallery")]
    keys = sorted({r.key for r in space})
    label_of = {k: i for i, k in enumerate(keys)}
    names = {r.key: r.cls for r in space}
    labels = np.array([label_of[r.key] for r in chosen], dtype=np.int64)
    classes = [names[k] for k in keys]
    paths = [r.path for r in chosen]
    mode = "L" if meta.grey else "RGB"
    return ImageDataset(base, paths, labels, classes, transform, mode, store=store, name=name)
