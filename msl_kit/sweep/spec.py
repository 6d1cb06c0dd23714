"""What a sweep runs: the spec from CLI strings or a named study, its cells and their configs.

No Optuna here: `msl_kit.sweep` runs a checked `SweepSpec` and re-exports these names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import yaml

from msl_kit.train.config import CONFIG_DIR, Config, load_config, parse_override

STUDY_DIR = CONFIG_DIR / "sweeps"


class SweepError(ValueError):
    """A sweep that cannot start; the message says what to change."""


@dataclasses.dataclass
class SweepSpec:
    """What a sweep runs: grid values per key (or ranges for a TPE search), seeds, base config."""

    grid: dict[str, list] = dataclasses.field(default_factory=dict)
    ranges: dict[str, tuple[float, float, bool]] = dataclasses.field(default_factory=dict)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    config: str | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    trials: int = 0  # > 0: a TPE search of this many trials over `ranges`

    @property
    def keys(self) -> list[str]:
        return list(self.ranges if self.trials else self.grid)

    def fingerprint(self) -> str:
        """Names the Optuna study: the same command on any machine finds the same study."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return "sweep-" + hashlib.sha1(text.encode()).hexdigest()[:10]


def parse_grid(text: str) -> tuple[str, list]:
    """`loss.beta=10,40,160` -> ("loss.beta", [10, 40, 160]); values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    values = [parse_override(f"k={v}")[1] for v in raw.split(",")] if raw.strip() else []
    if not sep or not key.strip() or not values:
        raise SweepError(f"--grid '{text}' is not of the form key=v1,v2 (e.g. loss.beta=10,40,160)")
    bad = [v for v in values if v is not None and not isinstance(v, (bool, int, float, str))]
    if bad or len(set(map(repr, values))) != len(values):
        raise SweepError(f"--grid '{text}': values must be distinct numbers, strings or booleans")
    return key.strip(), values


def parse_range(text: str) -> tuple[str, tuple[float, float, bool]]:
    """`loss.beta=10:160:log` -> ("loss.beta", (10.0, 160.0, True)) for a TPE search."""
    key, _, raw = text.partition("=")
    parts = raw.split(":")
    try:
        lo, hi, log = float(parts[0]), float(parts[1]), parts[2:] == ["log"]
    except (ValueError, IndexError):
        lo = hi = log = 0
    if not (lo < hi and len(parts) == 2 + log and (lo > 0 or not log)):
        raise SweepError(f"--range '{text}' is not key=lo:hi[:log] with lo < hi (lo > 0 for log)")
    return key.strip(), (lo, hi, log)


def load_study(name: str) -> dict:
    """A named sweep set from configs/sweeps/NAME.yaml (or a YAML path)."""
    path = Path(name) if Path(name).is_file() else STUDY_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))
        raise SweepError(f"no sweep study '{name}'; studies: {', '.join(names) or 'none'}")
    return yaml.safe_load(path.read_text()) or {}


def make_spec(
    grid: list[str] = (),
    ranges: list[str] = (),
    seeds: list[int] | None = None,
    config: str | None = None,
    overrides: list[str] = (),
    trials: int = 0,
    study: str | None = None,
) -> SweepSpec:
    """Build and check a spec from CLI-style strings; a named `study` gives the defaults."""
    base = load_study(study) if study else {}
    spec = SweepSpec(
        grid={k: list(v) for k, v in (base.get("grid") or {}).items()},
        seeds=list(seeds or base.get("seeds") or [0]),
        config=config or base.get("config"),
        overrides=[*(base.get("set") or []), *overrides],
        trials=trials,
    )
    spec.grid.update(parse_grid(g) for g in grid)
    spec.ranges.update(parse_range(r) for r in ranges)
    check_spec(spec)
    return spec


def check_spec(spec: SweepSpec) -> None:
    """Fail before any training: unknown keys, bad values, impossible cells (one clear line)."""
    if spec.trials < 0 or (spec.trials and not spec.ranges) or (spec.ranges and not spec.trials):
        raise SweepError("a search needs both --trials N (N >= 1) and at least one --range")
    if spec.trials and spec.grid:
        raise SweepError("use --grid for a grid or --range with --trials for a search, not both")
    if not spec.trials and not spec.grid:
        raise SweepError("nothing to sweep: give --grid key=v1,v2 (or --study NAME)")
    if "seed" in spec.keys:
        raise SweepError("sweep seeds with --seeds 0,1,2, not as a grid key")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise SweepError(f"--seeds must be distinct integers, got {spec.seeds}")
    for params in cells(spec) if not spec.trials else [{k: r[0] for k, r in spec.ranges.items()}]:
        cell_config(spec, params, spec.seeds[0])


def cells(spec: SweepSpec) -> list[dict]:
    """Every grid cell's parameters (seed excluded), in grid order."""
    keys = list(spec.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*spec.grid.values())]


def cell_config(spec: SweepSpec, params: dict, seed: int, threads: int = 0) -> Config:
    """The base config, then --set, then the cell's values and seed (ConfigError if invalid)."""
    # One resolution of every source, so a grid over loss.preset applies the preset's numbers.
    cfg = load_config(spec.config, spec.overrides, {**params, "seed": seed})
    if threads and not cfg.train.threads:  # an explicit train.threads wins
        cfg.train.threads = threads
    return cfg


def cell_name(spec: SweepSpec, params: dict, seed: int, trial: int | None = None) -> str:
    """Run folder name: `beta=40_lam=0.5_seed=0` (grid) or `trial0003_seed=0` (search)."""
    if spec.trials:
        return f"trial{trial:04d}_seed={seed}"
    short = [k.rsplit(".", 1)[-1] for k in params]
    names = short if len(set(short)) == len(short) else list(params)
    parts = [f"{n}={v}" for n, v in zip(names, params.values())] + [f"seed={seed}"]
    return "_".join(parts).replace("/", "-").replace(" ", "")
