"""Batch sampling, reproducible and DDP-aware: P x K (P distinct classes, K indices each) or
plain shuffled batches (what proxy losses train on)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from msl_kit.datasets.layouts.common import DatasetError

CLASS_DRAWS = ("uniform", "released")


class PKSampler(Sampler[list[int]]):
    """Batch sampler: P = `batch_size // samples_per_class` distinct classes x K indices each.

    K is `samples_per_class`.

    `class_draw` says how often each class is drawn:

    - "uniform" (default): classes are visited in shuffled rounds (every class once before any
      class repeats), so every class is drawn equally often whatever its size; each class's
      indices are used in shuffled rounds too. A class with fewer than K items is padded by
      sampling with replacement; any other class never repeats an index inside a batch.
    - "released": the released MS-loss code's RandomIdentitySampler behaviour, written anew.
      Each epoch, every class's indices are shuffled and cut into floor(n / K) chunks of K; the
      n mod K leftovers are dropped for that epoch. A class with n < K gives one chunk: its n
      items once plus K - n drawn with replacement (the released code draws all K with
      replacement; for a class that small the two differ only in which items repeat). Then
      each batch draws P distinct classes uniformly among the classes that still have a chunk
      and takes one chunk of each; the epoch ends when fewer than P classes have chunks left
      (their chunks are dropped) and the next epoch re-cuts every class. So classes are drawn
      in proportion to floor(n / K) (at least 1), and large classes lose a little at each
      epoch's end, as in the released code. Random draws come from numpy, not Python's
      `random`, so the stream is not the released one, only its distribution.

    Length: `iterations` batches when given (the released recipe counts iterations), else one
    epoch: `num_classes // P` batches ("uniform"), or the batch count of this seed's first
    released epoch ("released"). `start` skips that many batches of the same seeded stream,
    which is how a resumed run continues exactly where it stopped.

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
        class_draw: str = "uniform",
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(
                f"labels must be integers (got dtype {labels.dtype}); map class names to ids first"
            )
        if samples_per_class < 1 or batch_size < 1:
            raise ValueError("batch_size and samples_per_class must be positive")
        if batch_size % samples_per_class:
            fit = batch_size // samples_per_class * samples_per_class or samples_per_class
            raise ValueError(
                f"batch_size={batch_size} is not a multiple of samples_per_class="
                f"{samples_per_class}; use e.g. batch_size={fit}"
            )
        if class_draw not in CLASS_DRAWS:
            raise ValueError(f"class_draw must be one of {CLASS_DRAWS}, not {class_draw!r}")
        classes, inverse = np.unique(labels, return_inverse=True)
        self.classes_per_batch = batch_size // samples_per_class
        if self.classes_per_batch > len(classes):
            raise DatasetError(
                f"a batch of {batch_size} = {self.classes_per_batch} classes x "
                f"{samples_per_class} needs {self.classes_per_batch} classes but the data has "
                f"only {len(classes)}; lower train.batch_size or raise train.samples_per_class"
            )
        if self.classes_per_batch % num_replicas:
            raise DatasetError(
                f"{self.classes_per_batch} classes per batch cannot be split "
                f"evenly over {num_replicas} ranks"
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
        self.class_draw = class_draw
        self._epoch_batches: int | None = None

    def __len__(self) -> int:
        total = self.iterations if self.iterations is not None else self._epoch_length()
        return max(total - self.start, 0)

    def _epoch_length(self) -> int:
        if self.class_draw == "uniform":
            return len(self._members) // self.classes_per_batch
        if self._epoch_batches is None:  # the first epoch of this seed's stream, counted once
            rng = np.random.default_rng(self.seed)
            self._epoch_batches = sum(1 for _ in self._released_epoch(rng))
        return self._epoch_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed)
        per_rank = self.classes_per_batch // self.num_replicas
        batches = self._uniform(rng) if self.class_draw == "uniform" else self._released(rng)
        for batch_number in range(self.start + len(self)):
            batch = next(batches)  # drawn even when skipped: a resumed run sees the same stream
            if batch_number < self.start:
                continue
            mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
            yield [int(i) for chunk in mine for i in chunk]

    # --- class_draw="uniform" --------------------------------------------------------------

    def _uniform(self, rng: np.random.Generator) -> Iterator[list[list[int]]]:
        """Global batches (P lists of K indices) forever, classes in shuffled rounds."""
        class_queue: list[int] = []
        member_queues: list[list[int]] = [[] for _ in self._members]
        while True:
            batch_classes = self._next_classes(rng, class_queue)
            yield [self._take(rng, c, member_queues[c]) for c in batch_classes]

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

    # --- class_draw="released" -------------------------------------------------------------

    def _released(self, rng: np.random.Generator) -> Iterator[list[list[int]]]:
        """Global batches forever, epoch after epoch of `_released_epoch`."""
        while True:
            yield from self._released_epoch(rng)

    def _released_epoch(self, rng: np.random.Generator) -> Iterator[list[list[int]]]:
        """One epoch: floor(n / K) chunks per class, P distinct classes with chunks per batch."""
        k, p = self.samples_per_class, self.classes_per_batch
        chunks: list[list[list[int]]] = []
        for members in self._members:
            shuffled = rng.permutation(members)
            if len(shuffled) < k:
                shuffled = np.concatenate([shuffled, rng.choice(members, size=k - len(shuffled))])
            chunks.append(
                [shuffled[i * k : (i + 1) * k].tolist() for i in range(len(shuffled) // k)]
            )
        left = list(range(len(chunks)))  # classes with a chunk left (every class, at first)
        while len(left) >= p:
            picked = sorted(rng.choice(len(left), size=p, replace=False).tolist(), reverse=True)
            batch = []
            for pos in picked:  # descending, so a swap-removal never moves a later pick
                c = left[pos]
                batch.append(chunks[c].pop())
                if not chunks[c]:
                    left[pos] = left[-1]
                    left.pop()
            yield batch


class RandomBatchSampler(Sampler[list[int]]):
    """Batch sampler of shuffled batches: each epoch a seeded permutation of all items cut into
    `batch_size` batches, the last partial batch dropped (drop_last), as proxy losses train.

    Length: `iterations` batches when given (epochs follow each other, each reshuffled), else
    one epoch. `start` skips that many batches of the same seeded stream (exact resume). Under
    DDP every rank draws the same global batch and keeps its own `batch_size / num_replicas`
    slice.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        *,
        iterations: int | None = None,
        start: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if num_items < batch_size:
            raise DatasetError(
                f"a batch of {batch_size} needs {batch_size} items but the data has only "
                f"{num_items}; lower train.batch_size"
            )
        if batch_size % num_replicas:
            raise DatasetError(
                f"batch_size {batch_size} cannot be split evenly over {num_replicas}"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.iterations, self.start = iterations, start
        self.num_replicas, self.rank = num_replicas, rank

    def __len__(self) -> int:
        total = (
            self.iterations if self.iterations is not None else self.num_items // self.batch_size
        )
        return max(total - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.num_items // self.batch_size
        per_rank = self.batch_size // self.num_replicas
        lo = self.rank * per_rank
        order, seen = np.arange(0), -1
        for batch_number in range(self.start, self.start + len(self)):
            epoch, pos = divmod(batch_number, per_epoch)
            if epoch != seen:  # one generator per epoch: a resumed run jumps straight to it
                order, seen = (
                    np.random.default_rng([self.seed, epoch]).permutation(self.num_items),
                    epoch,
                )
            batch = order[pos * self.batch_size : (pos + 1) * self.batch_size]
            yield [int(i) for i in batch[lo : lo + per_rank]]
