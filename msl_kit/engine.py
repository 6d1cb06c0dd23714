"""Iteration-based training, evaluation and exact resume. Reports through callbacks; never draws."""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from msl_kit import checkpoint as ckpt
from msl_kit import datasets, distributed, losses, models, transforms
from msl_kit.evaluation import autocast, eval_sets, evaluate, make_loader
from msl_kit.config import Config, save_config, to_dict
from msl_kit.memory import CrossBatchMemory, xbm_step_loss
from msl_kit.sampler import PKSampler


class DivergenceError(RuntimeError):
    """Training produced NaN or inf; the step was stopped before any weight changed."""


class Callback:
    """Hooks the engine calls; subclass and override what you need (progress bars, live plots)."""

    def on_start(self, cfg: Config, start_iteration: int, total: int) -> None: ...
    def on_step(self, record: dict) -> None: ...
    def on_eval(self, iteration: int, results: dict) -> None: ...
    def on_end(self, results: dict) -> None: ...


class TensorBoardLogger(Callback):
    """Writes the loss, learning rate and every evaluation metric as TensorBoard scalars."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

        self.writer = SummaryWriter(str(log_dir))

    def on_step(self, record: dict) -> None:
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["iteration"])

    def on_end(self, results: dict) -> None:
        self.writer.close()


def pick_device(name: str) -> torch.device:
    """`auto` means CUDA when there is one; an unavailable CUDA device is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is cuda but no CUDA GPU is visible; use --set device=cpu")
    return device


def set_threads(cfg: Config) -> None:
    """Leave a core per DataLoader worker: oversubscribing 2 cores slowed training ~10x here."""
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) - cfg.data.workers)
    torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: Config, *, load_pretrained: bool = True) -> nn.Module:
    """The model a config describes, with the convnet's size options where they apply.

    `load_pretrained=False` skips reading `model.pretrained`: for a model whose weights come from
    a checkpoint next, or that is built only for its preprocessing spec.
    """
    m = cfg.model
    options = {}
    if m.backbone == "convnet":
        options = dict(in_channels=m.in_channels, image_size=m.image_size, resize_size=m.resize_size or m.image_size, width=m.width)
    pretrained = m.pretrained if load_pretrained else None
    return models.build_model(m.backbone, m.embedding_dim, pretrained, freeze_bn=m.freeze_bn, **options)


def preprocessing(cfg: Config, model: nn.Module) -> transforms.Preprocessing:
    """The model's preprocessing spec with the config's augmentation overrides applied."""
    spec = model.preprocessing
    if cfg.data.crop_scale is not None:
        spec = dataclasses.replace(spec, crop_scale=tuple(cfg.data.crop_scale))
    if cfg.data.hflip is not None:
        spec = dataclasses.replace(spec, hflip=cfg.data.hflip)
    return spec


def build_loss(cfg: Config) -> nn.Module:
    """The loss a config names. alpha/beta/lam/margin parametrise MS; `loss.margin` is also the
    triplet margin (both are similarity margins); contrastive, binomial and lifted keep their
    own published defaults, which differ from MS's numbers."""
    lc = cfg.loss
    if lc.name == "ms":
        return losses.MultiSimilarityLoss(lc.alpha, lc.beta, lc.lam, lc.margin)
    if lc.name == "triplet":
        return losses.build_loss("triplet", margin=lc.margin)
    return losses.build_loss(lc.name)


class _SeededItems(Dataset):
    """Seeds the augmentation RNG per (batch, slot) so that batches are identical however many
    workers load them and wherever a resumed run starts."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        slot, index = key
        # CPU generator only: torch.manual_seed would also reseed every CUDA device, per image.
        torch.random.default_generator.manual_seed(self.seed * 1_000_003 + slot)
        return self.dataset[index]


class _KeyedBatches:
    def __init__(self, sampler: PKSampler, start: int) -> None:
        self.sampler, self.start = sampler, start

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for n, batch in enumerate(self.sampler, start=self.start):
            yield [(n * len(batch) + pos, i) for pos, i in enumerate(batch)]


def lr_factor(iteration: int, cfg: Config) -> float:
    """Linear warm-up, then x lr_gamma at each of lr_steps (a pure function: resume needs no state)."""
    t = cfg.train
    warm = min(1.0, (iteration + 1) / t.warmup) if t.warmup else 1.0
    return warm * t.lr_gamma ** sum(iteration >= s for s in t.lr_steps)


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam with separate backbone and head groups, so both lr multipliers really take effect."""
    t = cfg.train
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": t.lr * t.backbone_lr_mult, "name": "backbone"},
        {"params": [p for p in model.head.parameters() if p.requires_grad], "lr": t.lr * t.head_lr_mult, "name": "head"},
    ]
    return torch.optim.Adam([g for g in groups if g["params"]], weight_decay=t.weight_decay)


def _write_history(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    ckpt.atomic_write_text(path, buf.getvalue())


def prepare_out_dir(out: Path) -> Path:
    """Create the run folder and prove it is writable before any training time is spent."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to the output folder {out} ({e.strerror}); choose another with --out") from None
    return out


def _check_finite(iteration: int, what: str, value: torch.Tensor, out: Path) -> None:
    if not bool(torch.isfinite(value).all()):
        # Say which checkpoint survives: a run that diverges before its first save has none.
        kept = next((p for p in (out / "checkpoint.pt", out / "checkpoint.prev.pt") if p.exists()), None)
        saved = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint had been written yet"
        raise DivergenceError(
            f"{what} became NaN or inf at iteration {iteration}; the step was stopped before any weight "
            f"changed and {saved}. Try a lower train.lr, train.amp=bf16 instead "
            f"of fp16, or check the input images."
        )


def _load_model_state(model: nn.Module, state: dict, path: Path) -> None:
    """Load a checkpoint's weights, naming the file when they do not fit the configured model."""
    try:
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:400]  # torch's message spans many lines
        raise ckpt.CheckpointError(f"{path} does not fit the model its config describes: {detail}") from None


def train(
    cfg: Config,
    out: str | Path,
    *,
    callbacks: Iterable[Callback] = (),
    resume: bool = False,
    loss_fn: nn.Module | None = None,
) -> dict:
    """Train as `cfg` says, writing config.yaml, history.csv, checkpoint.pt, best.pt, metrics.json.

    With `resume=True`, continue from the last complete checkpoint in `out` with its stored config;
    on the CPU the resumed run ends with exactly the metrics of an uninterrupted one.
    `loss_fn` replaces the configured loss (for comparisons with other libraries).
    """
    dist = distributed.init_distributed()
    main = dist.rank == 0
    out, state, state_path = Path(out), None, None
    if resume:  # before prepare_out_dir, so that a mistyped --resume DIR is not created empty
        state, state_path = ckpt.load_latest(out)
    if main:
        prepare_out_dir(out)
    if resume:
        ckpt.clear_partial_writes(out)
        if main and state_path.name != "checkpoint.pt" and (out / "checkpoint.pt").exists():
            # Set the unreadable file aside: the next save would otherwise keep it as the fallback copy.
            os.replace(out / "checkpoint.pt", out / "checkpoint.corrupt.pt")
        from msl_kit.config import from_dict

        cfg = from_dict(state["config"])
    device = dist.device if dist.world_size > 1 else pick_device(cfg.device)
    set_threads(cfg)
    seed_everything(cfg.seed)
    model = build_model(cfg).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = preprocessing(cfg, model)
    train_set = datasets.build(cfg.data.name, cfg.data.root, "train", transforms.build_transform(spec, train=True),
                               val_fraction=cfg.data.val_fraction, seed=cfg.seed, skip_corrupt=cfg.data.skip_corrupt)
    sets = eval_sets(cfg, spec)
    loss_fn = loss_fn or build_loss(cfg)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16" and device.type == "cuda")
    xbm = CrossBatchMemory(cfg.loss.xbm_size, cfg.loss.xbm_start, cfg.loss.xbm_weight) if cfg.loss.xbm_size else None
    lc = cfg.loss
    ms_on_sim = functools.partial(losses.multi_similarity_loss, alpha=lc.alpha, beta=lc.beta, lam=lc.lam, margin=lc.margin)
    start, history, best = 0, [], {"iteration": 0, "recall@1": -1.0}
    if state is not None:
        _load_model_state(model, state, state_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if xbm is not None:
            xbm.load_state_dict(state["xbm"])
        start, history, best = state["iteration"], state["history"], state["best"]
        ckpt.set_rng_state(state["rng"])
    elif main:
        save_config(cfg, out / "config.yaml")
    net = distributed.wrap_ddp(model, dist)
    total = cfg.train.iterations
    per_rank_batch = cfg.train.batch_size
    sampler = PKSampler(train_set.labels, per_rank_batch, cfg.train.samples_per_class, cfg.seed, iterations=total,
                        start=start, num_replicas=dist.world_size, rank=dist.rank)
    loader = make_loader(_SeededItems(train_set, cfg.seed), cfg, device, batch_sampler=_KeyedBatches(sampler, start),
                         persistent_workers=cfg.data.workers > 0)
    callbacks = list(callbacks)
    if cfg.train.tensorboard and main:
        callbacks.append(TensorBoardLogger(out / "tensorboard"))
    for cb in callbacks:
        cb.on_start(cfg, start, total)

    def snapshot(iteration: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "xbm": xbm.state_dict() if xbm else None, "iteration": iteration,
                "history": history, "best": best, "rng": ckpt.rng_state(), "config": to_dict(cfg)}

    model.train()
    iteration, results, tick = start, {}, time.perf_counter()
    for images, labels, indices in loader:
        images = images.to(device, non_blocking=True)
        if cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels, indices = labels.to(device, non_blocking=True), indices.to(device, non_blocking=True)
        with autocast(cfg, device):
            emb = net(images)
        emb = emb.float()
        _check_finite(iteration + 1, "the embeddings", emb, out)

        def step_loss(e: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return xbm_step_loss(xbm, iteration, loss_fn(e, y), ms_on_sim, e, y, idx)

        if dist.world_size > 1:  # every rank scores the gathered global batch (and keeps the same memory)
            global_loss = distributed.global_batch_loss(step_loss, emb, labels, indices)
            loss, loss_value = global_loss.scaled, global_loss.value
        else:
            loss = step_loss(emb, labels, indices)
            loss_value = loss.detach()
        _check_finite(iteration + 1, "the loss", loss.detach(), out)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if not scaler.is_enabled():  # (fp16's scaler skips non-finite steps itself)
            # One reduction over every gradient: a per-tensor check would sync the GPU ~200 times a step.
            grad_max = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            _check_finite(iteration + 1, "a gradient", grad_max, out)
        lr = optimizer.param_groups[-1]["lr"]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        iteration += 1
        now = time.perf_counter()
        record = {"iteration": iteration, "loss": float(loss_value), "lr": lr,
                  "images_per_s": len(images) / max(now - tick, 1e-9)}
        tick = now
        last = iteration == total
        if cfg.train.eval_every and iteration % cfg.train.eval_every == 0 or last:
            results = evaluate(model, cfg, device, sets)
            record.update(results)
            if main and results["recall@1"] > best["recall@1"]:
                best = {"iteration": iteration, **results}
                ckpt.save_checkpoint(snapshot(iteration), out / "best.pt", keep_previous=False)
            for cb in callbacks:
                cb.on_eval(iteration, results)
        if iteration % cfg.train.log_every == 0 or "recall@1" in record or last:
            history.append(record)
            if main:
                _write_history(out / "history.csv", history)
        for cb in callbacks:
            cb.on_step(record)
        if main and (cfg.train.checkpoint_every and iteration % cfg.train.checkpoint_every == 0 or last):
            ckpt.save_checkpoint(snapshot(iteration), out / "checkpoint.pt")
    if not results:  # resumed after the last iteration had already finished
        results = evaluate(model, cfg, device, sets)
    final = {**results, "iteration": iteration, "split": cfg.eval.split, "best": best}
    if main:
        ckpt.atomic_write_text(out / "metrics.json", json.dumps(final, indent=2) + "\n")
    for cb in callbacks:
        cb.on_end(final)
    return final


def evaluate_checkpoint(path: str | Path, *, split: str | None = None, device: str | None = None) -> tuple[dict, Config]:
    """Load a checkpoint (safely) with its stored config and evaluate it."""
    from msl_kit.config import from_dict

    state = ckpt.load_checkpoint(Path(path))
    cfg = from_dict(state["config"])
    if split:
        cfg.eval.split = split
    if device:
        cfg.device = device
    dev = pick_device(cfg.device)
    set_threads(cfg)
    model = build_model(cfg, load_pretrained=False)
    _load_model_state(model, state, Path(path))
    model.to(dev)
    return evaluate(model, cfg, dev, eval_sets(cfg, preprocessing(cfg, model))), cfg
