"""Downloads that resume and verify.

Shared by `datasets.prepare` (archives) and `models` (weights). Nothing here is half-written:
a download grows in `dest + ".part"` and is renamed once complete and verified. Archives are
extracted by `msl_kit.files.archives.safe_extract`, which cannot escape its folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from msl_kit.errors import MslKitError

CHUNK = 1 << 20


class DownloadError(MslKitError, OSError):
    """A download that did not complete; what was received is kept in the .part file."""


class ChecksumError(MslKitError, ValueError):
    """A file whose md5 differs from the published one (the bad file has been deleted)."""


def md5sum(path: str | Path) -> str:
    """The hex md5 of a file (what the datasets publish), read in 1 MiB chunks."""
    return _digest(path, hashlib.md5(usedforsecurity=False))


def sha256sum(path: str | Path) -> str:
    """The hex sha256 of a file (a checkpoint's identity), read in 1 MiB chunks."""
    return _digest(path, hashlib.sha256())


def _digest(path: str | Path, digest: Any) -> str:  # a hashlib object
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest`, resuming a previous partial download, and return `dest`.

    Bytes go to `dest + ".part"`; a cut connection is resumed with an HTTP Range request (up
    to `retries` times here, or by calling again later). With `md5`, a mismatch deletes the
    file and raises ChecksumError; only a complete, verified file is renamed to `dest`.
    """
    dest = Path(dest)
    if urllib.parse.urlparse(url).scheme.lower() not in ("http", "https", "ftp", "file"):
        raise DownloadError(
            f"{url!r} is not an http(s) URL; give a full URL (https://...) or a "
            "local copy with --archive"
        )
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
                raise DownloadError(
                    f"{url} answered HTTP {err.code} {err.reason}; check the "
                    "URL, or download the file yourself and pass it as --archive"
                ) from err
            failure: Exception = err
        except (OSError, _Incomplete) as err:  # URLError, resets and timeouts are OSErrors
            failure = err
        if attempt == retries:
            got = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"download of {url} stopped after {got} bytes ({failure}); run "
                f"the same command again to resume from {part}"
            ) from failure
        time.sleep(min(0.5 * 2**attempt, 10.0))
    if md5 is not None:
        got_md5 = md5sum(part)
        if got_md5 != md5.lower():
            part.unlink()
            raise ChecksumError(
                f"{url} downloaded with md5 {got_md5}, expected {md5.lower()}; the "
                "file was deleted. The server's copy changed or is damaged: try "
                "another mirror (--url) or a copy you trust (--archive)"
            )
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
        raise _Incomplete(
            "the server's file is shorter than the partial download; restarting"
        ) from err
    with resp:
        content_range = resp.headers.get("Content-Range", "")
        resumed = (
            have
            and getattr(resp, "status", None) == 206
            and content_range.startswith(f"bytes {have}-")
        )
        if not resumed:
            have = 0  # the server sent the whole file: start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        name = Path(urllib.parse.urlparse(url).path).name or url
        received = 0
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name,
                disable=not progress,
            ) as bar,
        ):
            while block := resp.read(CHUNK):
                f.write(block)
                received += len(block)
                bar.update(len(block))
    # http.client returns b"" when the peer closes early instead of raising: compare sizes
    if total is not None and have + received < total:
        raise _Incomplete(f"connection closed after {have + received} of {total} bytes")
