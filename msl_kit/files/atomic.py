"""File I/O at the bottom of the package: atomic writes, fsync, safe torch loading and saving.

`checkpoint`, `models` and the CLI write and read files through here, so that every file
msl_kit writes is either the old version or the complete new one, never a torn one, and no
file is ever unpickled into arbitrary Python objects. Downloads live in `msl_kit.files.download`.
"""

from __future__ import annotations

import errno
import os
import pickle
import secrets
import shutil
import stat
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
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _explained(e, path) from e
    fsync_dir(path.parent)


def _open_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temp file beside `path`, created as `open(path, "wb")` would create it:
    mode 0o666 less the umask, or `path`'s own permission bits where `path` exists (mkstemp's
    0o600 would lock a group out of a shared run folder, index or exported model)."""
    try:
        keep = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        keep = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        if keep is not None:
            try:
                os.chmod(tmp, keep)
            except OSError:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
        return fd, tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary file name beside {path}")


def _write_temp(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """`write` into a new temp file beside `path`, fsynced; on any failure it is removed."""
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _explained(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


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


def atomic_write_files(
    writes: dict[Path, Callable[[BinaryIO], Any]], remove: tuple[Path, ...] = ()
) -> None:
    """Several files written all or none (an export's module, description and ONNX file).

    Each is written and fsynced into a temp file beside it first; only then are the old files
    set aside (hard links, so a reader never finds a path missing) and the new ones renamed
    in, in the order given, and `remove` deleted. A failure at any point removes what is new
    and puts every old file back. A kill between two renames can leave a mixed set; name the
    file that records the others last.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, write in writes.items():
            temps.append((path, _write_temp(path, write)))
    except BaseException:
        for _, tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    _swap_in(temps, [Path(p) for p in remove if os.path.lexists(p)])


def _swap_in(temps: list[tuple[Path, Path]], remove: list[Path]) -> None:
    """Rename each temp over its path and delete `remove`, undoing everything on a failure."""
    saved: dict[Path, Path] = {}
    changed: list[Path] = []  # replaced or removed so far
    path = temps[0][0] if temps else Path(".")
    try:
        for path in [p for p, _ in temps if os.path.lexists(p)] + remove:
            saved[path] = _set_aside(path)
        for path, tmp in temps:
            os.replace(tmp, path)
            changed.append(path)
        for path in remove:
            path.unlink()
            changed.append(path)
    except BaseException as e:
        for new in changed:
            if new not in saved:
                new.unlink(missing_ok=True)
        for old, aside in saved.items():
            if old in changed:
                os.replace(aside, old)
            else:  # still the old file (renaming a hard link onto itself would do nothing)
                aside.unlink(missing_ok=True)
        for _, tmp in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _explained(e, path) from e
        raise
    for aside in saved.values():
        try:
            aside.unlink()
        except OSError:  # the new set is in place: a stray `.old.tmp` is only clutter
            pass
    for folder in {p.parent for p, _ in temps} | {p.parent for p in remove}:
        fsync_dir(folder)


def _set_aside(path: Path) -> Path:
    """A second name for `path`'s current file (a hard link, else a copy), kept for undo."""
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old.tmp")
    try:
        os.link(path, aside)
    except OSError:  # no hard links on this file system
        shutil.copy2(path, aside)
    return aside


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
