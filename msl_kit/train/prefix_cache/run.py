"""What a run asks of a frozen prefix (`cache.prefix`), and of its cache (`cache.views`).

`FrozenPrefix.attach(cfg, model, device)` cuts the backbone after `cache.prefix`, checks the cut
on a random input and freezes the prefix (no gradient, eval mode). With `cache.views = 0` that
is all: every step runs the whole network. With `cache.views = V` the prefix's output for V
seeded augmented views of every training image, and for the evaluation images, is cached on
disk once (`cached_set`), and the trainer takes from it:

- `batches(train_set, sampler, start)`: P x K batches of cached activations, each item one of
  its image's V views (drawn from the run's seed and the batch number: a resume draws the same);
- `net(model)`: activations -> the backbone's tail -> the head (a step trains exactly what
  the uncached step trains on that view, the same parameters, the same gradients);
- `embedder(...)`: evaluation features from cached eval activations (the eval transform, one
  view).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from msl_kit.models.prefix import PrefixSplit
from msl_kit.train.config import Config
from msl_kit.train.evaluation import EvalOptions, autocast
from msl_kit.train.prefix_cache.build import fill
from msl_kit.train.prefix_cache.store import (
    ActivationSet,
    CacheError,
    RowMapped,
    SetSpec,
    check_room,
    find_superset,
    item_keys,
    items_digest,
    say,
    weights_digest,
)

TRAIN_ONLY = ("crop_scale", "crop_ratio", "hflip")  # Preprocessing fields of augmentation only


class TailModel(nn.Module):
    """Prefix activations -> the backbone's tail -> the model's head (embeddings)."""

    def __init__(self, model: nn.Module, split: PrefixSplit) -> None:
        super().__init__()
        self.model, self.split = model, split

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.split.tail(activations))


class CachedBatches:
    """The sampler's batches as (activations, labels, indices), like the image loader's."""

    def __init__(
        self,
        aset: ActivationSet | RowMapped,
        labels: np.ndarray,
        sampler: Sampler,
        *,
        start: int,
        seed: int,
        views: int,
    ) -> None:
        self.aset, self.labels, self.sampler = aset, np.asarray(labels), sampler
        self.start, self.seed, self.views = start, seed, views

    def __len__(self) -> int:
        return len(self.sampler)

    def views_of(self, batch_number: int, size: int) -> np.ndarray:
        """Which view each item of batch `batch_number` takes (seeded: resume draws the same)."""
        rng = np.random.default_rng([self.seed, batch_number])
        return rng.integers(0, self.views, size)

    def __iter__(self):
        for n, batch in enumerate(self.sampler, start=self.start):
            idx = np.asarray(batch, dtype=np.int64)
            acts = self.aset.gather(self.views_of(n, len(idx)), idx)
            yield acts, torch.as_tensor(self.labels[idx]), torch.as_tensor(idx)


def _set_spec(
    cfg: Config, split: PrefixSplit, dataset: Dataset, keys: list | None, shape: tuple, views: int
) -> SetSpec:
    transform = getattr(dataset, "transform", None)
    spec = getattr(transform, "spec", None)
    train = bool(getattr(transform, "train", False))
    how = dataclasses.asdict(spec) if spec is not None else {"transform": repr(transform)}
    if not train:  # the eval transform draws no crop and no flip: those fields change nothing
        how = {k: v for k, v in how.items() if k not in TRAIN_ONLY}
    material = {
        "backbone": cfg.model.backbone,
        "prefix": cfg.cache.prefix,
        "weights_sha256": weights_digest(split.modules),
        "preprocessing": how,
        "train_transform": train,
        "view_seed": cfg.cache.view_seed if train else 0,
        "items_sha256": items_digest(dataset, keys),
        "dtype": cfg.cache.dtype,
        "amp": cfg.train.amp,
    }
    return SetSpec(material, len(dataset), views, tuple(shape), cfg.cache.dtype)


class FrozenPrefix:
    """The frozen prefix of one run and, with `cache.views`, its cached activations."""

    def __init__(self, cfg: Config, split: PrefixSplit, shape: tuple) -> None:
        self.cfg, self.split = cfg, split
        self.shape = shape  # one prefix activation (C, H, W)
        self.views = cfg.cache.views
        self.sets: dict[int, ActivationSet | RowMapped] = {}  # id(dataset) -> its set, opened

    @classmethod
    def attach(
        cls,
        cfg: Config,
        model: nn.Module,
        device: torch.device,
        world_size: int = 1,
        sets: tuple[Dataset, ...] = (),
    ) -> FrozenPrefix:
        """Cut `model.backbone` after `cache.prefix`, check the cut, freeze the prefix; with
        `sets` (the training split, then the eval splits) refuse a cache above `cache.max_gb`
        or the free disk now, before a run writes anything."""
        if cfg.cache.views and world_size > 1:
            raise CacheError(
                "cache.views does not run under torchrun (one process reads one cache): set "
                "cache.views=0 or train in one process"
            )
        split = PrefixSplit(model.backbone, cfg.cache.prefix)
        spec = model.preprocessing
        gen = torch.Generator().manual_seed(0)  # the run's RNG is not touched
        probe = torch.randn(2, spec.channels, spec.input_size, spec.input_size, generator=gen)
        split.check(probe.to(device))
        split.freeze()
        shape = tuple(split.prefix_output(probe[:1].to(device)).shape[1:])
        prefix = cls(cfg, split, shape)
        if sets and prefix.cached:
            views = [prefix.views] + [1] * (len(sets) - 1)
            specs = [
                _set_spec(cfg, split, d, item_keys(d), shape, v)
                for d, v in zip(sets, views)
                if d is not None
            ]
            check_room([ActivationSet(prefix.folder(), spec) for spec in specs], cfg.cache.max_gb)
        return prefix

    @property
    def cached(self) -> bool:
        return self.views > 0

    def folder(self) -> Path:
        """`cache.dir`, else `prefix_cache/` in the data root (beside it for a CSV root)."""
        c = self.cfg.cache
        if c.dir:
            return Path(c.dir).expanduser()
        root = Path(self.cfg.data.root).expanduser()
        return (root.parent if root.is_file() else root) / "prefix_cache"

    def cached_set(
        self, dataset: Dataset, views: int, device: torch.device
    ) -> ActivationSet | RowMapped:
        """`dataset`'s cached set of `views` views, built where missing, then opened; once. A
        complete set holding all of its images (the whole training split for a validation
        run's training classes) is read instead of building another."""
        if id(dataset) not in self.sets:
            keys = item_keys(dataset)
            spec = _set_spec(self.cfg, self.split, dataset, keys, self.shape, views)
            aset = ActivationSet(self.folder(), spec)
            found = None if aset.folder.exists() else find_superset(self.folder(), spec, keys)
            if found is not None:
                say(
                    f"prefix cache: {spec.count} images read from {found.parent.folder}, "
                    f"which holds them among its {found.parent.spec.count}"
                )
                found.parent.open()
                self.sets[id(dataset)] = found
                return found
            check_room([aset], self.cfg.cache.max_gb)
            aset.claim(keys)
            say(aset.describe(len(aset.chunks) - len(aset.missing())))
            c = self.cfg.cache
            fill(
                aset,
                self.split,
                dataset,
                c.view_seed,
                device,
                amp=self.cfg.train.amp,
                batch_size=min(self.cfg.eval.batch_size, 64),  # bounds the build's memory
                workers=self.cfg.data.workers,
            )
            aset.open()
            self.sets[id(dataset)] = aset
        return self.sets[id(dataset)]

    def batches(
        self, train_set: Dataset, sampler: Sampler, start: int, device: torch.device
    ) -> CachedBatches:
        """The training batches from the cache (built first where missing)."""
        aset = self.cached_set(train_set, self.views, device)
        return CachedBatches(
            aset, train_set.labels, sampler, start=start, seed=self.cfg.seed, views=self.views
        )

    def net(self, model: nn.Module) -> TailModel:
        """What the trainer's step calls on cached activations."""
        return TailModel(model, self.split)

    def embedder(
        self, model: nn.Module, device: torch.device, opts: EvalOptions, backbone_only: bool
    ):
        """`evaluation.extract` for an eval dataset (any: cached on first use), from its cached
        activations: the head's embeddings, or the backbone's pooled features L2-normalised."""

        @torch.no_grad()
        def embed(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
            aset, n = self.cached_set(dataset, 1, device), len(dataset)
            was = model.training
            model.eval()
            outs = []
            for start in range(0, n, opts.batch_size):
                idx = np.arange(start, min(start + opts.batch_size, n))
                acts = aset.gather(np.zeros_like(idx), idx).to(device, non_blocking=True)
                if opts.channels_last:
                    acts = acts.contiguous(memory_format=torch.channels_last)
                with autocast(opts.amp, device):
                    feats = self.split.tail(acts)
                    out = (feats if backbone_only else model.head(feats)).float()
                outs.append(nn.functional.normalize(out, dim=1) if backbone_only else out.cpu())
            model.train(was)
            return torch.cat([o.cpu() for o in outs]), torch.as_tensor(np.asarray(dataset.labels))

        return embed
