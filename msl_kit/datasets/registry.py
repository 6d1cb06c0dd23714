"""The dataset registry: every dataset msl_kit knows, its files, licence and splits.

`msl-kit prepare --list` shows it; `prepare` reads what to fetch from it; `build` reads each
dataset's splits, native colour and layout reader from it. A new dataset is one layout file in
`layouts/` plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from msl_kit.datasets.layouts.cars import read_cars
from msl_kit.datasets.layouts.common import DatasetError, Record, check_records
from msl_kit.datasets.layouts.official import read_cub, read_inshop, read_omniglot, read_sop


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
    reader: Callable[[Path], list[Record]] | None = None  # the prepared folder's layout reader

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
            reader=read_omniglot,
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
            reader=read_cub,
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
            reader=read_cars,
        ),
        DatasetInfo(
            "sop",
            "Stanford Online Products, 22,634 eBay products in 12 categories",
            "120,053 images, 22,634 classes, 2.9 GB",
            "research use (Stanford CVGL)",
            "https://cvgl.stanford.edu/projects/lifted_struct/",
            (RemoteFile("Stanford_Online_Products.zip", "7f73d41a2f44250d4779881525aea32e"),),
            split_rule="Ebay_train.txt (11,318 classes) / Ebay_test.txt (11,316 classes)",
            reader=read_sop,
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
            reader=read_inshop,
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


def register_dataset(dataset: DatasetInfo) -> None:
    """Add a dataset (from a plugin module): its files and splits, and the `reader` of its
    prepared folder's layout; an existing name is refused."""
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
    reader = info(name).reader
    if reader is None:
        raise DatasetError(f"{name} has no official file layout to read")
    return check_records(name, reader, ddir)
