"""Columns of an embeddings file that stream to disk and read back on demand: `Texts`, many
strings as one bytes blob plus offsets, and the writers that append to them a block at a time.

A string is stored as its UTF-8 bytes followed by a NUL; a file name that is not UTF-8 keeps its
own bytes (Python's surrogate escapes), so it reads back as the same `str` and opens the same
file. `offsets[i]` is where string i starts, `offsets[N]` the blob's length. Both arrays may be
memory-mapped: reading string i touches two offsets and its own bytes, and a scan over every
string decodes one block of `BLOCK` strings at a time. A file path cannot hold a NUL, so every
NUL in the blob ends a string; a blob that says otherwise is damaged (`TextsError`).
"""

from __future__ import annotations

import array
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from msl_kit.errors import MslKitError

BLOCK = 1 << 13  # strings per block when a column is scanned or written (~1 MB of paths)
END = b"\0"


class TextsError(MslKitError, ValueError):
    """A column of strings whose bytes do not match its offsets (a damaged file), or a string
    that cannot be stored in one (a NUL inside it)."""


def encode(text: str) -> bytes:
    """The bytes a string is stored as: UTF-8, escaped non-UTF-8 bytes as themselves."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escape: kept, as UTF-8 keeps it
        return text.encode("utf-8", "surrogatepass")


def decode(raw: bytes) -> str:
    """The string stored as `raw` (the inverse of `encode` for every file name)."""
    return raw.decode("utf-8", "surrogateescape")


def read_only(path: Path, dtype: str) -> np.ndarray:
    """A raw file's values, memory-mapped read-only (an empty file: an empty array)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Texts(Sequence):
    """N strings over `offsets` (N + 1 int64) and `blob` (uint8), both possibly memory-mapped.

    Indexing works as on a 1-d numpy array of str: an int gives a `str`, a slice or an array of
    ints (any shape) or of booleans gives a numpy str array; `==` compares element-wise. A whole
    array is built only where asked for (`np.asarray(texts)`, `tolist()`, a tuple index)."""

    ndim = 1

    def __init__(
        self, offsets: np.ndarray, blob: np.ndarray, files: Path | None = None, where: str = ""
    ) -> None:
        self.offsets, self.blob, self.files = offsets, blob, files
        self.where = where or (str(files) if files is not None else "a column")  # for errors

    @classmethod
    def open(cls, stem: Path) -> Texts:
        """The column a `TextsWriter(stem)` wrote (STEM.offsets, STEM.bytes), mapped."""
        offsets = read_only(stem.with_name(stem.name + ".offsets"), "<i8")
        return cls(offsets, read_only(stem.with_name(stem.name + ".bytes"), "u1"), stem)

    @classmethod
    def of(cls, texts: Iterable[str]) -> Texts:
        """A column in memory holding `texts`."""
        raw = [encode(t) for t in texts]
        lengths = np.fromiter((len(r) + 1 for r in raw), np.int64, len(raw))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(offsets, np.frombuffer(b"".join(r + END for r in raw), np.uint8))

    def __reduce__(self) -> tuple:
        # a mapped column travels to a DataLoader worker as its file names, not its bytes
        if self.files is not None:
            return (Texts.open, (self.files,))
        return (Texts, (np.asarray(self.offsets), np.asarray(self.blob)))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def shape(self) -> tuple[int]:
        """(N,), as a 1-d array's."""
        return (len(self),)

    def raw(self, i: int) -> bytes:
        """String i's stored bytes."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1]) - 1
        if not 0 <= a <= b < len(self.blob) or self.blob[b] != 0:
            raise TextsError(
                f"{self.where}: string {i} lies outside its bytes; the file is damaged"
            )
        return self.blob[a:b].tobytes()

    def raws(self, rows: np.ndarray) -> list[bytes]:
        """The stored bytes of the strings at `rows` (1-d ints in range), each read alone."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.asarray(self.offsets[rows], dtype=np.int64)
        ends = np.asarray(self.offsets[rows + 1], dtype=np.int64) - 1
        bad = (starts < 0) | (starts > ends) | (ends >= len(self.blob))
        if not bad.any():
            bad = self.blob[ends] != 0  # each string ends with its NUL
        if bad.any():
            i = int(rows[np.argmax(bad)])
            raise TextsError(
                f"{self.where}: string {i} lies outside its bytes; the file is damaged"
            )
        view = memoryview(self.blob)
        return [view[a:b].tobytes() for a, b in zip(starts.tolist(), ends.tolist())]

    def raw_range(self, start: int, stop: int) -> list[bytes]:
        """The stored bytes of strings start..stop-1, split in one pass."""
        if stop <= start:
            return []
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        parts = self.blob[a:b].tobytes().split(END)
        if not 0 <= a <= b <= len(self.blob) or len(parts) != stop - start + 1 or parts[-1]:
            raise TextsError(
                f"{self.where}: strings {start}..{stop - 1} do not match their offsets; the "
                "file is damaged"
            )
        return parts[:-1]

    def raw_blocks(self, size: int = BLOCK) -> Iterator[tuple[int, list[bytes]]]:
        """(first index, stored bytes of each string) per block of `size` strings."""
        for start in range(0, len(self), size):
            yield start, self.raw_range(start, min(start + size, len(self)))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The strings at `rows` (int array of any shape) as a numpy str array of that shape."""
        rows = np.asarray(rows)
        n = len(self)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"index out of range for {n} strings")
        flat = np.where(flat < 0, flat + n, flat)
        return np.array([decode(r) for r in self.raws(flat)], dtype=str).reshape(rows.shape)

    def __getitem__(self, key):  # noqa: ANN001, ANN204 (numpy's indexing: int, slice, array)
        if isinstance(key, (int, np.integer)):
            i = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= i < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} strings")
            return decode(self.raw(i))
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return np.array([decode(r) for r in self.raw_range(start, stop)], dtype=str)
            return self.take(np.arange(start, stop, step))
        if isinstance(key, tuple):
            return np.asarray(self)[key]
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return self.take(key)

    def __iter__(self) -> Iterator[str]:
        for _, block in self.raw_blocks():
            yield from (decode(r) for r in block)

    def tolist(self) -> list[str]:
        """Every string, as a list (the whole column in memory)."""
        return list(self)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # noqa: ANN001
        return np.array(self.tolist(), dtype=dtype or str)

    def __eq__(self, other: object) -> np.ndarray:  # type: ignore[override]
        return np.asarray(self) == other

    def __ne__(self, other: object) -> np.ndarray:  # type: ignore[override]
        return np.asarray(self) != other

    __hash__ = None  # type: ignore[assignment]

    def check(self) -> str:
        """What is wrong with the offsets (first one not 0, decreasing, past the blob, a string
        not ended by a NUL), read a block at a time; "" when nothing is."""
        off, n = self.offsets, len(self)
        if off.ndim != 1 or len(off) < 1 or off.dtype.kind not in "iu" or self.blob.ndim != 1:
            return "offsets that are not a list of positions"
        if int(off[0]) != 0 or int(off[-1]) != len(self.blob):
            return f"offsets from {int(off[0])} to {int(off[-1])} for {len(self.blob)} bytes"
        for start in range(0, n, BLOCK):
            block = np.asarray(off[start : start + BLOCK + 1])
            if (np.diff(block) < 1).any():
                return "offsets that do not increase"
            if (self.blob[block[1:] - 1] != 0).any():
                return "strings not ended by a NUL"
        return ""


def raw_at(texts: Sequence[str], rows: np.ndarray) -> list[bytes]:
    """The stored bytes of the strings at `rows` (1-d ints), of a `Texts` or any sequence of
    str, decoding only those."""
    if isinstance(texts, Texts):
        return texts.raws(rows)
    return [encode(str(texts[int(i)])) for i in rows]


def raw_blocks(texts: Sequence[str], size: int = BLOCK) -> Iterator[tuple[int, list[bytes]]]:
    """(first index, stored bytes of each string) per block, for a `Texts` or any sequence of
    str (a numpy array of paths, a list)."""
    if isinstance(texts, Texts):
        yield from texts.raw_blocks(size)
        return
    for start in range(0, len(texts), size):
        yield start, [encode(str(t)) for t in texts[start : start + size]]


class TextsWriter:
    """Appends strings to STEM.offsets and STEM.bytes (raw little-endian int64, raw bytes),
    holding at most one block of them in memory."""

    def __init__(self, stem: Path) -> None:
        self.stem = stem
        self.offsets_path = stem.with_name(stem.name + ".offsets")
        self.bytes_path = stem.with_name(stem.name + ".bytes")
        self._offsets = open(self.offsets_path, "wb")  # noqa: SIM115 (closed in close())
        self._bytes = open(self.bytes_path, "wb")  # noqa: SIM115
        self._ends = array.array("q")  # 8 bytes per pending string, not a list of ints
        self.count, self.size = 0, 0
        self._offsets.write(np.zeros(1, "<i8").tobytes())

    def add_raw(self, raws: Iterable[bytes]) -> None:
        """Append strings given as their stored bytes (`encode`)."""
        for raw in raws:
            if END in raw:
                raise TextsError(f"{decode(raw)!r} holds a NUL byte, which no file name can")
            self._bytes.write(raw + END)
            self.size += len(raw) + 1
            self._ends.append(self.size)
            if len(self._ends) >= BLOCK:
                self._flush()

    def add(self, texts: Iterable[str]) -> None:
        """Append strings."""
        self.add_raw(encode(t) for t in texts)

    def _flush(self) -> None:
        self._offsets.write(np.frombuffer(self._ends, np.int64).astype("<i8").tobytes())
        self.count += len(self._ends)
        self._ends = array.array("q")

    def close(self) -> Texts:
        """Finish both files and return the column, mapped."""
        self._flush()
        self._offsets.close()
        self._bytes.close()
        return Texts.open(self.stem)

    def __len__(self) -> int:
        return self.count + len(self._ends)


class IntsWriter:
    """Appends int64 values to a raw file, a block at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.count = 0

    def add(self, values: np.ndarray | Sequence[int]) -> None:
        """Append values."""
        block = np.asarray(values, "<i8")
        self._file.write(block.tobytes())
        self.count += len(block)

    def close(self) -> np.ndarray:
        """Finish the file and return its values, mapped read-only."""
        self._file.close()
        return read_only(self.path, "<i8")
