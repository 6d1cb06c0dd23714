"""Real photos in the notebooks (08): what is missing, and a split's embeddings under the
backbone as loaded or a fine-tuned model, from the prefix cache where the run has one."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from msl_kit.datasets import transforms
from msl_kit.datasets.registry import is_prepared
from msl_kit.models import packaged
from msl_kit.train import evaluation, recipe
from msl_kit.train.config import Config
from msl_kit.train.prefix_cache.run import FrozenPrefix
from msl_kit.use.index import Embeddings

if TYPE_CHECKING:
    import pandas as pd


def missing(cfg: Config) -> str | None:
    """One line saying what to run when the config's data or packaged weights are missing;
    None when both are there."""
    d = cfg.data
    if not is_prepared(d.name, d.root):
        return (
            f"{d.name} is not prepared in {d.root}: run `msl-kit prepare {d.name} --root "
            f"{d.root} --archive CUB_200_2011.tgz` (or the team's CUB_200_2011_subset100.tgz), "
            "then run this notebook again"
        )
    if packaged.is_packaged(cfg.model.pretrained):
        try:
            packaged.resolve(str(cfg.model.pretrained))
        except (FileNotFoundError, ValueError) as e:
            return f"{e}; then run this notebook again"
    return None


def split_embeddings(
    model: nn.Module, cfg: Config, split: str = "test", *, backbone_only: bool = False
) -> Embeddings:
    """The embeddings of a whole split (the eval transform) as a searchable `Embeddings`:
    the model's, or with `backbone_only` its backbone's pooled features, L2-normalised. Where
    the config caches a frozen prefix, from the cached activations (built on first use)."""
    ds = recipe.dataset(cfg, split, transforms.build_transform(recipe.preprocessing(cfg), False))
    device = next(model.parameters()).device
    opts = recipe.eval_options(cfg)
    if cfg.cache.prefix and cfg.cache.views:
        prefix = FrozenPrefix.attach(cfg, model, device)
        embed = prefix.embedder(model, device, opts, backbone_only)
    else:
        embed = functools.partial(
            evaluation.extract, model, device=device, opts=opts, backbone_only=backbone_only
        )
    emb, labels = embed(ds)
    paths = np.array([str(ds.root / p) for p in ds.paths])
    return Embeddings(emb.numpy(), paths, labels.numpy(), tuple(ds.classes))


ROWS = (  # metrics.json key -> row name, in the order a results table shows them
    ("raw_pixels", "raw pixels (floor)"),
    ("untrained", "untrained head (floor)"),
    ("backbone", "backbone as loaded (floor)"),
)


def results_table(metrics: dict) -> pd.DataFrame:
    """A run's metrics.json as a table in %: the floors, then the trained model."""
    import pandas as pd

    ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith("recall@"))
    cols = [f"recall@{k}" for k in ks] + ["map@r"]
    floors = metrics.get("floors", {})
    rows = {name: floors[key] for key, name in ROWS if key in floors}
    rows[f"fine-tuned, iteration {metrics.get('iteration')}"] = metrics
    table = pd.DataFrame({n: [100 * m[c] for c in cols] for n, m in rows.items()}, index=cols)
    return table.T.rename(columns=lambda c: c.replace("recall@", "R@").upper()).round(1)
