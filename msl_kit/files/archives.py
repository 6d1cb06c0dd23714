"""Archive extraction that cannot escape its folder, with size and member limits.

An archive is checked member by member before a byte is written, extracted into a temporary
folder next to the destination, and its top-level entries are then renamed into place. An
archive whose declared size or member count passes the limits is refused before anything is
written too. Used by `prepare` through `msl_kit.download`, which re-exports it.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

from msl_kit.errors import MslKitError

TMP_MARK = ".msl-tmp-"  # prefix of temporary folders; `prepare` removes leftovers of killed runs
# Archive limits: far above SOP (120k images, ~3 GB) and In-Shop, far below what fills a disk.
DEFAULT_MAX_BYTES = 20 * 10**9
DEFAULT_MAX_MEMBERS = 500_000
# With the default size limit, an archive declaring over 1 GB and over 100x its own size is
# refused too: photos do not compress like that, decompression bombs do.
BOMB_BYTES, BOMB_RATIO = 10**9, 100


class DamagedArchiveError(MslKitError, OSError):
    """A truncated or corrupt archive (nothing of it is left extracted)."""


class NotAnArchiveError(MslKitError, ValueError):
    """A file given as an archive that is neither a zip nor a tar (nothing is extracted)."""


class UnsafeArchiveError(MslKitError, ValueError):
    """An archive refused before extraction: a member that would land outside the destination,
    a device file, or (ArchiveLimitError) more bytes or members than the limits allow."""


class ArchiveLimitError(UnsafeArchiveError):
    """An archive declaring more bytes or members than allowed (or a decompression bomb)."""


def safe_extract(
    archive: Path, dest: Path, *, max_bytes: int | None = None, max_members: int | None = None
) -> None:
    """Extract a tar (any compression) or zip archive into `dest`, refusing unsafe members.

    Refused before anything is written: absolute paths, `..`, symlinks or hardlinks whose
    target leaves the archive root, members under a symlink, device files and FIFOs, and
    (ArchiveLimitError) more than `max_bytes` declared bytes or `max_members` members (defaults
    DEFAULT_MAX_BYTES, DEFAULT_MAX_MEMBERS; with the default size, a likely decompression bomb).
    A truncated or corrupt archive raises DamagedArchiveError. Members go to a temporary folder
    beside `dest`; each top-level entry is then renamed into `dest`, replacing one of that name.
    """
    archive, dest = Path(archive), Path(dest)
    kind = _archive_kind(archive)
    if kind is None:
        raise NotAnArchiveError(
            f"{archive} is neither a zip nor a tar archive; is the file complete?"
        )
    limits = _Limits(archive, max_bytes, max_members)
    try:
        with zipfile.ZipFile(archive) if kind == "zip" else tarfile.open(archive) as opened:
            if kind == "zip":
                links = _check_zip(opened, archive, limits)
            else:
                links = _check_tar(opened, archive, limits)
            _extract(opened, links, dest)
    except _DAMAGE as err:
        raise DamagedArchiveError(
            f"{archive} is truncated or damaged ({type(err).__name__}: "
            f"{err}); nothing was extracted. Delete it and download it "
            "again"
        ) from err
    except tarfile.FilterError as err:  # tarfile's own check, behind ours
        raise UnsafeArchiveError(f"{archive}: {err}; refusing to extract") from err


# What a truncated or corrupt archive raises while being read (but never a full disk's OSError).
_DAMAGE = (
    EOFError,
    tarfile.ReadError,
    tarfile.CompressionError,
    tarfile.HeaderError,
    zipfile.BadZipFile,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)


def _extract(opened: zipfile.ZipFile | tarfile.TarFile, links: dict[str, str], dest: Path) -> None:
    """Extract checked members into a temporary folder beside `dest`, then move them in."""
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_MARK}", dir=dest.parent))
    try:
        if isinstance(opened, zipfile.ZipFile):
            for member in opened.infolist():
                if member.filename not in links:
                    opened.extract(member, tmp)
            for name, target in links.items():  # zipfile would write links as text files
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, tmp / name)
        elif hasattr(tarfile, "data_filter"):  # a second, independent check where available
            opened.extractall(tmp, filter="data")
        else:
            opened.extractall(tmp)
        _move_entries(tmp, dest)
    except BaseException:
        if created and not any(dest.iterdir()):  # damage found while writing: leave no trace
            dest.rmdir()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Limits:
    """Running totals of an archive's declared sizes and members, checked member by member
    (a tar's headers are read one at a time, so a bomb is refused at its first big header)."""

    def __init__(self, archive: Path, max_bytes: int | None, max_members: int | None):
        for value, what in ((max_bytes, "max_bytes"), (max_members, "max_members")):
            if value is not None and value <= 0:
                raise UnsafeArchiveError(f"{what} must be positive, not {value}")
        self.archive, self.size = archive, archive.stat().st_size
        self.bomb_check = max_bytes is None  # an explicit size limit is the user's decision
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self.max_members = DEFAULT_MAX_MEMBERS if max_members is None else max_members
        self.bytes = self.members = 0

    def add(self, size: int) -> None:
        self.members += 1
        self.bytes += max(int(size), 0)
        if self.members > self.max_members:
            raise ArchiveLimitError(
                f"{self.archive} holds more than {self.max_members:,} members; "
                "refusing to extract (if you trust it, raise the limit with "
                "--max-files N, or max_members=)"
            )
        if self.bytes > self.max_bytes:
            raise ArchiveLimitError(
                f"{self.archive} declares more than {_size(self.max_bytes)} of "
                "files; refusing to extract (if you trust it, raise the limit "
                "with --max-size GB, or max_bytes=)"
            )
        if self.bomb_check and self.bytes > BOMB_BYTES and self.bytes > BOMB_RATIO * self.size:
            raise ArchiveLimitError(
                f"{self.archive} ({_size(self.size)}) declares "
                f"{_size(self.bytes)} of files, over {BOMB_RATIO}x its size "
                "as a decompression bomb does; refusing to extract (if you "
                "trust it, allow it with --max-size GB, or max_bytes=)"
            )


def _size(n: int) -> str:
    """Bytes in decimal units, as --max-size takes them (GB = 10^9 bytes)."""
    unit, scale = next(
        (u, d) for u, d in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("bytes", 1)) if n >= d or d == 1
    )
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n} bytes"


def _archive_kind(path: Path) -> str | None:
    """ "zip", "tar" (plain or gzip / bzip2 / xz compressed) or None, by content, not name.

    A compressed file counts as a tar by its magic bytes alone, so that a truncated .tgz is
    reported as damaged rather than taken for some other kind of file.
    """
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\x00":
        return "tar"
    try:
        return "tar" if tarfile.is_tarfile(path) else None
    except _DAMAGE:
        return None


def is_archive(path: str | Path) -> bool:
    """Whether `path` is a zip or a tar (any compression) by its content, not its name."""
    return _archive_kind(Path(path)) is not None


def _move_entries(src: Path, dest: Path) -> None:
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if target.exists() or target.is_symlink():
            old = src / f"{TMP_MARK}old-{entry.name}"
            os.replace(target, old)  # moved aside, deleted with `src`
        os.replace(entry, target)


def _parts(name: str, archive: Path) -> tuple[str, ...]:
    """A member name as path components; raises on absolute paths and `..`."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"[A-Za-z]:", norm) or "\0" in norm:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} has an absolute path; refusing to extract"
        )
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} climbs out with '..'; refusing to extract"
        )
    return parts


_Links = dict[tuple[str, ...], str]  # a symlink's path components -> its target


def _resolve(parts: tuple[str, ...], links: _Links, depth: int = 0) -> tuple[str, ...] | None:
    """Follow the archive's own symlinks along `parts`; None where the path leaves the root."""
    out: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(part)
        target = links.get(tuple(out))
        if target is not None:
            if depth > 32 or target.startswith("/"):
                return None
            resolved = _resolve(tuple(out[:-1]) + tuple(target.split("/")), links, depth + 1)
            if resolved is None:
                return None
            out = list(resolved)
    return tuple(out)


def _check_links(archive: Path, names: list[tuple[str, ...]], links: _Links) -> None:
    for parts in names:
        for i in range(1, len(parts)):
            if parts[:i] in links:
                raise UnsafeArchiveError(
                    f"{archive}: member {'/'.join(parts)!r} lies under the "
                    f"symlink {'/'.join(parts[:i])!r}; refusing to extract"
                )
    for parts, target in links.items():
        if target.startswith("/") or _resolve(parts[:-1] + tuple(target.split("/")), links) is None:
            raise UnsafeArchiveError(
                f"{archive}: symlink {'/'.join(parts)!r} -> {target!r} points "
                "outside the archive; refusing to extract"
            )


def _check_tar(tar: tarfile.TarFile, archive: Path, limits: _Limits) -> dict[str, str]:
    names, links = [], {}
    for m in tar:  # reads one header at a time: the limits stop a bomb before it is inflated
        limits.add(m.size if m.isfile() else 0)
        parts = _parts(m.name, archive)
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise UnsafeArchiveError(
                f"{archive}: member {m.name!r} is a device file or FIFO; refusing to extract"
            )
        if m.issym():
            links[parts] = m.linkname.replace("\\", "/")
        if m.islnk():  # its target is an archive path: the same rules as a member name
            try:
                _parts(m.linkname, archive)
            except UnsafeArchiveError:
                raise UnsafeArchiveError(
                    f"{archive}: hardlink {m.name!r} -> {m.linkname!r} points "
                    "outside the archive; refusing to extract"
                ) from None
        names.append(parts)
    _check_links(archive, names, links)  # a hardlink can only leave through a symlink checked here
    return {"/".join(p): t for p, t in links.items()}


def _check_zip(zf: zipfile.ZipFile, archive: Path, limits: _Limits) -> dict[str, str]:
    names, links = [], {}
    for info in zf.infolist():  # zipfile writes at most file_size bytes of each member
        limits.add(info.file_size)
        parts = _parts(info.filename, archive)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} is a device file or FIFO; refusing to extract"
            )
        if kind == stat.S_IFLNK:
            links[parts] = zf.read(info).decode("utf-8").replace("\\", "/")
        names.append(parts)
    _check_links(archive, names, links)
    # extract() keys members by their own names; map link parts back to them
    by_parts = {_parts(i.filename, archive): i.filename for i in zf.infolist()}
    return {by_parts[p]: t for p, t in links.items()}
