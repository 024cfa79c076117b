"""CIFAR-10 for Lightning: three on-disk sources, a uint8 cache, and two ways to feed batches.

Sources, detected from what ``root`` holds (first match wins):

* ``cifar-10-batches-py/`` (torchvision's download, or a copy of it);
* an image-folder tree ``train/<class>/*.{png,jpg}`` and ``test/<class>/*`` (classes in sorted order);
* nothing yet, with ``download=True``: torchvision downloads the batches into ``root``.

Whatever the source, the images are decoded once into ``cifar10-uint8.pt`` beside the data (or in
``cache_dir``): written under a file lock to a temporary file and renamed, so concurrent jobs and ranks
share one cache and never see a partial one. The cache records a fingerprint of its source and a
checksum of its arrays; a stale or damaged cache is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cbam.atomic import write_atomically

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BATCHES_DIR = "cifar-10-batches-py"
CACHE_NAME = "cifar10-uint8.pt"
CACHE_VERSION = 1


class DataError(RuntimeError):
    """A data folder, image or cache that cannot be used; the message names the path."""


@dataclass
class Cifar10Arrays:
    """CIFAR-10 decoded: images as uint8 (N, 32, 32, 3), labels as int64 (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


# ---------------------------------------------------------------------------------------------- sources


def find_source(root: Path) -> str | None:
    """``"batches"`` or ``"folder"`` for the CIFAR-10 found under ``root``, else None."""
    if (root / BATCHES_DIR / "data_batch_1").is_file():
        return "batches"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder"
    return None


def _source_files(root: Path, source: str) -> list[Path]:
    if source == "batches":
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        return [root / BATCHES_DIR / name for name in names]
    return sorted(
        path
        for split in ("train", "test")
        for path in (root / split).rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
    )


def _fingerprint(root: Path, source: str) -> str:
    """Changes when any source file is added, removed, resized or touched."""
    digest = hashlib.sha1(source.encode())
    for path in _source_files(root, source):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_batches(root: Path) -> Cifar10Arrays:
    def load(name: str) -> dict:
        path = root / BATCHES_DIR / name
        try:
            with open(path, "rb") as handle:
                return pickle.load(handle, encoding="bytes")
        except Exception as error:  # a truncated or foreign file: say which one
            raise DataError(f"cannot read CIFAR-10 batch file {path}: {error}") from None

    def images_and_labels(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [load(name) for name in names]
        images = torch.cat([torch.as_tensor(b[b"data"]).view(-1, 3, 32, 32) for b in batches])
        labels = torch.cat([torch.as_tensor(b[b"labels"]) for b in batches])
        return images.permute(0, 2, 3, 1).contiguous(), labels.long()

    train = images_and_labels([f"data_batch_{i}" for i in range(1, 6)])
    test = images_and_labels(["test_batch"])
    classes = [name.decode() for name in load("batches.meta")[b"label_names"]]
    return Cifar10Arrays(*train, *test, classes)


def _decode_image(path: Path) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            size = image.size
    except Exception as error:
        raise DataError(f"cannot decode image {path}: {error}") from None
    if size != (32, 32):
        raise DataError(f"image {path} is {size[0]}x{size[1]}, CIFAR-10 images are 32x32")
    return array.view(32, 32, 3)


def _read_folder(root: Path) -> Cifar10Arrays:
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders (expected train/<class>/*.png|jpg)")
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    if test_classes != classes:
        raise DataError(f"{root / 'test'} has classes {test_classes}, {root / 'train'} has {classes}")

    def read_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for label, name in enumerate(classes):
            files = sorted(p for p in (root / split / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            images += [_decode_image(path) for path in files]
            labels += [label] * len(files)
        if not images:
            raise DataError(f"{root / split} holds no .png or .jpg images")
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)

    return Cifar10Arrays(*read_split("train"), *read_split("test"), classes)


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as error:
        raise DataError(
            f"could not download CIFAR-10 into data.root={root}: {error}. Offline, point data.root at a "
            f"'{BATCHES_DIR}' folder's parent or a train/<class>/ test/<class>/ image tree"
        ) from None


# ------------------------------------------------------------------------------------------------ cache


def _checksum(arrays: Cifar10Arrays) -> str:
    digest = hashlib.sha1()
    for tensor in (arrays.train_images, arrays.train_labels, arrays.test_images, arrays.test_labels):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cache_dir_for(root: Path, cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.access(root, os.W_OK):
        return root
    # A read-only data folder (a shared mount): keep the cache in the user's cache directory instead.
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cbam" / key


def _read_cache(path: Path, fingerprint: str) -> Cifar10Arrays | None:
    """The cached arrays if the cache is intact and was built from the same source files, else None."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        arrays = Cifar10Arrays(**payload["arrays"])
        if payload["version"] != CACHE_VERSION or payload["fingerprint"] != fingerprint:
            return None
        if payload["checksum"] != _checksum(arrays):
            return None
        return arrays
    except Exception:  # missing, truncated or foreign: rebuild it
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock held across processes (and hosts, on file systems that honour flock)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_cifar10(
    root: str | os.PathLike, *, download: bool = True, cache_dir: str | os.PathLike | None = None
) -> Cifar10Arrays:
    """CIFAR-10 from ``root`` as uint8 arrays, decoding and caching it on first use (see module doc)."""
    root = Path(root).expanduser()
    source = find_source(root)
    if source is None:
        if not download:
            raise DataError(
                f"data.root={root} holds no CIFAR-10 ('{BATCHES_DIR}/' or train/<class>/ + test/<class>/ "
                f"images) and data.download=false"
            )
        root.mkdir(parents=True, exist_ok=True)
        # One download for all the jobs and ranks that start on an empty root at once.
        with _locked(root / ".download.lock"):
            if find_source(root) is None:
                _download(root)
        source = "batches"
    cache_dir = _cache_dir_for(root, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / CACHE_NAME
    fingerprint = _fingerprint(root, source)
    arrays = _read_cache(cache, fingerprint)
    if arrays is not None:
        return arrays
    with _locked(cache.with_name(CACHE_NAME + ".lock")):
        arrays = _read_cache(cache, fingerprint)  # another job may have built it while we waited
        if arrays is None:
            arrays = _read_batches(root) if source == "batches" else _read_folder(root)
            payload = {
                "version": CACHE_VERSION,
                "fingerprint": fingerprint,
                "checksum": _checksum(arrays),
                "arrays": vars(arrays),
            }
            write_atomically(cache, lambda file: torch.save(payload, file), prefix=f".{CACHE_NAME}.")
    return arrays


# ------------------------------------------------------------------------------------ split and batches


def split_train_val(num_train: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the train and validation subsets: a fixed random permutation, val = its tail."""
    if not 0 <= val_size < num_train:
        raise DataError(f"data.val_size must be in [0, {num_train}), got {val_size}")
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return order[: num_train - val_size].sort().values, order[num_train - val_size :].sort().values


def normalize(images: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 NHWC images -> float NCHW (channels_last in memory), scaled to [0, 1] and standardised.

    ``mean`` and ``std`` may be given already on the images' device: building them here is a blocking
    host-to-device copy, which a per-batch caller should not pay.
    """
    mean = torch.tensor(CIFAR10_MEAN, device=images.device) if mean is None else mean
    std = torch.tensor(CIFAR10_STD, device=images.device) if std is None else std
    return ((images.float() / 255 - mean) / std).permute(0, 3, 1, 2)


class ImageDataset(Dataset):
    """uint8 NHWC images and labels served through torchvision transforms (the ``workers`` loader)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool) -> None:
        self.images, self.labels = images, labels
        steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
        self.transform = v2.Compose(
            [*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index].permute(2, 0, 1)), self.labels[index]


class _EpochSampler:
    """Holds the epoch number; Lightning calls ``set_epoch`` on a loader's ``sampler`` every epoch."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class DeviceLoader:
    """Batches cut from uint8 images held on the training device (the ``device`` loader).

    Shuffling, random crops (4-pixel zero padding) and flips are drawn on the CPU from
    ``(seed, epoch, rank)`` alone, so every run with the same seed sees the same batches, on any device,
    and a resumed run can pick up where it stopped. Under DDP every rank takes a disjoint, equally long
    shard of each epoch's permutation.
    """

    PADDING = 4

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.batch_size = batch_size
        pad = self.PADDING if train else 0
        # Zero padding stored once: a crop is then a plain gather, as with RandomCrop(padding=4).
        self.images = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad)).to(self.device)
        self.labels = labels.to(self.device)
        self.mean = torch.tensor(CIFAR10_MEAN, device=self.device)
        self.std = torch.tensor(CIFAR10_STD, device=self.device)
        self.sampler = _EpochSampler()
        self.batch_sampler = None  # Lightning inspects both attributes of a loader
        self.batches_done = 0  # batches handed out in the current pass over the epoch
        # (epoch, batches_done) of a loaded checkpoint: the first pass over that epoch skips those batches.
        self._resume: tuple[int, int] | None = None

    def _shard_size(self) -> int:
        total = len(self.labels)
        return total // self.world_size if self.train else len(range(self.rank, total, self.world_size))

    def __len__(self) -> int:
        size = self._shard_size()
        return size // self.batch_size if self.train else -(-size // self.batch_size)

    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's indices and per-image row offsets, column offsets and flips for the epoch."""
        total, size = len(self.labels), self._shard_size()
        if not self.train:
            indices = torch.arange(self.rank, total, self.world_size)
            zeros = torch.zeros(size, dtype=torch.long)
            return indices, zeros, zeros, zeros.bool()
        shared = torch.Generator().manual_seed(self.seed * 1_000_003 + self.sampler.epoch)
        order = torch.randperm(total, generator=shared)
        indices = order[self.rank :: self.world_size][:size]
        own = torch.Generator().manual_seed((self.seed * 1_000_003 + self.sampler.epoch) * 8191 + self.rank)
        rows = torch.randint(0, 2 * self.PADDING + 1, (size,), generator=own)
        cols = torch.randint(0, 2 * self.PADDING + 1, (size,), generator=own)
        flips = torch.rand(size, generator=own) < 0.5
        return indices, rows, cols, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = [t.to(self.device) for t in self._epoch_plan()]
        indices, rows, cols, flips = plan
        grid = torch.arange(32, device=self.device)
        # A pass starts at the epoch's first batch, unless it is the first pass over the epoch a loaded
        # checkpoint was taken in. Lightning knows this loader's length, so it never fetches ahead:
        # batches_done counts exactly the batches trained on when a checkpoint is saved.
        start, resume, self._resume = 0, self._resume, None
        if resume is not None and resume[0] == self.sampler.epoch:
            start = min(resume[1], len(self))
        self.batches_done = start
        for batch in range(start, len(self)):
            self.batches_done = batch + 1
            window = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            index = indices[window]
            row = rows[window, None] + grid  # (B, 32)
            # A flip reads the columns of the crop right to left.
            col = cols[window, None] + torch.where(flips[window, None], 31 - grid, grid)
            images = self.images[index[:, None, None], row[:, :, None], col[:, None, :]]
            yield normalize(images, self.mean, self.std), self.labels[index]
        self.batches_done = 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self._resume = (state["epoch"], state["batches_done"])


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 with a fixed validation split taken out of the training set.

    Args:
        root: folder holding (or receiving) the data; see the module doc for what it may hold.
        download: download with torchvision when ``root`` holds no CIFAR-10.
        batch_size: training batch size per process.
        num_workers: worker processes of the ``workers`` loader.
        val_size: training images held out (with ``split_seed``) for validation; 0 validates on none.
        split_seed: seed of the train/val split, fixed so every run validates on the same images.
        seed: seed of the ``device`` loader's shuffling and augmentation.
        loader: ``device`` (batches cut on the training device), ``workers`` (DataLoader + torchvision
            transforms) or ``auto`` (``device`` on a GPU, else ``workers``).
        cache_dir: where the uint8 cache goes; default beside the data.
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
        if loader not in ("auto", "device", "workers"):
            raise DataError(f"data.loader must be auto, device or workers, got {loader!r}")
        self.root, self.download, self.cache_dir = root, download, cache_dir
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_size, self.split_seed, self.seed, self.loader = val_size, split_seed, seed, loader
        self.classes: list[str] = []
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._loaders: dict[str, DeviceLoader] = {}
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

    def _loader(self, split: str):
        images, labels = self._splits[split]
        train = split == "train"
        if self.uses_device_loader():
            if split not in self._loaders:  # built once: the images stay on the device
                trainer = self.trainer
                self._loaders[split] = DeviceLoader(
                    images,
                    labels,
                    self.batch_size,
                    train=train,
                    seed=self.seed,
                    device=self._device(),
                    rank=trainer.global_rank if trainer else 0,
                    world_size=trainer.world_size if trainer else 1,
                )
            if train and self._train_state is not None:
                self._loaders[split].load_state_dict(self._train_state)
                self._train_state = None
            return self._loaders[split]
        return DataLoader(
            ImageDataset(images, labels, augment=train),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self._device().type == "cuda",
            persistent_workers=self.num_workers > 0,
        )

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

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val") if self.val_size > 0 else []

    def test_dataloader(self):
        return self._loader("test")
