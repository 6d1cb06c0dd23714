"""Evaluation: embeddings of a split, retrieval metrics, and the raw-pixel floor."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from msl_kit import datasets, metrics, transforms
from msl_kit.config import Config


def make_loader(ds: Dataset, cfg: Config, device: torch.device, **kw: Any) -> DataLoader:
    """A DataLoader with the config's workers, pinning memory for a CUDA device."""
    return DataLoader(ds, num_workers=cfg.data.workers, pin_memory=device.type == "cuda", **kw)


@torch.no_grad()
def extract(model: nn.Module, dataset: Dataset, cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and labels of a whole dataset, in dataset order, on the CPU."""
    was_training = model.training
    model.eval()
    loader = make_loader(dataset, cfg, device, batch_size=cfg.eval.batch_size, shuffle=False)
    embs, labels = [], []
    for images, y, _ in loader:
        images = images.to(device, non_blocking=True)
        if cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(cfg, device):
            embs.append(model(images).float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(embs), torch.cat(labels)


def autocast(cfg: Config, device: torch.device):
    if cfg.train.amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16)


def eval_sets(cfg: Config, spec: transforms.Preprocessing) -> tuple[Dataset, Dataset | None]:
    """The evaluation data: (queries, gallery) for In-Shop, (split, None) where query = gallery."""
    tf = transforms.build_transform(spec, train=False)
    kw = dict(val_fraction=cfg.data.val_fraction, seed=cfg.seed, skip_corrupt=cfg.data.skip_corrupt)
    if datasets.info(cfg.data.name).query_gallery and cfg.eval.split == "test":
        return (datasets.build(cfg.data.name, cfg.data.root, "query", tf, **kw),
                datasets.build(cfg.data.name, cfg.data.root, "gallery", tf, **kw))
    return datasets.build(cfg.data.name, cfg.data.root, cfg.eval.split, tf, **kw), None


def _score(embed: Callable[[Dataset], tuple[torch.Tensor, torch.Tensor]], cfg: Config,
           sets: tuple[Dataset, Dataset | None]) -> dict:
    query_set, gallery_set = sets
    emb, labels = embed(query_set)
    if gallery_set is None:
        return metrics.retrieval_metrics(emb, labels, ks=tuple(cfg.eval.ks))
    g_emb, g_labels = embed(gallery_set)
    return metrics.retrieval_metrics(emb, labels, ks=tuple(cfg.eval.ks), gallery=g_emb, gallery_labels=g_labels)


def evaluate(model: nn.Module, cfg: Config, device: torch.device, sets: tuple[Dataset, Dataset | None]) -> dict:
    """R@K, MAP@R and R-precision of `model` on the evaluation data."""
    return _score(lambda ds: extract(model, ds, cfg, device), cfg, sets)


PIXEL_SIDE = 32  # pixels are average-pooled to at most this side: 227 px RGB would need 3.6 GB for CUB


def pixel_features(dataset: Dataset, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed eval images, pooled to at most PIXEL_SIDE, flattened and L2-normalised."""
    feats, labels = [], []
    for images, y, _ in make_loader(dataset, cfg, torch.device("cpu"), batch_size=cfg.eval.batch_size, shuffle=False):
        side = min(images.shape[-1], PIXEL_SIDE)
        pooled = nn.functional.adaptive_avg_pool2d(images.float(), side)
        feats.append(nn.functional.normalize(pooled.flatten(1), dim=1))
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def pixel_baseline(cfg: Config, spec: transforms.Preprocessing) -> dict:
    """The same metrics on raw pixels of the same evaluation data: the floor training must beat."""
    return _score(lambda ds: pixel_features(ds, cfg), cfg, eval_sets(cfg, spec))
