"""Datasets: the registry (files, md5s, licences, splits, layout readers), `prepare`, the
embedded Omniglot-small set, the torch Datasets (`build`), image decoding and transforms.

Import names from here (`from msl_kit.datasets import build`); each is defined in the module
it is imported from below."""

from msl_kit.datasets.dataset import (
    DigitsDataset,
    EmbeddedDataset,
    ImageDataset,
    build,
)
from msl_kit.datasets.layouts.common import (
    IMAGE_EXTENSIONS,
    LayoutError,
    Record,
    check_records,
    find,
    inside,
    read_rows,
    search,
    subfolders,
    to_int,
)
from msl_kit.datasets.preparation import (
    MARKER,
    dataset_dir,
    is_complete,
    is_prepared,
    prepare,
)
from msl_kit.datasets.registry import (
    REGISTRY,
    DatasetInfo,
    RemoteFile,
    info,
    list_datasets,
    read_layout,
    register_dataset,
)
from msl_kit.datasets.transforms import (
    CorruptImageError,
    ImageTransform,
    build_transform,
    load_image,
    to_mode,
)

__all__ = [
    "REGISTRY",
    "CorruptImageError",
    "DatasetInfo",
    "DigitsDataset",
    "EmbeddedDataset",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "ImageTransform",
    "LayoutError",
    "MARKER",
    "Record",
    "RemoteFile",
    "build",
    "build_transform",
    "check_records",
    "dataset_dir",
    "find",
    "info",
    "inside",
    "is_complete",
    "is_prepared",
    "list_datasets",
    "load_image",
    "prepare",
    "read_layout",
    "register_dataset",
    "read_rows",
    "search",
    "subfolders",
    "to_int",
    "to_mode",
]
