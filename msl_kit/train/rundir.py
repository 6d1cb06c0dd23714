"""Run folders: their file names (`RunFolder`), one writer at a time, never clobbering files the
kit did not write.

`RunFolder` is the one place that names a run's files: the config, the history, the metrics,
the checkpoints, the weight snapshots, the lock and the record of the kit's own writes; every
other module asks it. `claim` takes a lock file holding the writer's pid and host, created
atomically (O_EXCL), so two `msl-kit train --out same` cannot both write; a lock whose
process is gone (same host) is stale and taken over.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from msl_kit.errors import MslKitError
from msl_kit.files.atomic import atomic_write_text


class RunFolder:
    """A run folder and the names of the files `msl-kit train` writes into it.

    `RunFolder(path).metrics` is its metrics.json, `.checkpoint` its checkpoint.pt, and so on;
    `RunFolder.checkpoint_of(path)` is a checkpoint file given as itself or as its run folder.
    """

    CONFIG = "config.yaml"
    HISTORY = "history.csv"
    METRICS = "metrics.json"
    CHECKPOINT = "checkpoint.pt"
    PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before the last, kept for a torn write
    CORRUPT = "checkpoint.corrupt.pt"  # an unreadable checkpoint set aside on resume
    BEST = "best.pt"
    SNAPSHOTS = "snapshots"  # snapshots/iter_NNNNNN.pt: weights at each evaluation
    TENSORBOARD = "tensorboard"
    LOCK = ".msl_kit.lock"
    # The sha256 of every config.yaml the kit wrote into a run, and the resume extensions, each
    # recorded before the config.yaml it leads to (see `write_config`).
    WRITTEN = ".msl_kit.config.json"
    EVAL_METRICS = "metrics_eval.json"  # `msl-kit evaluate`'s default output, beside the file
    # What a run writes, in the order a reader meets them.
    FILES = (WRITTEN, CONFIG, HISTORY, CHECKPOINT, PREVIOUS, BEST, METRICS)
    # What a run folder may hold before its first checkpoint (the engine writes these first).
    EARLY = (*FILES, LOCK, SNAPSHOTS, TENSORBOARD)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def history(self) -> Path:
        return self.path / self.HISTORY

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def previous(self) -> Path:
        return self.path / self.PREVIOUS

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def written(self) -> Path:
        return self.path / self.WRITTEN

    def checkpoints(self) -> list[Path]:
        """The checkpoint, then the one before it: where a resume looks, in that order."""
        return [self.checkpoint, self.previous]

    def snapshot(self, iteration: int) -> Path:
        """The weight snapshot of `iteration`."""
        return self.path / self.SNAPSHOTS / f"iter_{iteration:06d}.pt"

    def snapshots(self) -> list[Path]:
        """The weight snapshots, in training order."""
        return sorted((self.path / self.SNAPSHOTS).glob("iter_*.pt"))

    def finished(self) -> bool:
        """Whether the run wrote its final metrics."""
        return self.metrics.is_file()

    def read_metrics(self) -> dict:
        """metrics.json; RunFolderError (one line) if the run has not finished."""
        if not self.finished():
            raise RunFolderError(
                f"{self.metrics} is missing: the run has not finished "
                "(resume it with msl-kit train --resume DIR)"
            )
        return json.loads(self.metrics.read_text())

    @classmethod
    def checkpoint_of(cls, path: str | os.PathLike) -> Path:
        """A checkpoint file, or a run folder's checkpoint."""
        path = Path(path)
        return path / cls.CHECKPOINT if path.is_dir() else path

    @classmethod
    def find(cls, root: str | os.PathLike) -> list[RunFolder]:
        """The finished runs at `root` or anywhere under it, sorted by path."""
        root = Path(root)
        if (root / cls.METRICS).is_file():
            return [cls(root)]
        return [cls(p.parent) for p in sorted(root.rglob(cls.METRICS))]


class RunFolderError(MslKitError, OSError):
    """A run folder that cannot be used as asked; the message says what to do instead."""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def take_lock(lock: Path, busy: str, error: type[Exception] = RunFolderError) -> Path:
    """Create `lock` atomically (O_EXCL) holding this process's pid and host; a lock left by a
    process that is gone (same host) is taken over with a warning. A live holder is refused
    with `error`: "`busy` (pid N on HOST); wait for it to finish, ...". Run folders and
    `msl-kit embed --out` files share this one mechanism."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = {}
            owner = owner if isinstance(owner, dict) else {}
            same_host = owner.get("host") == me["host"]
            if same_host and isinstance(owner.get("pid"), int) and not pid_alive(owner["pid"]):
                warnings.warn(
                    f"{lock} was left by a process that is gone (pid {owner['pid']}); "
                    "taking it over",
                    RuntimeWarning,
                    stacklevel=4,
                )
                lock.unlink(missing_ok=True)
                continue
            who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
            raise error(
                f"{busy} ({who}); wait for it to finish, choose another --out, or delete "
                f"{lock} if that process is really gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise error(f"could not take the lock {lock}; try again")


def _take_lock(folder: Path) -> Path:
    return take_lock(RunFolder(folder).lock, f"{folder} is in use by another msl-kit run")


@contextlib.contextmanager
def claim(folder: str | Path, *, new: bool) -> Iterator[Path]:
    """Hold `folder` for one writer. `new=True` (a fresh run) needs a missing or empty folder."""
    folder = Path(folder)
    if new and folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file; choose a folder")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = _take_lock(folder)  # first: a folder in use is reported as such
    except RunFolderError:
        raise
    except OSError as e:
        raise RunFolderError(
            f"cannot write to the output folder {folder} ({e.strerror}); choose another with --out"
        ) from None
    run = RunFolder(folder)
    if new and any(p.name != run.LOCK for p in folder.iterdir()):
        lock.unlink(missing_ok=True)
        if any(p.exists() for p in run.checkpoints()):
            hint = f"it holds a run: continue it with `msl-kit train --resume {folder}`"
        elif run.config.exists():  # nothing to resume: --resume would refuse it
            hint = "it holds a config.yaml but no checkpoint, so there is nothing to resume"
        else:
            hint = "it holds files msl-kit did not write"
        raise RunFolderError(
            f"{folder} is not empty ({hint}), or choose another --out (a new or "
            "empty folder); nothing in it was changed"
        )
    try:
        yield folder
    finally:
        lock.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a run refused before its first write leaves nothing
            if created and not any(folder.iterdir()):
                folder.rmdir()


def read_written(folder: Path) -> dict:
    """What the kit recorded of its writes to `folder`/config.yaml: {"sha256": [...],
    "extensions": [...]} (both empty for runs from before the record, or without one)."""
    try:
        record = json.loads(RunFolder(folder).written.read_text())
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    return {k: list(record.get(k) or []) for k in ("sha256", "extensions")}


def write_config(folder: Path, text: str, extension: dict | None = None) -> None:
    """Write `text` as the folder's config.yaml, recording its hash (and the resume `extension` that
    changes it) first, both atomically: whenever a crash comes, a resume knows every config.yaml
    the kit wrote from a user's edit, and the extension is replayed rather than lost."""
    record = read_written(folder)
    record["sha256"].append(hashlib.sha256(text.encode()).hexdigest())
    if extension is not None:
        record["extensions"].append(extension)
    run = RunFolder(folder)
    atomic_write_text(run.written, json.dumps(record, indent=1) + "\n")
    atomic_write_text(run.config, text)


def kit_wrote(path: Path) -> bool:
    """Whether the file at `path` (a run's config.yaml) is byte for byte one the kit wrote."""
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return False
    return digest in read_written(Path(path).parent)["sha256"]


def write_history(path: Path, rows: list[dict]) -> None:
    """history.csv (atomically): one row per logged iteration, columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def check_metrics_out(path: Path) -> None:
    """`msl-kit evaluate --out`: never replace a checkpoint, a run's files or a foreign file."""
    path = Path(path)
    if path.is_dir():
        raise RunFolderError(
            f"--out {path} is a folder; give a file name like {path / RunFolder.EVAL_METRICS}"
        )
    if not path.parent.is_dir():
        raise RunFolderError(
            f"cannot write {path}: the folder {path.parent} does not exist; create it or "
            "choose another --out"
        )
    if not os.access(path.parent, os.W_OK):
        raise RunFolderError(f"cannot write {path}: {path.parent} is not writable")
    if not path.exists():
        return
    written_by = None
    if path.is_file() and path.suffix == ".json":
        try:
            written_by = json.loads(path.read_text()).get("written_by")
        except (OSError, ValueError, AttributeError):
            pass
    if written_by != "msl-kit evaluate":
        raise RunFolderError(
            f"{path} exists and was not written by `msl-kit evaluate`; it is "
            "left alone: choose a new --out file"
        )
