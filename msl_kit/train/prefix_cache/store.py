"""A set of cached prefix activations on disk: its key, its chunk files, reading them back.

One folder per set, named by the sha256 of what the activations depend on (the prefix's
weights, the preprocessing, train or eval transform, the view seed, the images' paths, sizes
and mtimes, dtype and autocast): a set made from other weights or preprocessing is another
folder and is never read for this one. `meta.json` (written first) says what the set holds;
activations are `.npy` chunks of CHUNK images of one view, each written atomically, so an
interrupted build resumes where it stopped and a chunk of the wrong size is rebuilt; a set of
V views serves every run of V or fewer, and more views only add chunk files. Reading
memory-maps the chunks: RAM holds what the OS pages in, not the whole set.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from msl_kit.errors import MslKitError
from msl_kit.files.atomic import atomic_write_bytes, atomic_write_text

CHUNK = 256  # images per chunk file: 22 MB of Lite0 block-4 activations in float32
DTYPES = {"float32": np.float32, "float16": np.float16}
GB = 1e9
META_MARK = "msl_kit prefix cache"  # meta.json's written_by: the kit made this folder


class CacheError(MslKitError, ValueError):
    """A prefix cache that cannot be used as asked (too large, another cache in its folder, a
    chunk missing); the message says what to change."""


class CacheSpaceError(MslKitError, OSError):
    """Too little free disk for the cache a run needs; says how much and where."""


def weights_digest(modules: list[nn.Module]) -> str:
    """sha256 of the modules' state (names, dtypes, shapes and bytes of every tensor)."""
    digest = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def item_keys(dataset: object) -> list[str] | None:
    """One key per image file: its path, size and mtime (what its pixels depend on); None for
    items that are not files (digits, the embedded set), which only their index names."""
    root = getattr(dataset, "root", None)
    if root is None or str(root) == ".":
        return None
    keys = []
    for path in dataset.paths:
        try:
            st = (Path(root) / str(path)).stat()
            keys.append(f"{Path(root) / str(path)}\t{st.st_size}:{st.st_mtime_ns}")
        except OSError:  # unreadable now: the build says so when it decodes it
            keys.append(f"{Path(root) / str(path)}\tmissing")
    return keys


def items_digest(dataset: object, keys: list[str] | None) -> str:
    """sha256 of a dataset's items: their `item_keys`, else their index, path and label."""
    if keys is not None:
        return hashlib.sha256("\n".join(keys).encode()).hexdigest()
    digest = hashlib.sha256(f"{type(dataset).__name__}:{len(dataset)}".encode())
    for path in getattr(dataset, "paths", []):
        digest.update(str(path).encode() + b"\0")
    digest.update(np.asarray(dataset.labels, dtype="<i8").tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SetSpec:
    """What one cached set holds: everything its activations depend on, and its size."""

    material: dict  # the key: weights, preprocessing, transform, view seed, items, dtype, amp
    count: int  # images
    views: int  # augmented views per image (1 for an eval set)
    shape: tuple[int, ...]  # one activation (C, H, W)
    dtype: str  # "float32" or "float16"

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.material, sort_keys=True).encode()).hexdigest()

    @property
    def family(self) -> str:
        """The key without the images: sets of one family differ only in which images."""
        rest = {k: v for k, v in self.material.items() if k != "items_sha256"}
        return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()

    @property
    def bytes(self) -> int:
        item = int(np.prod(self.shape)) * np.dtype(DTYPES[self.dtype]).itemsize
        return self.views * self.count * item


class ActivationSet:
    """The chunk files of one `SetSpec` under `root/<key[:20]>/`."""

    def __init__(self, root: str | Path, spec: SetSpec) -> None:
        self.spec = spec
        self.folder = Path(root).expanduser() / spec.key[:20]
        self.chunks = [(v, c) for v in range(spec.views) for c in range(-(-spec.count // CHUNK))]
        self._maps: dict[tuple[int, int], np.ndarray] = {}

    def chunk_path(self, view: int, chunk: int) -> Path:
        return self.folder / f"v{view:03d}_c{chunk:05d}.npy"

    def chunk_rows(self, chunk: int) -> range:
        """The image indices chunk `chunk` holds."""
        return range(chunk * CHUNK, min((chunk + 1) * CHUNK, self.spec.count))

    def claim(self, keys: list[str] | None = None) -> None:
        """Create the folder with meta.json (and items.txt, the `item_keys` in row order, where
        the images are files), or check that the meta.json there describes this set."""
        meta = {"written_by": META_MARK, "family": self.spec.family, **self.spec.material}
        meta.update(count=self.spec.count, shape=list(self.spec.shape))  # views: any number
        path = self.folder / "meta.json"
        if path.is_file():
            try:
                there = json.loads(path.read_text())
            except ValueError:
                there = None
            if there != json.loads(json.dumps(meta)):
                raise CacheError(
                    f"{self.folder} holds a cache other than this one (its meta.json differs); "
                    "delete that folder, or set cache.dir to another folder"
                )
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if keys is not None:
            atomic_write_text(self.folder / "items.txt", "\n".join(keys) + "\n")
        atomic_write_text(path, json.dumps(meta, indent=1, sort_keys=True) + "\n")

    def _read(self, view: int, chunk: int) -> np.ndarray | None:
        """Chunk (view, chunk) memory-mapped, or None where it is missing or not whole."""
        path = self.chunk_path(view, chunk)
        want = (len(self.chunk_rows(chunk)), *self.spec.shape)
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        ok = data.shape == want and data.dtype == np.dtype(DTYPES[self.spec.dtype])
        return data if ok else None

    def missing(self) -> list[tuple[int, int]]:
        """The (view, chunk) pairs not on disk whole (a cut-off or foreign chunk counts)."""
        return [vc for vc in self.chunks if self._read(*vc) is None]

    def write(self, view: int, chunk: int, values: np.ndarray) -> None:
        """Write one chunk atomically (the cast to the set's dtype happens here)."""
        array = np.ascontiguousarray(values, dtype=DTYPES[self.spec.dtype])
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(self.chunk_path(view, chunk), lambda f: f.write(buffer.getbuffer()))

    def open(self) -> None:
        """Memory-map every chunk; CacheError if any is missing (build the set first)."""
        for vc in self.chunks:
            data = self._read(*vc)
            if data is None:
                raise CacheError(f"{self.chunk_path(*vc)} is missing or cut off; rebuild")
            self._maps[vc] = data

    def gather(self, views: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        """float32 activations (len(indices), *shape) of image indices[i] in view views[i]."""
        if not self._maps:
            self.open()
        rows = [
            self._maps[(int(v), int(i) // CHUNK)][int(i) % CHUNK] for v, i in zip(views, indices)
        ]
        return torch.from_numpy(np.stack(rows).astype(np.float32, copy=False))

    def describe(self, done: int) -> str:
        """One line: what the set holds, its size on disk and in memory."""
        s = self.spec
        shape = "x".join(map(str, s.shape))
        chunk_mb = CHUNK * s.bytes / max(1, s.views * s.count) / 1e6
        return (
            f"prefix cache {self.folder}: {s.views} view(s) x {s.count} images of {shape} "
            f"{s.dtype} = {s.bytes / GB:.2f} GB on disk ({done} of {len(self.chunks)} chunks "
            f"there); read memory-mapped, at most one {chunk_mb:.0f} MB chunk held while built"
        )


class RowMapped:
    """A whole cached set read through a row map: a dataset whose images all lie in a larger set
    of the same family (a validation split's training classes in the whole training split's)."""

    def __init__(self, parent: ActivationSet, rows: np.ndarray) -> None:
        self.parent, self.rows, self.spec = parent, rows, parent.spec

    def gather(self, views: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        return self.parent.gather(views, self.rows[np.asarray(indices, dtype=np.int64)])


def find_superset(root: Path, spec: SetSpec, keys: list[str] | None) -> RowMapped | None:
    """A complete set of `spec`'s family (its first `spec.views` views) holding every image of
    `keys`, read through a row map; None where there is none."""
    if keys is None:
        return None
    for meta_path in sorted(Path(root).expanduser().glob("*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
            items = (meta_path.parent / "items.txt").read_text().splitlines()
        except (OSError, ValueError):
            continue
        if meta.get("written_by") != META_MARK or meta.get("family") != spec.family:
            continue
        index = {key: row for row, key in enumerate(items)}
        if len(items) != meta.get("count") or not all(k in index for k in keys):
            continue
        material = {k: meta[k] for k in spec.material}
        parent = ActivationSet(
            root, SetSpec(material, len(items), spec.views, spec.shape, spec.dtype)
        )
        if parent.folder == meta_path.parent and not parent.missing():
            return RowMapped(parent, np.array([index[k] for k in keys], dtype=np.int64))
    return None


def check_room(sets: list[ActivationSet], max_gb: float) -> None:
    """CacheError when the sets exceed `cache.max_gb`, CacheSpaceError the free disk space."""
    total = sum(s.spec.bytes for s in sets)
    if total > max_gb * GB:
        raise CacheError(
            f"the prefix cache would take {total / GB:.2f} GB, above cache.max_gb = {max_gb}; "
            "lower cache.views, set cache.dtype=float16, cut later (cache.prefix) or raise "
            "cache.max_gb"
        )
    todo = sum(s.spec.bytes * len(s.missing()) / len(s.chunks) for s in sets)
    folder = sets[0].folder.parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if todo > free:
        raise CacheSpaceError(
            f"the prefix cache needs {todo / GB:.2f} GB more in {folder}, which has "
            f"{free / GB:.2f} GB free; free space or set cache.dir to another disk"
        )


def say(line: str) -> None:
    """A progress line on stderr (the run's results go to stdout)."""
    print(line, file=sys.stderr, flush=True)
