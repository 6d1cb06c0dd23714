"""P x K batch sampling: P distinct classes, K indices each, reproducible and DDP-aware."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKSampler(Sampler[list[int]]):
    """Batch sampler yielding `batch_size // samples_per_class` distinct classes x `samples_per_class`.

    Classes are visited in shuffled rounds (every class once before any class repeats) and
    each class's indices in shuffled rounds too, so long runs see the data evenly. A class with
    fewer than `samples_per_class` items is padded by sampling with replacement; any other
    class never repeats an index inside a batch.

    Length: `iterations` batches when given (the released recipe counts iterations), else one
    epoch-style pass of `num_classes // P` batches. `start` skips that many batches of the same
    seeded stream, which is how a resumed run continues exactly where it stopped.

    Under DDP every rank draws the same global batch from the same seed and keeps its own
    `P / num_replicas` classes, so ranks never overlap and `batch_size` is the global batch.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        samples_per_class: int,
        seed: int = 0,
        *,
        iterations: int | None = None,
        start: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integers (got dtype {labels.dtype}); map class names to ids first")
        if samples_per_class < 1 or batch_size < 1:
            raise ValueError("batch_size and samples_per_class must be positive")
        if batch_size % samples_per_class:
            raise ValueError(
                f"batch_size={batch_size} is not a multiple of samples_per_class={samples_per_class}; "
                f"use e.g. batch_size={batch_size // samples_per_class * samples_per_class or samples_per_class}"
            )
        classes, inverse = np.unique(labels, return_inverse=True)
        self.classes_per_batch = batch_size // samples_per_class
        if self.classes_per_batch > len(classes):
            raise ValueError(
                f"a batch of {batch_size} = {self.classes_per_batch} classes x {samples_per_class} needs "
                f"{self.classes_per_batch} classes but the data has only {len(classes)}; lower "
                f"train.batch_size or raise train.samples_per_class"
            )
        if self.classes_per_batch % num_replicas:
            raise ValueError(
                f"{self.classes_per_batch} classes per batch cannot be split evenly over {num_replicas} ranks"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))
        self._members = np.split(order, bounds[:-1])
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.seed = seed
        self.iterations = iterations
        self.start = start
        self.num_replicas = num_replicas
        self.rank = rank

    def __len__(self) -> int:
        total = self.iterations if self.iterations is not None else len(self._members) // self.classes_per_batch
        return max(total - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed)
        class_queue: list[int] = []
        member_queues: list[list[int]] = [[] for _ in self._members]
        per_rank = self.classes_per_batch // self.num_replicas
        total = self.start + len(self)
        for batch_number in range(total):
            batch_classes = self._next_classes(rng, class_queue)
            batch = [self._take(rng, c, member_queues[c]) for c in batch_classes]
            if batch_number < self.start:
                continue
            mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
            yield [int(i) for chunk in mine for i in chunk]

    def _next_classes(self, rng: np.random.Generator, queue: list[int]) -> list[int]:
        """The next P distinct classes from shuffled rounds over all classes."""
        chosen: list[int] = []
        while len(chosen) < self.classes_per_batch:
            if not queue:
                queue.extend(rng.permutation(len(self._members)).tolist())
            # A class left over from the last round may already be in this batch: defer it.
            for pos, c in enumerate(queue):
                if c not in chosen:
                    chosen.append(queue.pop(pos))
                    break
            else:
                queue.extend(rng.permutation(len(self._members)).tolist())
        return chosen

    def _take(self, rng: np.random.Generator, c: int, queue: list[int]) -> list[int]:
        """K indices of class c without repeats, padded with replacement only for small classes."""
        members = self._members[c]
        k = self.samples_per_class
        if len(members) < k:
            extra = rng.choice(members, size=k - len(members), replace=True)
            return rng.permutation(members).tolist() + extra.tolist()
        taken: list[int] = []
        while len(taken) < k:
            if not queue:
                queue.extend(rng.permutation(members).tolist())
            i = queue.pop()
            if i in taken:  # only possible right after a reshuffle: keep it for a later batch
                queue.insert(0, i)
                continue
            taken.append(i)
        return taken
