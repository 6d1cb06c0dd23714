"""Omniglot-small, shipped inside the package: the embedded default dataset.

The two official "small background" archives of Omniglot (Lake, Salakhutdinov, Tenenbaum,
Science 2015; MIT licence, see `omniglot_small/LICENSE` beside this module) are package data,
byte for byte as published in github.com/brendenlake/omniglot
(python/images_background_small{1,2}.zip) and checked against their md5s before use. Images are
decoded straight from the archives: nothing is downloaded, extracted or written, and no HOME or
data folder is needed (`STORE`, a `Shipped` store: `embed` names an item
"omniglot_small:<member>").

Together they hold 8 alphabets (Greek and Latin are in both and counted once), 242 characters
and 4,840 images of 105x105. The split is the rule `msl-kit prepare omniglot` applies to the
same archives: alphabets sorted by name, every second one held out, so the test characters
come from alphabets never seen in training (4 / 4 alphabets, 130 / 112 characters).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

from PIL import Image

from msl_kit.datasets.layouts.common import Record
from msl_kit.datasets.layouts.official import omniglot_records
from msl_kit.datasets.stores import Shipped
from msl_kit.datasets.transforms import CorruptImageError

DATA_DIR = Path(__file__).resolve().parent / "omniglot_small"
ARCHIVES = {  # file -> md5 of the official archive
    "images_background_small1.zip": "e704a628b5459e08445c13499850abc4",
    "images_background_small2.zip": "b75a71a51d3b13f821f212756fe481fd",
}

_verified: set[Path] = set()
# Keyed by process: a forked DataLoader worker must not share the parent's file offset.
_open: dict[tuple[int, Path], zipfile.ZipFile] = {}
# Each image decoded once per process and kept as its raw bits (1,470 bytes for a 105 x 105
# bilevel image, ~7 MB for the whole set): a run reads every test image at each evaluation
# and each training image many times, and reading + decoding the PNG was 16 % of the default
# run's time. A forked worker inherits what its parent has decoded.
_decoded: dict[str, tuple[str, tuple[int, int], bytes]] = {}


def archive_paths() -> list[Path]:
    """The shipped archives, verified once per process (a damaged install fails clearly)."""
    paths = []
    for name, md5 in ARCHIVES.items():
        path = DATA_DIR / name
        if path not in _verified:
            if not path.is_file():
                raise FileNotFoundError(
                    f"the embedded Omniglot archive {path} is missing: "
                    "reinstall msl_kit (pip install -e .)"
                )
            digest = hashlib.md5(path.read_bytes()).hexdigest()
            if digest != md5:
                raise OSError(
                    f"the embedded Omniglot archive {path} is damaged (md5 {digest}, "
                    f"expected {md5}): reinstall msl_kit"
                )
            _verified.add(path)
        paths.append(path)
    return paths


def records() -> list[Record]:
    """Every image of the embedded set as (path inside the archives, class, split) records."""
    names = []
    for path in archive_paths():
        with zipfile.ZipFile(path) as zf:
            names += [n for n in zf.namelist() if n.endswith(".png")]
    return omniglot_records(names)


def _archive_for(member: str) -> zipfile.ZipFile:
    key = (os.getpid(), DATA_DIR / f"{member.split('/', 1)[0]}.zip")
    if key not in _open:
        _open[key] = zipfile.ZipFile(key[1])
    return _open[key]


def load(member: str) -> Image.Image:
    """Decode one image of the embedded archives ("images_background_small1/Greek/...png"); a
    fresh Image each call, which the caller may change."""
    if member in _decoded:
        mode, size, bits = _decoded[member]
        return Image.frombytes(mode, size, bits)
    try:
        data = _archive_for(member).read(member)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (KeyError, OSError, zipfile.BadZipFile) as err:
        raise CorruptImageError(
            f"cannot read {member} from the embedded Omniglot archives: {err}; reinstall msl_kit"
        ) from err
    if img.mode in ("1", "L"):  # no palette or other state beside the pixels
        _decoded[member] = (img.mode, img.size, img.tobytes())
    return img


STORE = Shipped(records, load, "msl_kit")  # the registry entry's store: nothing to prepare
