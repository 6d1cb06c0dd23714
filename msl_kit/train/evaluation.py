"""Evaluation: embeddings of a dataset, retrieval metrics, and the floors training must beat.

Every function takes explicit values (an `EvalOptions`, the datasets, the ks), never a whole
config: `msl_kit.recipe` turns a config into these.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from msl_kit import metrics

FLOORS = ("raw_pixels", "untrained", "backbone")  # metrics.json "floors" keys; eval.floors lists
PIXEL_SIDE = (
    32  # pixels are average-pooled to at most this side: 227 px RGB would need 3.6 GB for CUB
)


@dataclass(frozen=True)
class EvalOptions:
    """How embeddings are extracted (loader batch and workers, autocast, memory format) and
    ranked (`metrics.METRICS`, `metrics.LONE_QUERIES`)."""

    batch_size: int = 256
    workers: int = 0
    amp: str = "none"  # none, bf16, fp16
    channels_last: bool = False
    metric: str = "ip"  # inner product, or "euclidean"
    lone_queries: str = "miss"  # queries without a relevant item: misses in R@K, or "skip"


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for "bf16" / "fp16", a disabled one for "none"."""
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _loader(dataset: Dataset, opts: EvalOptions, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=opts.batch_size,
        shuffle=False,
        num_workers=opts.workers,
        pin_memory=device.type == "cuda",
    )


@torch.no_grad()
def extract(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    opts: EvalOptions = EvalOptions(),
    *,
    backbone_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and labels of a whole dataset, in dataset order, on the CPU.

    `backbone_only`: `model.backbone`'s pooled features, L2-normalised, instead of the head's
    embeddings (the frozen-backbone floor); the model's own train / eval switch is used.
    """
    was_training = model.training
    model.eval()
    embs, labels = [], []
    forward = model.backbone if backbone_only else model
    for images, y, _ in _loader(dataset, opts, device):
        images = images.to(device, non_blocking=True)
        if opts.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(opts.amp, device):
            out = forward(images).float()
        if backbone_only:  # the features as the head would receive them, ranked by cosine
            out = nn.functional.normalize(out, dim=1)
        embs.append(out.cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(embs), torch.cat(labels)


Embed = Callable[[Dataset], tuple[torch.Tensor, torch.Tensor]]


def score(
    embed: Embed,
    query: Dataset,
    gallery: Dataset | None,
    ks: Sequence[int],
    opts: EvalOptions = EvalOptions(),
) -> dict:
    """R@K, MAP@R and R-precision of `embed`'s vectors; query = gallery where gallery is None."""
    emb, labels = embed(query)
    how = dict(ks=tuple(ks), metric=opts.metric, lone_queries=opts.lone_queries)
    if gallery is None:
        return metrics.retrieval_metrics(emb, labels, **how)
    g_emb, g_labels = embed(gallery)
    return metrics.retrieval_metrics(emb, labels, gallery=g_emb, gallery_labels=g_labels, **how)


def evaluate(
    model: nn.Module,
    query: Dataset,
    gallery: Dataset | None,
    device: torch.device,
    ks: Sequence[int],
    opts: EvalOptions = EvalOptions(),
    *,
    backbone_only: bool = False,
) -> dict:
    """R@K, MAP@R and R-precision of `model` on the evaluation data. `backbone_only`: of its
    backbone's pooled features as loaded, L2-normalised, no head (the floor a fine-tuned
    pretrained backbone must beat: fine-tuning can lower it)."""
    embed = functools.partial(extract, model, device=device, opts=opts, backbone_only=backbone_only)
    return score(embed, query, gallery, ks, opts)


def pixel_features(
    dataset: Dataset, opts: EvalOptions = EvalOptions()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed eval images, pooled to at most PIXEL_SIDE, flattened and L2-normalised."""
    feats, labels = [], []
    for images, y, _ in _loader(dataset, opts, torch.device("cpu")):
        side = min(images.shape[-1], PIXEL_SIDE)
        pooled = nn.functional.adaptive_avg_pool2d(images.float(), side)
        feats.append(nn.functional.normalize(pooled.flatten(1), dim=1))
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def pixel_baseline(
    query: Dataset, gallery: Dataset | None, ks: Sequence[int], opts: EvalOptions = EvalOptions()
) -> dict:
    """The same metrics on raw pixels of the same evaluation data: the floor training must beat."""
    return score(lambda ds: pixel_features(ds, opts), query, gallery, ks, opts)


def max_rank(query: Dataset, gallery: Dataset | None) -> int:
    """The largest K that R@K can use: the gallery size (minus the query itself where shared)."""
    return len(query) - 1 if gallery is None else len(gallery)
