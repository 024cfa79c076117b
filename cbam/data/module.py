"""CIFAR10DataModule: the fixed train/val split and the choice between the two loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from cbam.data.batches import fill_batch
from cbam.data.device_loader import DeviceLoader
from cbam.data.sources import BATCHES_DIR, Cifar10Arrays, DataError, find_source, load_cifar10
from cbam.data.workers import WorkersLoader
from cbam.errors import InvalidArgument

LOADERS = ("auto", "device", "workers")
#: CIFAR-10's training set: val_size must leave some of it to train on
CIFAR10_TRAIN_SIZE = 50_000


def split_train_val(num_train: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the train and validation subsets: a fixed random permutation, val = its tail."""
    if not 0 <= val_size < num_train:
        # The constructor checked val_size against CIFAR-10's size; a smaller image folder may hold fewer.
        raise DataError(f"data.val_size must be in [0, {num_train}) for this data set, got {val_size}")
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return order[: num_train - val_size].sort().values, order[num_train - val_size :].sort().values


def _require_integer(argument: str, value: Any, minimum: int, below: int | None = None) -> None:
    # bool is a subclass of int: true is not a batch size
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not in_range or (below is not None and value >= below):
        accepted = f"an integer >= {minimum}" if below is None else f"an integer in [{minimum}, {below})"
        raise InvalidArgument(argument, value, f"must be {accepted}")


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 with a fixed validation split taken out of the training set.

    Args:
        root: folder holding (or receiving) the data; see :mod:`cbam.data.sources` for what it may hold.
        download: download with torchvision when ``root`` holds no CIFAR-10.
        batch_size: training batch size per process.
        num_workers: worker processes of the ``workers`` loader.
        val_size: training images held out (with ``split_seed``) for validation; 0 validates on none.
        split_seed: seed of the train/val split, fixed so every run validates on the same images.
        seed: seed of the shuffling and augmentation of either loader.
        loader: ``device`` (batches cut on the training device), ``workers`` (a DataLoader whose worker
            processes cut the batches) or ``auto`` (``device`` on a GPU, else ``workers``).
        cache_dir: where the uint8 cache goes; default beside the data.

    Both loaders give every rank a disjoint shard of each epoch, evaluate every image exactly once across
    ranks, draw shuffling and augmentation from ``(seed, epoch, rank)`` and resume mid-epoch from the
    position this module saves in checkpoints. Every batch reaches the model with ``batch_size`` rows: a
    short evaluation batch is filled up with ignored rows (:func:`cbam.data.batches.fill_batch`).
    """

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        loader: str = "auto",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        _require_integer("batch_size", batch_size, 1)
        _require_integer("num_workers", num_workers, 0)
        _require_integer("val_size", val_size, 0, below=CIFAR10_TRAIN_SIZE)
        if loader not in LOADERS:
            raise InvalidArgument("loader", loader, f"accepted values are {', '.join(LOADERS)}")
        if not download and find_source(Path(root).expanduser()) is None:
            state = "does not exist" if not Path(root).expanduser().exists() else "holds no CIFAR-10"
            raise InvalidArgument(
                "root", root, f"{state}; with download=false it must be a folder holding {BATCHES_DIR}/ or "
                f"train/<class>/ + test/<class>/ images",
            )  # fmt: skip
        self.root, self.download, self.cache_dir = root, download, cache_dir
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_size, self.split_seed, self.seed, self.loader = val_size, split_seed, seed, loader
        self.classes: list[str] = []
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._loaders: dict[str, DeviceLoader | WorkersLoader] = {}
        self._train_state: dict | None = None  # the train loader's position, from a checkpoint
        self._prepared: Cifar10Arrays | None = None

    def prepare_data(self) -> None:
        # Kept for setup() in the same process; other ranks read the cache this writes.
        self._prepared = load_cifar10(self.root, download=self.download, cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        arrays = self._prepared or load_cifar10(self.root, download=False, cache_dir=self.cache_dir)
        self._prepared = None
        self.classes = arrays.classes
        train_idx, val_idx = split_train_val(len(arrays.train_labels), self.val_size, self.split_seed)
        self._splits = {
            "train": (arrays.train_images[train_idx], arrays.train_labels[train_idx]),
            "val": (arrays.train_images[val_idx], arrays.train_labels[val_idx]),
            "test": (arrays.test_images, arrays.test_labels),
        }

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def uses_device_loader(self) -> bool:
        return self.loader == "device" or (self.loader == "auto" and self._device().type == "cuda")

    def _build_loader(self, split: str) -> DeviceLoader | WorkersLoader:
        images, labels = self._splits[split]
        trainer = self.trainer
        common = {
            "train": split == "train",
            "seed": self.seed,
            "rank": trainer.global_rank if trainer else 0,
            "world_size": trainer.world_size if trainer else 1,
        }
        device = self._device()
        if self.uses_device_loader():
            return DeviceLoader(images, labels, self.batch_size, device=device, **common)
        options = {"num_workers": self.num_workers, "pin_memory": device.type == "cuda"}
        return WorkersLoader(images, labels, self.batch_size, **options, **common)

    def _loader(self, split: str) -> DeviceLoader | WorkersLoader:
        # Built once: the device loader's images stay on the device, the workers stay up, and the train
        # loader's position is what state_dict saves.
        if split not in self._loaders:
            self._loaders[split] = self._build_loader(split)
        if split == "train" and self._train_state is not None:
            self._loaders[split].load_state_dict(self._train_state)
            self._train_state = None
        return self._loaders[split]

    # The train loader's position (epoch, batches done) travels in checkpoints through these two hooks.
    # Lightning also saves it with the fit loop, but restores it from there only when the loop builds the
    # loader after the checkpoint was read, and configure_optimizers' trainer.estimated_stepping_batches
    # builds it before: the data module's state is read before either.
    def state_dict(self) -> dict:
        loader = self._loaders.get("train")
        return {"train_loader": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_state = state_dict.get("train_loader")
        if self._train_state is not None and "train" in self._loaders:
            self._loaders["train"].load_state_dict(self._train_state)
            self._train_state = None

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> tuple:
        # Here, on the training device, for both loaders alike. Training batches are always full (the last
        # partial one is dropped); a short evaluation batch is filled up, so the network sees one shape.
        return fill_batch(*batch, self.batch_size)

    def train_dataloader(self) -> DeviceLoader | WorkersLoader:
        return self._loader("train")

    def val_dataloader(self) -> DeviceLoader | WorkersLoader | list:
        return self._loader("val") if self.val_size > 0 else []

    def test_dataloader(self) -> DeviceLoader | WorkersLoader:
        return self._loader("test")
