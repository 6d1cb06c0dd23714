"""File I/O at the bottom of the package: atomic writes, fsync, safe torch loading and saving.

`checkpoint`, `models` and the CLI write and read files through here, so that every file
msl_kit writes is either the old version or the complete new one, never a torn one, and no
file is ever unpickled into arbitrary Python objects. Downloads live in `msl_kit.files.download`.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from msl_kit.errors import MslKitError


class SafeLoadError(MslKitError, RuntimeError):
    """A torch file (checkpoint, weights) that cannot be read safely: missing, holding Python
    objects, truncated or corrupt; the message names it and what to do."""


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, fsync, then rename over it.

    A crash at any moment leaves either the old file or the new one, never a torn one, and a
    failed write (disk full) leaves the old file untouched and removes the temp file. An
    OSError is re-raised as OSError with the same errno and a message naming `path`.
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
        raise _explained(e, path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _explained(e: OSError, path: Path) -> OSError:
    """`e` with a message that says which file, what happened and what survived."""
    message = f"could not write {path} ({e.strerror or e}); "
    if e.errno == errno.ENOSPC:
        message += (
            f"the disk holding {path.parent} is full. The previous version of that file is "
            "untouched (a previous checkpoint is kept). Free disk space, then retry"
        )
    else:
        message += (
            "the previous version of that file is untouched. Free disk space or fix "
            "permissions, then retry"
        )
    # OSError(errno, ...) keeps the subclass (PermissionError, ...) and the errno callers test.
    return OSError(e.errno, message) if e.errno else OSError(message)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` for text files (history.csv, metrics.json, config.yaml)."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


class _RecordingWriter:
    """A file wrapper that remembers the OSError its last write raised.

    torch.save's zip writer turns a failed write into `RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos`, which hides that the disk was full; the
    recorded OSError lets us say so.
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj)` into `path` atomically (see `atomic_write_bytes`).

    A full disk raises OSError(ENOSPC) saying so, whichever way torch reports it; the temp file
    is removed and the previous file at `path` is kept.
    """

    def write(f: BinaryIO) -> None:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:
            cause = writer.error or e.__context__
            if isinstance(cause, OSError):
                raise cause from e  # atomic_write_bytes adds the path and what survived
            raise

    atomic_write_bytes(path, write)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so that a rename inside it survives a power cut (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def _looks_like_torch_file(path: Path) -> bool:
    """A zip (torch's format since 1.6) or a raw pickle (protocol 2+ starts with 0x80): the
    only files whose refusal by the weights-only unpickler means "holds Python objects"."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def safe_load(
    path: str | os.PathLike, what: str = "checkpoint", map_location: str | torch.device = "cpu"
) -> object:
    """`torch.load(weights_only=True)` with errors that name the file and say what to do.

    A file holding Python objects (which could run code on load) is refused, never unpickled.
    Raises SafeLoadError (missing, refused, truncated or corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise SafeLoadError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        refused = isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower()
        if refused and _looks_like_torch_file(path):
            raise SafeLoadError(
                f"{what} {path} was refused: it holds Python objects other than tensors and "
                "plain containers, which could run code when loaded. msl_kit never writes such "
                "files; turn off safe loading only for a file whose source you trust"
            ) from None
        first = str(e).split(". ")[0][:160]  # torch goes on with advice that does not apply here
        raise SafeLoadError(
            f"{what} {path} is truncated or corrupt ({type(e).__name__}: {first}); "
            "it was probably cut off mid-write or is not a file of that kind"
        ) from None
