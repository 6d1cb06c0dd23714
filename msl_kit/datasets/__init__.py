"""Datasets: the registry (files, md5s, licences, splits, layout readers), `prepare`, the
embedded Omniglot-small set, the torch Datasets (`build`), image decoding and transforms, and
the batch samplers. Import the public names from here (`from msl_kit.datasets import build`);
layout helpers for a plugin's own reader are in `msl_kit.datasets.layouts.common`."""

from msl_kit.datasets.dataset import ImageDataset, build
from msl_kit.datasets.layouts.common import LayoutError, Record
from msl_kit.datasets.preparation import dataset_dir, is_prepared, prepare
from msl_kit.datasets.registry import (
    REGISTRY,
    DatasetInfo,
    RemoteFile,
    info,
    list_datasets,
    register_dataset,
)
from msl_kit.datasets.sampling import PKSampler, RandomBatchSampler
from msl_kit.datasets.transforms import CorruptImageError, build_transform, load_image

__all__ = [
    "REGISTRY",
    "CorruptImageError",
    "DatasetInfo",
    "ImageDataset",
    "LayoutError",
    "PKSampler",
    "RandomBatchSampler",
    "Record",
    "RemoteFile",
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
