"""Validation of every config value at load time, before any data is read.

Each failure is one `ConfigError` line naming the key, the value and what is allowed, so a
bad value never surfaces as a traceback (or a silently wrong run) deep inside training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from msl_kit.datasets.registry import info
from msl_kit.losses.registry import LOSSES, loss_spec
from msl_kit.models.builder import preprocessing_spec
from msl_kit.models.head import HEAD_INITS
from msl_kit.models.packaged import check_backbone, is_packaged
from msl_kit.models.registry import backbone_spec
from msl_kit.models.timm import GLOBAL_POOLS, HUB
from msl_kit.preprocessing import CROP_MODES
from msl_kit.train.evaluation import FLOORS

if TYPE_CHECKING:
    from msl_kit.train.config import Config


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message says how to fix it."""

    def __init__(self, message: str) -> None:
        # One line of readable length however large the value a file or --set gave (a 3 MB
        # YAML value would otherwise be repeated whole in the message): long words are cut,
        # then the line (the list of valid keys alone is ~1,200 characters).
        words = [w if len(w) <= 160 else f"{w[:120]}...{w[-20:]}" for w in str(message).split()]
        line = " ".join(words)
        super().__init__(line if len(line) <= 2000 else f"{line[:1800]} ... {line[-150:]}")


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `ConfigError("key = value is not allowed: allowed")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")


def choice(key: str, value: Any, options: Iterable[Any]) -> None:
    """`value` must be one of `options`."""
    options = list(options)
    check(value in options, key, value, f"use one of {', '.join(map(str, options))}")


def validate(cfg: Config) -> None:
    """Check every value of `cfg`; each failure names the key and the allowed range."""
    _check_finite(cfg)
    check(0 <= cfg.seed < 2**32, "seed", cfg.seed, "use an integer in [0, 2**32)")
    _check_data(cfg)
    _check_model(cfg)
    _check_loss(cfg)
    _check_train(cfg)
    _check_eval(cfg)
    _check_cache(cfg)
    _check_device(cfg.device)


def _check_finite(cfg: Config) -> None:
    """No NaN or inf in any float key: a NaN passes every range check written as `not (x < lo)`
    and slips through `min()`; inf would train silently (loss.alpha) or diverge (train.lr)."""
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(part):
            continue
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            values = value if isinstance(value, list) else [value]
            finite = all(math.isfinite(v) for v in values if isinstance(v, float))
            check(finite, f"{section.name}.{f.name}", value, "use a finite number")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    try:
        info(d.name)
    except ValueError as e:
        raise ConfigError(f"data.name = {d.name!r}: {e}") from None
    check(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "use 0 <= value < 1")
    check(d.workers >= 0, "data.workers", d.workers, "use 0 or more worker processes")
    scale_ok = d.crop_scale is None or (
        len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1
    )
    check(scale_ok, "data.crop_scale", d.crop_scale, "use 0 < low <= high <= 1, like [0.16, 1.0]")
    choice("data.crop_mode", d.crop_mode, [None, *CROP_MODES])


def _check_model(cfg: Config) -> None:
    m = cfg.model
    try:
        spec = backbone_spec(m.backbone)
    except (ValueError, ImportError) as e:  # a timm name timm lacks lists the close ones
        raise ConfigError(f"model.backbone = {m.backbone!r}: {e}") from None
    check(m.embedding_dim >= 2, "model.embedding_dim", m.embedding_dim, "use 2 or more")
    check(m.image_size >= 8, "model.image_size", m.image_size, "use 8 px or more")
    check(m.resize_size >= 0, "model.resize_size", m.resize_size, "use 0 (= image_size) or more")
    choice("model.in_channels", m.in_channels, [1, 3])
    check(m.width >= 1, "model.width", m.width, "use 1 or more")
    choice("model.head_init", m.head_init, HEAD_INITS)
    check(
        not m.freeze_bn_affine or m.freeze_bn,
        "model.freeze_bn_affine",
        m.freeze_bn_affine,
        "it goes with model.freeze_bn=true (running statistics fixed too, as Proxy-Anchor's "
        "--bn-freeze)",
    )
    check(all(m.freeze_modules), "model.freeze_modules", m.freeze_modules, "name modules")
    _check_pretrained(m.backbone, m.pretrained, spec.takes_pretrained)
    _check_timm_options(cfg, spec.options)


def _check_pretrained(backbone: str, pretrained: str | None, own_download: bool) -> None:
    """`hub` only where the backbone downloads its own weights, `default` only where not."""
    word = "default" if own_download else HUB
    allowed = (
        "use hub (timm's own download), a weights file path, or none"
        if own_download
        else "use default (the published file's cache path), a weights file path, or none"
    )
    message = f"{backbone} takes no {word}: {allowed}"
    check(pretrained != word, "model.pretrained", pretrained, message)
    if is_packaged(pretrained):  # efficientnet_lite0 weights go with their timm model only
        try:
            check_backbone(backbone, pretrained)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_timm_options(cfg: Config, options: tuple[str, ...]) -> None:
    """global_pool and input_size only for the backbones that take them; sizes that fit."""
    m = cfg.model
    for key, unset in (("global_pool", None), ("input_size", 0)):
        value = getattr(m, key)
        check(
            value == unset or key in options,
            f"model.{key}",
            value,
            f"only timm backbones take it; {m.backbone} has none",
        )
    choice("model.global_pool", m.global_pool, [None, *GLOBAL_POOLS])
    check(m.input_size >= 0, "model.input_size", m.input_size, "use 0 (timm's own) or 16 or more")
    check(m.input_size == 0 or m.input_size >= 16, "model.input_size", m.input_size, "use 16+")
    if "input_size" in options and (m.input_size or m.resize_size):
        try:  # resize_size below the input size: timm_preprocessing says so in one line
            preprocessing_spec(m.backbone, input_size=m.input_size, resize_size=m.resize_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_loss(cfg: Config) -> None:
    lo = cfg.loss
    choice("loss.name", lo.name, LOSSES)
    spec = loss_spec(lo.name)
    choice("loss.mining", lo.mining, [None, "ms", "none"])
    takes_mining = [name for name, s in LOSSES.items() if s.mining]
    check(
        lo.mining is None or spec.mining,
        "loss.mining",
        lo.mining,
        f"loss.name={lo.name} has no MS mining option; it is for {', '.join(takes_mining)}",
    )
    check(lo.alpha > 0, "loss.alpha", lo.alpha, "use a value > 0 (released recipe: 2)")
    check(0 < lo.beta <= 1000, "loss.beta", lo.beta, "use 0 < value <= 1000 (released: 40)")
    check(-1 <= lo.lam <= 1, "loss.lam", lo.lam, "similarities lie in [-1, 1]: use a value there")
    check(0 <= lo.margin < 2, "loss.margin", lo.margin, "use 0 <= value < 2 (released: 0.1)")
    xbm = (lo.xbm_size, lo.xbm_start, lo.xbm_weight)
    check(min(xbm) >= 0, "loss.xbm_size/start/weight", xbm, "use values >= 0")
    check(
        not lo.xbm_size or spec.pairs,
        "loss.xbm_size",
        lo.xbm_size,
        f"cross-batch memory scores batch-to-memory pairs, but loss.name={lo.name} scores "
        "samples against its learned proxies, not pairs: use loss.xbm_size=0",
    )
    check(
        0 <= lo.proxy_lr_mult <= 1e4,
        "loss.proxy_lr_mult",
        lo.proxy_lr_mult,
        "use 0 <= value <= 10000 (Proxy-Anchor's release: 100)",
    )


def _check_train(cfg: Config) -> None:
    t = cfg.train
    k = t.samples_per_class
    check(t.iterations >= 1, "train.iterations", t.iterations, "use 1 or more")
    choice("train.sampler", t.sampler, ["pk", "random"])
    if t.sampler == "pk":
        check(
            k >= 2,
            "train.samples_per_class",
            k,
            "pair losses need 2 or more images per class in a batch (released recipe: 5)",
        )
        check(
            t.batch_size >= 2 * k and t.batch_size % k == 0,
            "train.batch_size",
            t.batch_size,
            f"use a multiple of train.samples_per_class ({k}) holding 2 or more classes",
        )
    check(t.batch_size >= 2, "train.batch_size", t.batch_size, "use 2 or more")
    check(t.lr > 0, "train.lr", t.lr, "use a learning rate > 0 (released recipe: 3e-5)")
    check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "use 0 or more")
    check(0 < t.lr_gamma <= 1, "train.lr_gamma", t.lr_gamma, "use 0 < value <= 1")
    check(all(s >= 1 for s in t.lr_steps), "train.lr_steps", t.lr_steps, "use iterations >= 1")
    check(t.warmup >= 0, "train.warmup", t.warmup, "use 0 (none) or more iterations")
    check(
        0 <= t.warmup_frozen <= t.iterations,
        "train.warmup_frozen",
        t.warmup_frozen,
        f"use 0 (off) to train.iterations ({t.iterations}) iterations with the backbone frozen",
    )
    choice("train.optimizer", t.optimizer, ["adam", "adamw"])
    for key, value in (
        ("grad_clip_value", t.grad_clip_value),
        ("grad_clip_norm", t.grad_clip_norm),
    ):
        check(value >= 0, f"train.{key}", value, "use 0 (off) or a positive threshold, e.g. 10")
    mults = (t.backbone_lr_mult, t.head_lr_mult)
    check(min(mults) >= 0, "train.backbone_lr_mult/head_lr_mult", mults, "use values >= 0")
    choice("train.class_draw", t.class_draw, ["uniform", "released"])
    check(t.eval_every >= 0, "train.eval_every", t.eval_every, "use 0 (end only) or more")
    check(
        t.checkpoint_every >= 0,
        "train.checkpoint_every",
        t.checkpoint_every,
        "use 0 (end only) or more",
    )
    check(t.log_every >= 1, "train.log_every", t.log_every, "use 1 or more iterations")
    choice("train.amp", t.amp, ["none", "bf16", "fp16"])
    check(t.threads >= 0, "train.threads", t.threads, "use 0 (automatic) or more")


def _check_eval(cfg: Config) -> None:
    e = cfg.eval
    choice("eval.split", e.split, ["test", "val"])
    check(
        e.split != "val" or cfg.data.val_fraction > 0,
        "eval.split",
        e.split,
        "val needs data.val_fraction > 0 (e.g. --set data.val_fraction=0.2)",
    )
    check(bool(e.ks) and min(e.ks) >= 1, "eval.ks", e.ks, "use ranks >= 1, like [1, 2]")
    check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "use 1 or more")
    choice("eval.metric", e.metric, ["ip", "euclidean"])
    choice("eval.lone_queries", e.lone_queries, ["miss", "skip"])
    if isinstance(e.floors, list):
        for name in e.floors:
            choice("eval.floors", name, FLOORS)


def _check_cache(cfg: Config) -> None:
    c = cfg.cache
    check(c.views >= 0, "cache.views", c.views, "use 0 (no cache) or more views per image")
    check(
        not c.views or c.prefix,
        "cache.views",
        c.views,
        "the cache holds the frozen prefix's output: name its last module in cache.prefix",
    )
    check(0 <= c.view_seed < 2**32, "cache.view_seed", c.view_seed, "use 0 <= value < 2**32")
    choice("cache.dtype", c.dtype, ["float32", "float16"])
    check(c.max_gb > 0, "cache.max_gb", c.max_gb, "use a size in GB > 0")


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device("cuda" if name == "auto" else name)
    except RuntimeError:
        raise ConfigError(
            f"device = {name!r} is not allowed: use cpu, cuda, cuda:N or auto"
        ) from None
    if name == "auto" or device.type == "cpu":
        return
    check(device.type == "cuda", "device", name, "use cpu, cuda, cuda:N or auto")
    count = torch.cuda.device_count()
    check(
        count > (device.index or 0),
        "device",
        name,
        f"this machine sees {count} CUDA GPU(s): use --set device=cpu (or auto)",
    )
