"""What a sweep runs and where: the spec from CLI strings or a named study, its cells and their
configs, the folders it owns (the sweep folder's claim, each cell's folder) and its tables.

A cell is its full resolved config: `config_hash` names it, its folder name carries the hash,
and equal values (40 and 40.0) are one cell. No Optuna here: `msl_kit.sweep` runs a checked
`SweepSpec` and re-exports these names.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import shutil
import signal
import socket
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msl_kit.errors import MslKitError
from msl_kit.files.atomic import atomic_write_text
from msl_kit.files.safe_yaml import YamlError, load_yaml
from msl_kit.train import rundir
from msl_kit.train.config import CONFIG_DIR, Config, flatten, load_config, parse_override, to_dict
from msl_kit.train.rundir import RunFolder, pid_alive

STUDY_DIR = CONFIG_DIR / "sweeps"
HOST = socket.gethostname()
METRICS = ("recall@1", "map@r")
MARK = "sweep.json"  # written first into a sweep folder: whose it is
TABLES = ("sweep.csv", "summary.csv", "summary.md")
SWEEP_FILES = {MARK, *TABLES, "runs", RunFolder.LOCK, "optuna.db"}


class SweepError(MslKitError, ValueError):
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
    """`loss.ms.beta=10,40` -> ("loss.ms.beta", [10, 40]); values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    values = [parse_override(f"k={v}")[1] for v in raw.split(",")] if raw.strip() else []
    if not sep or not key.strip() or not values:
        raise SweepError(
            f"--grid '{text}' is not of the form key=v1,v2 (e.g. loss.ms.beta=10,40,160)"
        )
    bad = [v for v in values if v is not None and not isinstance(v, (bool, int, float, str))]
    if bad or len(set(map(repr, values))) != len(values):
        raise SweepError(f"--grid '{text}': values must be distinct numbers, strings or booleans")
    return key.strip(), values


def parse_range(text: str) -> tuple[str, tuple[float, float, bool]]:
    """`loss.ms.beta=10:160:log` -> ("loss.ms.beta", (10.0, 160.0, True)) for a TPE search."""
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
    try:
        study = load_yaml(path.read_text(), str(path)) or {}
    except YamlError as e:
        raise SweepError(str(e)) from None
    if not isinstance(study, dict):
        raise SweepError(f"{path} is not a mapping of grid, set, seeds and config")
    return study


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
    for flag, parse, texts, target in (
        ("--grid", parse_grid, grid, spec.grid),
        ("--range", parse_range, ranges, spec.ranges),
    ):
        parsed = [parse(t) for t in texts]
        keys = [k for k, _ in parsed]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:  # which of the two lists was meant is a guess the kit will not make
            raise SweepError(f"{flag} {twice[0]} is given twice; give each key once")
        target.update(parsed)
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
    seeds = spec.seeds
    if not seeds or len(set(seeds)) != len(seeds) or not all(_is_seed(s) for s in seeds):
        raise SweepError(f"--seeds must be distinct integers in 0..2**32-1, got {seeds}")
    if spec.trials:  # both ends of every range, so no trial can draw a value the config refuses
        lows = {k: r[0] for k, r in spec.ranges.items()}
        for key, (lo, hi, _) in spec.ranges.items():
            for end in (lo, hi):
                try:
                    cell_config(spec, {**lows, key: end}, seeds[0])
                except ValueError as e:
                    raise SweepError(f"--range {key}={lo:g}:{hi:g} reaches a bad value: {e}") from e
    else:
        merge_equal_values(spec)
        for params in cells(spec):
            cell_config(spec, params, seeds[0])


def _is_seed(seed: object) -> bool:
    return isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32


def merge_equal_values(spec: SweepSpec) -> None:
    """Values of a grid key that give the same config (40 and 40.0) become one value, written as
    the config holds it; Optuna's grid must see exactly the cells the kit counts."""
    first = {k: v[0] for k, v in spec.grid.items()}
    for key, values in spec.grid.items():
        merged: dict[str, object] = {}
        for value in values:
            cfg = cell_config(spec, {**first, key: value}, spec.seeds[0])
            held = flatten(to_dict(cfg)).get(key, value)
            merged.setdefault(config_hash(cfg), held if held == value else value)
        spec.grid[key] = list(merged.values())


def cells(spec: SweepSpec) -> list[dict]:
    """Every grid cell's parameters (seed excluded), in grid order."""
    keys = list(spec.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*spec.grid.values())]


def cell_config(spec: SweepSpec, params: dict, seed: int, threads: int = 0) -> Config:
    """The base config, then --set, then the cell's values and seed (ConfigError if invalid)."""
    # One resolution of every source, so a grid over loss.ms.preset applies the preset's numbers.
    cfg = load_config(spec.config, spec.overrides, {**params, "seed": seed})
    if threads and not cfg.train.threads:  # an explicit train.threads wins
        cfg.train.threads = threads
    return cfg


def config_hash(cfg: Config) -> str:
    """What identifies a cell: a hash of its whole resolved config as canonical JSON (values are
    typed by the config, so 40 and 40.0 hash alike). train.threads is left out: the sweep sets
    it from --jobs, and it does not change what the cell computes."""
    values = to_dict(cfg)
    values["train"] = {k: v for k, v in values["train"].items() if k != "threads"}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cell_name(spec: SweepSpec, params: dict, seed: int, trial: int | None = None) -> str:
    """Run folder name: `beta=40_lam=0.5_seed=0_<hash>` (grid) or `trial0003_seed=0_<hash>`
    (search); the readable part may coincide for two cells, the config hash never does."""
    digest = config_hash(cell_config(spec, params, seed))[:10]
    if spec.trials:
        return f"trial{trial:04d}_seed={seed}_{digest}"
    short = [k.rsplit(".", 1)[-1] for k in params]
    names = short if len(set(short)) == len(short) else list(params)
    parts = [f"{n}={v}" for n, v in zip(names, params.values())] + [f"seed={seed}", digest]
    return "_".join(parts).replace("/", "-").replace(" ", "")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: a sweep stops between cells too (the
    engine takes both signals over while a cell trains, so that the cell checkpoints first)."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals are not ours to handle
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _own(name: str) -> bool:
    # An atomic write cut off by a kill leaves `.sweep.csv.<random>.tmp`.
    temp = name.endswith(".tmp") and any(name.startswith(f".{t}.") for t in TABLES)
    return name in SWEEP_FILES or temp or name.startswith("optuna.db-")  # SQLite's journal


def check_out(out: Path, study: str) -> None:
    """Refuse a sweep folder holding anything but this sweep's own files; reads, never writes."""
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file; choose a folder")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not [n for n in names if n != RunFolder.LOCK]:
        return  # new or empty (a lock alone: claiming it says who holds it)
    try:
        mark = json.loads((out / MARK).read_text())
    except (OSError, ValueError):
        mark = None
    if not isinstance(mark, dict) or mark.get("written_by") != "msl-kit sweep":
        run = set(names) & set(RunFolder.FILES)
        what = "a training run" if run else "files msl-kit sweep did not write"
        raise SweepError(
            f"--out {out} holds {what} ({', '.join(names[:3])}); nothing in it was changed: "
            "choose a new or empty folder"
        )
    if mark.get("study") != study:
        raise SweepError(
            f"--out {out} holds another sweep (other keys, values, seeds or --set); rerun "
            "that exact command or choose another --out"
        )
    foreign = [n for n in names if not _own(n)]
    if foreign:
        raise SweepError(
            f"--out {out} holds files msl-kit sweep did not write ({', '.join(foreign[:3])}); "
            "move them away or choose another --out"
        )


@contextlib.contextmanager
def claim_out(out: str | Path, study: str) -> Iterator[Path]:
    """Hold a sweep folder like a run folder: foreign content refused before anything is
    written, then a lock (pid + host) for as long as the sweep runs, and the sweep's mark."""
    out = Path(out)
    check_out(out, study)
    with rundir.claim(out, new=False):
        if not (out / MARK).is_file():
            text = json.dumps({"written_by": "msl-kit sweep", "study": study}, indent=2)
            atomic_write_text(out / MARK, text + "\n")
        yield out


def prepare_cell(cfg: Config, run_dir: Path) -> bool:
    """Whether the cell's folder holds a checkpoint to continue; one of another config is refused.
    A folder with no checkpoint yet (killed early) holds nothing to keep: it is cleared, so that
    the cell starts again (its name carries this config's hash: it is this cell's folder)."""
    if not run_dir.exists():
        return False
    run = RunFolder(run_dir)
    if any(p.is_file() for p in run.checkpoints()):
        from msl_kit.train import checkpoint

        state, path = checkpoint.load_latest(run_dir)
        if config_hash(checkpoint.stored_config(state, path)) != config_hash(cfg):
            raise SweepError(f"{run_dir} holds a run of another config; move it away and rerun")
        return True
    foreign = sorted({p.name for p in run_dir.iterdir()} - set(RunFolder.EARLY))
    if foreign:
        raise SweepError(
            f"{run_dir} holds files msl-kit did not write ({', '.join(foreign[:3])}); "
            "move them away and rerun"
        )
    try:
        owner = json.loads(run.lock.read_text())
    except (OSError, ValueError):
        owner = {}
    if owner and (owner.get("host") != HOST or pid_alive(owner.get("pid", 0))):
        raise SweepError(f"{run_dir} is in use by pid {owner.get('pid')} on {owner.get('host')}")
    shutil.rmtree(run_dir)  # the sweep's own folder, with no step worth keeping
    return False


def summarize(table: list[dict], keys: list[str]) -> list[dict]:
    """Mean and sample std over seeds per cell (std is nan for a single seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in table:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    summary = []
    for values, runs in groups.items():
        row = {**dict(zip(keys, values)), "seeds": len(runs)}
        for m in (*METRICS, "wall_s"):
            xs = [r[m] for r in runs]
            row[f"{m}_mean"] = statistics.fmean(xs)
            row[f"{m}_std"] = statistics.stdev(xs) if len(xs) > 1 else math.nan
        summary.append(row)
    return summary


def table_csv(table: list[dict]) -> str:
    """A list of dicts as CSV text, columns in first-seen order."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in table for k in r)))
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def markdown(summary: list[dict], keys: list[str]) -> str:
    """The summary as a markdown table, metrics in % as mean ± std."""

    def pm(r: dict, m: str) -> str:
        std = "" if math.isnan(r[f"{m}_std"]) else f" ± {100 * r[f'{m}_std']:.1f}"
        return f"{100 * r[f'{m}_mean']:.1f}{std}"

    head = [*keys, "seeds", "R@1", "MAP@R", "wall s"]
    body = [
        [
            *(str(r[k]) for k in keys),
            str(r["seeds"]),
            pm(r, "recall@1"),
            pm(r, "map@r"),
            f"{r['wall_s_mean']:.1f}",
        ]
        for r in summary
    ]
    return "".join(f"| {' | '.join(c)} |\n" for c in [head, ["---"] * len(head), *body])
