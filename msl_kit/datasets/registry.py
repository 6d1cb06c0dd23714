"""The dataset registry: every dataset msl_kit knows, its files, licence, splits and store.

`msl-kit prepare --list` shows it; `prepare`, `is_prepared`, `build`, `embed`'s item names and
a search grid's thumbnails ask each entry's `store` (`stores.py`) how that dataset is read and
what it needs. A new dataset is one file (a layout reader in `layouts/`, or a module with its
own store) plus one entry here, or one `register_dataset` call from a plugin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from msl_kit.datasets import digits, embedded
from msl_kit.datasets.layouts.cars import read_cars
from msl_kit.datasets.layouts.common import DatasetError, Record
from msl_kit.datasets.layouts.official import read_cub, read_inshop, read_omniglot, read_sop
from msl_kit.datasets.preparation import PreparedFolder, RemoteFile
from msl_kit.datasets.stores import PrepareOptions, Store, UserFolder


@dataclass(frozen=True)
class DatasetInfo:
    """What `msl-kit prepare --list` shows, and where the dataset's images are (`store`)."""

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
    # how its images are read and what it needs: a prepared folder and its layout reader, the
    # user's folder, images shipped with a package
    store: Store = PreparedFolder()

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
            store=digits.STORE,
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
            store=PreparedFolder(read_omniglot),
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
            store=embedded.STORE,
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
            store=PreparedFolder(read_cub),
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
            store=PreparedFolder(read_cars),
        ),
        DatasetInfo(
            "sop",
            "Stanford Online Products, 22,634 eBay products in 12 categories",
            "120,053 images, 22,634 classes, 2.9 GB",
            "research use (Stanford CVGL)",
            "https://cvgl.stanford.edu/projects/lifted_struct/",
            (RemoteFile("Stanford_Online_Products.zip", "7f73d41a2f44250d4779881525aea32e"),),
            split_rule="Ebay_train.txt (11,318 classes) / Ebay_test.txt (11,316 classes)",
            store=PreparedFolder(read_sop),
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
            store=PreparedFolder(read_inshop),
        ),
        DatasetInfo(
            "folder",
            "your own images: root/<split>/<class>/*.jpg, or a CSV of path,label,split",
            "yours",
            "yours",
            "local folder or CSV file",
            split_rule="the split folders or the CSV's split column",
            store=UserFolder(),
        ),
    )
}


def register_dataset(dataset: DatasetInfo) -> None:
    """Add a dataset (from a plugin module): its files, splits and `store` (a `PreparedFolder`
    with its layout reader, a `Shipped` set of the plugin's own, ...); an existing name is
    refused."""
    if dataset.name in REGISTRY and REGISTRY[dataset.name] != dataset:
        raise DatasetError(f"a dataset named {dataset.name!r} is already registered; pick another")
    REGISTRY[dataset.name] = dataset


def list_datasets() -> list[DatasetInfo]:
    """Every registered dataset, in registry order."""
    return list(REGISTRY.values())


def info(name: str) -> DatasetInfo:
    """The registry entry of `name`; ValueError naming the valid names otherwise."""
    if name not in REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def read_layout(name: str, ddir: Path) -> list[Record]:
    """The records of dataset `name` prepared in `ddir`, read by its registered layout reader."""
    return info(name).store.read_layout(name, ddir)


def is_prepared(name: str, root: str | Path | None) -> bool:
    """Whether `name` can be read from `root` now: a prepared set's marker is there, or its
    store needs no preparation (shipped, the user's folder)."""
    return info(name).store.ready(name, root)


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
    declaring more than `max_bytes` or `max_members` are refused (defaults in
    msl_kit.files.archives).
    A prepare that fails in a folder it started empty removes what it extracted there and keeps
    `downloads/`, so that the next run resumes. A set shipped with a package, or a folder of
    your own, needs nothing: its store says so and returns.
    """
    meta = info(name)
    how = PrepareOptions(archive, url, md5, progress, max_bytes, max_members)
    return meta.store.prepare(meta, root, how)


def item_image(item: str) -> Image.Image | None:
    """The image an item name of a shipped set stands for ("omniglot_small:<member>", as
    `embed` names it); None where `item` is a file's path (or names no registered dataset)."""
    name, sep, rest = item.partition(":")
    entry = REGISTRY.get(name) if sep else None
    return None if entry is None else entry.store.item_image(rest)
