"""The data modules: one :class:`ImageDataModule` (the fixed train/val split, the choice between the two
loaders, the data set's facts) over a :class:`~cbam.data.sources.Source`, and one subclass per member of
the ``data`` config group: :class:`CIFAR10DataModule`, :class:`CIFAR100DataModule`,
:class:`ImageFolderDataModule`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from cbam.arguments import check_choice, check_flag, check_integer
from cbam.data.batches import LoaderSpec, default_padding, fill_batch
from cbam.data.device_loader import DeviceLoader
from cbam.data.facts import DataFacts
from cbam.data.sources import CIFAR10, CIFAR100, FolderSource, ImageArrays, Source, load_arrays
from cbam.data.workers import WorkersLoader
from cbam.errors import DataError, InvalidArgument

LOADERS = ("auto", "device", "workers")
#: class names listed in the one-line summary before the rest are elided
SUMMARY_CLASSES = 10


def check_val_size(val_size: int, num_train: int, data: str = "this data set") -> None:
    if not 0 <= val_size < num_train:
        raise DataError(
            f"data.val_size={val_size}: must be less than the {num_train} training images of {data}"
        )


def split_train_val(
    num_train: int, val_size: int, seed: int, data: str = "this data set"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the train and validation subsets: a fixed random permutation, val = its tail (``val_size``
    checked against ``num_train``, the training images of ``data``)."""
    check_val_size(val_size, num_train, data)
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return order[: num_train - val_size].sort().values, order[num_train - val_size :].sort().values


class ImageDataModule(pl.LightningDataModule):
    """An image-classification data set with a fixed validation split taken out of its training set.

    Args:
        source: the data set's layout under ``root`` (see :mod:`cbam.data.sources`).
        root: folder holding (or receiving) the data.
        download: download the data set (if it can be) when ``root`` does not hold it.
        batch_size: training batch size per process.
        num_workers: worker processes of the ``workers`` loader.
        val_size: training images held out (with ``split_seed``) for validation; 0 validates on none.
        split_seed: seed of the train/val split, fixed so every run validates on the same images.
        seed: seed of the shuffling and augmentation of either loader.
        loader: ``device`` (batches cut on the training device), ``workers`` (a DataLoader whose worker
            processes cut the batches) or ``auto`` (``device`` on a GPU, else ``workers``).
        crop_padding: zero padding (pixels) around each training image before its random crop of the
            image's size; None: 1/8 of the image size (4 at 32x32).
        cache_dir: where the uint8 cache goes; default beside the data.

    Both loaders give every rank a disjoint shard of each epoch, evaluate every image exactly once across
    ranks, draw shuffling and augmentation from ``(seed, epoch, rank)`` and resume mid-epoch from the
    position this module saves in checkpoints. Every batch reaches the model with ``batch_size`` rows: a
    short evaluation batch is filled up with ignored rows (:func:`cbam.data.batches.fill_batch`). After
    ``setup`` the data set's facts are attributes: ``classes``, ``image_size`` (height, width), ``mean`` and
    ``std``; :meth:`class_count` is known before.
    """

    def __init__(
        self,
        source: Source,
        root: str,
        *,
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        loader: str = "auto",
        crop_padding: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_integer("batch_size", batch_size, 1)
        check_integer("num_workers", num_workers, 0)
        check_integer("val_size", val_size, 0)
        check_integer("split_seed", split_seed)
        check_integer("seed", seed)
        check_integer("crop_padding", crop_padding, 0, null_ok=True, null_means="1/8 of the image size")
        check_flag("download", download)
        check_choice("loader", loader, LOADERS)
        if not isinstance(root, (str, Path)):
            raise InvalidArgument("root", root, f"must be a folder holding {source.holds}")
        path = Path(root).expanduser()
        if (not download or source.downloaded_classes is None) and source.layout(path) is None:
            state = "does not exist" if not path.exists() else f"holds no {source.title}"
            if source.downloaded_classes is None:
                accepted = f"{state}; it must be a folder holding {source.holds}"
            else:
                accepted = f"{state}; with download=false it must be a folder holding {source.holds}"
            raise InvalidArgument("root", root, accepted)
        self.source, self.root, self.download, self.cache_dir = source, root, download, cache_dir
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_size, self.split_seed, self.seed, self.loader = val_size, split_seed, seed, loader
        self.crop_padding = crop_padding
        self.classes: list[str] = []
        self.image_size: tuple[int, int] | None = None
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._loaders: dict[str, DeviceLoader | WorkersLoader] = {}
        self._train_state: dict | None = None  # the train loader's position, from a checkpoint
        self._prepared: ImageArrays | None = None
        self._class_count: int | None = None
        self._train_images: int | None = None  # known without decoding for an image-folder tree

    # ---------------------------------------------------------------------------------- the data set

    @property
    def description(self) -> str:
        """``"<kind> at <root>"``, for a run's record."""
        return self.source.describe(Path(self.root).expanduser())

    def class_count(self) -> int:
        """The data set's number of classes, found before any image is decoded (once): from its class
        folders or label names, or, before a download, the count of the data set it brings.

        Checks what ``root`` holds on the way, raising :class:`DataError` for what no run can use: an
        image-folder tree with a test class that has no training folder or an empty class folder, or
        ``val_size`` not below its training images.
        """
        if self._class_count is None:
            root = Path(self.root).expanduser()
            if self.source.layout(root) is None:  # to be downloaded (the constructor checked it may be)
                self._class_count = self.source.downloaded_classes
            else:
                classes, self._train_images = self.source.classes(root), self.source.train_count(root)
                if self._train_images is not None:
                    check_val_size(self.val_size, self._train_images, self.description)
                self._class_count = len(classes)
        return self._class_count

    def check_training_batch(self) -> None:
        """For a training run: raise :class:`DataError` when the training images left after ``val_size``
        are fewer than one batch (training drops a partial batch, so no step would run). Checked where
        :meth:`class_count` found the count without decoding (an image-folder tree)."""
        self.class_count()
        left = None if self._train_images is None else self._train_images - self.val_size
        if left is not None and self.batch_size > left:
            raise DataError(
                f"data.batch_size={self.batch_size}: larger than the {left} training images of "
                f"{self.description} (after data.val_size={self.val_size}): no training batch would be full; "
                f"lower data.batch_size or data.val_size"
            )

    def load(self, download: bool | None = None) -> ImageArrays:
        """The decoded arrays (from the cache, built on first use); ``download`` overrides the module's."""
        download = self.download if download is None else download
        return load_arrays(self.source, self.root, download=download, cache_dir=self.cache_dir)

    def summary(self) -> str:
        """One line: what the data set holds and how its images are prepared (after setup)."""
        names = ", ".join(self.classes[:SUMMARY_CLASSES]) + (
            ", ..." if len(self.classes) > SUMMARY_CLASSES else ""
        )
        sizes = " / ".join(f"{len(self._splits[split][1])} {split}" for split in ("train", "val", "test"))
        mean, std = (", ".join(f"{value:.4f}" for value in values) for values in (self.mean, self.std))
        return (
            f"data: {self.description}: {len(self.classes)} classes ({names}); "
            f"{self.image_size[0]}x{self.image_size[1]} images, {sizes}; crop padding {self.padding}; "
            f"mean ({mean}), std ({std})"
        )

    def facts(self) -> DataFacts:
        """What a network trained on these data needs to be used on other images (what checkpoints record):
        after setup, from its attributes; before, from the decoded arrays (loaded, never downloaded)."""
        if self.classes:
            classes, image_size, mean, std = self.classes, self.image_size, self.mean, self.std
        else:
            arrays = self.load(download=False)
            classes, image_size, mean, std = arrays.classes, arrays.image_size, arrays.mean, arrays.std
        return DataFacts(
            dataset=self.source.title,
            classes=tuple(classes),
            image_size=tuple(image_size),
            resize=self.source.resize_rule(),
            mean=tuple(mean),
            std=tuple(std),
        )

    def class_counts(self) -> dict[str, list[int]]:
        """Images of each class in each split, ``{"train": [...], "val": [...], "test": [...]}`` (after setup)."""
        return {
            split: torch.bincount(labels, minlength=len(self.classes)).tolist()
            for split, (_, labels) in self._splits.items()
        }

    @property
    def padding(self) -> int:
        return self.crop_padding if self.crop_padding is not None else default_padding(self.image_size)

    # ------------------------------------------------------------------------------------ Lightning

    def prepare_data(self) -> None:
        # Kept for setup() in the same process; other ranks read the cache this writes.
        self._prepared = self.load()

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        arrays = self._prepared or self.load(download=False)
        self._prepared = None
        self.classes, self.image_size = arrays.classes, arrays.image_size
        self.mean, self.std = arrays.mean, arrays.std
        train_idx, val_idx = split_train_val(
            len(arrays.train_labels), self.val_size, self.split_seed, self.description
        )
        self._splits = {
            "train": (arrays.train_images[train_idx], arrays.train_labels[train_idx]),
            "val": (arrays.train_images[val_idx], arrays.train_labels[val_idx]),
            "test": (arrays.test_images, arrays.test_labels),
        }
        if self.trainer is None or self.trainer.is_global_zero:
            print(self.summary(), flush=True)

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def uses_device_loader(self) -> bool:
        return self.loader == "device" or (self.loader == "auto" and self._device().type == "cuda")

    def _build_loader(self, split: str) -> DeviceLoader | WorkersLoader:
        images, labels = self._splits[split]
        trainer = self.trainer
        spec = LoaderSpec(
            self.batch_size,
            train=split == "train",
            mean=tuple(self.mean),
            std=tuple(self.std),
            padding=self.padding,
            seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        device = self._device()
        if self.uses_device_loader():
            return DeviceLoader(images, labels, spec, device=device)
        return WorkersLoader(
            images, labels, spec, num_workers=self.num_workers, pin_memory=device.type == "cuda"
        )

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
    # builds it before: the data module's state is read before either. (Lightning files it under the
    # class's name: CIFAR10DataModule keeps its name, so older checkpoints resume exactly.)
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


class CIFAR10DataModule(ImageDataModule):
    """``data=cifar10``: CIFAR-10, from ``cifar-10-batches-py/`` or a tree of 32x32 images under ``root``
    (downloaded with torchvision when ``root`` holds neither and ``download``); normalised with its
    published channel mean and std. ``options``: the arguments of :class:`ImageDataModule`."""

    def __init__(self, root: str = "data", download: bool = True, **options: Any) -> None:
        super().__init__(CIFAR10, root, download=download, **options)


class CIFAR100DataModule(ImageDataModule):
    """``data=cifar100``: CIFAR-100's 100 fine classes, from ``cifar-100-python/`` under ``root``
    (downloaded with torchvision when missing and ``download``); class names from its ``meta`` file.
    ``options``: the arguments of :class:`ImageDataModule`."""

    def __init__(self, root: str = "data", download: bool = True, **options: Any) -> None:
        super().__init__(CIFAR100, root, download=download, **options)


class ImageFolderDataModule(ImageDataModule):
    """``data=folder``: any ``train/<class>/``, ``test/<class>/`` tree of .png or .jpg images under
    ``root``. Class names, class count and image size come from the data; ``image_size=S`` resizes every
    image (shorter side to S, then the centre SxS) when the cache is built, else all images must share one
    size. ``options``: the arguments of :class:`ImageDataModule`."""

    def __init__(self, root: str | None = None, image_size: int | None = None, **options: Any) -> None:
        check_integer("image_size", image_size, 1, null_ok=True, null_means="the images' own size")
        super().__init__(FolderSource(image_size), root, **options)
