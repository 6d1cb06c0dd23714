"""Dataset registry, `prepare` (download / verify / extract) and class-disjoint splits.

A prepared dataset lives in `root/<name>/` exactly as its official archives unpack, plus
`downloads/` and a marker file written last. `build(name, root, split, transform)` reads the
official list files and returns items `(image, label, index)`; labels are contiguous per split.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from msl_kit import embedded
from msl_kit.download import (
    TMP_MARK,
    DownloadError,
    download_file,
    is_archive,
    md5sum,
    safe_extract,
)
from msl_kit.layouts import LayoutError, Record, read_folder, read_layout
from msl_kit.transforms import CorruptImageError, load_image, to_mode

MARKER = ".msl_kit_prepared.json"


@dataclass(frozen=True)
class RemoteFile:
    """One file a dataset is made of, with its published md5 and mirrors tried in order."""

    filename: str
    md5: str | None = None
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    """What `msl-kit prepare --list` shows, and what `prepare` needs to fetch a dataset."""

    name: str
    description: str
    size: str  # images, classes, download size
    licence: str
    source: str  # the page the files come from
    files: tuple[RemoteFile, ...] = ()  # what prepare fetches; urls empty = bring your own copy
    query_gallery: bool = False  # In-Shop: evaluate queries against a separate gallery
    splits: tuple[str, ...] = ("train", "val", "test")
    grey: bool = False  # native colour: "L" when no transform says otherwise
    split_rule: str = ""
    file_sets: tuple[str, ...] = ()  # other sets of files `prepare` accepts, with their origin

    @property
    def url(self) -> str:
        """The first download URL, or "" where the files must be fetched by hand."""
        return next((u for f in self.files for u in f.urls), "")


_OMNIGLOT = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
REGISTRY: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            "digits",
            "scikit-learn's 8x8 handwritten digits (ships with scikit-learn)",
            "1,797 images, 10 classes, no download",
            "BSD-3 (sklearn), CC BY 4.0 (UCI)",
            "sklearn.datasets.load_digits",
            grey=True,
            split_rule="digits 0-4 train, 5-9 test",
        ),
        DatasetInfo(
            "omniglot",
            "Omniglot handwritten characters of 50 alphabets (Lake et al. 2015)",
            "32,460 images, 1,623 characters, 16 MB",
            "MIT",
            "https://github.com/brendenlake/omniglot",
            (
                RemoteFile(
                    "images_background.zip",
                    "68d2efa1b9178cc56df9314c21c6e718",
                    (_OMNIGLOT + "images_background.zip",),
                ),
                RemoteFile(
                    "images_evaluation.zip",
                    "6b91aef0f799c5bb55b94e3f2daec811",
                    (_OMNIGLOT + "images_evaluation.zip",),
                ),
            ),
            grey=True,
            split_rule="background alphabets train, evaluation alphabets test",
        ),
        DatasetInfo(
            "omniglot_small",
            "Omniglot-small, shipped inside msl_kit: the embedded default",
            "4,840 images, 242 characters of 8 alphabets, 105x105, no download",
            "MIT",
            "https://github.com/brendenlake/omniglot (images_background_small1/2.zip)",
            grey=True,
            split_rule="alphabets sorted, every second held out: 4 train (130 "
            "characters), 4 test (112)",
        ),
        DatasetInfo(
            "cub200",
            "Caltech-UCSD Birds-200-2011, 200 bird species",
            "11,788 images, 200 classes, 1.1 GB",
            "research, non-commercial (Caltech)",
            "https://www.vision.caltech.edu/datasets/cub_200_2011/",
            (
                RemoteFile(
                    "CUB_200_2011.tgz",
                    "97eceeb196236b17998738112f37df78",
                    (
                        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                        "http://www.vision.caltech.edu/visipedia-data/CUB-200-2011/CUB_200_2011.tgz",
                    ),
                ),
            ),
            split_rule="classes 1-100 train (5,864), 101-200 test (5,924)",
        ),
        DatasetInfo(
            "cars196",
            "Stanford Cars, 196 car models (Krause et al. 2013)",
            "16,185 images, 196 classes, 1.9 GB",
            "non-commercial research only",
            "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (moved; use a mirror)",
            (
                RemoteFile("car_ims.tgz", "d5c8f0aa497503f355e17dc7886c3f14"),
                RemoteFile("cars_annos.mat", "b407c6086d669747186bd1d764ff9dbc"),
            ),
            split_rule="classes 1-98 train (8,054), 99-196 test (8,131)",
            file_sets=(
                "car_ims.tgz + cars_annos.mat (the DML papers' copy)",
                "cars_train.tgz + cars_test.tgz + car_devkit.tgz + "
                "cars_test_annos_withlabels.mat (torchvision's StanfordCars, see "
                "github.com/pytorch/vision/issues/7545)",
                "the zip of kaggle.com/datasets/jutrera/stanford-car-dataset-by-classes-"
                "folder (car_data/, anno_train.csv, anno_test.csv, names.csv)",
            ),
        ),
        DatasetInfo(
            "sop",
            "Stanford Online Products, 22,634 eBay products in 12 categories",
            "120,053 images, 22,634 classes, 2.9 GB",
            "research use (Stanford CVGL)",
            "https://cvgl.stanford.edu/projects/lifted_struct/",
            (RemoteFile("Stanford_Online_Products.zip", "7f73d41a2f44250d4779881525aea32e"),),
            split_rule="Ebay_train.txt (11,318 classes) / Ebay_test.txt (11,316 classes)",
        ),
        DatasetInfo(
            "inshop",
            "DeepFashion In-Shop Clothes Retrieval, 7,982 clothing items",
            "52,712 images, 7,982 classes",
            "non-commercial (DeepFashion terms)",
            "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html "
            "(Google Drive, manual)",
            (RemoteFile("img.zip"), RemoteFile("list_eval_partition.txt")),
            query_gallery=True,
            splits=("train", "val", "query", "gallery"),
            split_rule="list_eval_partition.txt: train 3,997 items; query / gallery 3,985 items",
        ),
        DatasetInfo(
            "folder",
            "your own images: root/<split>/<class>/*.jpg, or a CSV of path,label,split",
            "yours",
            "yours",
            "local folder or CSV file",
            split_rule="the split folders or the CSV's split column",
        ),
    )
}


def list_datasets() -> list[DatasetInfo]:
    """Every registered dataset, in registry order."""
    return list(REGISTRY.values())


def info(name: str) -> DatasetInfo:
    """The registry entry of `name`; ValueError naming the valid names otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


# ----------------------------------------------------------------------------- prepare


def dataset_dir(name: str, root: str | Path) -> Path:
    """Where `name` is prepared: `root/name`, or `root` itself when it holds that dataset's
    marker."""
    root = Path(root).expanduser()
    return root if _prepared(root, name) else root / name


def is_prepared(name: str, root: str | Path) -> bool:
    """Whether `prepare(name, root)` has completed (its marker is there)."""
    return name in ("digits", "folder", "omniglot_small") or _prepared(
        dataset_dir(name, root), name
    )


def _prepared(folder: Path, name: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text())["name"] == name
    except (OSError, ValueError, KeyError):
        return False


def prepare(
    name: str,
    root: str | Path | None,
    *,
    archive: str | Path | Sequence[str | Path] | None = None,
    url: str | Sequence[str] | None = None,
    progress: bool = True,
    md5: str | Sequence[str] | None = None,
    max_bytes: int | None = None,
    max_members: int | None = None,
) -> Path:
    """Make `name` ready under `root` from local archives, a given URL, or the official URLs.

    Returns the dataset folder. Idempotent (a prepared folder is left alone); a folder left by an
    interrupted run is repaired: partial downloads resume, archives are extracted again. Archives
    declaring more than `max_bytes` or `max_members` are refused (defaults in msl_kit.download).
    A prepare that fails in a folder it started empty removes what it extracted there and keeps
    `downloads/`, so that the next run resumes.
    """
    meta = info(name)
    if name in ("digits", "omniglot_small"):
        print(
            f"{name} ships with {'scikit-learn' if name == 'digits' else 'msl_kit'}: "
            "nothing to prepare"
        )
        return Path(root or ".")
    if root is None:
        raise ValueError(f"prepare {name} needs a root folder, e.g. --root data")
    for value, what in ((max_bytes, "max_bytes"), (max_members, "max_members")):
        if value is not None and value <= 0:
            raise ValueError(f"{what} must be positive, not {value}")
    if name == "folder":
        base, records = read_folder(Path(root))
        print(
            f"folder needs no preparation: {len(records)} images of "
            f"{len({r.key for r in records})} classes under {base}"
        )
        return Path(root)
    ddir = dataset_dir(name, root)
    if _prepared(ddir, name):
        print(f"{name} is already prepared in {ddir}; nothing to do")
        return ddir
    _remove_leftovers(ddir)
    if ddir.exists() and any(p.name != "downloads" for p in ddir.iterdir()):
        print(f"{ddir} holds an incomplete preparation (no {MARKER}); repairing it")
        if archive is None and url is None:
            try:  # files the user unpacked themselves, or an interrupted run that got far enough
                return _finish(name, ddir, ["existing files"])
            except LayoutError as err:
                if not meta.url:
                    raise LayoutError(f"{err}; {_where_to_get(meta, root)}") from err
        fresh = False  # never delete what was there before this run
    else:
        fresh = True
    made = [p for p in (Path(root).expanduser(), ddir) if not p.exists()]
    try:
        sources = _fetch(meta, ddir, archive, url, md5, progress, root)
        _unpack(sources, ddir, max_bytes, max_members)
        return _finish(name, ddir, [s.name for s in sources])
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


def _finish(name: str, ddir: Path, sources: list[str]) -> Path:
    records = read_layout(name, ddir)
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


def _fetch(meta: DatasetInfo, ddir: Path, archive, url, md5, progress: bool, root) -> list[Path]:
    """Local archives as given, else downloads into ddir/downloads (resumed, verified)."""
    archives = [Path(a).expanduser() for a in _as_list(archive)]
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
                stacklevel=3,
            )
    if archives:
        return archives
    urls, md5s = _as_list(url), _as_list(md5)
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
                paths.append(download_file(mirror, dest, md5=remote.md5, progress=progress))
                break
            except OSError as err:  # DownloadError, URLError...: try the next mirror
                errors.append(str(err))  # (a ChecksumError is a ValueError: final)
        else:  # one line for the CLI: every mirror's reason, then where else to get the files
            raise DownloadError(
                f"could not download {remote.filename}: {' | '.join(errors)}. "
                f"{_where_to_get(meta, root)}"
            )
    return paths


# ----------------------------------------------------------------------------- build


class ImageDataset(torch.utils.data.Dataset):
    """Images listed by path under `root`; items are (image, label, index).

    Images are decoded in the mode the transform asks for (its `load_hint`), else in the
    dataset's native mode ("RGB", or "L" for digits and Omniglot).
    """

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        labels: np.ndarray,
        classes: list[str],
        transform: Callable | None = None,
        mode: str = "RGB",
    ):
        self.root = Path(root)
        self.paths = np.array(paths, dtype=str)  # one numpy array: no per-item refcounts in workers
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = int(index) % len(self)
        mode, min_size = getattr(self.transform, "load_hint", (self.mode, None))
        image = self._load(index, mode, min_size)
        return (self.transform(image) if self.transform else image), int(self.labels[index]), index

    def _load(self, index: int, mode: str, min_size: int | None) -> Image.Image:
        return load_image(self.root / self.paths[index], mode, min_size)


class DigitsDataset(ImageDataset):
    """scikit-learn's digits as 8x8 "L" images (0-16 scaled to 0-255)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], transform=None):
        super().__init__(Path("."), [""] * len(labels), labels, classes, transform, mode="L")
        self.images = images

    def _load(self, index: int, mode: str, min_size: int | None) -> Image.Image:
        return to_mode(Image.fromarray(self.images[index], mode="L"), mode)


class EmbeddedDataset(ImageDataset):
    """Images decoded straight from the archives shipped in the package (msl_kit.embedded)."""

    def _load(self, index: int, mode: str, min_size: int | None) -> Image.Image:
        return to_mode(embedded.load(str(self.paths[index])), mode)


def _digits_records() -> tuple[np.ndarray, list[Record]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    splits = ["train" if t < 5 else "test" for t in digits.target]
    return images, [
        Record(str(i), int(t), str(int(t)), s)
        for i, (t, s) in enumerate(zip(digits.target, splits))
    ]


def _select(records: list[Record], split: str, val_fraction: float, seed: int) -> list[Record]:
    """The records of `split`; "val" is a seeded, class-disjoint share of the training classes."""
    if split not in ("train", "val") or (split == "train" and val_fraction <= 0):
        return [r for r in records if r.split == split]
    if any(r.split == "val" for r in records):
        if val_fraction > 0:
            raise ValueError("this dataset has its own val split; leave val_fraction at 0")
        return [r for r in records if r.split == split]
    if not 0 < val_fraction < 1:
        raise ValueError(
            f"split 'val' is carved from the training classes: pass 0 < val_fraction < 1 "
            f"(e.g. 0.2), not {val_fraction}"
        )
    keys = sorted({r.key for r in records if r.split == "train"})
    n_val = min(max(1, round(val_fraction * len(keys))), len(keys) - 1)
    order = np.random.default_rng(seed).permutation(len(keys))
    val_keys = {keys[i] for i in order[:n_val]}
    return [r for r in records if r.split == "train" and (r.key in val_keys) == (split == "val")]


def _readable(root: Path, records: list[Record], where: str) -> list[Record]:
    """Records whose image decodes; the others are counted in a warning."""

    def ok(rec: Record) -> bool:
        try:
            load_image(root / rec.path, None, 1)  # 1/8-scale JPEG decode still reads every byte
            return True
        except CorruptImageError:
            return False

    with ThreadPoolExecutor(
        max_workers=min(8, os.cpu_count() or 1)
    ) as pool:  # PIL decodes without the GIL
        keep = list(pool.map(ok, records, chunksize=64))
    bad = [r.path for r, k in zip(records, keep) if not k]
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image(s) of {len(records)} in {where} "
            f"(first: {', '.join(bad[:3])})",
            RuntimeWarning,
            stacklevel=3,
        )
    return [r for r, k in zip(records, keep) if k]


def build(
    name: str,
    root: str | Path | None,
    split: str,
    transform: Callable | None = None,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_corrupt: bool = False,
) -> ImageDataset:
    """The `split` of a prepared dataset as a torch Dataset of (image, label, index).

    `.labels` (int64, contiguous 0..C-1 in this split; In-Shop query and gallery share one label
    space) and `.classes` (names in label order). With val_fraction > 0, "val" holds that share
    of the training classes (seeded) and "train" the rest.
    """
    meta = info(name)
    if split not in meta.splits and not (name == "folder"):
        raise ValueError(f"{name} has splits {', '.join(meta.splits)}, not {split!r}")
    images = None
    if name == "digits":
        images, records = _digits_records()
        base = Path(".")
    elif name == "omniglot_small":
        base, records = Path("."), embedded.records()
    elif name == "folder":
        if root is None:
            raise ValueError(
                "the folder dataset needs root: a folder of <split>/<class>/ images or a CSV file"
            )
        base, records = read_folder(Path(root).expanduser())
    else:
        if root is None:
            raise ValueError(f"{name} needs root, the folder it was prepared in")
        base = dataset_dir(name, root)
        if not _prepared(base, name):
            raise LayoutError(
                f"{name} is not prepared in {base}: run `msl-kit prepare {name} --root {root}` "
                f"(or msl_kit.datasets.prepare({name!r}, {str(root)!r}))"
            )
        records = read_layout(name, base)
    chosen = _select(records, split, val_fraction, seed)
    if not chosen:
        have = sorted({r.split for r in records})
        raise ValueError(
            f"{name} has no images in split {split!r} (splits found: {', '.join(have)})"
        )
    if skip_corrupt and images is None and name != "omniglot_small":  # shipped, md5-checked
        chosen = _readable(base, chosen, f"{name}/{split}")
    space = chosen  # the classes that get labels; query and gallery share theirs
    if meta.query_gallery and split in ("query", "gallery"):
        space = [r for r in records if r.split in ("query", "gallery")]
    keys = sorted({r.key for r in space})
    label_of = {k: i for i, k in enumerate(keys)}
    names = {r.key: r.cls for r in space}
    labels = np.array([label_of[r.key] for r in chosen], dtype=np.int64)
    classes = [names[k] for k in keys]
    if name == "omniglot_small":
        return EmbeddedDataset(base, [r.path for r in chosen], labels, classes, transform, "L")
    if images is not None:
        return DigitsDataset(images[[int(r.path) for r in chosen]], labels, classes, transform)
    return ImageDataset(
        base, [r.path for r in chosen], labels, classes, transform, "L" if meta.grey else "RGB"
    )
