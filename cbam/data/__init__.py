"""CIFAR-10 for Lightning: the on-disk sources and their uint8 cache (:mod:`cbam.data.sources`), the plans
both loaders share (:mod:`cbam.data.batches`), the ``device`` loader (:mod:`cbam.data.device_loader`),
the ``workers`` loader (:mod:`cbam.data.workers`) and the data module (:mod:`cbam.data.module`)."""

from cbam.data.batches import CIFAR10_MEAN, CIFAR10_STD, IGNORED_LABEL, fill_batch, normalize
from cbam.data.device_loader import DeviceLoader
from cbam.data.module import CIFAR10DataModule, split_train_val
from cbam.data.sources import CACHE_NAME, Cifar10Arrays, DataError, find_source, load_cifar10
from cbam.data.workers import PlannedCrops, WorkersLoader

__all__ = [
    "CACHE_NAME",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IGNORED_LABEL",
    "CIFAR10DataModule",
    "Cifar10Arrays",
    "DataError",
    "DeviceLoader",
    "PlannedCrops",
    "WorkersLoader",
    "fill_batch",
    "find_source",
    "load_cifar10",
    "normalize",
    "split_train_val",
]
