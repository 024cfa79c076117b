"""Image data sets for Lightning: their sources on disk and the uint8 cache (:mod:`cbam.data.sources`), the
plans both loaders share (:mod:`cbam.data.batches`), the ``device`` loader (:mod:`cbam.data.device_loader`),
the ``workers`` loader (:mod:`cbam.data.workers`), the data modules (:mod:`cbam.data.datamodule`) and what
checkpoints record of their data (:mod:`cbam.data.facts`)."""

from cbam.data.batches import IGNORED_LABEL, LoaderSpec, default_padding, fill_batch, normalize
from cbam.data.datamodule import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ImageDataModule,
    ImageFolderDataModule,
    split_train_val,
)
from cbam.data.device_loader import DeviceLoader
from cbam.data.facts import DataFacts
from cbam.data.sources import (
    CIFAR10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100,
    FolderSource,
    ImageArrays,
    Source,
    load_arrays,
    load_cifar10,
)
from cbam.data.workers import PlannedCrops, WorkersLoader
from cbam.errors import DataError

#: the cache file of CIFAR-10 (each source names its own: ``source.cache_name``)
CACHE_NAME = CIFAR10.cache_name

__all__ = [
    "LoaderSpec",
    "CACHE_NAME",
    "CIFAR10",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100",
    "IGNORED_LABEL",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataError",
    "DataFacts",
    "DeviceLoader",
    "FolderSource",
    "ImageArrays",
    "ImageDataModule",
    "ImageFolderDataModule",
    "PlannedCrops",
    "Source",
    "WorkersLoader",
    "default_padding",
    "fill_batch",
    "load_arrays",
    "load_cifar10",
    "normalize",
    "split_train_val",
]
