"""One run's state and phases: model, data, loss, optimizer; step, evaluate, log, save.

`msl_kit.engine.train` drives a `Trainer`; this module holds what a step needs (seeded data
order, finite checks, mining statistics, snapshots) so the loop itself reads on one screen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from msl_kit.errors import MslKitError
from msl_kit.files.atomic import atomic_write_text
from msl_kit.losses.memory import CrossBatchMemory, xbm_step_loss
from msl_kit.losses.mining import mining_stats
from msl_kit.losses.registry import loss_spec
from msl_kit.models.weights import uses_weights
from msl_kit.train import checkpoint as ckpt
from msl_kit.train import distributed, evaluation, recipe, rundir
from msl_kit.train.config import Config, config_text, to_dict
from msl_kit.train.prefix_cache.run import FrozenPrefix
from msl_kit.train.rundir import RunFolder
from msl_kit.train.validation import check_ranks


class DivergenceError(MslKitError, RuntimeError):
    """Training produced NaN or inf; the step was stopped before any weight changed."""


class Callback:
    """Hooks the engine calls; subclass and override what you need (progress bars, live plots)."""

    def on_start(self, cfg: Config, start_iteration: int, total: int) -> None: ...
    def on_step(self, record: dict) -> None: ...
    def on_eval(self, iteration: int, results: dict) -> None: ...
    def on_end(self, results: dict) -> None: ...


class TensorBoardLogger(Callback):
    """Writes the loss, learning rate, mining statistics and metrics as TensorBoard scalars."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional tensorboard package

        self.writer = SummaryWriter(str(log_dir))

    def on_step(self, record: dict) -> None:
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["iteration"])

    def on_end(self, results: dict) -> None:
        self.writer.close()


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
    def __init__(self, sampler: Sampler[list[int]], start: int) -> None:
        self.sampler, self.start = sampler, start

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for n, batch in enumerate(self.sampler, start=self.start):
            yield [(n * len(batch) + pos, i) for pos, i in enumerate(batch)]


def _check_finite(iteration: int, what: str, value: torch.Tensor, out: Path) -> None:
    if not bool(torch.isfinite(value).all()):
        # Say which checkpoint survives: a run that diverges before its first save has none.
        kept = next((p for p in RunFolder(out).checkpoints() if p.exists()), None)
        saved = (
            f"the last good checkpoint {kept} is kept"
            if kept
            else "no checkpoint had been written yet"
        )
        raise DivergenceError(
            f"{what} became NaN or inf at iteration {iteration}; the step was stopped before any "
            f"weight changed and {saved}. Try a lower train.lr, train.amp=bf16 instead of fp16, "
            "or check the input images."
        )


class Trainer:
    """Everything one run holds: model, data, loss, optimizer, state; one method per phase."""

    def __init__(
        self,
        cfg: Config,
        out: Path,
        dist: distributed.DistInfo,
        *,
        loss_fn: nn.Module | None = None,
        state: dict | None = None,
        state_path: Path | None = None,
        overrides: list[str] | None = None,
    ) -> None:
        self.cfg, self.out, self.dist, self.main = cfg, out, dist, dist.rank == 0
        self.run = RunFolder(out)
        self.device = dist.device if dist.world_size > 1 else recipe.pick_device(cfg.device)
        recipe.seed_everything(cfg.seed)
        self.model = recipe.build_model(cfg, load_pretrained=state is None).to(self.device)
        spec = recipe.preprocessing(cfg)
        self.eval_data = recipe.eval_data(cfg, spec)
        check_ranks(cfg, evaluation.max_rank(*self.eval_data))
        train_set = recipe.train_data(cfg, spec)
        # Built before anything is written: a batch the data cannot fill (data.val_fraction left
        # too few classes) is refused while the run folder is still empty, so the same --out
        # works once the config is fixed. PKSampler draws no random numbers here.
        sampler = recipe.build_sampler(
            cfg,
            train_set.labels,
            start=state["iteration"] if state is not None else 0,
            num_replicas=dist.world_size,
            rank=dist.rank,
        )
        # cache.prefix: the prefix is frozen before the optimizer collects the parameters
        self.prefix = None
        if cfg.cache.prefix:  # (a cache too large for the disk is refused before any write)
            sets = (train_set, *self.eval_data)
            self.prefix = FrozenPrefix.attach(cfg, self.model, self.device, dist.world_size, sets)
        spec = loss_spec(cfg.loss.name)
        classes = recipe.num_classes(train_set) if spec.needs_classes else None
        self.loss_fn = (loss_fn or recipe.build_loss(cfg, classes)).to(self.device)
        self.optimizer = recipe.build_optimizer(self.model, cfg, self.loss_fn)
        self.scheduler = recipe.build_schedule(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=cfg.train.amp == "fp16" and self.device.type == "cuda"
        )
        lc = cfg.loss
        self.xbm = (
            CrossBatchMemory(lc.xbm_size, lc.xbm_start, lc.xbm_weight) if lc.xbm_size else None
        )
        self.ms = recipe.ms_params(cfg)  # what the MS mining statistics of each log use
        # XBM scores anchors against the memory with the configured pair loss's own from_sim
        self.memory_loss = getattr(self.loss_fn, "from_sim", None) if self.xbm is not None else None
        self.iteration, self.history, self.results = 0, [], {}
        self.best: dict = {"iteration": 0, "recall@1": -1.0}
        self.floors: dict = {}
        self.resumes: list[dict] = []
        if state is not None:
            self._restore(state, state_path, overrides or [])
        else:
            if self.main:
                rundir.write_config(out, config_text(cfg))
            if cfg.eval.floors:
                self.floors = self._floors()
            self._snapshot_weights()
        self.net, self.loader = self._batches(train_set, sampler)
        self.model.train()
        self.tick = time.perf_counter()

    def _batches(self, train_set: Dataset, sampler: Sampler) -> tuple[nn.Module, Iterable]:
        """What a step calls and the batches it gets: the tail on cached activations where
        `cache.views` is set (built first where missing), else the network on images."""
        if self.prefix is not None and self.prefix.cached:
            batches = self.prefix.batches(train_set, sampler, self.iteration, self.device)
            return self.prefix.net(self.model), batches
        loader = DataLoader(
            _SeededItems(train_set, self.cfg.seed),
            batch_sampler=_KeyedBatches(sampler, self.iteration),
            num_workers=self.cfg.data.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.cfg.data.workers > 0,
        )
        return distributed.wrap_ddp(self.model, self.dist), loader

    def _restore(self, state: dict, path: Path, overrides: list[str]) -> None:
        ckpt.load_model_state(self.model, state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if state.get("loss"):  # the proxies (checkpoints of parameter-free losses hold {})
            self.loss_fn.load_state_dict(state["loss"])
        if self.xbm is not None:
            self.xbm.load_state_dict(state["xbm"])
        self.iteration, self.history, self.best = (
            state["iteration"],
            state["history"],
            state["best"],
        )
        self.floors, self.resumes = state.get("floors", {}), list(state.get("resumes", []))
        ckpt.set_rng_state(state["rng"])
        ckpt.clear_partial_writes(self.out)
        run = self.run
        if self.main and path != run.checkpoint and run.checkpoint.exists():
            # Set the unreadable file aside: the next save would keep it as the fallback copy.
            run.checkpoint.replace(run / run.CORRUPT)
        if overrides:
            record = {
                "iteration": self.iteration,
                "overrides": overrides,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            self.resumes.append(record)
            if self.main:  # config.yaml shows what the run now does; the change is in metrics.json
                # recorded before config.yaml changes: a crash before the next checkpoint loses
                # neither (engine.resumed_config replays it)
                rundir.write_config(self.out, config_text(self.cfg), extension=record)
        elif self.main:  # an extension replayed after a crash: config.yaml shows what runs now
            shown = self.run.config
            if not shown.is_file() or shown.read_text() != config_text(self.cfg):
                rundir.write_config(self.out, config_text(self.cfg))

    def _floors(self) -> dict:
        """Raw pixels, the untrained network and, with pretrained weights, the backbone as
        loaded (its pooled features, no head) on the evaluation data: what training must beat.
        `eval.floors` as a list keeps only the floors it names."""
        cfg = self.cfg
        ks, opts, data = cfg.eval.ks, recipe.eval_options(cfg), self.eval_data
        wanted = cfg.eval.floors if isinstance(cfg.eval.floors, list) else evaluation.FLOORS
        floors = {}
        if "raw_pixels" in wanted:
            floors["raw_pixels"] = evaluation.pixel_baseline(*data, ks, opts)
        if "backbone" in wanted and uses_weights(cfg.model.pretrained):
            floors["backbone"] = self.score(backbone_only=True)
        if "untrained" in wanted:
            floors["untrained"] = self.score()
        return floors

    def score(self, backbone_only: bool = False) -> dict:
        """The metrics of the model now (or of its backbone's pooled features) on the eval data;
        from the cached eval activations where the prefix is cached."""
        opts, ks = recipe.eval_options(self.cfg), self.cfg.eval.ks
        if self.prefix is not None and self.prefix.cached:
            embed = self.prefix.embedder(self.model, self.device, opts, backbone_only)
            return evaluation.score(embed, *self.eval_data, ks, opts)
        return evaluation.evaluate(
            self.model, *self.eval_data, self.device, ks, opts, backbone_only=backbone_only
        )

    def callbacks(self, given: Iterable[Callback]) -> list[Callback]:
        """The given callbacks (rank 0 only reports), plus TensorBoard when configured."""
        board = self.run / self.run.TENSORBOARD
        extra = [TensorBoardLogger(board)] if self.cfg.train.tensorboard else []
        return [*given, *extra] if self.main else []

    @property
    def finished(self) -> bool:
        return self.iteration >= self.cfg.train.iterations

    def due(self, every: int) -> bool:
        """Whether an every-N action falls on this iteration (always at the last one)."""
        return bool(every) and self.iteration % every == 0 or self.finished

    def step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict:
        """One optimisation step; returns the history record (loss, lr, mining statistics)."""
        cfg, device = self.cfg, self.device
        images = images.to(device, non_blocking=True)
        if cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels, indices = (
            labels.to(device, non_blocking=True),
            indices.to(device, non_blocking=True),
        )
        with evaluation.autocast(cfg.train.amp, device):
            emb = self.net(images)
        emb = emb.float()
        n = self.iteration + 1
        _check_finite(n, "the embeddings", emb, self.out)
        loss, loss_value = self._loss(emb, labels, indices)
        _check_finite(n, "the loss", loss.detach(), self.out)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._adjust_grads()
        if not self.scaler.is_enabled():  # (fp16's scaler skips non-finite steps itself)
            # One reduction over every gradient: a per-tensor check would sync the GPU ~200 times.
            grad_max = torch.nn.utils.clip_grad_norm_(self._params(), float("inf"))
            _check_finite(n, "a gradient", grad_max, self.out)
        lrs = {g.get("name"): g["lr"] for g in self.optimizer.param_groups}
        lr = [v for k, v in lrs.items() if k != "loss"][-1]  # the head's (or last model group's)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration = n
        record = {"iteration": n, "loss": float(loss_value), "lr": lr}
        if "loss" in lrs:
            record["lr_loss"] = lrs["loss"]  # the proxies' group: lr x loss.proxy_lr_mult
        if n % cfg.train.log_every == 0 or self.finished:
            # Mining statistics of this very batch: no second forward, one B x B product.
            record.update(self._mining(emb.detach(), labels))
        return record

    def _params(self) -> list[nn.Parameter]:
        """Every trained parameter: the model's and the loss's (Proxy-Anchor's proxies)."""
        return [*self.model.parameters(), *self.loss_fn.parameters()]

    def _adjust_grads(self) -> None:
        """Warm-up freezing, the DDP scale of loss parameters, clipping; before the step."""
        t = self.cfg.train
        if self.iteration < t.warmup_frozen:
            # Proxy-Anchor's warm-up trains only the head and the proxies. A None gradient makes
            # Adam / AdamW skip a parameter (no moment, no decay), as requires_grad=False does in
            # the release; the backward still runs through the backbone, so DDP's reducer sees
            # every parameter it expects (it cannot change which ones mid-run).
            for p in self.model.backbone.parameters():
                p.grad = None
        if self.dist.world_size > 1:
            # Every rank computes the whole global loss, scaled by N for DDP's mean (see
            # distributed.global_batch_loss); the loss's parameters are outside DDP, so their
            # gradient is N times the full one, the same on every rank: undo the N.
            for p in self.loss_fn.parameters():
                if p.grad is not None:
                    p.grad.div_(self.dist.world_size)
        if t.grad_clip_value or t.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)  # clip true gradients (no-op without fp16)
            if t.grad_clip_value:
                torch.nn.utils.clip_grad_value_(self._params(), t.grad_clip_value)
            if t.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(self._params(), t.grad_clip_norm)

    def _loss(
        self, emb: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def step_loss(e: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return xbm_step_loss(
                self.xbm, self.iteration, self.loss_fn(e, y), self.memory_loss, e, y, idx
            )

        if self.dist.world_size > 1:  # every rank scores the gathered global batch
            global_loss = distributed.global_batch_loss(step_loss, emb, labels, indices)
            return global_loss.scaled, global_loss.value
        loss = step_loss(emb, labels, indices)
        return loss, loss.detach()

    def _mining(self, emb: torch.Tensor, labels: torch.Tensor) -> dict:
        return mining_stats(emb @ emb.T, labels, self.ms)

    def evaluate(self) -> dict:
        """Metrics of the current model; keeps best.pt for the best R@1 so far."""
        self.results = self.score()
        self._snapshot_weights()
        if self.main and self.results["recall@1"] > self.best["recall@1"]:
            self.best = {"iteration": self.iteration, **self.results}
            ckpt.save_checkpoint(self.snapshot(), self.run.best, keep_previous=False)
        return self.results

    def log(self, record: dict) -> None:
        """Append `record` to history.csv when it is due (every log_every, and evaluations)."""
        now = time.perf_counter()
        if self.iteration % self.cfg.train.log_every == 0 or "recall@1" in record or self.finished:
            self.history.append(dict(record))  # no timings: same seed, same bytes
            if self.main:
                rundir.write_history(self.run.history, self.history)
        record["images_per_s"] = self.cfg.train.batch_size / max(now - self.tick, 1e-9)
        self.tick = now

    def snapshot(self) -> dict:
        """Everything exact resume needs, in types that weights-only loading accepts."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "xbm": self.xbm.state_dict() if self.xbm is not None else None,
            "loss": self.loss_fn.state_dict(),  # the proxies of a proxy loss
            "iteration": self.iteration,
            "history": self.history,
            "best": self.best,
            "floors": self.floors,
            "resumes": self.resumes,
            "rng": ckpt.rng_state(),
            "config": to_dict(self.cfg),
        }

    def _snapshot_weights(self) -> None:
        """snapshots/iter_NNNNNN.pt: the weights (and config) at this point of training, so a
        notebook can show how the same batch looked to the model as it learned."""
        if self.main and self.cfg.train.keep_snapshots:
            path = self.run.snapshot(self.iteration)
            path.parent.mkdir(exist_ok=True)
            state = {
                "model": self.model.state_dict(),
                "config": to_dict(self.cfg),
                "iteration": self.iteration,
                **({"metrics": self.results} if self.results else {}),
            }
            ckpt.save_checkpoint(state, path, keep_previous=False)

    def save(self) -> None:
        """Write checkpoint.pt atomically (the one it replaces stays as checkpoint.prev.pt)."""
        if self.main:
            ckpt.save_checkpoint(self.snapshot(), self.run.checkpoint)

    def finish(self) -> dict:
        """Final metrics (evaluated now if the last iteration was already done) -> metrics.json."""
        if not self.results:
            self.evaluate()
        final = {
            **self.results,
            "iteration": self.iteration,
            "split": self.cfg.eval.split,
            "metric": self.cfg.eval.metric,  # how the numbers were counted: name it in tables
            "lone_queries": self.cfg.eval.lone_queries,
            "best": self.best,
            "floors": self.floors,
        }
        if self.resumes:
            final["resumes"] = self.resumes
        if self.main:
            atomic_write_text(self.run.metrics, json.dumps(final, indent=2) + "\n")
        return final
