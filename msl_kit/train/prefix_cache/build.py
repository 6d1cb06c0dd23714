"""Filling a cached set: seeded augmented views of the training images (or the eval images)
through the frozen prefix, one chunk file at a time.

View `v` of image `i` is the dataset's item with torch's generator seeded by
`view_seed(seed, v, i)` (the train transform draws its crop and flip from it), so the same view
can be made again without the cache: `view_images` (the tests' and the benchmark's uncached
step on the same view).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from msl_kit.models.prefix import PrefixSplit
from msl_kit.train.evaluation import autocast
from msl_kit.train.prefix_cache.store import ActivationSet


def view_seed(seed: int, view: int, index: int) -> int:
    """The generator seed of view `view` of image `index` in the view set `seed`."""
    digest = hashlib.blake2b(f"{seed}:{view}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63, as manual_seed wants


class SeededViews(Dataset):
    """Items keyed by (view, index): the dataset's image with the augmentation seeded for it."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        view, index = key
        # CPU generator only: torch.manual_seed would also reseed every CUDA device, per image
        torch.random.default_generator.manual_seed(view_seed(self.seed, view, index))
        return self.dataset[index][0]


def view_images(dataset: Dataset, seed: int, views: np.ndarray, indices: np.ndarray):
    """The images of views[i] of images indices[i], stacked: what the cache holds before the
    prefix. The global torch RNG is left as it was."""
    items = SeededViews(dataset, seed)
    with torch.random.fork_rng(devices=[]):
        return torch.stack([items[(int(v), int(i))] for v, i in zip(views, indices)])


def _batches(aset: ActivationSet, todo: list[tuple[int, int]], size: int) -> Iterator[list]:
    for view, chunk in todo:
        rows = aset.chunk_rows(chunk)
        for start in range(rows.start, rows.stop, size):
            yield [(view, i) for i in range(start, min(start + size, rows.stop))]


def fill(
    aset: ActivationSet,
    split: PrefixSplit,
    dataset: Dataset,
    seed: int,
    device: torch.device,
    *,
    amp: str = "none",
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> None:
    """Compute and write every chunk of `aset` that is not on disk whole."""
    from tqdm.auto import tqdm

    todo = aset.missing()
    if not todo:
        return
    loader = DataLoader(
        SeededViews(dataset, seed),
        batch_sampler=list(_batches(aset, todo, batch_size)),
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    per_view = aset.spec.count
    done = aset.spec.views * per_view - sum(len(aset.chunk_rows(c)) for _, c in todo)
    total = aset.spec.views * per_view
    bar = tqdm(total=total, initial=done, desc="cache", unit="img", disable=not progress)
    pending, chunks = [], iter(todo)
    current = next(chunks)
    try:
        with torch.random.fork_rng(devices=[]):  # the seeding above must not move the run's RNG
            for images in loader:
                with autocast(amp, device):
                    out = split.prefix_output(images.to(device, non_blocking=True))
                pending.append(out.float().cpu().numpy())
                bar.update(len(images))
                if sum(len(p) for p in pending) == len(aset.chunk_rows(current[1])):
                    aset.write(*current, np.concatenate(pending))
                    pending, current = [], next(chunks, None)
    finally:
        bar.close()
