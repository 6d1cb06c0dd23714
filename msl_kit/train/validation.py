"""Validation of every config value at load time, before any data is read.

Each failure is one `ConfigError` line naming the key, the value and what is allowed, so a
bad value never surfaces as a traceback (or a silently wrong run) deep inside training. The
range of a single key is declared with the key (`msl_kit.params.param`: the config's
dataclasses, each loss's and backbone's params); what is checked here is what spans keys or
needs a registry: a batch that P x K can fill, a loss that takes MS mining, the device.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from msl_kit.datasets.registry import info
from msl_kit.errors import MslKitError
from msl_kit.losses.registry import LOSSES, loss_spec
from msl_kit.models.builder import check_pretrained, preprocessing_spec
from msl_kit.models.registry import backbone_section, backbone_spec
from msl_kit.params import ParamError, check_value, declared, short
from msl_kit.train.evaluation import FLOORS

if TYPE_CHECKING:
    from msl_kit.train.config import Config


class ConfigError(MslKitError, ValueError):
    """A config file or override that cannot be applied; the message says how to fix it."""

    def __init__(self, message: str) -> None:
        # One line of readable length however large the value a file or --set gave (a 3 MB
        # YAML value would otherwise be repeated whole in the message): long words are cut,
        # then the line (the list of valid keys alone is ~1,200 characters). Values are put
        # in messages through `short`, so no message is ever built from a whole huge value.
        words = [w if len(w) <= 160 else f"{w[:120]}...{w[-20:]}" for w in str(message).split()]
        line = " ".join(words)
        super().__init__(line if len(line) <= 2000 else f"{line[:1800]} ... {line[-150:]}")


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `ConfigError("key = value is not allowed: allowed")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} = {short(value)} is not allowed: {allowed}")


def choice(key: str, value: Any, options: Iterable[Any]) -> None:
    """`value` must be one of `options`."""
    options = list(options)
    check(value in options, key, value, f"use one of {', '.join(map(str, options))}")


def check_names(cfg: Config) -> None:
    """The loss and the backbone a config names are registered."""
    choice("loss.name", cfg.loss.name, LOSSES)
    try:
        backbone_spec(cfg.model.backbone)
    except (ValueError, ImportError) as e:  # a timm name timm lacks lists the close ones
        raise ConfigError(f"model.backbone = {short(cfg.model.backbone)}: {e}") from None


def check_plugins(cfg: Config, what: str) -> None:
    """A stored config whose loss, backbone or dataset only a plugin registers, where that
    plugin is not imported: one line naming the `--plugin` to pass (nothing is imported)."""
    missing = [p for p in cfg.plugins if p not in sys.modules]
    if not missing:
        return
    registered = (
        cfg.loss.name in LOSSES,
        _backbone_known(cfg.model.backbone),
        _dataset_known(cfg.data.name),
    )
    if not all(registered):
        raise ConfigError(
            f"{what} was trained with plugin {missing[0]!r}; pass --plugin {missing[0]} to import "
            f"it (in Python: plugins=[{missing[0]!r}]); a checkpoint never imports code by itself"
        )


def _dataset_known(name: str) -> bool:
    try:
        info(name)
    except ValueError:
        return False
    return True


def _backbone_known(name: str) -> bool:
    try:
        backbone_spec(name)
    except (ValueError, ImportError):
        return False
    return True


def validate(cfg: Config) -> None:
    """Check every value of `cfg`; each failure names the key and the allowed range."""
    _check_declared(cfg)
    _check_data(cfg)
    _check_model(cfg)
    _check_loss(cfg)
    _check_train(cfg)
    _check_eval(cfg)
    _check_cache(cfg)
    try:
        check_device(cfg.device)
    except DeviceError as e:
        raise ConfigError(
            f"device = {short(cfg.device)} is not allowed: {e}; set device=cpu (or auto)"
        ) from None


def _check_declared(cfg: Config) -> None:
    """Every declared key in its range, no NaN or inf in any float (a NaN passes every range
    check written as `not (x < lo)`); the components' values against their declarations."""
    try:
        _declared_section("", cfg)
        for f in dataclasses.fields(cfg):
            part = getattr(cfg, f.name)
            if dataclasses.is_dataclass(part):
                _declared_section(f"{f.name}.", part)
        for section, name, params in (
            ("loss", cfg.loss.name, LOSSES[cfg.loss.name].params),
            (
                "model",
                backbone_section(cfg.model.backbone),
                backbone_spec(cfg.model.backbone).params,
            ),
        ):
            held = getattr(cfg, section).params
            if (params is None) != (held is None) or (params and type(held) is not params):
                raise ConfigError(
                    f"{section}.params holds another component's values than {section} names "
                    f"({name}): change the component with load_config, not by assignment"
                )
            if held is not None:
                _declared_section(f"{section}.{name}.", held)
    except ParamError as e:
        raise ConfigError(str(e)) from None


def _declared_section(prefix: str, part: Any) -> None:
    for name, (annotation, meta) in declared(type(part)).items():
        value = getattr(part, name)
        if name != "params" and not dataclasses.is_dataclass(value):
            check_value(f"{prefix}{name}", value, annotation, meta)


def _check_data(cfg: Config) -> None:
    d = cfg.data
    try:
        info(d.name)
    except ValueError as e:
        raise ConfigError(f"data.name = {short(d.name)}: {e}") from None
    scale_ok = d.crop_scale is None or (
        len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1
    )
    check(scale_ok, "data.crop_scale", d.crop_scale, "use 0 < low <= high <= 1, like [0.16, 1.0]")


def _check_model(cfg: Config) -> None:
    m = cfg.model
    check(
        not m.freeze_bn_affine or m.freeze_bn,
        "model.freeze_bn_affine",
        m.freeze_bn_affine,
        "it goes with model.freeze_bn=true (running statistics fixed too, as Proxy-Anchor's "
        "--bn-freeze)",
    )
    check(all(m.freeze_modules), "model.freeze_modules", m.freeze_modules, "name modules")
    try:
        check_pretrained(m.backbone, m.pretrained)
        # the backbone's own checks across its options (timm: a resize below the input size)
        options = dataclasses.asdict(m.params) if m.params is not None else {}
        preprocessing_spec(m.backbone, **options)
    except ParamError as e:
        raise ConfigError(str(e)) from None


def _check_loss(cfg: Config) -> None:
    lo = cfg.loss
    spec = loss_spec(lo.name)
    takes_mining = [name for name, s in LOSSES.items() if s.mining]
    check(
        lo.mining is None or spec.mining,
        "loss.mining",
        lo.mining,
        f"loss.name={lo.name} has no MS mining option; it is for {', '.join(takes_mining)}",
    )
    check(
        not lo.xbm_size or spec.pairs,
        "loss.xbm_size",
        lo.xbm_size,
        f"cross-batch memory scores batch-to-memory pairs, but loss.name={lo.name} scores "
        "samples against its learned proxies, not pairs: use loss.xbm_size=0",
    )


def _check_train(cfg: Config) -> None:
    t = cfg.train
    k = t.samples_per_class
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
    check(
        t.warmup_frozen <= t.iterations,
        "train.warmup_frozen",
        t.warmup_frozen,
        f"use 0 (off) to train.iterations ({t.iterations}) iterations with the backbone frozen",
    )


def _check_eval(cfg: Config) -> None:
    e = cfg.eval
    check(
        e.split != "val" or cfg.data.val_fraction > 0,
        "eval.split",
        e.split,
        "val needs data.val_fraction > 0 (e.g. --set data.val_fraction=0.2)",
    )
    check(bool(e.ks), "eval.ks", e.ks, "use ranks >= 1, like [1, 2]")
    if isinstance(e.floors, list):
        for name in e.floors:
            choice("eval.floors", name, FLOORS)


def _check_cache(cfg: Config) -> None:
    c = cfg.cache
    check(
        not c.views or bool(c.prefix),
        "cache.views",
        c.views,
        "the cache holds the frozen prefix's output: name its last module in cache.prefix",
    )


def check_ranks(cfg: Config, top: int) -> None:
    """eval.ks must fit the evaluation split, whose queries rank at most `top` items."""
    if max(cfg.eval.ks) > top:
        raise ConfigError(
            f"eval.ks = {cfg.eval.ks} is not allowed: the {cfg.eval.split} split "
            f"of {cfg.data.name} ranks at most {top} items; use ks <= {top}"
        )


class DeviceError(MslKitError, ValueError):
    """A device this machine does not have (or no device at all); says which it has."""


def check_device(name: str) -> str:
    """`name` if this machine can run on it (cpu, cuda, cuda:N or auto), else DeviceError in
    one line saying which devices it has. Training, evaluate, embed and search all ask here."""
    import torch

    try:
        device = torch.device("cuda" if name == "auto" else name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{short(name)} names no device (cpu, cuda, cuda:N or auto)") from None
    if name == "auto" or device.type == "cpu":
        return name
    if device.type != "cuda":
        raise DeviceError(f"{device.type} is not supported (cpu, cuda, cuda:N or auto)")
    count = torch.cuda.device_count()
    if count <= (device.index or 0):
        raise DeviceError(f"this machine sees {count} CUDA GPU(s)")
    return name
