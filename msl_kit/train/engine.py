"""Iteration-based training with exact resume. Reports through callbacks; never draws.

`train(cfg, out)` is the whole loop: set up (`Trainer`), then per iteration a step, an
evaluation when due, a history row and a checkpoint when due. Ctrl-C / SIGTERM finish the
current step, save a checkpoint and raise `Interrupted`, which names the resume command.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from msl_kit.train import checkpoint as ckpt
from msl_kit.train import distributed, evaluation, recipe, rundir
from msl_kit.train.config import (
    Config,
    flatten,
    import_plugins,
    parse_override,
    read_yaml,
    resolve,
    to_dict,
)
from msl_kit.train.rundir import RunFolder
from msl_kit.train.trainer import Callback, DivergenceError, Trainer
from msl_kit.train.validation import ConfigError, check_ranks

# What `--resume DIR --set ...` may change: how long the run goes and how often it reports.
RESUME_KEYS = ("train.iterations", "train.eval_every", "train.checkpoint_every", "train.log_every")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: a checkpoint of the last finished step was written first."""

    def __init__(self, out: Path, iteration: int) -> None:
        super().__init__(f"interrupted at iteration {iteration}; checkpoint saved in {out}")
        self.out, self.iteration = out, iteration


def resumed_config(out: Path, state: dict, path: Path, overrides: Iterable[str] = ()) -> Config:
    """The stored config of a run, refusing an edited config.yaml, with the allowed overrides.

    Extensions that an earlier `--resume --set` recorded but no checkpoint holds yet (a crash
    came before the next save) are replayed first and added to `state["resumes"]`."""
    done = list(state.get("resumes", []))
    pending = [e for e in rundir.read_written(out)["extensions"] if e not in done]
    replayed = [t for e in pending for t in e["overrides"]]
    base = _with_overrides(ckpt.stored_config(state, path), replayed)
    stored = flatten(to_dict(base))
    state["resumes"] = done + pending
    on_disk = RunFolder(out).config
    if on_disk.is_file() and not rundir.kit_wrote(on_disk):  # the kit's own writes are no edits
        what = f"the edited {on_disk}"
        edited = flatten(to_dict(resolve(read_yaml(on_disk), stored=True, what=what)))
        changed = [
            f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in edited.items() if stored.get(k) != v
        ]
        if changed:
            raise ConfigError(
                f"{on_disk} was edited after the run started ({'; '.join(changed[:4])}); "
                f"a resumed "
                "run keeps the config stored in its checkpoint. Undo the edit, change only "
                f"{', '.join(RESUME_KEYS)} with --set, or start a new run from the edited "
                "file with "
                f"`msl-kit train --config {on_disk} --out NEW_DIR`"
            )
    cfg = _with_overrides(base, overrides)
    if cfg.train.iterations < state["iteration"]:
        raise ConfigError(
            f"train.iterations = {cfg.train.iterations} is below the {state['iteration']} "
            f"iterations this run has already done; use a larger value"
        )
    return cfg


def _with_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """`cfg` with `--set` overrides of RESUME_KEYS only (anything else is refused)."""
    values = flatten(to_dict(cfg))
    for text in overrides:
        key, value = parse_override(text)
        if key not in RESUME_KEYS:
            raise ConfigError(
                f"--set {key} cannot change on --resume (the run was trained with its "
                f"stored value); only {', '.join(RESUME_KEYS)} can. Start a new run "
                "to change it"
            )
        values[key] = value
    return resolve(values, stored=True)


@contextlib.contextmanager
def _stop_requests() -> Iterator[dict]:
    """SIGINT / SIGTERM set a flag that the loop checks after each step (a second Ctrl-C stops
    at once). Outside the main thread, signals are left alone."""
    flag = {"signal": None}

    def request(signum: int, frame: Any) -> None:
        flag["signal"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        old = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        old = {}
    try:
        yield flag
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def train(
    cfg: Config | None,
    out: str | Path,
    *,
    callbacks: Iterable[Callback] = (),
    resume: bool = False,
    loss_fn: nn.Module | None = None,
    overrides: Iterable[str] = (),
) -> dict:
    """Train as `cfg` says, writing config.yaml, history.csv, checkpoint.pt, best.pt, metrics.json.

    `out` must be a new or empty folder; it is locked while the run writes. With `resume=True`,
    continue from the last complete checkpoint in `out` with its stored config (`overrides` may
    change only RESUME_KEYS); on the CPU the resumed run ends with exactly the metrics of an
    uninterrupted one. `loss_fn` replaces the configured loss (to compare with other libraries).
    """
    out, state, path = Path(out), None, None
    if resume:  # before the folder is claimed, so that a mistyped --resume DIR is not created
        state, path = ckpt.load_latest(out)
        cfg = resumed_config(out, state, path, overrides)
    assert cfg is not None, "train needs a config unless it resumes"
    dist = distributed.init_distributed()
    claim = rundir.claim(out, new=not resume) if dist.rank == 0 else contextlib.nullcontext(out)
    with claim, _stop_requests() as stop:
        run = Trainer(
            cfg, out, dist, loss_fn=loss_fn, state=state, state_path=path, overrides=list(overrides)
        )
        callbacks = run.callbacks(callbacks)
        for cb in callbacks:
            cb.on_start(run.cfg, run.iteration, run.cfg.train.iterations)
        try:
            for images, labels, indices in run.loader:
                record = run.step(images, labels, indices)
                if run.due(run.cfg.train.eval_every):
                    record.update(run.evaluate())
                    for cb in callbacks:
                        cb.on_eval(run.iteration, run.results)
                run.log(record)
                for cb in callbacks:
                    cb.on_step(record)
                if run.due(run.cfg.train.checkpoint_every) or stop["signal"]:
                    run.save()
                if stop["signal"] and not run.finished:
                    raise Interrupted(out, run.iteration)
        except RuntimeError as e:
            if not stop["signal"] or isinstance(e, DivergenceError):
                raise
            # DataLoader workers share the terminal's process group: Ctrl-C stopped them too, and
            # the loader reports that as a RuntimeError. The last finished step is still whole.
            run.save()
            raise Interrupted(out, run.iteration) from None
        final = run.finish()
    for cb in callbacks:
        cb.on_end(final)
    return final


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str | None = None,
    device: str | None = None,
    metric: str | None = None,
    lone_queries: str | None = None,
    plugins: list[str] | tuple[str, ...] = (),
) -> tuple[dict, Config]:
    """Load a checkpoint (safely) with its stored config and evaluate it; the given options
    replace the stored eval.split, device, eval.metric, eval.lone_queries (the stored device
    is used where this machine has it, else the CPU). `plugins` are imported first."""
    import_plugins(list(plugins))
    path = Path(path)
    state = ckpt.load_checkpoint(path)
    stored = str(ckpt.stored_values(state, path).get("device", "cpu"))
    given = {"eval.split": split, "eval.metric": metric, "eval.lone_queries": lone_queries}
    changes = {k: v for k, v in given.items() if v}
    cfg = ckpt.stored_config(state, path, device=ckpt.use_device(stored, device), **changes)
    dev = recipe.pick_device(cfg.device)
    model = recipe.build_model(cfg, load_pretrained=False)
    ckpt.load_model_state(model, state, path)
    model.to(dev)
    data = recipe.eval_data(cfg)
    check_ranks(cfg, evaluation.max_rank(*data))
    return evaluation.evaluate(model, *data, dev, cfg.eval.ks, recipe.eval_options(cfg)), cfg
