"""Downloads that resume and verify, and archive extraction that cannot escape its folder.

Shared by `datasets.prepare` (archives) and `models` (weights). Nothing here is half-written:
a download grows in `dest + ".part"` and is renamed once complete and verified; an archive is
checked member by member before a byte is written, extracted into a temporary folder next to
the destination, and its top-level entries are then renamed into place.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

CHUNK = 1 << 20
TMP_MARK = ".msl-tmp-"  # prefix of temporary folders; `prepare` removes leftovers of killed runs


class DownloadError(RuntimeError):
    """A download that did not complete; what was received is kept in the .part file."""


class ChecksumError(ValueError):
    """A file whose md5 differs from the published one (the bad file has been deleted)."""


class UnsafeArchiveError(ValueError):
    """An archive with a member that would land outside the destination, or a device file."""


def md5sum(path: str | Path) -> str:
    """The hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, *, md5: str | None = None, progress: bool = True,
                  retries: int = 3, timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, resuming a previous partial download, and return `dest`.

    Bytes go to `dest + ".part"`; a cut connection is resumed with an HTTP Range request (up
    to `retries` times here, or by calling again later). With `md5`, a mismatch deletes the
    file and raises ChecksumError; only a complete, verified file is renamed to `dest`.
    """
    dest = Path(dest)
    if dest.exists():
        if md5 is None or md5sum(dest) == md5.lower():
            return dest
        dest.unlink()  # a damaged or stale copy: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, part, progress, timeout)
            break
        except urllib.error.HTTPError as err:
            if err.code < 500 and err.code != 429:  # 404, 403...: retrying will not help
                raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}; check the URL, "
                                    "or download the file yourself and pass it as --archive") from err
            failure: Exception = err
        except (OSError, _Incomplete) as err:  # URLError, resets and timeouts are OSErrors
            failure = err
        if attempt == retries:
            got = part.stat().st_size if part.exists() else 0
            raise DownloadError(f"download of {url} stopped after {got} bytes ({failure}); run the "
                                f"same command again to resume from {part}") from failure
        time.sleep(min(0.5 * 2**attempt, 10.0))
    if md5 is not None:
        got_md5 = md5sum(part)
        if got_md5 != md5.lower():
            part.unlink()
            raise ChecksumError(f"{url} downloaded with md5 {got_md5}, expected {md5.lower()}; the "
                                "file was deleted. The server's copy changed or is damaged: try "
                                "another mirror (--url) or a copy you trust (--archive)")
    os.replace(part, dest)
    return dest


class _Incomplete(Exception):
    pass


def _fetch_into(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Append the rest of `url` to `part` (or start over when the server ignores Range)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "msl_kit", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not have:
            raise
        # 416: nothing left past `have`; the part is complete only if the sizes agree
        total = re.search(r"/(\d+)", err.headers.get("Content-Range", "") or "")
        if total and int(total.group(1)) == have:
            return
        part.unlink()
        raise _Incomplete("the server's file is shorter than the partial download; restarting")
    with resp:
        content_range = resp.headers.get("Content-Range", "")
        resumed = have and getattr(resp, "status", None) == 206 and content_range.startswith(f"bytes {have}-")
        if not resumed:
            have = 0  # the server sent the whole file: start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        name = Path(urllib.parse.urlparse(url).path).name or url
        received = 0
        with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, disable=not progress) as bar:
            while block := resp.read(CHUNK):
                f.write(block)
                received += len(block)
                bar.update(len(block))
    # http.client returns b"" when the peer closes early instead of raising: compare sizes
    if total is not None and have + received < total:
        raise _Incomplete(f"connection closed after {have + received} of {total} bytes")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar (any compression) or zip archive into `dest`, refusing unsafe members.

    Refused before anything is written: absolute paths, `..`, symlinks or hardlinks whose
    target leaves the archive root, members under a symlink, device files and FIFOs. Members
    go to a temporary folder beside `dest`; each top-level entry is then renamed into `dest`,
    replacing an entry of the same name.
    """
    archive, dest = Path(archive), Path(dest)
    is_zip = _is_zip(archive)
    if not is_zip and not tarfile.is_tarfile(archive):
        raise ValueError(f"{archive} is neither a zip nor a tar archive; is the file complete?")
    opened = zipfile.ZipFile(archive) if is_zip else tarfile.open(archive)
    with opened:
        links = _check_zip(opened, archive) if is_zip else _check_tar(opened, archive)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_MARK}", dir=dest.parent))
        try:
            if is_zip:
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
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def is_archive(path: str | Path) -> bool:
    """Whether `path` is a zip or a tar (any compression) by its content, not its name."""
    return _is_zip(Path(path)) or tarfile.is_tarfile(path)


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
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} climbs out with '..'; refusing to extract")
    return parts


def _resolve(parts: tuple[str, ...], links: dict[tuple[str, ...], str], depth: int = 0) -> tuple[str, ...] | None:
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


def _check_links(archive: Path, names: list[tuple[str, ...]], links: dict[tuple[str, ...], str]) -> None:
    for parts in names:
        for i in range(1, len(parts)):
            if parts[:i] in links:
                raise UnsafeArchiveError(f"{archive}: member {'/'.join(parts)!r} lies under the "
                                         f"symlink {'/'.join(parts[:i])!r}; refusing to extract")
    for parts, target in links.items():
        if target.startswith("/") or _resolve(parts[:-1] + tuple(target.split("/")), links) is None:
            raise UnsafeArchiveError(f"{archive}: symlink {'/'.join(parts)!r} -> {target!r} points "
                                     "outside the archive; refusing to extract")


def _check_tar(tar: tarfile.TarFile, archive: Path) -> dict[str, str]:
    names, links = [], {}
    for m in tar.getmembers():
        parts = _parts(m.name, archive)
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device file or FIFO; refusing to extract")
        if m.issym():
            links[parts] = m.linkname.replace("\\", "/")
        if m.islnk():  # its target is an archive path: the same rules as a member name
            try:
                _parts(m.linkname, archive)
            except UnsafeArchiveError:
                raise UnsafeArchiveError(f"{archive}: hardlink {m.name!r} -> {m.linkname!r} points "
                                         "outside the archive; refusing to extract") from None
        names.append(parts)
    _check_links(archive, names, links)  # a hardlink can only leave through a symlink checked here
    return {"/".join(p): t for p, t in links.items()}


def _check_zip(zf: zipfile.ZipFile, archive: Path) -> dict[str, str]:
    names, links = [], {}
    for info in zf.infolist():
        parts = _parts(info.filename, archive)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a device file or FIFO; "
                                     "refusing to extract")
        if kind == stat.S_IFLNK:
            links[parts] = zf.read(info).decode("utf-8").replace("\\", "/")
        names.append(parts)
    _check_links(archive, names, links)
    # extract() keys members by their own names; map link parts back to them
    by_parts = {_parts(i.filename, archive): i.filename for i in zf.infolist()}
    return {by_parts[p]: t for p, t in links.items()}
