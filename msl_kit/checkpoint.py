"""Crash-safe checkpoint files: atomic writes, safe loading, and fallback to the last good one."""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file and what to do."""


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, fsync, then rename over it.

    A crash at any moment leaves either the old file or the new one, never a torn one, and a
    failed write (disk full) leaves the old file untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        message = (f"could not write {path} ({e.strerror or e}); the previous version of that file is "
                   f"untouched. Free disk space or fix permissions, then retry")
        # OSError(errno, ...) keeps the subclass (PermissionError, ...) and the errno callers test.
        raise (OSError(e.errno, message) if e.errno else OSError(message)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` for text files (history.csv, metrics.json)."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk too, or a power cut can undo it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: Path, keep_previous: bool = True) -> None:
    """Save `state` atomically; the file it replaces is kept as `<name>.prev.pt` for fallback."""
    path = Path(path)
    if keep_previous and path.exists():
        prev = path.with_suffix(".prev.pt")
        # Hard link, not copy: instant, and the old inode survives the rename below.
        prev.unlink(missing_ok=True)
        try:
            os.link(path, prev)
        except OSError:  # no hard links here: copy, atomically too, or a torn copy could be the fallback
            atomic_write_bytes(prev, lambda f: f.write(path.read_bytes()))
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def safe_load(path: Path, what: str = "checkpoint", map_location: str | torch.device = "cpu") -> object:
    """`torch.load(weights_only=True)` with errors that name the file and say what to do.

    A file holding Python objects (which could run code on load) is refused, never unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise CheckpointError(
                f"{what} {path} was refused: it holds Python objects other than tensors and plain "
                f"containers, which could run code when loaded. msl_kit never writes such files; turn off "
                f"safe loading only for a file whose source you trust"
            ) from None
        first = str(e).split(". ")[0][:160]  # torch goes on with advice that does not apply here
        raise CheckpointError(
            f"{what} {path} is truncated or corrupt ({type(e).__name__}: {first}); "
            f"it was probably cut off mid-write or is not a file of that kind"
        ) from None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load an msl_kit checkpoint safely (see `safe_load`)."""
    state = safe_load(path, "checkpoint", map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not an msl_kit checkpoint (no 'model' entry)")
    return state


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path]:
    """The newest readable checkpoint of a run: checkpoint.pt, else checkpoint.prev.pt."""
    run_dir = Path(run_dir)
    errors = []
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
            continue
        return state, path
    detail = "; ".join(errors) if errors else "no checkpoint.pt found"
    raise CheckpointError(f"cannot resume from {run_dir}: {detail}. Start a fresh run instead (drop --resume).")


def clear_partial_writes(run_dir: Path) -> list[Path]:
    """Delete temp files that a killed write left behind; the files they were meant for are intact."""
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def rng_state() -> dict:
    """Every random state a training step reads, in types that `weights_only` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(value: Any) -> Any:
    return [_to_plain(v) for v in value] if isinstance(value, tuple) else value


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
