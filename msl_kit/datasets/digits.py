"""scikit-learn's 8x8 handwritten digits, which ship inside scikit-learn: digits 0-4 train,
5-9 test. Items are named by their index in `sklearn.datasets.load_digits()` and decoded from
that array (0-16 scaled to 0-255) as "L" images; nothing is downloaded or written.

The array is read from the CSV scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`, what
`load_digits` reads) without importing scikit-learn: importing `sklearn.datasets` costs ~1.5 s
of CPU (scipy.stats and more), paid by every process that trains on digits (sweep workers, the
CLI in a subprocess). `load_digits()` is the fallback where that file is not found."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from msl_kit.datasets.layouts.common import Record
from msl_kit.datasets.stores import Shipped
from msl_kit.datasets.transforms import CorruptImageError


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    pixels, target = _shipped_csv() or _load_digits()
    return np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8), target


def _shipped_csv() -> tuple[np.ndarray, np.ndarray] | None:
    """(N, 64) pixels 0-16 and (N,) digits from scikit-learn's own CSV, None where not found."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not csv.is_file():
        return None
    with gzip.open(csv, "rt") as handle:
        data = np.loadtxt(handle, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data, digits.target


def records() -> list[Record]:
    """Every digit as a record: path = its index in load_digits(), class = the digit."""
    return [
        Record(str(i), int(t), str(int(t)), "train" if t < 5 else "test")
        for i, t in enumerate(_digits()[1])
    ]


def load(item: str) -> Image.Image:
    """The digit of index `item` as an 8x8 "L" image."""
    images = _digits()[0]
    if not item.isdigit() or int(item) >= len(images):
        raise CorruptImageError(f"digits has no item {item!r}: items are 0-{len(images) - 1}")
    return Image.fromarray(images[int(item)], mode="L")


STORE = Shipped(records, load, "scikit-learn")
