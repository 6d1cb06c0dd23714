"""Sweeps over dotted config keys on Optuna: a grid, or a TPE search over ranges.

Every cell is a normal run folder (`engine.train`) under OUT/runs/, named and checked by its full
config's hash; a result is reported only for its own config. Optuna's storage is the bookkeeping:
`sqlite:///OUT/optuna.db` by default, or a `--storage` URL that several machines share. A rerun
of the same command skips finished cells; a cell left RUNNING by a killed worker is failed and
queued again (Optuna's heartbeat; on the same host a dead pid says so at once). SIGINT / SIGTERM
stop every worker (each checkpoints its cell). Pure orchestration: reports go through `on_cell`
and return values. What a sweep runs (spec, cells, configs, folders, tables) is msl_kit.sweep.spec.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from msl_kit.sweep.spec import (
    HOST,
    METRICS,
    SweepError,
    SweepSpec,
    cell_config,
    cell_name,
    cells,
    check_spec,
    claim_out,
    config_hash,
    markdown,
    prepare_cell,
    sigterm_interrupts,
    summarize,
    table_csv,
)
from msl_kit.train.config import Config
from msl_kit.train.rundir import pid_alive

HEARTBEAT_S, GRACE_S = 10, 60  # a worker silent for a minute is stale (other machines)
POLL_S = 2.0  # how often an idle worker looks for work while others still run cells
STOP_S = 120  # how long stopped workers may take to checkpoint their cells before being killed


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
    """The spec's study in `url` (made if missing with `create`), with a GridSampler (grid) or
    TPESampler (search); a storage that cannot be read or written is one SweepError line."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The heartbeat and its retry callback are marked experimental; they are the point here.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        storage = _storage(url)
        study = _create(spec, storage, create)
        study.set_user_attr("opened_by", f"{HOST}:{os.getpid()}")  # fails now if read-only
    except (SQLAlchemyError, optuna.exceptions.OptunaError, ImportError, OSError, ValueError) as e:
        while e.__cause__ is not None:  # Optuna wraps the driver's message
            e = e.__cause__
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SweepError(
            f"cannot use --storage {url}: {reason}; give a database URL on a writable disk, "
            "e.g. sqlite:///path/optuna.db"
        ) from None
    return study


def _create(spec: SweepSpec, storage: Any, create: bool) -> Any:
    if spec.trials:
        sampler = optuna.samplers.TPESampler()
    else:
        sampler = optuna.samplers.GridSampler({**spec.grid, "seed": spec.seeds})
    # Other studies may share a --storage; the sweep folder's mark says which one is this one's.
    name = spec.fingerprint()
    if not create:  # a worker joins the study its sweep made
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
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
        if t.state == TrialState.RUNNING and pid and not pid_alive(pid):
            try:
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
            retry(study, storage.get_trial(t._trial_id))
        elif t.state == TrialState.FAIL and retry_failed:
            type(retry)(max_retry=None)(study, t)
    optuna.storages.fail_stale_trials(study)


def run_cell(cfg: Config, run_dir: Path) -> dict:
    """Train one cell (continuing a checkpoint of its very config if one was left); its record."""
    from msl_kit.train import engine

    start, resume = datetime.now(), prepare_cell(cfg, run_dir)
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
        "config": config_hash(cfg),
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
        cfgs = [cell_config(spec, params, seed, threads) for seed in seeds]
        trial.set_user_attr("configs", [config_hash(c) for c in cfgs])  # what this trial runs
        runs = []
        for seed, cfg in zip(seeds, cfgs):
            name = cell_name(spec, params, seed, number)
            runs.append({"trial": trial.number, **params, **run_cell(cfg, out / "runs" / name)})
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
    quiet = _QuietStop()
    optuna.logging.get_logger("optuna.study._optimize").addFilter(quiet)
    try:
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
    finally:
        optuna.logging.get_logger("optuna.study._optimize").removeFilter(quiet)


class _QuietStop(logging.Filter):
    """Drops Optuna's log of a trial stopped by Ctrl-C / SIGTERM (a failure with a traceback)."""

    stopped = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        self.stopped = self.stopped or isinstance(error, KeyboardInterrupt)
        return not self.stopped


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    jobs: int = 1,
    storage: str | None = None,
    on_cell: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or finish) a sweep with `jobs` worker processes of cores // jobs torch threads each
    (unless train.threads is set); returns rows, summary and failures. SIGINT / SIGTERM stop
    every worker and raise KeyboardInterrupt: rerunning the same sweep resumes it."""
    if jobs < 1:
        raise SweepError(f"--jobs must be at least 1, got {jobs}")
    check_spec(spec)
    with claim_out(out, spec.fingerprint()) as out, sigterm_interrupts():
        url = storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
        study = open_study(spec, url, create=True)
        checked_rows(study, spec)  # before any cell runs: no result of another config
        reap(study, spec, retry_failed=True)
        threads = max(1, (os.cpu_count() or 1) // jobs)
        if jobs == 1:
            run_worker(spec, out, url, threads, on_cell)
        else:
            _run_workers(jobs, (spec, str(out), url, threads, on_cell))
        return write_tables(out, open_study(spec, url), spec)  # fresh: workers ran elsewhere


def _die_with_parent(parent: int) -> None:
    """Linux: this worker gets SIGTERM when the sweep's parent dies, even by SIGKILL, so no
    worker trains on alone (it checkpoints its cell and stops); elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(parent: int, *args: Any) -> None:
    with sigterm_interrupts():
        try:
            _die_with_parent(parent)
            run_worker(*args)
        except KeyboardInterrupt:
            sys.exit(130)  # the parent reports the stop, once


def _run_workers(jobs: int, args: tuple) -> None:
    """`jobs` spawned run_worker processes; on KeyboardInterrupt (Ctrl-C, SIGTERM) each is
    stopped (its cell checkpoints) and waited for, then killed if it takes over STOP_S."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch's threads started is unsafe
    procs = [ctx.Process(target=_worker, args=(os.getpid(), *args)) for _ in range(jobs)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        started = [p for p in procs if p.pid is not None]
        try:
            for p in started:
                p.terminate()  # SIGTERM: the engine checkpoints the cell, then the worker stops
            deadline = time.monotonic() + STOP_S
            for p in started:
                p.join(max(0.0, deadline - time.monotonic()))
        finally:  # a second Ctrl-C, or a worker that does not stop: no worker outlives the sweep
            for p in (p for p in started if p.is_alive()):
                p.kill()
                p.join()
        raise
    codes = {p.exitcode for p in procs} - {0}
    if codes == {130}:  # every worker that stopped was interrupted and checkpointed its cell:
        # a stop, as when this process gets the Ctrl-C itself (a signal sent to the workers
        # alone, or one this process had not acted on before its workers ended)
        raise KeyboardInterrupt("the sweep's workers were interrupted")
    if codes:
        raise SweepError(
            "a worker process stopped with an error (see above); rerun the "
            "same command to finish the sweep"
        )


def checked_rows(study: Any, spec: SweepSpec) -> list[dict]:
    """Every finished run of the study, each checked to be of the config this spec gives its
    cell now (SweepError otherwise: e.g. the --config file was edited after those runs)."""
    rows = [
        r
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        for r in t.user_attrs.get("runs", [])
    ]
    for r in rows:
        cfg = cell_config(spec, {k: r[k] for k in spec.keys}, r["seed"])
        if r.get("config") != config_hash(cfg):
            raise SweepError(
                f"the sweep's study holds a result for {r['run']} of another config than this "
                "command gives that cell (was the --config file edited?); choose a new --out "
                "(and --storage) for the new configs"
            )
    return rows


def write_tables(out: Path, study: Any, spec: SweepSpec) -> dict:
    """Write sweep.csv, summary.csv and summary.md from the study; return them with failures."""
    from msl_kit.files.atomic import atomic_write_text

    # One row per finished run (keys, seed, R@1, MAP@R, wall time, run folder), in grid order.
    table = sorted(
        checked_rows(study, spec),
        key=lambda r: (
            *[spec.grid[k].index(r[k]) for k in spec.grid],
            r["trial"] if spec.trials else 0,
            r["seed"],
        ),
    )
    summary = summarize(table, spec.keys)
    for name, text in (
        ("sweep.csv", table_csv(table)),
        ("summary.csv", table_csv(summary)),
        ("summary.md", markdown(summary, spec.keys)),
    ):
        atomic_write_text(Path(out) / name, text)
    failed = [t.params for t in cell_states(study, spec).values() if t.state == TrialState.FAIL]
    return {"rows": table, "summary": summary, "failed": failed, "keys": spec.keys}
