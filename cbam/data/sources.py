"""CIFAR-10 on disk: finding and reading its three sources, and the uint8 cache of the decoded arrays.

Sources, detected from what ``root`` holds (first match wins):

* ``cifar-10-batches-py/`` (torchvision's download, or a copy of it);
* an image-folder tree ``train/<class>/*.{png,jpg}`` and ``test/<class>/*`` (classes in sorted order);
* nothing yet, with ``download=True``: torchvision downloads the batches into ``root``.

An image folder is read class by class; its arrays are then put in one fixed shuffled order (a permutation
drawn from ``FOLDER_ORDER_SEED``), as the official batches are, so any prefix of the training or test set
is a fair sample of the classes.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cbam.atomic import write_atomically
from cbam.write_failures import writing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BATCHES_DIR = "cifar-10-batches-py"
CACHE_NAME = "cifar10-uint8.pt"
# 2: image-folder arrays in the fixed shuffled order (version 1 kept them sorted by class)
CACHE_VERSION = 2
#: seed of the fixed order of an image folder's arrays (one permutation per split)
FOLDER_ORDER_SEED = 0


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
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(FOLDER_ORDER_SEED))
        return torch.stack(images)[order], torch.tensor(labels, dtype=torch.long)[order]

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
    with writing(path):  # creating the lock file is the first write into the folder: name it if that fails
        handle = open(path, "a+")
    with handle:
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
    with writing(cache_dir):
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
