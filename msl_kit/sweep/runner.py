"""Sweeps over dotted config keys on Optuna: a grid, or a TPE search over ranges.

Every cell is a normal run folder (`engine.train`) under OUT/runs/. Optuna's storage is the
bookkeeping: `sqlite:///OUT/optuna.db` by default, or any `--storage` URL that several machines
share. A rerun of the same command skips finished cells; a cell left RUNNING by a killed worker
is failed and queued again (Optuna's heartbeat; on the same host a dead pid says so at once).
Pure orchestration: reports go through `on_cell` and return values, never drawing.
The spec (`SweepSpec`, `make_spec`, cells and their configs) lives in msl_kit.sweep_spec and is
re-exported here.
"""

from __future__ import annotations

import csv
import io
import math
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from msl_kit.sweep.spec import (
    SweepError,
    SweepSpec,
    cell_config,
    cell_name,
    cells,
    check_spec,
)
from msl_kit.train.config import Config

HEARTBEAT_S, GRACE_S = 10, 60  # a worker silent for a minute is stale (other machines)
POLL_S = 2.0  # how often an idle worker looks for work while others still run cells
METRICS = ("recall@1", "map@r")
HOST = socket.gethostname()


def _storage(url: str) -> Any:
    # Optuna 4.9 renamed the retry callback and its argument; the old names go in 6.0.
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    callback = {
        "heartbeat_stale_trial_callback" if retry else "failed_trial_callback": (
            retry or optuna.storages.RetryFailedTrialCallback
        )(max_retry=3)
    }
    # Workers of one machine share the SQLite file: wait for its lock rather than fail at once.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **callback
    )


def open_study(spec: SweepSpec, url: str, *, create: bool = False) -> Any:
    """The spec's study in `url`, with a GridSampler (grid) or TPESampler (search)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The heartbeat and its retry callback are marked experimental; they are the point here.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = _storage(url)
    if spec.trials:
        sampler = optuna.samplers.TPESampler()
    else:
        sampler = optuna.samplers.GridSampler({**spec.grid, "seed": spec.seeds})
    name = spec.fingerprint()
    others = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if create and url.startswith("sqlite") and others and name not in others:
        raise SweepError(
            f"{url} holds a sweep with other keys, values, seeds or --set; "
            "rerun that exact command or choose another --out"
        )
    return optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, direction="maximize", load_if_exists=True
    )


def _group(spec: SweepSpec, trial: Any) -> Any:
    """What makes two trials the same cell: grid values + seed, or the search trial retried."""
    if spec.trials:
        return trial.system_attrs.get("failed_trial", trial.number)
    return tuple(sorted((k, repr(v)) for k, v in trial.params.items()))


def cell_states(study: Any, spec: SweepSpec) -> dict:
    """Each started cell's latest trial (a retry supersedes the trial it repeats)."""
    latest: dict = {}
    for t in study.get_trials(deepcopy=False):
        if t.state != TrialState.PRUNED and (t.params or spec.trials):
            latest[_group(spec, t)] = t  # trials come in number order
    return latest


def _pending(study: Any, spec: SweepSpec) -> tuple[int, int]:
    """(cells still to start here, cells running somewhere)."""
    latest = cell_states(study, spec).values()
    total = spec.trials or len(cells(spec)) * len(spec.seeds)
    waiting = sum(t.state == TrialState.WAITING for t in latest)
    running = sum(t.state == TrialState.RUNNING for t in latest)
    return max(0, total - len(latest)) + waiting, running


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except OSError as e:
        return not isinstance(e, ProcessLookupError)  # PermissionError: another user's, alive
    return True


def reap(study: Any, spec: SweepSpec, retry_failed: bool = False) -> None:
    """Fail stale RUNNING trials and queue them again. A dead pid on this host is stale at once
    (no need to wait out the heartbeat's grace period); `retry_failed` also queues cells that
    failed in an earlier invocation, as a rerun of the command should."""
    storage = study._storage
    retry = getattr(
        storage, "get_heartbeat_stale_trial_callback", storage.get_failed_trial_callback
    )()
    for t in cell_states(study, spec).values():
        pid = t.user_attrs.get("pid") if t.user_attrs.get("host") == HOST else None
        if t.state == TrialState.RUNNING and pid and not _alive(pid):
            try:
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
            retry(study, storage.get_trial(t._trial_id))
        elif t.state == TrialState.FAIL and retry_failed:
            type(retry)(max_retry=None)(study, t)
    optuna.storages.fail_stale_trials(study)


def run_cell(cfg: Config, run_dir: Path) -> dict:
    """Train one cell (continuing its checkpoint if a killed worker left one); its record."""
    from msl_kit.train import engine

    start, resume = datetime.now(), (run_dir / "checkpoint.pt").is_file()
    metrics = engine.train(cfg, run_dir, resume=resume)
    end = datetime.now()
    return {
        "seed": cfg.seed,
        **{m: metrics.get(m, math.nan) for m in METRICS},
        "wall_s": round((end - start).total_seconds(), 2),
        "start": start.isoformat(timespec="milliseconds"),
        "end": end.isoformat(timespec="milliseconds"),
        "run": f"{run_dir.parent.name}/{run_dir.name}",
        "resumed": resume,
    }


def _objective(spec: SweepSpec, out: Path, threads: int, on_cell: Callable | None):
    def objective(trial: optuna.Trial) -> float:
        # Who runs this trial, first: a kill from here on is detectable by the pid.
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", os.getpid())
        if spec.trials:
            params = {
                k: (trial.suggest_float(k, lo, hi, log=log))
                for k, (lo, hi, log) in spec.ranges.items()
            }
            seeds = spec.seeds
        else:
            params = {k: trial.suggest_categorical(k, v) for k, v in spec.grid.items()}
            seeds = [trial.suggest_categorical("seed", spec.seeds)]
            if _taken(trial, spec):
                raise optuna.TrialPruned("another worker runs this cell")
        frozen = trial.study._storage.get_trial(trial._trial_id)
        number = frozen.system_attrs.get("failed_trial", trial.number)
        runs = []
        for seed in seeds:
            name = cell_name(spec, params, seed, number)
            runs.append(
                {
                    "trial": trial.number,
                    **params,
                    **run_cell(cell_config(spec, params, seed, threads), out / "runs" / name),
                }
            )
            if on_cell:
                on_cell(runs[-1])
        trial.set_user_attr("runs", runs)
        return statistics.fmean(r["recall@1"] for r in runs)

    return objective


def _taken(trial: Any, spec: SweepSpec) -> bool:
    """A lower-numbered trial of the same cell is running or done (GridSampler may hand the same
    cell to two workers once the grid is exhausted; the lower number keeps it)."""
    study, me = trial.study, trial.study._storage.get_trial(trial._trial_id)
    return any(
        t.number < trial.number
        and t.state in (TrialState.RUNNING, TrialState.COMPLETE)
        and t.params
        and _group(spec, t) == _group(spec, me)
        for t in study.get_trials(deepcopy=False)
    )


def run_worker(
    spec: SweepSpec,
    out: str | Path,
    url: str,
    threads: int = 0,
    on_cell: Callable[[dict], None] | None = None,
) -> None:
    """Run cells of the study until none is left to start and none runs elsewhere."""
    out = Path(out)
    study = open_study(spec, url)
    objective = _objective(spec, out, threads, on_cell)
    while True:
        reap(study, spec)
        todo, running = _pending(study, spec)
        if not todo and not running:
            return
        if not todo:  # wait for cells elsewhere: one of them may turn stale and come back
            time.sleep(POLL_S)
            continue
        study.optimize(
            objective,
            n_trials=1,
            catch=(Exception,),
            gc_after_trial=False,
            callbacks=[lambda s, t: write_tables(out, s, spec)],
        )


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    jobs: int = 1,
    storage: str | None = None,
    on_cell: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or finish) a sweep with `jobs` worker processes of cores // jobs torch threads each
    (unless train.threads is set); returns rows, summary and failures."""
    if jobs < 1:
        raise SweepError(f"--jobs must be at least 1, got {jobs}")
    check_spec(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    study = open_study(spec, url, create=True)
    reap(study, spec, retry_failed=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        run_worker(spec, out, url, threads, on_cell)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch's threads started is unsafe
        procs = [
            ctx.Process(target=run_worker, args=(spec, str(out), url, threads, on_cell))
            for _ in range(jobs)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SweepError(
                "a worker process stopped with an error (see above); rerun the "
                "same command to finish the sweep"
            )
    return write_tables(out, open_study(spec, url), spec)  # fresh: workers ran elsewhere


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


def _csv(table: list[dict]) -> str:
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


def write_tables(out: Path, study: Any, spec: SweepSpec) -> dict:
    """Write sweep.csv, summary.csv and summary.md from the study; return them with failures."""
    from msl_kit.files.atomic import atomic_write_text

    # One row per finished run (keys, seed, R@1, MAP@R, wall time, run folder), in grid order.
    table = sorted(
        (
            r
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            for r in t.user_attrs.get("runs", [])
        ),
        key=lambda r: (
            *[spec.grid[k].index(r[k]) for k in spec.grid],
            r["trial"] if spec.trials else 0,
            r["seed"],
        ),
    )
    summary = summarize(table, spec.keys)
    for name, text in (
        ("sweep.csv", _csv(table)),
        ("summary.csv", _csv(summary)),
        ("summary.md", markdown(summary, spec.keys)),
    ):
        atomic_write_text(Path(out) / name, text)
    failed = [t.params for t in cell_states(study, spec).values() if t.state == TrialState.FAIL]
    return {"rows": table, "summary": summary, "failed": failed, "keys": spec.keys}
