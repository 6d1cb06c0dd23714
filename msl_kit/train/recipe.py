"""From a Config to the parts of a run: the one seam between settings and the library.

Training, `msl-kit evaluate`, the notebooks and the benchmarks all build their datasets,
model, preprocessing, loss, optimizer and evaluation options here, so a setting (say
`data.skip_corrupt`) means the same thing everywhere. Each builder reads only the keys it
needs and calls a library function that takes explicit values.
"""

from __future__ import annotations

import dataclasses
import random
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from msl_kit.datasets.dataset import ImageDataset, build
from msl_kit.datasets.layouts.common import DatasetError
from msl_kit.datasets.registry import info
from msl_kit.datasets.sampling import PKSampler, RandomBatchSampler
from msl_kit.datasets.transforms import build_transform
from msl_kit.losses import registry as loss_registry
from msl_kit.losses.multi_similarity import MSParams
from msl_kit.models import builder as model_builder
from msl_kit.preprocessing import Preprocessing
from msl_kit.train.config import Config
from msl_kit.train.evaluation import EvalOptions


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """`auto` means CUDA when there is one (config validation already refused a missing GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_options(cfg: Config) -> dict:
    """The configured backbone's own options (`model.<backbone>.*`, as it declares them; 0 or
    None means the backbone's own value)."""
    params = cfg.model.params
    return dataclasses.asdict(params) if params is not None else {}


def ms_params(cfg: Config) -> MSParams:
    """The MS numbers of this run: its loss's where the loss is MS (or declares MS's numbers),
    else the released preset (what the mining statistics of other losses are computed with)."""
    params = cfg.loss.params
    return params if isinstance(params, MSParams) else MSParams()


def preprocessing(cfg: Config) -> Preprocessing:
    """The backbone's preprocessing spec (no network is built) with the data overrides."""
    spec = model_builder.preprocessing_spec(cfg.model.backbone, **model_options(cfg))
    changes: dict = {}
    if cfg.data.crop_scale is not None:
        changes["crop_scale"] = tuple(cfg.data.crop_scale)
    if cfg.data.hflip is not None:
        changes["hflip"] = cfg.data.hflip
    if cfg.data.crop_mode is not None:
        changes["crop"] = cfg.data.crop_mode
    return dataclasses.replace(spec, **changes)


def build_model(cfg: Config, *, load_pretrained: bool = True) -> nn.Module:
    """The configured model. `load_pretrained=False` skips `model.pretrained`: for a model
    whose weights come from a checkpoint next."""
    m = cfg.model
    pretrained = m.pretrained if load_pretrained else None
    model = model_builder.build_model(
        m.backbone,
        m.embedding_dim,
        pretrained,
        freeze_bn=m.freeze_bn,
        head_init=m.head_init,
        freeze_bn_affine=m.freeze_bn_affine,
        freeze_modules=tuple(m.freeze_modules),
        **model_options(cfg),
    )
    return model.to(memory_format=torch.channels_last) if m.channels_last else model


def dataset(cfg: Config, split: str, transform=None) -> ImageDataset:
    """One split of the configured dataset: the only place the config's data keys are read."""
    d = cfg.data
    return build(
        d.name,
        d.root,
        split,
        transform,
        val_fraction=d.val_fraction,
        seed=cfg.seed,
        skip_corrupt=d.skip_corrupt,
    )


class EvalData(NamedTuple):
    """Queries and gallery; `gallery` is None where the split is its own gallery."""

    query: Dataset
    gallery: Dataset | None


def eval_data(cfg: Config, spec: Preprocessing | None = None) -> EvalData:
    """The evaluation split (In-Shop's test: query and gallery) with the eval transform."""
    tf = build_transform(spec or preprocessing(cfg), train=False)
    if info(cfg.data.name).query_gallery and cfg.eval.split == "test":
        return EvalData(dataset(cfg, "query", tf), dataset(cfg, "gallery", tf))
    return EvalData(dataset(cfg, cfg.eval.split, tf), None)


def train_data(cfg: Config, spec: Preprocessing | None = None) -> Dataset:
    """The training split with the train transform (augmentation)."""
    return dataset(cfg, "train", build_transform(spec or preprocessing(cfg), train=True))


def eval_options(cfg: Config) -> EvalOptions:
    """How the configured run extracts embeddings."""
    e = cfg.eval
    return EvalOptions(
        e.batch_size,
        cfg.data.workers,
        cfg.train.amp,
        cfg.model.channels_last,
        e.metric,
        e.lone_queries,
    )


def num_classes(train_set: Dataset) -> int:
    """The training classes' count, for one proxy each; their labels must be 0..C-1.

    `datasets.build` numbers each split's classes 0..C-1 already (sorted class keys, so the same
    class gets the same proxy on every run and rank); this refuses any other labelling rather
    than let a label index past the proxies or leave proxies without data.
    """
    labels = np.unique(np.asarray(train_set.labels))
    if labels.size == 0 or labels[0] != 0 or labels[-1] != labels.size - 1:
        raise DatasetError(
            f"the training labels must be 0..C-1 for one proxy per class, got {labels.size} "
            f"classes labelled {labels[:3].tolist()}...; number the classes from 0"
        )
    return int(labels.size)


def loss_params(cfg: Config, classes: int | None = None) -> dict:
    """The parameters the configured loss gets: its own (`loss.<name>.*`, as it declares them),
    `loss.mining` where it is set and the loss takes it, and for a proxy loss `num_classes`
    (`classes`, the train split's class count) and `dim` (`model.embedding_dim`)."""
    lc = cfg.loss
    spec = loss_registry.loss_spec(lc.name)
    params = dataclasses.asdict(lc.params) if lc.params is not None else {}
    if lc.mining is not None and spec.mining:
        params["mining"] = lc.mining
    if spec.needs_classes:
        if classes is None:
            raise ValueError(f"loss.name={lc.name} learns one proxy per class: pass `classes`")
        params.update(num_classes=classes, dim=cfg.model.embedding_dim)
    return params


def build_loss(cfg: Config, classes: int | None = None) -> nn.Module:
    """The configured loss, built from the loss registry (`classes`: see `loss_params`)."""
    return loss_registry.build_loss(cfg.loss.name, **loss_params(cfg, classes))


def lr_factor(iteration: int, cfg: Config) -> float:
    """Linear warm-up, then x lr_gamma at each of lr_steps (pure: resume needs no state)."""
    t = cfg.train
    warm = min(1.0, (iteration + 1) / t.warmup) if t.warmup else 1.0
    return warm * t.lr_gamma ** sum(iteration >= s for s in t.lr_steps)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(
    model: nn.Module, cfg: Config, loss: nn.Module | None = None
) -> torch.optim.Optimizer:
    """`train.optimizer` with one named group each for the backbone, the head and, where the
    loss learns parameters (Proxy-Anchor's proxies), the loss at lr x `loss.proxy_lr_mult`."""
    t = cfg.train
    groups = [
        {
            "params": [p for p in model.backbone.parameters() if p.requires_grad],
            "lr": t.lr * t.backbone_lr_mult,
            "name": "backbone",
        },
        {
            "params": [p for p in model.head.parameters() if p.requires_grad],
            "lr": t.lr * t.head_lr_mult,
            "name": "head",
        },
    ]
    if loss is not None:
        groups.append(
            {
                "params": [p for p in loss.parameters() if p.requires_grad],
                "lr": t.lr * cfg.loss.proxy_lr_mult,
                "name": "loss",
            }
        )
    cls = OPTIMIZERS[t.optimizer]
    return cls([g for g in groups if g["params"]], weight_decay=t.weight_decay)


def build_sampler(
    cfg: Config, labels: np.ndarray, start: int = 0, num_replicas: int = 1, rank: int = 0
) -> Sampler[list[int]]:
    """`train.sampler`: P x K batches, or shuffled batches with drop_last, from `start` on."""
    t = cfg.train
    common = dict(iterations=t.iterations, start=start, num_replicas=num_replicas, rank=rank)
    if t.sampler == "random":
        return RandomBatchSampler(len(labels), t.batch_size, cfg.seed, **common)
    return PKSampler(
        labels, t.batch_size, t.samples_per_class, cfg.seed, class_draw=t.class_draw, **common
    )


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: Config
) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured lr schedule as a LambdaLR over `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, cfg))
