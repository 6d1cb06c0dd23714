"""Run configuration: dataclasses with defaults, YAML files, and `--set key=value` overrides.

The defaults are the embedded demo: Omniglot-small (shipped in the package), split by alphabet,
a small convnet, on the CPU in well under a minute. Recipes in `configs/*.yaml` override what
they need; every key is dotted (`loss.beta`). Every value is checked when the config is loaded
(`validate`), before any data is read, so a bad value fails in one line, not mid-run.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msl_kit.losses.multi_similarity import PRESETS
from msl_kit.losses.registry import LOSSES
from msl_kit.train.checks import ConfigError, validate

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


_MS = PRESETS["released"]  # the loss numbers have one home: msl_kit.losses.PRESETS


@dataclass
class DataConfig:
    name: str = "omniglot_small"  # shipped in the package: nothing to download
    root: str = "data"
    val_fraction: float = (
        0.0  # >0 carves a class-disjoint validation split out of the train classes
    )
    workers: int = 0  # DataLoader worker processes
    skip_corrupt: bool = False  # skip unreadable images with a warning instead of stopping
    crop_scale: list[float] | None = None  # None: the backbone's spec (released recipe: 0.16-1)
    hflip: bool | None = None  # None: the backbone's spec
    crop_mode: str | None = None  # None: the backbone's spec; "two_step" (released) or "fused"


@dataclass
class ModelConfig:
    backbone: str = "convnet"
    embedding_dim: int = 64
    # A weights file; "default" (bninception / resnet50: the usual cache path); "hub" (timm:
    # timm's own download); null or none: random init
    pretrained: str | None = None
    freeze_bn: bool = False  # keep BatchNorm running statistics fixed (released CUB/Cars recipe)
    freeze_bn_affine: bool = False  # with freeze_bn: BatchNorm weight / bias stop training too
    freeze_modules: list[str] = field(default_factory=list)  # backbone modules kept fixed
    head_init: str = "kaiming_fan_out"  # the released recipe's; "orthogonal" (Hyp-ViT)
    image_size: int = 28  # convnet only; bninception / resnet50 fix their own sizes
    resize_size: int = 0  # convnet: 0 = image_size; timm: 0 = timm's input_size / crop_pct
    in_channels: int = 1  # convnet only
    width: int = 64  # convnet only
    global_pool: str | None = None  # timm only: None = the model's own; avg, max, avgmax, token
    input_size: int = 0  # timm only: the side the network sees; 0 = timm's pretrained config
    channels_last: bool = False


@dataclass
class LossConfig:
    # alpha/beta/lam/margin parametrise MS; margin is also the triplet margin and the MS-mining
    # margin of the other losses; contrastive, binomial and lifted keep their published numbers.
    # alpha and margin are also Proxy-Anchor's scale and margin (32 and 0.1 unless a key sets
    # them: the registry's defaults for that loss).
    name: str = "ms"  # ms, contrastive, triplet, binomial, lifted, proxy_anchor
    preset: str | None = None  # "released" or "paper": the four numbers, unless a key sets one
    alpha: float = _MS["alpha"]
    beta: float = _MS["beta"]
    lam: float = _MS["lam"]
    margin: float = _MS["margin"]
    mining: str | None = None  # None: the loss's own; "ms" (MS mining) or "none" (every pair)
    xbm_size: int = 0  # cross-batch memory slots; 0 turns XBM off
    xbm_start: int = 0  # iteration from which the memory term is added
    xbm_weight: float = 1.0
    proxy_lr_mult: float = 100.0  # proxies' lr = train.lr x this (Proxy-Anchor's release: 100)


@dataclass
class TrainConfig:
    iterations: int = 150
    batch_size: int = 80
    samples_per_class: int = 5
    lr: float = 1e-3
    weight_decay: float = 5e-4
    lr_steps: list[int] = field(default_factory=list)  # iterations at which lr is x lr_gamma
    lr_gamma: float = 0.1
    warmup: int = 0  # linear warm-up iterations
    warmup_frozen: int = 0  # iterations in which the backbone is frozen (head and proxies train)
    optimizer: str = "adam"  # adam (MS release) or adamw (Proxy-Anchor release)
    sampler: str = "pk"  # pk: P classes x K images; random: shuffled batches, drop_last
    grad_clip_value: float = 0.0  # clip each gradient element to +-value; 0 = off
    grad_clip_norm: float = 0.0  # clip the total gradient norm; 0 = off
    backbone_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    class_draw: str = "uniform"  # PKSampler: "uniform" classes, or "released" (by floor(n/K))
    eval_every: int = 50  # 0: evaluate only at the end
    checkpoint_every: int = 50  # 0: checkpoint only at the end
    keep_snapshots: bool = True  # model weights at start and each evaluation, in snapshots/
    log_every: int = 10
    amp: str = "none"  # none, bf16, fp16
    threads: int = 0  # torch intra-op threads; 0 picks cores minus workers
    tensorboard: bool = False


@dataclass
class EvalConfig:
    split: str = "test"  # test or val (inshop evaluates query against gallery)
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 256
    # metrics.json "floors": true = raw pixels, the untrained network and, with pretrained
    # weights, the backbone as loaded; false = none; or a list of those that apply: [backbone]
    floors: bool | list[str] = True
    metric: str = "ip"  # rank by inner product, or "euclidean" (smallest squared distance)
    lone_queries: str = "miss"  # a query with no same-class item: a miss in R@K, or "skip" (PML)


@dataclass
class CacheConfig:
    # A frozen prefix of the backbone and a cache of its activations (msl_kit/train/prefix_cache):
    # fine-tuning only the tail on a CPU, the prefix run once per augmented view, not per step.
    prefix: str = ""  # backbone module ending the frozen prefix ("blocks.4"); "" = none
    views: int = 0  # seeded augmented views per training image cached on disk; 0 = no cache
    view_seed: int = 0  # seeds the views (not the run's seed: every seed shares one cache)
    dir: str = ""  # where caches live; "" = <data.root>/prefix_cache
    dtype: str = "float32"  # float32 (exact) or float16 (half the disk, rounded activations)
    max_gb: float = 20.0  # refuse to build a cache larger than this


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    description: str = ""
    # Modules imported before the config is checked, so that they can register their own
    # losses, backbones or datasets (`register_loss`, `register_backbone`); recorded in
    # config.yaml, so a resumed run or a sweep cell imports them again.
    plugins: list[str] = field(default_factory=list)


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
    """Set one dotted key with type checking (a preset's numbers are applied by `resolve`)."""
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
    setattr(target, name, _coerce(value, hints[name], key))


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (as read from YAML) as {dotted key: value}, in reading order."""
    if not isinstance(values, dict):
        raise ConfigError(
            f"expected a mapping of config keys at '{prefix or 'top level'}', got {values!r}"
        )
    flat: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if prefix:
                raise _unknown_key(key, Config())
            flat.update(flatten(v, prefix=f"{key}."))
        else:
            flat[key] = v
    return flat


def resolve(values: dict[str, Any]) -> Config:
    """The config that dotted `values` describe: defaults, then the preset, then every key.

    A preset only fills in what no key sets: `beta: 60` beside `preset: released` gives 60
    whichever comes first, in a file or in `--set` overrides.
    """
    cfg = Config()
    preset = values.get("loss.preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"loss.preset must be one of {', '.join(sorted(PRESETS))}, got {preset!r}"
            )
        for k, v in PRESETS[preset].items():
            setattr(cfg.loss, k, float(v))
    for key, value in values.items():
        set_key(cfg, key, value)
    import_plugins(cfg.plugins)
    _loss_defaults(cfg, values)
    validate(cfg)
    return cfg


def _loss_defaults(cfg: Config, values: dict[str, Any]) -> None:
    """The chosen loss's own values of shared keys (Proxy-Anchor's alpha 32) where neither a
    key nor a preset set them; after the plugins, which may register the loss."""
    spec = LOSSES.get(cfg.loss.name)
    if spec is None or values.get("loss.preset") is not None:
        return  # an unknown name fails in validate; a preset's numbers are what was asked
    for key, value in spec.defaults.items():
        if f"loss.{key}" not in values:
            setattr(cfg.loss, key, float(value))


def import_plugins(names: list[str]) -> None:
    """Import each plugin module (by dotted name, from sys.path / PYTHONPATH) once."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # any failure of a user's module is theirs to see in one line
            raise ConfigError(
                f"plugins: cannot import {name!r} ({type(err).__name__}: {err}); put the module "
                "on PYTHONPATH or fix it"
            ) from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is read as YAML so `1e-4`, `true`, `[1, 2]` and `null` work."""
    if "=" not in text:
        raise ConfigError(
            f"override '{text}' is not of the form key=value (e.g. --set loss.beta=50)"
        )
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
    listed = ", ".join(names) or "none found"
    raise ConfigError(
        f"no config file '{name_or_path}' and no preset of that name; presets: {listed}"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """The dotted keys of a YAML config file (read with safe_load: no tags, no code)."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:  # a binary file: name it, not only the codec
        raise ConfigError(
            f"{path} is not a YAML text file (byte {e.start} is not UTF-8); give a config "
            "written as text, e.g. a copy of configs/digits.yaml"
        ) from None
    return flatten(values)


def load_config(
    source: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
) -> Config:
    """Defaults, then a YAML file (path or preset name), then `key=value` overrides in order,
    then `values` ({dotted key: typed value}); a preset fills in only what no key sets."""
    flat = read_yaml(resolve_config_path(str(source))) if source is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = value
    flat.update(values or {})
    return resolve(flat)


def to_dict(cfg: Config) -> dict:
    """A plain nested dict, as written to a run's config.yaml."""
    return dataclasses.asdict(cfg)


def config_text(cfg: Config) -> str:
    """`cfg` as the YAML text a run's config.yaml holds."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    """Write `cfg` as YAML that `load_config(path)` reads back to the same config."""
    path.write_text(config_text(cfg))


def from_dict(values: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint's stored config)."""
    return resolve(flatten(values))
