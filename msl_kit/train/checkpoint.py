"""Checkpoints: saved atomically with the previous one kept, loaded safely (weights only, and
no code their config names), exact RNG state, and a trained model loaded back.

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
from torch import nn

from msl_kit.files.atomic import SafeLoadError, atomic_torch_save, atomic_write_bytes, safe_load
from msl_kit.train import recipe
from msl_kit.train.config import Config, flatten, import_plugins, resolve
from msl_kit.train.old_keys import ConfigNote
from msl_kit.train.rundir import RunFolder
from msl_kit.train.validation import DeviceError, check_device


class CheckpointError(SafeLoadError):
    """A checkpoint that cannot be used: unreadable, not msl_kit's, or not fitting its config."""


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
    """Load an msl_kit checkpoint safely (see `safe_load`); CheckpointError otherwise."""
    try:
        state = safe_load(path, "checkpoint", map_location)
    except CheckpointError:
        raise
    except SafeLoadError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not an msl_kit checkpoint (no 'model' entry)")
    return state


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path]:
    """The newest readable checkpoint of a run: checkpoint.pt, else checkpoint.prev.pt."""
    run_dir = Path(run_dir)
    errors = []
    for path in RunFolder(run_dir).checkpoints():
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
            continue
        return state, path
    detail = "; ".join(errors) if errors else f"no {RunFolder(run_dir).checkpoint.name} found"
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


def load_model_state(model: nn.Module, state: dict, path: Path) -> None:
    """Load a checkpoint's weights, naming the file when they do not fit the configured model."""
    try:
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:400]  # torch's message spans many lines
        raise CheckpointError(
            f"{path} does not fit the model its config describes: {detail}"
        ) from None


def stored_values(state: dict, path: Path) -> dict[str, Any]:
    """The dotted keys of the config a checkpoint was trained with (any version's form)."""
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(
            f"{path} holds weights but no stored config, so msl-kit cannot "
            "rebuild its model: it was not written by `msl-kit train`"
        )
    return flatten(state["config"])


def stored_config(state: dict, path: Path, **changes: Any) -> Config:
    """The config a checkpoint was trained with, with `changes` ({dotted key: value}) applied
    before it is checked. Nothing it names is imported: a plugin it needs is one line asking
    for `--plugin NAME` (see `config.resolve(stored=True)`)."""
    values = {**stored_values(state, path), **changes}
    return resolve(values, stored=True, what=f"the checkpoint {path}")


def use_device(stored: str, given: str | None) -> str:
    """Where to use a trained model: `given` (checked, DeviceError in one line), else the device
    it was trained on where this machine has it, else the CPU (with a note)."""
    if given:
        try:
            return check_device(given)
        except DeviceError as e:
            raise DeviceError(f"device {given!r} cannot be used: {e}; use cpu (or auto)") from None
    try:
        return check_device(stored)
    except DeviceError:
        warnings.warn(
            f"the model was trained on {stored}, which this machine lacks: using the CPU",
            ConfigNote,
            stacklevel=3,
        )
        return "cpu"


def load_model(
    checkpoint: str | Path | None = None,
    cfg: Config | None = None,
    device: str | None = "cpu",
    plugins: list[str] | tuple[str, ...] = (),
) -> tuple[nn.Module, Config]:
    """A trained model and its stored config from a checkpoint file or run folder, or, with no
    checkpoint, the fresh model `cfg` describes (the same weights its training starts from).

    `device`: where the model goes (None: the device it was trained on where this machine has
    it, else the CPU); the returned config says it. `plugins` are imported first: the only
    way a checkpoint's loss or backbone from a plugin is found (a checkpoint imports nothing).
    """
    import_plugins(list(plugins))
    if checkpoint is not None:
        path = RunFolder.checkpoint_of(checkpoint)
        state = load_checkpoint(path)
        stored = str(stored_values(state, path).get("device", "cpu"))
        cfg = stored_config(state, path, device=use_device(stored, device))
        model = recipe.build_model(cfg, load_pretrained=False)  # the checkpoint holds every weight
        load_model_state(model, state, path)
        device = cfg.device
    else:
        cfg = cfg or resolve({})
        recipe.seed_everything(cfg.seed)  # as engine.train does before building the model
        model = recipe.build_model(cfg)
    return model.to(recipe.pick_device(device or "cpu")).eval(), cfg
