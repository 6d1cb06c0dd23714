"""Datasets: the registry (files, md5s, licences, splits, and each entry's store: how its
images are read and what it needs), `prepare`, the shipped sets (Omniglot-small, digits), the
torch Datasets (`build`), image decoding and transforms, and the batch samplers. Import the
public names from here (`from msl_kit.datasets import build`); layout helpers for a plugin's own
reader are in `msl_kit.datasets.layouts.common`."""

from msl_kit.datasets.dataset import ImageDataset, build
from msl_kit.datasets.layouts.common import LayoutError, Record
from msl_kit.datasets.preparation import PreparedFolder, RemoteFile, dataset_dir
from msl_kit.datasets.registry import (
    REGISTRY,
    DatasetInfo,
    info,
    is_prepared,
    list_datasets,
    prepare,
    register_dataset,
)
from msl_kit.datasets.sampling import PKSampler, RandomBatchSampler
from msl_kit.datasets.stores import PrepareOptions, Shipped, Store, UserFolder
from msl_kit.datasets.transforms import CorruptImageError, build_transform, load_image

__all__ = [
    "REGISTRY",
    "CorruptImageError",
    "DatasetInfo",
    "ImageDataset",
    "LayoutError",
    "PKSampler",
    "PrepareOptions",
    "PreparedFolder",
    "RandomBatchSampler",
    "Record",
    "RemoteFile",
    "Shipped",
    "Store",
    "UserFolder",
    "build",
    "build_transform",
    "dataset_dir",
    "info",
    "is_prepared",
    "list_datasets",
    "load_image",
    "prepare",
    "register_dataset",
]
