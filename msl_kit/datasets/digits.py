"""scikit-learn's 8x8 handwritten digits, which ship inside scikit-learn: digits 0-4 train,
5-9 test. Items are named by their index in `sklearn.datasets.load_digits()` and decoded from
that array (0-16 scaled to 0-255) as "L" images; nothing is downloaded or written."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from msl_kit.datasets.layouts.common import Record
from msl_kit.datasets.stores import Shipped
from msl_kit.datasets.transforms import CorruptImageError


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target


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
