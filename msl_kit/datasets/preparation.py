"""Prepared datasets: `PreparedFolder`, the store of every dataset `prepare` makes ready on
disk (download / verify / extract), idempotently.

A prepared dataset lives in `root/<name>/` exactly as its official archives unpack, plus
`downloads/` and a marker file written last (`MARKER`): its presence means the folder is
complete. A folder left by an interrupted run is repaired on the next call. The entry's layout
reader (`layouts/`) turns the folder's list files into records.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from msl_kit.datasets.layouts.common import DatasetError, LayoutError, Record, check_records
from msl_kit.datasets.stores import PrepareOptions, Store
from msl_kit.files.archives import TMP_MARK, is_archive, safe_extract
from msl_kit.files.download import DownloadError, download_file, md5sum

if TYPE_CHECKING:
    from msl_kit.datasets.registry import DatasetInfo

MARKER = ".msl_kit_prepared.json"


@dataclass(frozen=True)
class RemoteFile:
    """One file a dataset is made of, with its published md5 and mirrors tried in order."""

    filename: str
    md5: str | None = None
    urls: tuple[str, ...] = ()


def dataset_dir(name: str, root: str | Path) -> Path:
    """Where `name` is prepared: `root/name`, or `root` itself when it holds that dataset's
    marker."""
    root = Path(root).expanduser()
    return root if is_complete(root, name) else root / name


def is_complete(folder: Path, name: str) -> bool:
    """Whether `folder` holds a complete prepare of `name` (its marker, written last)."""
    try:
        return json.loads((folder / MARKER).read_text())["name"] == name
    except (OSError, ValueError, KeyError):
        return False


@dataclass(frozen=True)
class PreparedFolder(Store):
    """A dataset `prepare` fetches (its entry's `files`, or archives the user gives) and unpacks
    into `root/<name>/`; `reader` turns that folder's official list files into records."""

    reader: Callable[[Path], list[Record]] | None = None
    fetched: ClassVar[bool] = True

    def records(self, name: str, root: str | Path | None) -> tuple[Path, list[Record]]:
        if root is None:
            raise DatasetError(f"{name} needs root, the folder it was prepared in")
        base = dataset_dir(name, root)
        if not is_complete(base, name):
            raise LayoutError(
                f"{name} is not prepared in {base}: run `msl-kit prepare {name} --root {root}` "
                f"(or msl_kit.datasets.prepare({name!r}, {str(root)!r}))"
            )
        return base, self.read_layout(name, base)

    def read_layout(self, name: str, ddir: Path) -> list[Record]:
        if self.reader is None:
            return super().read_layout(name, ddir)
        return check_records(name, self.reader, ddir)

    def ready(self, name: str, root: str | Path | None) -> bool:
        return root is not None and is_complete(dataset_dir(name, root), name)

    def prepare(self, meta: DatasetInfo, root: str | Path | None, how: PrepareOptions) -> Path:
        """Make `meta` ready under `root` from local archives, given URLs or the official ones
        (`how`); what `msl_kit.datasets.prepare` says, for a downloadable set."""
        if root is None:
            raise DatasetError(f"prepare {meta.name} needs a root folder, e.g. --root data")
        return _prepare(self, meta, root, how)


def _prepare(
    store: PreparedFolder, meta: DatasetInfo, root: str | Path, how: PrepareOptions
) -> Path:
    name = meta.name
    ddir = dataset_dir(name, root)
    if is_complete(ddir, name):
        print(f"{name} is already prepared in {ddir}; nothing to do")
        return ddir
    _remove_leftovers(ddir)
    if ddir.exists() and any(p.name != "downloads" for p in ddir.iterdir()):
        print(f"{ddir} holds an incomplete preparation (no {MARKER}); repairing it")
        if how.archive is None and how.url is None:
            try:  # files the user unpacked themselves, or an interrupted run that got far enough
                return _finish(store, name, ddir, ["existing files"])
            except LayoutError as err:
                if not meta.url:
                    raise LayoutError(f"{err}; {_where_to_get(meta, root)}") from err
        fresh = False  # never delete what was there before this run
    else:
        fresh = True
    made = [p for p in (Path(root).expanduser(), ddir) if not p.exists()]
    try:
        sources = _fetch(meta, ddir, how, root)
        _unpack(sources, ddir, how.max_bytes, how.max_members)
        return _finish(store, name, ddir, [s.name for s in sources])
    except BaseException:  # Ctrl-C too: leave nothing half-extracted behind
        if fresh:
            _remove_extracted(ddir, made)
        raise


def _remove_leftovers(ddir: Path) -> None:
    """Remove the temporary files and folders of a killed run."""
    leftovers = [
        *ddir.parent.glob(f".{ddir.name}{TMP_MARK}*"),
        *(ddir.glob(f".*{TMP_MARK}*") if ddir.is_dir() else []),
    ]
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink()


def _unpack(
    sources: list[Path], ddir: Path, max_bytes: int | None, max_members: int | None
) -> None:
    """Extract archives into ddir; copy other files (a .mat, a list file) in atomically."""
    for src in sources:
        if is_archive(src):
            print(f"extracting {src.name} into {ddir}")
            safe_extract(src, ddir, max_bytes=max_bytes, max_members=max_members)
        else:
            ddir.mkdir(parents=True, exist_ok=True)
            tmp = ddir / f".{src.name}{TMP_MARK}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, ddir / src.name)


def _remove_extracted(ddir: Path, made: list[Path]) -> None:
    """After a failed prepare in a fresh folder: remove everything but downloads/ (kept so that a
    rerun resumes), then the folders this run created, where they are left empty."""
    if ddir.is_dir():
        for entry in ddir.iterdir():
            if entry.name == "downloads" and entry.is_dir() and not entry.is_symlink():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        downloads = ddir / "downloads"
        if downloads.is_dir() and not any(downloads.iterdir()):
            downloads.rmdir()
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # not empty (downloads kept) or already gone
            pass


def _finish(store: PreparedFolder, name: str, ddir: Path, sources: list[str]) -> Path:
    records = store.read_layout(name, ddir)
    missing = [r.path for r in records if not (ddir / r.path).is_file()]
    if missing:
        raise LayoutError(
            f"{ddir}: {len(missing)} of the {len(records)} listed images are "
            f"missing (first: {missing[0]}); the archive is incomplete: prepare it "
            "again from a full copy"
        )
    marker = {
        "name": name,
        "format": 1,
        "images": len(records),
        "classes": len({r.key for r in records}),
        "sources": sources,
    }
    tmp = ddir / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, ddir / MARKER)  # written last: its presence means the folder is complete
    print(f"prepared {name}: {marker['images']} images of {marker['classes']} classes in {ddir}")
    return ddir


def _where_to_get(meta: DatasetInfo, root: str | Path) -> str:
    files = " and ".join(f.filename for f in meta.files)
    if meta.file_sets:
        files = "one of: " + "; ".join(meta.file_sets)
    return (
        f"{meta.name} needs {files}. Get them from {meta.source}, then run "
        f"`msl-kit prepare {meta.name} --root {root} --archive FILE [FILE ...]` (or --url URL)"
    )


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def _fetch(meta: DatasetInfo, ddir: Path, how: PrepareOptions, root: str | Path) -> list[Path]:
    """Local archives as given, else downloads into ddir/downloads (resumed, verified)."""
    archives = [Path(a).expanduser() for a in _as_list(how.archive)]
    for path in archives:
        if not path.is_file():
            raise FileNotFoundError(
                f"archive {path} is not a file; give the downloaded archive itself"
            )
        official = next((f for f in meta.files if f.filename == path.name and f.md5), None)
        if official and md5sum(path) != official.md5:
            warnings.warn(
                f"{path} differs from the published {official.filename} (md5 "
                f"{official.md5}); using it anyway since you gave it",
                stacklevel=5,  # the caller of datasets.prepare
            )
    if archives:
        return archives
    urls, md5s = _as_list(how.url), _as_list(how.md5)
    if urls:
        names = [Path(u.split("?")[0]).name or f"download{i}" for i, u in enumerate(urls)]
        wanted = [
            RemoteFile(n, md5s[i] if i < len(md5s) else None, (u,))
            for i, (n, u) in enumerate(zip(names, urls))
        ]
    elif meta.url:
        wanted = list(meta.files)
    else:
        raise FileNotFoundError(_where_to_get(meta, root))
    paths = []
    for remote in wanted:
        dest, errors = ddir / "downloads" / remote.filename, []
        for mirror in remote.urls:
            try:
                paths.append(download_file(mirror, dest, md5=remote.md5, progress=how.progress))
                break
            except OSError as err:  # DownloadError, URLError...: try the next mirror
                errors.append(str(err))  # (a ChecksumError is a ValueError: final)
        else:  # one line for the CLI: every mirror's reason, then where else to get the files
            raise DownloadError(
                f"could not download {remote.filename}: {' | '.join(errors)}. "
                f"{_where_to_get(meta, root)}"
            )
    return paths
