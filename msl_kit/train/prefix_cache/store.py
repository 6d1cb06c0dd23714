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

from msl_kit.files.atomic import atomic_write_bytes, atomic_write_text

CHUNK = 256  # images per chunk file: 22 MB of Lite0 block-4 activations in float32
DTYPES = {"float32": np.float32, "float16": np.float16}
GB = 1e9


def weights_digest(modules: list[nn.Module]) -> str:
    """sha256 of the modules' state (names, dtypes, shapes and bytes of every tensor)."""
    digest = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def items_digest(dataset: object) -> str:
    """sha256 of a dataset's items: paths with size and mtime where they are files, labels."""
    digest = hashlib.sha256()
    root = getattr(dataset, "root", None)
    for path in getattr(dataset, "paths", []):
        digest.update(str(path).encode() + b"\0")
        if root is not None and str(root) != ".":
            try:
                st = (Path(root) / str(path)).stat()
                digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:  # unreadable now: the build says so when it decodes it
                pass
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

    def claim(self) -> None:
        """Create the folder with meta.json, or check that the one there describes this set."""
        meta = {"written_by": "msl_kit prefix cache", **self.spec.material}
        meta.update(count=self.spec.count, shape=list(self.spec.shape))  # views: any number
        path = self.folder / "meta.json"
        if path.is_file():
            try:
                there = json.loads(path.read_text())
            except ValueError:
                there = None
            if there != json.loads(json.dumps(meta)):
                raise ValueError(
                    f"{self.folder} holds a cache other than this one (its meta.json differs); "
                    "delete that folder, or set cache.dir to another folder"
                )
            return
        self.folder.mkdir(parents=True, exist_ok=True)
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
        """Memory-map every chunk; ValueError if any is missing (build the set first)."""
        for vc in self.chunks:
            data = self._read(*vc)
            if data is None:
                raise ValueError(f"{self.chunk_path(*vc)} is missing or cut off; rebuild")
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


def check_room(sets: list[ActivationSet], max_gb: float) -> None:
    """ValueError when the sets exceed `cache.max_gb` or the free disk space."""
    total = sum(s.spec.bytes for s in sets)
    if total > max_gb * GB:
        raise ValueError(
            f"the prefix cache would take {total / GB:.2f} GB, above cache.max_gb = {max_gb}; "
            "lower cache.views, set cache.dtype=float16, cut later (cache.prefix) or raise "
            "cache.max_gb"
        )
    todo = sum(s.spec.bytes * len(s.missing()) / len(s.chunks) for s in sets)
    folder = sets[0].folder.parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if todo > free:
        raise OSError(
            f"the prefix cache needs {todo / GB:.2f} GB more in {folder}, which has "
            f"{free / GB:.2f} GB free; free space or set cache.dir to another disk"
        )


def say(line: str) -> None:
    """A progress line on stderr (the run's results go to stdout)."""
    print(line, file=sys.stderr, flush=True)
