"""Run configuration: dataclasses with defaults, YAML files, and `--set key=value` overrides.

The defaults are the embedded demo (scikit-learn digits, small convnet, CPU, about a minute).
Recipes in `configs/*.yaml` override what they need; every key is dotted (`loss.beta`).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message says how to fix it."""


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"
    val_fraction: float = 0.0  # >0 carves a class-disjoint validation split out of the train classes
    workers: int = 0  # DataLoader worker processes
    skip_corrupt: bool = False  # skip unreadable images with a warning instead of stopping
    crop_scale: list[float] | None = None  # None: the backbone's spec (released recipe: 0.16-1)
    hflip: bool | None = None  # None: the backbone's spec


@dataclass
class ModelConfig:
    backbone: str = "convnet"
    embedding_dim: int = 64
    pretrained: str | None = None  # path to backbone weights, or "default" for the usual cache path
    freeze_bn: bool = False  # keep BatchNorm running statistics fixed (released CUB/Cars recipe)
    image_size: int = 8  # convnet only; bninception / resnet50 fix their own sizes
    resize_size: int = 0  # convnet only; 0 = image_size
    in_channels: int = 1  # convnet only
    width: int = 64  # convnet only
    channels_last: bool = False


@dataclass
class LossConfig:
    # alpha/beta/lam/margin parametrise MS; margin is also the triplet margin; contrastive,
    # binomial and lifted use their own published defaults (msl_kit.losses).
    name: str = "ms"  # ms, contrastive, triplet, binomial, lifted
    preset: str | None = None  # "released" or "paper": sets alpha/beta/lam/margin when applied
    alpha: float = 2.0
    beta: float = 40.0
    lam: float = 0.5
    margin: float = 0.1
    xbm_size: int = 0  # cross-batch memory slots; 0 turns XBM off
    xbm_start: int = 0  # iteration from which the memory term is added
    xbm_weight: float = 1.0


@dataclass
class TrainConfig:
    iterations: int = 400
    batch_size: int = 50
    samples_per_class: int = 10
    lr: float = 1e-3
    weight_decay: float = 5e-4
    lr_steps: list[int] = field(default_factory=list)  # iterations at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup: int = 0  # linear warm-up iterations
    backbone_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    eval_every: int = 100  # 0: evaluate only at the end
    checkpoint_every: int = 100  # 0: checkpoint only at the end
    log_every: int = 10
    amp: str = "none"  # none, bf16, fp16
    threads: int = 0  # torch intra-op threads; 0 picks cores minus workers
    tensorboard: bool = False


@dataclass
class EvalConfig:
    split: str = "test"  # test or val (inshop evaluates query against gallery)
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 256


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    description: str = ""


def valid_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key a config accepts, in declaration order."""
    cfg = cfg or Config()
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{sub.name}" for sub in dataclasses.fields(value)]
        else:
            keys.append(f.name)
    return keys


def _unknown_key(key: str, cfg: Config) -> ConfigError:
    keys = valid_keys(cfg)
    near = difflib.get_close_matches(key, keys, n=3)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys: {', '.join(keys)}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field's type, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list like [1, 2], got {value!r}")
        return [_coerce(v, item_type, f"{key}[]") for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every field uses the types above
        raise ConfigError(f"{key}: unsupported type {annotation}")
    raise ConfigError(f"{key} expects {getattr(annotation, '__name__', annotation)}, got {value!r}")


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key with type checking; `loss.preset` also sets the preset's four numbers."""
    parts = key.split(".")
    if len(parts) > 2:
        raise _unknown_key(key, cfg)
    target: Any = cfg
    if len(parts) == 2:
        section = getattr(cfg, parts[0], None)
        if not dataclasses.is_dataclass(section):
            raise _unknown_key(key, cfg)
        target = section
    fields = {f.name: f for f in dataclasses.fields(target)}
    name = parts[-1]
    if name not in fields or dataclasses.is_dataclass(getattr(target, name)):
        raise _unknown_key(key, cfg)
    hints = typing.get_type_hints(type(target))
    value = _coerce(value, hints[name], key)
    if key == "loss.preset" and value is not None:
        from msl_kit.losses import PRESETS  # the maths defines the presets; config only applies them

        if value not in PRESETS:
            raise ConfigError(f"loss.preset must be one of {sorted(PRESETS)}, got {value!r}")
        for k, v in PRESETS[value].items():
            setattr(target, k, float(v))
    setattr(target, name, value)


def apply_dict(cfg: Config, values: dict, prefix: str = "") -> Config:
    """Apply a nested mapping (as read from YAML) onto `cfg`."""
    if not isinstance(values, dict):
        raise ConfigError(f"expected a mapping of config keys at '{prefix or 'top level'}', got {values!r}")
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if prefix or not dataclasses.is_dataclass(getattr(cfg, k, None)):
                raise _unknown_key(key, cfg)
            apply_dict(cfg, v, prefix=f"{key}.")
        else:
            set_key(cfg, key, v)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is read as YAML so `1e-4`, `true`, `[1, 2]` and `null` work."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. --set loss.beta=50)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read the value of '{text}': {e}") from None
    if isinstance(value, str) and raw.strip():
        # YAML reads 1e-4 as a string; numbers written that way are meant as floats.
        try:
            value = float(raw) if any(c in raw for c in "eE.") else value
        except ValueError:
            pass
    return key.strip(), value


def resolve_config_path(name_or_path: str) -> Path:
    """A config given by path, or by name from the repository's `configs/` folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if candidate.is_file():
        return candidate
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"no config file '{name_or_path}' and no preset of that name; presets: {', '.join(names) or 'none found'}")


def load_config(source: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then a YAML file (path or preset name), then `key=value` overrides in order."""
    cfg = Config()
    if source is not None:
        path = resolve_config_path(str(source))
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        apply_dict(cfg, values)
    for text in overrides:
        set_key(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks whose failure would otherwise surface deep inside training."""
    t = cfg.train
    if t.iterations < 1:
        raise ConfigError("train.iterations must be at least 1")
    if t.samples_per_class < 1 or t.batch_size % t.samples_per_class:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a positive multiple of train.samples_per_class ({t.samples_per_class})"
        )
    if t.amp not in ("none", "bf16", "fp16"):
        raise ConfigError(f"train.amp must be none, bf16 or fp16, got {t.amp!r}")
    if cfg.eval.split not in ("test", "val"):
        raise ConfigError(f"eval.split must be test or val, got {cfg.eval.split!r}")
    if cfg.eval.split == "val" and not cfg.data.val_fraction > 0:
        raise ConfigError("eval.split=val needs data.val_fraction > 0 (e.g. --set data.val_fraction=0.2)")
    from msl_kit.losses import LOSSES

    if cfg.loss.name not in LOSSES:
        raise ConfigError(f"loss.name must be one of {', '.join(LOSSES)}, got {cfg.loss.name!r}")
    if cfg.loss.xbm_size and cfg.loss.name != "ms":
        raise ConfigError("loss.xbm_size > 0 (cross-batch memory) works with loss.name=ms only")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError("data.val_fraction must lie in [0, 1)")
    if cfg.data.crop_scale is not None and len(cfg.data.crop_scale) != 2:
        raise ConfigError("data.crop_scale must be two numbers like [0.16, 1.0]")


def to_dict(cfg: Config) -> dict:
    """A plain nested dict, as written to a run's config.yaml."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    """Write `cfg` as YAML that `load_config(path)` reads back to the same config."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(values: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint's stored config)."""
    cfg = apply_dict(Config(), values)
    validate(cfg)
    return cfg
