"""Run configuration: dataclasses with defaults, YAML files, and `--set key=value` overrides.

The defaults are the embedded demo: Omniglot-small (shipped in the package), split by alphabet,
a small convnet, on the CPU in well under a minute. Recipes in `configs/*.yaml` override what
they need; every key is dotted. A key that belongs to the run sits in its section (`train.lr`,
`loss.mining`, `model.embedding_dim`); the chosen loss's and backbone's own parameters sit in
a section named after the component (`loss.ms.beta`, `loss.proxy_anchor.alpha`,
`model.convnet.input_size`, `model.timm.input_size`), checked against what that component
declares (`msl_kit.params`). The section of a component the run does not use is left out, so
switching `loss.name` never carries a number written for another loss. Every value is checked
when the config is loaded (`validate`), before any data is read.

A new run-level key is one field below (`param(default, doc, ge=..., le=...)` gives its range
and its line in the docs); a loss's or backbone's new key is one field of its params dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msl_kit.files.safe_yaml import YamlError, load_yaml
from msl_kit.losses.multi_similarity import MSParams
from msl_kit.losses.registry import LOSSES
from msl_kit.models.convnet import ConvNetParams
from msl_kit.models.head import HEAD_INITS
from msl_kit.models.registry import backbone_section, is_section, section_params
from msl_kit.params import ParamError, build, coerce, param, short
from msl_kit.preprocessing import CROP_MODES
from msl_kit.train.old_keys import upgrade
from msl_kit.train.validation import ConfigError, check_names, check_plugins, validate

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
COMPONENTS = ("loss", "model")  # the sections that hold a component's own parameters
PARAMS = "params"  # the field of LossConfig / ModelConfig holding that component's values
MAX_BATCH = 16384  # a (B, B) float32 similarity matrix of 1 GiB


@dataclass
class DataConfig:
    name: str = "omniglot_small"  # shipped in the package: nothing to download
    root: str = "data"
    val_fraction: float = param(
        0.0, "> 0 carves a class-disjoint validation split out of the train classes", ge=0, lt=1
    )
    workers: int = param(0, "DataLoader worker processes", ge=0, le=128)
    skip_corrupt: bool = False  # skip unreadable images with a warning instead of stopping
    crop_scale: list[float] | None = None  # None: the backbone's spec (released recipe: 0.16-1)
    hflip: bool | None = None  # None: the backbone's spec
    crop_mode: str | None = param(
        None, "None: the backbone's; two_step (released) or fused", choices=(None, *CROP_MODES)
    )


@dataclass
class ModelConfig:
    backbone: str = "convnet"
    embedding_dim: int = param(64, "width of the embedding", ge=2, le=8192)
    # A weights file; "default" (bninception / resnet50: the usual cache path); "hub" (timm:
    # timm's own download); null or none: random init
    pretrained: str | None = None
    freeze_bn: bool = False  # keep BatchNorm running statistics fixed (released CUB/Cars recipe)
    freeze_bn_affine: bool = False  # with freeze_bn: BatchNorm weight / bias stop training too
    freeze_modules: list[str] = field(default_factory=list)  # backbone modules kept fixed
    head_init: str = param(
        "kaiming_fan_out", "the released recipe's; orthogonal (Hyp-ViT)", choices=HEAD_INITS
    )
    channels_last: bool = False
    # The chosen backbone's own options (`model.<backbone>.*`: its BackboneSpec.params).
    params: Any = field(default_factory=ConvNetParams)


@dataclass
class LossConfig:
    name: str = "ms"  # ms, contrastive, triplet, binomial, lifted, proxy_anchor, or a plugin's
    # Keys of the run, not of one loss: MS mining for every loss that takes it (the paper's
    # ablation crosses it with the weighting), cross-batch memory around any pair loss, and the
    # learning rate of a loss's own parameters (Proxy-Anchor's proxies).
    mining: str | None = param(
        None, "None: the loss's own; ms (MS mining) or none (every pair)",
        choices=(None, "ms", "none"),
    )  # fmt: skip
    xbm_size: int = param(0, "cross-batch memory slots; 0 turns XBM off", ge=0, le=1_000_000)
    xbm_start: int = param(0, "iteration from which the memory term is added", ge=0)
    xbm_weight: float = param(1.0, "weight of the memory term", ge=0)
    proxy_lr_mult: float = param(
        100.0, "lr of the loss's parameters = train.lr x this", ge=0, le=1e4,
        hint="Proxy-Anchor's release: 100",
    )  # fmt: skip
    # The chosen loss's own parameters (`loss.<name>.*`: its LossSpec.params).
    params: Any = field(default_factory=MSParams)


@dataclass
class TrainConfig:
    iterations: int = param(150, "optimisation steps", ge=1, le=100_000_000)
    batch_size: int = param(80, "images per step", ge=2, le=MAX_BATCH)
    samples_per_class: int = param(5, "images of each class in a P x K batch", ge=1, le=MAX_BATCH)
    lr: float = param(1e-3, "learning rate", gt=0, hint="released recipe: 3e-5")
    weight_decay: float = param(5e-4, "weight decay", ge=0)
    lr_steps: list[int] = param([], "iterations at which lr is x lr_gamma", ge=1)
    lr_gamma: float = param(0.1, "lr factor at each step", gt=0, le=1)
    warmup: int = param(0, "linear warm-up iterations", ge=0)
    warmup_frozen: int = param(0, "iterations in which only the head and proxies train", ge=0)
    optimizer: str = param("adam", "adam (MS release) or adamw", choices=("adam", "adamw"))
    sampler: str = param("pk", "pk: P x K batches; random: shuffled", choices=("pk", "random"))
    grad_clip_value: float = param(0.0, "clip each gradient element to +-value; 0 = off", ge=0)
    grad_clip_norm: float = param(0.0, "clip the total gradient norm; 0 = off", ge=0)
    backbone_lr_mult: float = param(1.0, "backbone lr = lr x this", ge=0)
    head_lr_mult: float = param(1.0, "head lr = lr x this", ge=0)
    class_draw: str = param(
        "uniform", "PKSampler: uniform classes or released", choices=("uniform", "released")
    )
    eval_every: int = param(50, "0: evaluate only at the end", ge=0)
    checkpoint_every: int = param(50, "0: checkpoint only at the end", ge=0)
    keep_snapshots: bool = True  # model weights at start and each evaluation, in snapshots/
    log_every: int = param(10, "history.csv rows every this many iterations", ge=1)
    amp: str = param("none", "mixed precision", choices=("none", "bf16", "fp16"))
    threads: int = param(
        0, "torch threads; 0: OMP_NUM_THREADS if set, else cores minus workers", ge=0, le=1024
    )
    tensorboard: bool = False


@dataclass
class EvalConfig:
    split: str = param("test", "test or val (inshop: query vs gallery)", choices=("test", "val"))
    ks: list[int] = param([1, 2, 4, 8], "ranks of Recall@K", ge=1, le=100_000)
    batch_size: int = param(256, "images per evaluation batch", ge=1, le=MAX_BATCH)
    # metrics.json "floors": true = raw pixels, the untrained network and, with pretrained
    # weights, the backbone as loaded; false = none; or a list of those that apply: [backbone]
    floors: bool | list[str] = True
    metric: str = param("ip", "inner product or euclidean", choices=("ip", "euclidean"))
    lone_queries: str = param(
        "miss", "a query with no same-class item: a miss, or skip (PML)", choices=("miss", "skip")
    )


@dataclass
class CacheConfig:
    # A frozen prefix of the backbone and a cache of its activations (msl_kit/train/prefix_cache):
    # fine-tuning only the tail on a CPU, the prefix run once per augmented view, not per step.
    # A section of the run, not of one backbone: any backbone whose frozen part is a module
    # prefix takes it (`model.<backbone>.*` holds what builds that backbone, not how it trains).
    prefix: str = param("", "backbone module ending the frozen prefix (blocks.4); empty: none")
    views: int = param(
        0, "seeded augmented views per training image cached on disk; 0: no cache", ge=0, le=1000
    )
    view_seed: int = param(
        0, "seeds the views (not the run's seed: every seed shares one cache)", ge=0, lt=2**32
    )
    dir: str = ""  # where caches live; "" = <data.root>/prefix_cache
    dtype: str = param(
        "float32", "float32 (exact) or float16 (half the disk, rounded activations)",
        choices=("float32", "float16"),
    )  # fmt: skip
    max_gb: float = param(20.0, "refuse to build a cache larger than this many GB", gt=0)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = param(0, "seed of every random draw", ge=0, lt=2**32)
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    description: str = ""
    # Modules imported before the config is checked, so that they can register their own
    # losses, backbones or datasets (`register_loss`, `register_backbone`); recorded in
    # config.yaml. Only a config the user gives imports them: a stored one (a checkpoint's, a
    # run's) asks for `--plugin NAME` instead (a checkpoint is data and runs no code).
    plugins: list[str] = field(default_factory=list)


def component(cfg: Config, section: str) -> str:
    """The config section name of the chosen loss ("ms") or backbone ("convnet", "timm")."""
    return cfg.loss.name if section == "loss" else backbone_section(cfg.model.backbone)


def component_params(section: str, name: str) -> type | None:
    """The params class of component `name` of `section` (None if it takes none)."""
    if section == "loss":
        spec = LOSSES.get(name)
        return spec.params if spec is not None else None
    return section_params(name)


def _sections(cfg: Config) -> list[tuple[str, Any]]:
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]


def valid_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key a config accepts, in declaration order; a component's own keys are those
    of the chosen loss and backbone (`loss.ms.beta`, `model.convnet.input_size`)."""
    cfg = cfg or Config()
    keys = []
    for name, value in _sections(cfg):
        if not dataclasses.is_dataclass(value):
            keys.append(name)
            continue
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(value) if f.name != PARAMS]
        if name in COMPONENTS and dataclasses.is_dataclass(value.params):
            own = component(cfg, name)
            keys += [f"{name}.{own}.{f.name}" for f in dataclasses.fields(value.params)]
    return keys


def _unknown_key(key: str, cfg: Config) -> ConfigError:
    keys = valid_keys(cfg)
    near = difflib.get_close_matches(key, keys, n=3)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys: {', '.join(keys)}")


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one run-level dotted key with type checking (ranges are checked by `validate`; a
    component's own keys are set through `resolve`)."""
    parts = key.split(".")
    target: Any = cfg
    if len(parts) == 2:
        target = getattr(cfg, parts[0], None)
        if not dataclasses.is_dataclass(target):
            raise _unknown_key(key, cfg)
    elif len(parts) != 1:
        raise _unknown_key(key, cfg)
    fields = {f.name: f for f in dataclasses.fields(target)}
    name = parts[-1]
    if name not in fields or name == PARAMS or dataclasses.is_dataclass(getattr(target, name)):
        raise _unknown_key(key, cfg)
    annotation = typing_hints(type(target))[name]
    try:
        setattr(target, name, coerce(value, annotation, key))
    except ParamError as e:
        raise ConfigError(str(e)) from None


@functools.lru_cache(maxsize=16)
def typing_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (cached)."""
    return typing.get_type_hints(cls)


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (as read from YAML) as {dotted key: value}, in reading order; a
    component's section (`loss: {ms: {beta: 50}}`) gives `loss.ms.beta`."""
    if not isinstance(values, dict):
        raise ConfigError(
            f"expected a mapping of config keys at '{prefix or 'top level'}', got {short(values)}"
        )
    depth = prefix.count(".")
    flat: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        nested = depth == 0 or (depth == 1 and prefix.split(".")[0] in COMPONENTS)
        if isinstance(v, dict) and prefix and not nested:
            raise _unknown_key(key, Config())
        if isinstance(v, dict):
            flat.update(flatten(v, prefix=f"{key}."))
        else:
            flat[key] = v
    return flat


def _split(values: dict[str, Any], cfg: Config) -> tuple[dict, dict]:
    """Run-level keys, and {section: {component: {key: value}}} of the components' keys."""
    run: dict[str, Any] = {}
    parts: dict[str, dict[str, dict]] = {name: {} for name in COMPONENTS}
    for key, value in values.items():
        head, *rest = key.split(".")
        if head in COMPONENTS and len(rest) == 2:
            parts[head].setdefault(rest[0], {})[rest[1]] = value
        elif len(rest) > 1:
            raise _unknown_key(key, cfg)
        else:
            run[key] = value
    return run, parts


def _component_values(cfg: Config, parts: dict[str, dict[str, dict]]) -> None:
    """Build the chosen loss's and backbone's params from their sections (defaults for the
    rest); a section of another component is left out, one of no component is refused."""
    for section in COMPONENTS:
        for name in parts[section]:
            known = name in LOSSES if section == "loss" else is_section(name)
            if not known:
                registered = ", ".join(LOSSES) if section == "loss" else "convnet, timm, ..."
                raise ConfigError(
                    f"unknown config key '{section}.{name}.{next(iter(parts[section][name]))}':"
                    f" no {'loss' if section == 'loss' else 'backbone'} is named {name} "
                    f"(a {section} section names one: {registered})"
                )
        own = component(cfg, section)
        params = component_params(section, own)
        values = parts[section].get(own, {})
        target = getattr(cfg, section)
        try:
            target.params = build(params, values, prefix=f"{section}.{own}.") if params else None
        except ParamError as e:
            raise ConfigError(str(e)) from None
        if params is None and values:
            raise ConfigError(
                f"unknown config key '{section}.{own}.{next(iter(values))}': {own} takes no "
                "parameters"
            )


def resolve(values: dict[str, Any], *, stored: bool = False, what: str = "the config") -> Config:
    """The config that dotted `values` describe: defaults, then every key.

    `stored`: the values are a config msl_kit wrote (a checkpoint's, a run's config.yaml): old
    keys are upgraded silently and its plugins are not imported (a loss, backbone or dataset
    that only a plugin registers is one line naming the `--plugin` to pass). Otherwise old
    keys each get a one-line note, and the config's plugins are imported first.
    """
    cfg = Config()
    values = upgrade(values, cfg.loss.name, cfg.model.backbone, note=not stored)
    run, parts = _split(values, cfg)
    for key, value in run.items():
        set_key(cfg, key, value)
    if stored:
        check_plugins(cfg, what)
    else:
        import_plugins(cfg.plugins)
    check_names(cfg)  # the loss and backbone exist, before their sections are read
    _component_values(cfg, parts)
    validate(cfg)
    return cfg


def import_plugins(names: list[str]) -> None:
    """Import each plugin module (by dotted name, from sys.path / PYTHONPATH) once."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # any failure of a user's module is theirs to see in one line
            raise ConfigError(
                f"plugins: cannot import {name!r} ({type(err).__name__}: {short(str(err))}); put "
                "the module on PYTHONPATH or fix it"
            ) from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is read as YAML so `1e-4`, `true`, `[1, 2]` and `null` work."""
    if "=" not in text:
        raise ConfigError(
            f"override '{short(text)}' is not of the form key=value (e.g. --set loss.ms.beta=50)"
        )
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw, f"the value of --set {key.strip()}") if raw.strip() else ""
    except YamlError as e:
        raise ConfigError(str(e)) from None
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
        f"no config file '{short(name_or_path)}' and no preset of that name; presets: {listed}"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """The dotted keys of a YAML config file (no tags, no code, no alias bomb)."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as e:  # a binary file: name it, not only the codec
        raise ConfigError(
            f"{path} is not a YAML text file (byte {e.start} is not UTF-8); give a config "
            "written as text, e.g. a copy of configs/digits.yaml"
        ) from None
    try:
        values = load_yaml(text, str(path)) or {}
    except YamlError as e:
        raise ConfigError(str(e)) from None
    return flatten(values)


def load_config(
    source: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
    *,
    stored: bool = False,
) -> Config:
    """Defaults, then a YAML file (path or preset name), then `key=value` overrides in order,
    then `values` ({dotted key: typed value}). A section's `preset` fills in only what no key
    sets. Old flat keys of each source are mapped to the component that source names (or that
    is in effect when it names none). `stored`: see `resolve` (a run's own config.yaml)."""
    file = read_yaml(resolve_config_path(str(source))) if source is not None else {}
    given = dict(parse_override(text) for text in overrides)
    names = {"loss.name": Config().loss.name, "model.backbone": Config().model.backbone}
    flat: dict[str, Any] = {}
    for part in (file, given, values or {}):
        names.update({k: part[k] for k in names if k in part})
        flat.update(upgrade(part, *names.values(), note=not stored))
    return resolve(flat, stored=stored, what=f"the run of {source}" if stored else "the config")


def to_dict(cfg: Config) -> dict:
    """A plain nested dict, as written to a run's config.yaml: each section's run-level keys,
    with the chosen component's own section right after its name."""
    out: dict[str, Any] = {}
    for name, value in _sections(cfg):
        if not dataclasses.is_dataclass(value):
            out[name] = _plain(value)
            continue
        part: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.name == PARAMS:
                continue
            part[f.name] = _plain(getattr(value, f.name))
            if name in COMPONENTS and f.name in ("name", "backbone") and value.params is not None:
                part[component(cfg, name)] = dataclasses.asdict(value.params)
        out[name] = part
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def config_text(cfg: Config) -> str:
    """`cfg` as the YAML text a run's config.yaml holds."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    """Write `cfg` as YAML that `load_config(path)` reads back to the same config."""
    path.write_text(config_text(cfg))


def from_dict(values: dict, *, what: str = "this checkpoint") -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint's stored config; the flat
    form of earlier versions too). It imports no plugin: see `resolve(stored=True)`."""
    return resolve(flatten(values), stored=True, what=what)
