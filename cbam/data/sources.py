"""Image data sets on disk: their sources, and the uint8 cache of the decoded arrays.

A :class:`Source` is one data set's way of being stored under ``data.root`` (a strategy of
:func:`load_arrays`):

* :data:`CIFAR10`: ``cifar-10-batches-py/`` (torchvision's download, or a copy of it), or an image-folder
  tree of 32x32 images; CIFAR-10's published channel mean and std;
* :data:`CIFAR100`: ``cifar-100-python/{train,test,meta}``, fine labels, class names from ``meta``;
* :class:`FolderSource`: an image-folder tree ``train/<class>/*.{png,jpg}`` and ``test/<class>/*`` of any
  image size; ``image_size=S`` resizes (shorter side to S, then the centre SxS) when the cache is built.

Class names of a tree are its training folders in sorted order. A tree is read class by class; its arrays
are then put in one fixed shuffled order (a permutation drawn from ``FOLDER_ORDER_SEED``), as the official
batches are, so any prefix of the training or test set is a fair sample of the classes.

Whatever the source, the images are decoded once into ``<source name>-uint8.pt`` beside the data (or in
``cache_dir``), with the facts the pipeline needs: class names and the channel mean and std (computed from
the training split, except CIFAR-10's published constants). The cache is written under a file lock to a
temporary file and renamed, so concurrent jobs and ranks share one cache and never see a partial one. It
records a fingerprint of its source and a checksum of its contents; a stale or damaged cache is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cbam.errors import DataError
from cbam.runtime.atomic import write_atomically
from cbam.runtime.write_failures import writing

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: 3: the cache holds the channel mean and std (2: image folders in the fixed shuffled order; 1: sorted)
CACHE_VERSION = 3
#: seed of the fixed order of an image folder's arrays (one permutation per split)
FOLDER_ORDER_SEED = 0
#: CIFAR-10's usual channel statistics (of its 50,000 training images, within 1e-4). CIFAR-10 keeps them
#: rather than its computed ones: its batches, and every checkpoint trained so far, stay bit-identical.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TREE = "train/<class>/ and test/<class>/ folders of .png or .jpg images"


@dataclass
class ImageArrays:
    """A data set decoded: images as uint8 (N, H, W, 3), labels as int64 (N,), the class names, and the
    per-channel mean and std (of pixel values in [0, 1]) that normalise its images."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return tuple(self.train_images.shape[1:3])


def channel_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 NHWC images, on the [0, 1] scale.

    Exact integer sums, a chunk of images at a time (no float copy of the whole set)."""
    sums = torch.zeros(3, dtype=torch.int64)
    squares = torch.zeros(3, dtype=torch.int64)
    for chunk in images.split(1024):
        values = chunk.reshape(-1, 3).long()
        sums += values.sum(0)
        squares += (values * values).sum(0)
    count = images.numel() // 3
    mean = sums.double() / count
    std = (squares.double() / count - mean**2).clamp_min(0).sqrt()
    # A constant channel (all-black images) would divide by zero: one grey level is the floor.
    return tuple((mean / 255).tolist()), tuple((std.clamp_min(1.0) / 255).tolist())


# ------------------------------------------------------------------------------------ image-folder trees


def _images_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(split: Path) -> list[str]:
    return sorted(path.name for path in split.iterdir() if path.is_dir())


def has_tree(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def tree_classes(root: Path) -> list[str]:
    """The class names of a tree (its training folders, sorted), once it is checked: every test class is
    a training class and no class folder is empty. A training class may have no test folder."""
    classes = _class_folders(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders (expected {TREE})")
    unknown = [name for name in _class_folders(root / "test") if name not in classes]
    if unknown:
        raise DataError(
            f"{root / 'test' / unknown[0]} is a test class with no training folder (train/{unknown[0]}/): "
            f"every test class must be a training class"
        )
    for split in ("train", "test"):
        for name in _class_folders(root / split):
            if not _images_in(root / split / name):
                raise DataError(
                    f"{root / split / name} is an empty class folder: it holds no .png or .jpg image"
                )
    return classes


def tree_files(root: Path) -> list[Path]:
    return sorted(
        path
        for split in ("train", "test")
        for path in (root / split).rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
    )


#: how images of another size are brought to a data set's size: scaled so that they cover it (a square's
#: shorter side to its side), then the centre cut out; ``data.image_size`` resizes a folder's images so, and
#: inference (``python -m cbam.predict``) any image
FIT_RULE = "shorter_side_then_center_crop"


def fit_image(image, size: tuple[int, int]):
    """The PIL ``image`` at ``size`` (height, width) by :data:`FIT_RULE` (unchanged when it has that size)."""
    from torchvision.transforms.v2 import functional as transforms

    height, width = size
    if image.size == (width, height):
        return image
    if height == width:  # (torchvision's rule for one size: the shorter side to it)
        image = transforms.resize(image, height, antialias=True)
    else:
        scale = max(height / image.height, width / image.width)
        covering = [max(height, round(image.height * scale)), max(width, round(image.width * scale))]
        image = transforms.resize(image, covering, antialias=True)
    return transforms.center_crop(image, [height, width])


def decode_image(path: Path, size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, str]:
    """The image as uint8 (H, W, 3) RGB, brought to ``size`` (S: S x S; or (height, width)) by
    :func:`fit_image` when given, and the mode it was stored in. A file that is not a readable image (or a
    truncated one) raises :class:`DataError` ``cannot decode image <path>: <reason>``."""
    from PIL import Image

    if isinstance(size, int):
        size = (size, size)
    try:
        with Image.open(path) as image:
            mode = image.mode
            image = image.convert("RGB")
            if size is not None:
                image = fit_image(image, size)
            width, height = image.size
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except Exception as error:
        raise DataError(f"cannot decode image {path}: {error}") from None
    return pixels.view(height, width, 3), mode


class _TreeReader:
    """Decodes a tree's images, all to one size: ``required`` (height, width), else resized to
    ``image_size``, else the first image's size; counts the images converted to RGB."""

    def __init__(self, *, image_size: int | None, required: tuple[int, int] | None, other_sizes: str):
        self.image_size, self.size, self.other_sizes = image_size, required, other_sizes
        self.first: Path | None = None
        self.converted: dict[str, int] = {}
        self.converted_example: Path | None = None

    def __call__(self, path: Path) -> torch.Tensor:
        pixels, mode = decode_image(path, self.image_size)
        if mode != "RGB":
            self.converted[mode] = self.converted.get(mode, 0) + 1
            self.converted_example = self.converted_example or path
        size = tuple(pixels.shape[:2])
        if self.size is None:
            self.size, self.first = size, path
        if size != self.size:
            expected = f"{self.size[1]}x{self.size[0]}"
            seen = f", like {self.first}" if self.first is not None else ""
            raise DataError(f"image {path} is {size[1]}x{size[0]}, not {expected}{seen}: {self.other_sizes}")
        return pixels


def read_tree(root: Path, reader: _TreeReader) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """The class names and ``(train images, train labels, test images, test labels)`` of a checked tree,
    each split in the fixed shuffled order; says once how many images were converted to RGB."""
    classes = tree_classes(root)

    def read_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for label, name in enumerate(classes):
            folder = root / split / name
            files = _images_in(folder) if folder.is_dir() else []
            images += [reader(path) for path in files]
            labels += [label] * len(files)
        if not images:
            raise DataError(f"{root / split} holds no .png or .jpg images")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(FOLDER_ORDER_SEED))
        return torch.stack(images)[order], torch.tensor(labels, dtype=torch.long)[order]

    splits = (*read_split("train"), *read_split("test"))
    if reader.converted:
        modes = ", ".join(f"{count} {mode}" for mode, count in sorted(reader.converted.items()))
        log.warning(f"data: converted images to RGB ({modes}; e.g. {reader.converted_example})")
    return classes, splits


# ------------------------------------------------------------------------------------------- the sources


class Source:
    """How one data set is stored under ``data.root``: which layouts it recognises, its class names before
    any image is decoded, the files its cache depends on, and how to read (and possibly download) it."""

    #: the cache file's prefix
    name: str
    #: the data set's name in messages
    title: str
    #: what ``data.root`` must hold, for messages
    holds: str
    #: the class count of the data set a download brings (None: cannot be downloaded)
    downloaded_classes: int | None

    def layout(self, root: Path) -> str | None:
        """Which of its layouts ``root`` holds (``"batches"``, ``"folder"``), or None."""
        raise NotImplementedError

    def declared_image_size(self) -> tuple[int, int] | None:
        """(H, W) of every image, when known before any is decoded (CIFAR's 32x32, a resized folder's)."""
        return None

    def resize_rule(self) -> str | None:
        """How images of other sizes were brought to the data set's size (:data:`FIT_RULE`), or None when
        every image had that size."""
        return None

    def describe(self, root: Path) -> str:
        """``"<kind> at <root>"``, for a run's record."""
        raise NotImplementedError

    def classes(self, root: Path) -> list[str]:
        """The class names, read without decoding any image (``root`` holds a layout)."""
        raise NotImplementedError

    def train_count(self, root: Path) -> int | None:
        """Training images, when known without decoding (an image-folder tree), else None."""
        if self.layout(root) != "folder":
            return None
        return sum(len(_images_in(root / "train" / name)) for name in _class_folders(root / "train"))

    def files(self, root: Path) -> list[Path]:
        raise NotImplementedError

    def read(self, root: Path) -> ImageArrays:
        raise NotImplementedError

    def download(self, root: Path) -> None:
        raise NotImplementedError

    @property
    def cache_name(self) -> str:
        return f"{self.name}-uint8.pt"

    def fingerprint(self, root: Path) -> str:
        """Changes when any source file is added, removed, resized or touched (or the source's options)."""
        digest = hashlib.sha1(f"{self.name}:{self.layout(root)}".encode())
        for path in self.files(root):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class CIFARSource(Source):
    """One of torchvision's CIFAR python folders (and, for CIFAR-10, a tree of 32x32 images)."""

    name: str
    title: str
    folder: str  # the python folder: cifar-10-batches-py, cifar-100-python
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    labels_key: bytes
    meta_file: str
    names_key: bytes
    torchvision_class: str
    downloaded_classes: int
    holds: str
    #: (mean, std) kept as published; None: computed from the training images
    statistics: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    reads_tree: bool = False

    def declared_image_size(self) -> tuple[int, int] | None:
        return (32, 32)

    def layout(self, root: Path) -> str | None:
        if (root / self.folder / self.train_files[0]).is_file():
            return "batches"
        if self.reads_tree and has_tree(root):
            return "folder"
        return None

    def describe(self, root: Path) -> str:
        kind = "image folder (train/, test/)" if self.layout(root) == "folder" else "python batches"
        return f"{self.title} {kind} at {root}"

    def _load(self, root: Path, name: str) -> dict:
        path = root / self.folder / name
        try:
            with open(path, "rb") as handle:
                return pickle.load(handle, encoding="bytes")
        except Exception as error:  # a truncated or foreign file: say which one
            raise DataError(f"cannot read {self.title} batch file {path}: {error}") from None

    def _meta_classes(self, root: Path) -> list[str]:
        return [name.decode() for name in self._load(root, self.meta_file)[self.names_key]]

    def classes(self, root: Path) -> list[str]:
        return tree_classes(root) if self.layout(root) == "folder" else self._meta_classes(root)

    def files(self, root: Path) -> list[Path]:
        if self.layout(root) == "folder":
            return tree_files(root)
        names = (*self.train_files, *self.test_files, self.meta_file)
        return [root / self.folder / name for name in names]

    def read(self, root: Path) -> ImageArrays:
        if self.layout(root) == "folder":
            other_sizes = f"{self.title} images are 32x32 (data=folder reads images of any size)"
            reader = _TreeReader(image_size=None, required=(32, 32), other_sizes=other_sizes)
            classes, splits = read_tree(root, reader)
        else:
            classes = self._meta_classes(root)
            splits = (*self._read_pickles(root, self.train_files), *self._read_pickles(root, self.test_files))
        mean, std = self.statistics or channel_statistics(splits[0])
        return ImageArrays(*splits, classes, mean, std)

    def _read_pickles(self, root: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [self._load(root, name) for name in names]
        images = torch.cat([torch.as_tensor(batch[b"data"]).view(-1, 3, 32, 32) for batch in batches])
        labels = torch.cat([torch.as_tensor(batch[self.labels_key]) for batch in batches])
        return images.permute(0, 2, 3, 1).contiguous(), labels.long()

    def download(self, root: Path) -> None:
        import torchvision.datasets

        try:
            getattr(torchvision.datasets, self.torchvision_class)(str(root), train=True, download=True)
        except Exception as error:
            raise DataError(
                f"could not download {self.title} into data.root={root}: {error}. Offline, point data.root at "
                f"a folder holding {self.holds}"
            ) from None


CIFAR10 = CIFARSource(
    name="cifar10",
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    labels_key=b"labels",
    meta_file="batches.meta",
    names_key=b"label_names",
    torchvision_class="CIFAR10",
    downloaded_classes=10,
    holds="'cifar-10-batches-py/' (data_batch_1..5, test_batch, batches.meta) or train/<class>/ and "
    "test/<class>/ folders of 32x32 .png or .jpg images",
    statistics=(CIFAR10_MEAN, CIFAR10_STD),
    reads_tree=True,
)
CIFAR100 = CIFARSource(
    name="cifar100",
    title="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    labels_key=b"fine_labels",
    meta_file="meta",
    names_key=b"fine_label_names",
    torchvision_class="CIFAR100",
    downloaded_classes=100,
    holds="'cifar-100-python/' (train, test, meta)",
)


@dataclass(frozen=True)
class FolderSource(Source):
    """An image-folder tree of any image size; ``image_size`` resizes every image to that square."""

    image_size: int | None = None
    title: str = "image folder"
    holds: str = TREE
    downloaded_classes = None  # (a class attribute, not a field: a folder is never downloaded)

    @property
    def name(self) -> str:
        return "folder" if self.image_size is None else f"folder-{self.image_size}px"

    def layout(self, root: Path) -> str | None:
        return "folder" if has_tree(root) else None

    def declared_image_size(self) -> tuple[int, int] | None:
        return (self.image_size, self.image_size) if self.image_size else None

    def resize_rule(self) -> str | None:
        return FIT_RULE if self.image_size else None

    def describe(self, root: Path) -> str:
        resized = f", resized to {self.image_size}x{self.image_size}" if self.image_size else ""
        return f"image folder (train/, test/){resized} at {root}"

    def classes(self, root: Path) -> list[str]:
        return tree_classes(root)

    def files(self, root: Path) -> list[Path]:
        return tree_files(root)

    def read(self, root: Path) -> ImageArrays:
        other_sizes = (
            "the images of a folder must share one size; set data.image_size=S to resize them all to SxS "
            "when the cache is built"
        )
        reader = _TreeReader(image_size=self.image_size, required=None, other_sizes=other_sizes)
        classes, splits = read_tree(root, reader)
        return ImageArrays(*splits, classes, *channel_statistics(splits[0]))


# ------------------------------------------------------------------------------------------------ cache


def _checksum(arrays: ImageArrays) -> str:
    digest = hashlib.sha1()
    for tensor in (arrays.train_images, arrays.train_labels, arrays.test_images, arrays.test_labels):
        digest.update(tensor.contiguous().numpy().tobytes())
    digest.update(repr((list(arrays.classes), list(arrays.mean), list(arrays.std))).encode())
    return digest.hexdigest()


def _cache_dir_for(root: Path, cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.access(root, os.W_OK):
        return root
    # A read-only data folder (a shared mount): keep the cache in the user's cache directory instead.
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cbam" / key


def _read_cache(path: Path, fingerprint: str) -> ImageArrays | None:
    """The cached arrays if the cache is intact and was built from the same source files, else None."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["version"] != CACHE_VERSION or payload["fingerprint"] != fingerprint:
            return None
        arrays = ImageArrays(**payload["arrays"])
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


def load_arrays(
    source: Source,
    root: str | os.PathLike,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> ImageArrays:
    """The data set of ``source`` under ``root`` as uint8 arrays, decoding and caching it on first use
    (see the module doc); with ``download``, a downloadable data set missing from ``root`` is downloaded."""
    root = Path(root).expanduser()
    if source.layout(root) is None:
        if not download or source.downloaded_classes is None:
            offline = " and data.download=false: offline" if source.downloaded_classes is not None else ":"
            raise DataError(f"data.root={root} holds no {source.title}{offline} it must hold {source.holds}")
        with writing(root):
            root.mkdir(parents=True, exist_ok=True)
        # One download for all the jobs and ranks that start on an empty root at once.
        with _locked(root / ".download.lock"):
            if source.layout(root) is None:
                source.download(root)
    cache_dir = _cache_dir_for(root, cache_dir)
    with writing(cache_dir):
        cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / source.cache_name
    fingerprint = source.fingerprint(root)
    arrays = _read_cache(cache, fingerprint)
    if arrays is not None:
        return arrays
    with _locked(cache.with_name(source.cache_name + ".lock")):
        arrays = _read_cache(cache, fingerprint)  # another job may have built it while we waited
        if arrays is None:
            arrays = source.read(root)
            payload = {
                "version": CACHE_VERSION,
                "fingerprint": fingerprint,
                "checksum": _checksum(arrays),
                "arrays": vars(arrays),
            }
            write_atomically(cache, lambda file: torch.save(payload, file), prefix=f".{source.cache_name}.")
    return arrays


def load_cifar10(
    root: str | os.PathLike, *, download: bool = True, cache_dir: str | os.PathLike | None = None
) -> ImageArrays:
    """CIFAR-10 from ``root`` (its python batches or a tree of 32x32 images): :func:`load_arrays`."""
    return load_arrays(CIFAR10, root, download=download, cache_dir=cache_dir)
