"""Checkpoints: saved atomically with the previous one kept, loaded safely, exact RNG state.

The file primitives (atomic writes, `safe_load`) live in `msl_kit.files.atomic`.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msl_kit.files.atomic import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_bytes,
    safe_load,
)


def save_checkpoint(state: dict, path: Path, keep_previous: bool = True) -> None:
    """Save `state` atomically; the file it replaces is kept as `<name>.prev.pt` for fallback."""
    path = Path(path)
    if keep_previous and path.exists():
        prev = path.with_suffix(".prev.pt")
        # Hard link, not copy: instant, and the old inode survives the rename below.
        prev.unlink(missing_ok=True)
        try:
            os.link(path, prev)
        except OSError:  # no hard links: copy, atomically too, or a torn copy could be the fallback
            atomic_write_bytes(prev, lambda f: f.write(path.read_bytes()))
    atomic_torch_save(state, path)


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
    raise CheckpointError(
        f"cannot resume from {run_dir}: {detail}. Start a fresh run instead (drop --resume)."
    )


def clear_partial_writes(run_dir: Path) -> list[Path]:
    """Delete temp files a killed write left behind; the files they were meant for are intact."""
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
