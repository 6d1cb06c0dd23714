"""Models and data for the notebooks: a run's model, a split's embeddings, one P x K batch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from msl_kit.datasets import transforms
from msl_kit.datasets.sampling import PKSampler
from msl_kit.errors import MslKitError
from msl_kit.losses.multi_similarity import MSParams
from msl_kit.losses.proxy_anchor import ProxyAnchorParams
from msl_kit.train import checkpoint as ckpt
from msl_kit.train import evaluation, recipe
from msl_kit.train.config import Config
from msl_kit.train.rundir import RunFolder


def snapshots(run_dir: str | Path) -> list[Path]:
    """A run's weight snapshots (snapshots/iter_NNNNNN.pt), in training order."""
    return RunFolder(run_dir).snapshots()


def latest_run(runs_dir: str | Path = "runs") -> Path | None:
    """The most recently finished run folder right under `runs_dir`, or None."""
    done = [RunFolder(p) for p in Path(runs_dir).glob("*") if RunFolder(p).finished()]
    return max(done, key=lambda r: r.metrics.stat().st_mtime).path if done else None


class NeedsRun(MslKitError):
    """A notebook that needs a trained run found none. Jupyter shows it as its one line, with
    no traceback (IPython's `_render_traceback_`), and stops running the cells below."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def find_run(
    checkpoint: str | Path | None = None,
    runs: str | Path = "runs",
    demo: str | Path = "runs/demo",
) -> Path:
    """`checkpoint` (a run folder or file) if given, else the latest finished run under
    `runs` (where notebook 02 trains), else `demo` (the README's `msl-kit train --out
    runs/demo`) when it holds a finished run; none: `NeedsRun`, one line naming what to run."""
    if checkpoint is not None:
        return Path(checkpoint)
    found = latest_run(runs)
    if found is None and RunFolder(demo).finished():
        found = Path(demo)
    if found is None:
        raise NeedsRun(
            f"This notebook needs a trained run and found none under {runs} or {demo}: run "
            "notebook 02_train first (or `msl-kit train --out runs/demo` in the repository's "
            "folder), or set `checkpoint` to a run folder."
        )
    return found


class Picked(NamedTuple):
    """The model a notebook shows, the config it was built from, its run folder (None for a
    fresh model) and one line saying which model it is."""

    model: nn.Module
    cfg: Config
    run: Path | None
    note: str


def pick_model(
    checkpoint: str | Path | None = None, runs: str | Path = "runs", cfg: Config | None = None
) -> Picked:
    """`checkpoint` (a run folder or file) if given, else the latest finished run under `runs`,
    else a fresh model of `cfg` (the default config when None); `note` says which."""
    path = Path(checkpoint) if checkpoint is not None else latest_run(runs)
    if path is None:
        model, cfg = ckpt.load_model(cfg=cfg)
        return Picked(
            model,
            cfg,
            None,
            f"no finished run under {Path(runs).resolve()}: showing "
            f"a FRESH, untrained {cfg.model.backbone} on {cfg.data.name} "
            "(run 02_train first to see a trained model)",
        )
    model, cfg = ckpt.load_model(path)
    run = path if path.is_dir() else path.parent
    score = ""
    if RunFolder(run).finished():
        final = RunFolder(run).read_metrics()
        score = f", iteration {final.get('iteration')}, R@1 {100 * final.get('recall@1', 0):.1f}%"
    return Picked(model, cfg, run, f"trained model from {path.resolve()}{score}")


def ms_params(cfg: Config) -> MSParams:
    """The MS numbers of a run (its loss's for an MS run, else the released preset): the one
    place that says it is `recipe.ms_params`."""
    return recipe.ms_params(cfg)


def snapshot_similarities(run_dir: str | Path, **batch: Any) -> tuple[dict[int, Tensor], Tensor]:
    """The same P x K batch (`batch_similarity` keywords) under each weight snapshot of a run:
    {iteration: S} and the batch's labels."""
    sims, labels = {}, None
    for path in snapshots(run_dir):
        model, cfg = ckpt.load_model(path)
        sims[int(path.stem.split("_")[1])], labels = batch_similarity(model, cfg, **batch)
    if labels is None:
        raise FileNotFoundError(
            f"{run_dir} has no {RunFolder.SNAPSHOTS}/iter_*.pt: train it with "
            "train.keep_snapshots=true"
        )
    return sims, labels


class ItemImages(Sequence):
    """The untransformed images of `dataset[indices[i]]`, loaded only when indexed."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(map(int, indices))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.dataset[self.indices[i]][0]


def split_embeddings(
    model: nn.Module,
    cfg: Config,
    split: str = "test",
    *,
    max_items: int | None = None,
    max_classes: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor, ItemImages]:
    """Embeddings, labels and lazily loaded images of a split: the items of `max_classes`
    seeded classes (all classes when None), then a seeded subset of `max_items` of them."""
    tf = transforms.build_transform(recipe.preprocessing(cfg), train=False)
    ds = recipe.dataset(cfg, split, tf)
    rng = np.random.default_rng(seed)
    indices = np.arange(len(ds))
    classes = np.unique(ds.labels)
    if max_classes is not None and max_classes < len(classes):
        chosen = rng.choice(classes, max_classes, replace=False)
        indices = np.flatnonzero(np.isin(ds.labels, chosen))
    if max_items is not None and max_items < len(indices):
        indices = np.sort(rng.choice(indices, max_items, replace=False))
    device = next(model.parameters()).device
    emb, labels = evaluation.extract(
        model, Subset(ds, indices.tolist()), device, recipe.eval_options(cfg)
    )
    return emb, labels, ItemImages(recipe.dataset(cfg, split), indices)


@torch.no_grad()
def batch_embeddings(
    model: nn.Module,
    cfg: Config,
    *,
    n_classes: int = 8,
    per_class: int = 4,
    split: str = "train",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Embeddings and labels of one P x K batch of `split` (eval transform), sorted by label."""
    tf = transforms.build_transform(recipe.preprocessing(cfg), train=False)
    ds = recipe.dataset(cfg, split, tf)
    n_classes = min(n_classes, len(np.unique(ds.labels)))
    batch = next(iter(PKSampler(ds.labels, n_classes * per_class, per_class, seed)))
    order = sorted(batch, key=lambda i: (int(ds.labels[i]), i))
    images = torch.stack([ds[i][0] for i in order]).to(next(model.parameters()).device)
    return model.eval()(images).float().cpu(), torch.as_tensor(ds.labels[order])


def batch_similarity(model: nn.Module, cfg: Config, **batch: Any) -> tuple[Tensor, Tensor]:
    """S = X X^T and labels of one P x K batch (`batch_embeddings`' options)."""
    emb, labels = batch_embeddings(model, cfg, **batch)
    return emb @ emb.T, labels


def proxy_params(cfg: Config) -> dict[str, float]:
    """Proxy-Anchor's alpha and margin: the run's own for a proxy run, else the published."""
    params = cfg.loss.params
    own = params if isinstance(params, ProxyAnchorParams) else ProxyAnchorParams()
    return {"alpha": own.alpha, "margin": own.margin}


def run_proxies(run: str | Path | None) -> Tensor | None:
    """The learned proxies (C, D) of a run trained with a proxy loss; None for other runs."""
    if run is None:
        return None
    path = RunFolder.checkpoint_of(run)
    proxies = (ckpt.load_checkpoint(path).get("loss") or {}).get("proxies")
    return proxies.float() if proxies is not None else None
