"""cbam.data on small data sets written into tmp_path: the sources, the uint8 cache, the split and both
batch paths (the ``workers`` DataLoader and the ``device`` loader)."""

from __future__ import annotations

import functools
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from cbam.data import (
    CACHE_NAME,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    DataError,
    DeviceLoader,
    LoaderSpec,
    WorkersLoader,
    load_cifar10,
    normalize,
    sources,
    split_train_val,
)
from cbam.data.sources import FOLDER_ORDER_SEED
from cbam.errors import InvalidArgument

#: the CIFAR-10 pipeline: its published mean and std, 4 pixels of crop padding
CIFAR = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, "padding": 4}


def cifar_normalize(images: torch.Tensor) -> torch.Tensor:
    return normalize(images, torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD))


def cache_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def assert_no_temporary_files(folder):
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts the images decoded from an image folder (the expensive step the cache saves)."""
    calls = []
    original = sources.decode_image

    def counting(path, *options):
        calls.append(path)
        return original(path, *options)

    monkeypatch.setattr(sources, "decode_image", counting)
    return calls


# ---------------------------------------------------------------------------------------------- sources


def test_batches_folder_is_read_in_nhwc_layout(tmp_path, make_batches):
    written = make_batches(tmp_path, per_batch=6, num_test=8)
    arrays = load_cifar10(tmp_path, download=False)
    assert arrays.train_images.shape == (30, 32, 32, 3) and arrays.train_images.dtype == torch.uint8
    assert arrays.test_images.shape == (8, 32, 32, 3) and arrays.test_images.dtype == torch.uint8
    assert arrays.train_labels.dtype == torch.int64
    assert arrays.train_labels.tolist() == written["train_labels"]
    assert arrays.test_labels.tolist() == written["test_labels"]
    assert arrays.classes == written["classes"]
    # The rows hold 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    pairs = ((arrays.train_images, written["train_data"]), (arrays.test_images, written["test_data"]))
    for images, rows in pairs:
        expected = torch.from_numpy(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy())
        assert torch.equal(images, expected)
    n, h, w, c = 7, 5, 11, 2
    assert arrays.train_images[n, h, w, c].item() == written["train_data"][n, c * 1024 + h * 32 + w]


def written_index(image: torch.Tensor, written: list, tolerance: int = 0) -> int:
    """The position in ``written`` of the file an image was read from (JPEG: within ``tolerance``)."""
    errors = [(image.int() - torch.from_numpy(pixels).int()).abs().max().item() for _, pixels, _ in written]
    best = int(np.argmin(errors))
    assert errors[best] <= tolerance, f"no written image within {tolerance} levels (closest: {errors[best]})"
    return best


def test_image_folder_is_read_with_sorted_classes_in_a_fixed_mixed_order(tmp_path, make_image_folder):
    written = make_image_folder(
        tmp_path, classes=["zebra", "cat", "mouse"], train_per_class=4, test_per_class=3
    )
    arrays = load_cifar10(tmp_path, download=False)
    assert arrays.classes == ["cat", "mouse", "zebra"]
    assert arrays.train_images.shape == (12, 32, 32, 3) and arrays.test_images.shape == (9, 32, 32, 3)
    # every file read once, and each image keeps its own label (PNG is lossless: exact pixels; JPEG is
    # lossy: the flat colours come back within a few levels)
    splits = (
        (arrays.train_images, arrays.train_labels, written["train"], 0),
        (arrays.test_images, arrays.test_labels, written["test"], 4),
    )
    for images, labels, files, tolerance in splits:
        order = [written_index(image, files, tolerance) for image in images]
        assert sorted(order) == list(range(len(files)))
        assert [arrays.classes[label] for label in labels] == [files[i][2] for i in order]
        # not sorted by class: the same permutation of the (class, file name) order as FOLDER_ORDER_SEED draws
        seeded = torch.Generator().manual_seed(FOLDER_ORDER_SEED)
        assert order == torch.randperm(len(files), generator=seeded).tolist()
    assert arrays.train_labels.tolist() != sorted(arrays.train_labels.tolist())


def test_image_folder_order_mixes_the_classes_and_is_the_same_on_every_build(tmp_path, make_image_folder):
    make_image_folder(tmp_path, train_per_class=2, test_per_class=10)  # 10 classes
    first = load_cifar10(tmp_path, download=False, cache_dir=tmp_path / "cache1")
    # the first 20 of 100 test images: a fair sample, not the first two classes
    assert len(set(first.test_labels[:20].tolist())) >= 6
    again = load_cifar10(tmp_path, download=False, cache_dir=tmp_path / "cache2")  # built afresh
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name


def test_cache_of_version_1_is_rebuilt(tmp_path, make_image_folder, count_decodes):
    make_image_folder(tmp_path, classes=["a", "b"], train_per_class=3, test_per_class=2)
    fresh = load_cifar10(tmp_path, download=False)
    cache = tmp_path / CACHE_NAME
    payload = torch.load(cache, weights_only=True)
    payload["version"] = 1  # an intact cache of the class-sorted order, from before the fixed order
    torch.save(payload, cache)
    assert len(count_decodes) == 10
    arrays = load_cifar10(tmp_path, download=False)
    assert len(count_decodes) == 20
    assert torch.equal(arrays.train_labels, fresh.train_labels)
    assert torch.load(cache, weights_only=True)["version"] == sources.CACHE_VERSION


def test_image_folder_with_a_test_class_missing_from_train_is_rejected_naming_it(tmp_path, make_image_folder):
    make_image_folder(tmp_path, classes=["a", "b"], train_per_class=1, test_per_class=1)
    (tmp_path / "test" / "b").rename(tmp_path / "test" / "c")
    with pytest.raises(DataError, match=r"test/c is a test class with no training folder \(train/c/\)"):
        load_cifar10(tmp_path, download=False)
    # a training class without test images is fine: its test accuracy is simply unknown
    shutil.rmtree(tmp_path / "test" / "c")
    arrays = load_cifar10(tmp_path, download=False)
    assert arrays.classes == ["a", "b"] and arrays.test_labels.tolist() == [0]


def test_image_of_the_wrong_size_is_rejected_naming_it(tmp_path, make_image_folder):
    from PIL import Image

    make_image_folder(tmp_path, classes=["a"], train_per_class=1, test_per_class=1)
    Image.new("RGB", (16, 32)).save(tmp_path / "train" / "a" / "small.png")
    with pytest.raises(DataError, match="small.png"):
        load_cifar10(tmp_path, download=False)


def test_download_is_called_for_an_empty_root(tmp_path, monkeypatch, make_batches):
    calls = []

    def fake_download(source, root):
        calls.append(root)
        make_batches(root, per_batch=2, num_test=3)

    monkeypatch.setattr(sources.CIFARSource, "download", fake_download)
    root = tmp_path / "new" / "data"
    arrays = load_cifar10(root, download=True)
    assert calls == [root]
    assert arrays.train_images.shape == (10, 32, 32, 3) and arrays.test_images.shape == (3, 32, 32, 3)
    # once there, nothing is downloaded again
    load_cifar10(root, download=True)
    assert len(calls) == 1


def test_empty_root_without_download_raises_naming_data_root(tmp_path, monkeypatch):
    monkeypatch.setattr(
        sources.CIFARSource, "download", lambda source, root: pytest.fail("must not download")
    )
    with pytest.raises(DataError, match="data.root"):
        load_cifar10(tmp_path / "missing", download=False)
    with pytest.raises(DataError, match="data.root"):
        load_cifar10(tmp_path, download=False)
    assert not (tmp_path / "missing").exists()


# ------------------------------------------------------------------------------------------------ cache


def test_cache_is_written_once_and_reused(tmp_path, make_image_folder, count_decodes):
    make_image_folder(tmp_path, classes=["a", "b"], train_per_class=3, test_per_class=2)
    first = load_cifar10(tmp_path, download=False)
    assert len(count_decodes) == 10
    assert (tmp_path / CACHE_NAME).is_file()
    second = load_cifar10(tmp_path, download=False)
    assert len(count_decodes) == 10, "the second call decoded images again instead of using the cache"
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert second.classes == first.classes
    assert_no_temporary_files(tmp_path)


def test_cache_of_batches_is_reused(tmp_path, make_batches, monkeypatch):
    make_batches(tmp_path)
    calls = []
    original = sources.CIFARSource.read
    monkeypatch.setattr(
        sources.CIFARSource, "read", lambda source, root: calls.append(root) or original(source, root)
    )
    first = load_cifar10(tmp_path, download=False)
    second = load_cifar10(tmp_path, download=False)
    assert len(calls) == 1
    assert torch.equal(first.train_images, second.train_images)


def test_cache_dir_keeps_the_data_folder_clean(tmp_path, make_image_folder, count_decodes):
    root, cache = tmp_path / "root", tmp_path / "cache"
    make_image_folder(root, classes=["a"], train_per_class=2, test_per_class=1)
    load_cifar10(root, download=False, cache_dir=cache)
    load_cifar10(root, download=False, cache_dir=cache)
    assert len(count_decodes) == 3
    assert (cache / CACHE_NAME).is_file()
    assert not list(root.glob("cifar10-uint8*"))


def test_cache_is_rebuilt_when_a_source_file_is_touched(tmp_path, make_image_folder, count_decodes):
    written = make_image_folder(tmp_path, classes=["a", "b"], train_per_class=2, test_per_class=1)
    load_cifar10(tmp_path, download=False)
    assert len(count_decodes) == 6
    path, pixels, _ = written["train"][1]
    from PIL import Image

    changed = 255 - pixels
    Image.fromarray(changed).save(path)  # same size on disk is possible: the mtime must count too
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    arrays = load_cifar10(tmp_path, download=False)
    assert len(count_decodes) == 12
    assert (arrays.train_images == torch.from_numpy(changed)).flatten(1).all(1).sum() == 1
    load_cifar10(tmp_path, download=False)
    assert len(count_decodes) == 12
    # touching alone (same content) also invalidates: the fingerprint cannot know the content is unchanged
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 9_000_000_000))
    load_cifar10(tmp_path, download=False)
    assert len(count_decodes) == 18
    assert_no_temporary_files(tmp_path)


def test_cache_is_rebuilt_when_a_file_is_added(tmp_path, make_image_folder, count_decodes):
    make_image_folder(tmp_path, classes=["a", "b"], train_per_class=2, test_per_class=1)
    assert len(load_cifar10(tmp_path, download=False).train_labels) == 4
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(tmp_path / "train" / "b" / "zzz.png")
    arrays = load_cifar10(tmp_path, download=False)
    assert len(arrays.train_labels) == 5 and sorted(arrays.train_labels.tolist()) == [0, 0, 1, 1, 1]
    added = (arrays.train_images == 7).flatten(1).all(1)
    assert added.sum() == 1 and arrays.train_labels[added].item() == 1
    assert len(count_decodes) == 6 + 7


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_cache_is_rebuilt(tmp_path, make_image_folder, count_decodes, damage):
    written = make_image_folder(tmp_path, classes=["a", "b"], train_per_class=2, test_per_class=1)
    load_cifar10(tmp_path, download=False)
    cache = tmp_path / CACHE_NAME
    content = cache.read_bytes()
    if damage == "garbage":
        cache.write_bytes(os.urandom(len(content)))
    elif damage == "truncated":
        cache.write_bytes(content[: len(content) // 2])
    else:
        cache.write_bytes(b"")
    arrays = load_cifar10(tmp_path, download=False)
    assert len(count_decodes) == 12
    assert sorted(written_index(image, written["train"]) for image in arrays.train_images) == [0, 1, 2, 3]
    # the rebuilt cache is intact again and used
    load_cifar10(tmp_path, download=False)
    assert len(count_decodes) == 12
    assert_no_temporary_files(tmp_path)


def test_cache_with_tampered_arrays_is_rebuilt(tmp_path, make_batches, monkeypatch):
    """A cache that unpickles but whose arrays no longer match their checksum is not trusted."""
    make_batches(tmp_path)
    original = load_cifar10(tmp_path, download=False)
    cache = tmp_path / CACHE_NAME
    payload = torch.load(cache, weights_only=True)
    payload["arrays"]["train_images"][0] = 255 - payload["arrays"]["train_images"][0]
    torch.save(payload, cache)
    arrays = load_cifar10(tmp_path, download=False)
    assert torch.equal(arrays.train_images, original.train_images)


# ---------------------------------------------------------------------------------------------- split


def test_split_sizes_disjoint_and_fixed():
    train, val = split_train_val(100, 30, seed=0)
    assert len(train) == 70 and len(val) == 30
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    again_train, again_val = split_train_val(100, 30, seed=0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    _, other_val = split_train_val(100, 30, seed=1)
    assert not torch.equal(val, other_val)
    assert len(split_train_val(100, 0, seed=0)[1]) == 0
    with pytest.raises(DataError, match="val_size"):
        split_train_val(100, 100, seed=0)


@pytest.mark.parametrize("loader", ["workers", "device"])
def test_datamodule_holds_out_val_size_and_tests_on_the_test_split(tmp_path, make_batches, loader):
    make_batches(tmp_path, per_batch=10, num_test=12)  # 50 train images
    arrays = load_cifar10(tmp_path, download=False)
    module = CIFAR10DataModule(
        root=str(tmp_path), download=False, batch_size=8, num_workers=0, val_size=14, loader=loader
    )
    module.prepare_data()
    module.setup("fit")
    assert module.classes == arrays.classes

    def collect(batches):
        images, labels = zip(*batches)
        return torch.cat(images), torch.cat(labels)

    _, val_idx = split_train_val(50, 14, seed=0)
    val_images, val_labels = collect(module.val_dataloader())
    assert val_images.shape == (14, 3, 32, 32)
    torch.testing.assert_close(val_images, cifar_normalize(arrays.train_images[val_idx]))
    assert torch.equal(val_labels, arrays.train_labels[val_idx])

    test_images, test_labels = collect(module.test_dataloader())
    torch.testing.assert_close(test_images, cifar_normalize(arrays.test_images))
    assert torch.equal(test_labels, arrays.test_labels)

    train = module.train_dataloader()
    assert len(train) == 36 // 8  # full batches only
    train_images, _ = collect(train)
    assert train_images.shape == (32, 3, 32, 32)

    # a second DataModule draws the same validation images
    other = CIFAR10DataModule(
        root=str(tmp_path), download=False, batch_size=8, num_workers=0, val_size=14, loader=loader
    )
    other.setup("fit")
    torch.testing.assert_close(collect(other.val_dataloader())[0], val_images)


def test_datamodule_without_validation(tmp_path, make_batches):
    make_batches(tmp_path, per_batch=4)
    module = CIFAR10DataModule(root=str(tmp_path), download=False, batch_size=4, num_workers=0, val_size=0)
    module.setup("fit")
    assert len(module.val_dataloader()) == 0
    assert len(module.train_dataloader()) == 5


@pytest.mark.parametrize(
    "argument, value",
    [("batch_size", 0), ("batch_size", True), ("batch_size", "8"), ("num_workers", -1), ("val_size", -1),
     ("val_size", 2.5), ("loader", "gpu"), ("crop_padding", -1)],
)  # fmt: skip
def test_datamodule_rejects_arguments_it_cannot_use(tmp_path, make_batches, argument, value):
    make_batches(tmp_path)
    with pytest.raises(InvalidArgument) as raised:
        CIFAR10DataModule(root=str(tmp_path), download=False, **{argument: value})
    assert (raised.value.argument, raised.value.value) == (argument, value)
    assert raised.value.accepted.startswith(("must be", "accepted values are auto, device, workers"))


def test_datamodule_rejects_a_root_without_cifar10_when_it_may_not_download(tmp_path):
    (tmp_path / "empty").mkdir()
    for root, state in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no CIFAR-10")):
        with pytest.raises(InvalidArgument) as raised:
            CIFAR10DataModule(root=str(root), download=False)
        assert (raised.value.argument, raised.value.value) == ("root", str(root))
        assert raised.value.accepted.startswith(state)
        assert "cifar-10-batches-py/" in raised.value.accepted and "train/<class>/" in raised.value.accepted
    CIFAR10DataModule(root=str(tmp_path / "missing"), download=True)  # it may be downloaded into
    assert not (tmp_path / "missing").exists()  # (not by the constructor)


# ----------------------------------------------------------------------------------------- augmentation


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    # values from 1: a shifted-in zero padding pixel can never be confused with image content
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=generator)


def candidate_crops(image: torch.Tensor) -> torch.Tensor:
    """All 9 x 9 x 2 augmentations of one uint8 HWC image, normalised: index (row, col, flip)."""
    padded = torch.nn.functional.pad(image, (0, 0, 4, 4, 4, 4))  # zero padding of H and W
    crops = torch.stack([padded[r : r + 32, c : c + 32] for r in range(9) for c in range(9)])
    crops = torch.stack([crops, crops.flip(2)], dim=1).view(9 * 9 * 2, 32, 32, 3)
    return cifar_normalize(crops)


def identify(crop: torch.Tensor, candidates: torch.Tensor) -> tuple[int, int, bool]:
    """(row offset, column offset, flipped) of a normalised (3, 32, 32) crop; fails if it is no such crop."""
    errors = (candidates - crop).abs().flatten(1).amax(1)
    best = int(errors.argmin())
    assert errors[best] < 1e-5, f"not a shifted/flipped copy of the padded image (error {errors[best]:.3g})"
    assert (errors < 1e-5).sum() == 1
    return best // 18, (best // 2) % 9, bool(best % 2)


def check_augmentation_statistics(offsets: list[tuple[int, int, bool]]):
    rows = [r for r, _, _ in offsets]
    cols = [c for _, c, _ in offsets]
    flips = [f for _, _, f in offsets]
    assert min(rows) == 0 and max(rows) == 8 and min(cols) == 0 and max(cols) == 8
    assert len(set(rows)) == 9 and len(set(cols)) == 9
    # 400 draws: mean offset 4 (sd 2.58 / 20 = 0.13), flip rate 0.5 (sd 0.025); tolerances ~4 sd
    assert abs(np.mean(rows) - 4) < 0.55 and abs(np.mean(cols) - 4) < 0.55
    assert 0.4 < np.mean(flips) < 0.6
    assert len({(r, c) for r, c, _ in offsets}) > 40  # rows and columns drawn independently


def make_loader(loader_class, images, labels, batch_size, *, num_workers=None, **spec):
    """``loader_class`` over ``images`` with the CIFAR-10 pipeline and the :class:`LoaderSpec` fields
    ``spec``; ``num_workers`` for the workers loader."""
    options = {} if num_workers is None else {"num_workers": num_workers}
    return loader_class(images, labels, LoaderSpec(batch_size, **{**CIFAR, **spec}), **options)


#: both loaders with the CIFAR-10 pipeline
LOADERS = [
    pytest.param(functools.partial(make_loader, loader), id=loader.__name__)
    for loader in (DeviceLoader, WorkersLoader)
]


@pytest.mark.parametrize("loader_class", LOADERS)
def test_loaders_crop_shifted_flipped_copies(loader_class):
    images = random_images(20, seed=1)
    ids = torch.arange(20)  # the labels identify the source image
    loader = loader_class(images, ids, 10, train=True, seed=3)
    candidates = [candidate_crops(image) for image in images]
    offsets = []
    for epoch in range(20):
        loader.sampler.set_epoch(epoch)
        for batch, labels in loader:
            assert batch.shape == (10, 3, 32, 32) and batch.dtype == torch.float32
            offsets += [identify(crop, candidates[int(i)]) for crop, i in zip(batch, labels)]
    assert len(offsets) == 400
    check_augmentation_statistics(offsets)


def test_workers_loader_cuts_the_device_loaders_batches_whatever_its_worker_count():
    images, ids = random_images(45, seed=4), torch.arange(45)
    torch.manual_seed(0)  # the global random state plays no part: changed between the loaders below
    spec = LoaderSpec(8, train=True, seed=9, rank=1, world_size=2, **CIFAR)
    device = DeviceLoader(images, ids, spec)
    for num_workers in (0, 2):
        torch.manual_seed(num_workers + 1)
        workers = WorkersLoader(images, ids, spec, num_workers=num_workers)
        assert len(workers) == len(device) == 2
        for epoch in (0, 3):
            device.sampler.set_epoch(epoch)
            workers.sampler.set_epoch(epoch)
            for (x_device, y_device), (x_workers, y_workers) in zip(device, workers, strict=True):
                assert torch.equal(y_device, y_workers)
                torch.testing.assert_close(x_workers, x_device, atol=1e-6, rtol=0)


def test_unaugmented_paths_give_the_same_normalised_values():
    images = random_images(6, seed=2)
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    expected = cifar_normalize(images)
    assert expected.shape == (6, 3, 32, 32)
    # the usual CIFAR-10 channel statistics
    mean = torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64)[:, None, None]
    std = torch.tensor([0.2470, 0.2435, 0.2616], dtype=torch.float64)[:, None, None]
    manual = (images.permute(0, 3, 1, 2).double() / 255 - mean) / std
    torch.testing.assert_close(expected.double(), manual, atol=1e-5, rtol=0)
    for loader in (DeviceLoader, WorkersLoader):
        batches = list(make_loader(loader, images, labels, 4, train=False))
        assert [len(b[1]) for b in batches] == [4, 2], loader  # evaluation keeps the last partial batch
        torch.testing.assert_close(torch.cat([b[0] for b in batches]), expected, atol=1e-6, rtol=0)
        assert torch.equal(torch.cat([b[1] for b in batches]), labels)


# ------------------------------------------------------------------------------------------ DeviceLoader


def epoch_ids(loader, epoch: int) -> list[int]:
    loader.sampler.set_epoch(epoch)
    return [int(i) for _, labels in loader for i in labels]


@pytest.mark.parametrize("loader_class", LOADERS)
def test_loader_length(loader_class):
    ids = torch.arange(103)
    images = random_images(103)
    assert len(loader_class(images, ids, 10, train=True)) == 10  # drops the partial batch
    assert len(loader_class(images, ids, 10, train=False)) == 11  # keeps it
    assert len(loader_class(images, ids, 10, train=True, rank=1, world_size=2)) == 5
    assert len(loader_class(images, ids, 10, train=False, rank=1, world_size=2)) == 6  # 51 images
    loader = loader_class(images, ids, 10, train=True)
    assert len(list(loader)) == len(loader)


@pytest.mark.parametrize("loader_class", LOADERS)
@pytest.mark.parametrize("total", [100, 101])
def test_loader_shards_are_disjoint_and_equally_sized(loader_class, total):
    images, ids = random_images(total), torch.arange(total)
    shards = [
        epoch_ids(loader_class(images, ids, 10, train=True, seed=5, rank=rank, world_size=2), epoch=0)
        for rank in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 50
    assert len(set(shards[0])) == 50 and set(shards[0]).isdisjoint(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 100
    # evaluation: every image exactly once over the two ranks, none repeated to even them out
    evaluation = [
        epoch_ids(loader_class(images, ids, 10, train=False, rank=rank, world_size=2), 0) for rank in (0, 1)
    ]
    assert sorted(evaluation[0] + evaluation[1]) == list(range(total))


@pytest.mark.parametrize("loader_class", LOADERS)
def test_loader_reshuffles_per_epoch_and_is_deterministic(loader_class):
    images, ids = random_images(64), torch.arange(64)

    def loader(seed):
        return loader_class(images, ids, 8, train=True, seed=seed)

    epoch0, epoch1 = epoch_ids(loader(0), 0), epoch_ids(loader(0), 1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(64))
    assert epoch0 != epoch1
    assert epoch_ids(loader(0), 1) == epoch1
    assert epoch_ids(loader(1), 0) != epoch0

    a, b = loader(7), loader(7)
    a.sampler.set_epoch(2)
    b.sampler.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the same loader iterated twice in one epoch gives the same batches too
    first, second = list(a), list(a)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, second, strict=True))


@pytest.mark.parametrize(
    "loader_class, num_workers", [(DeviceLoader, None), (WorkersLoader, 0), (WorkersLoader, 1)]
)
def test_loader_resumes_within_an_epoch(loader_class, num_workers):
    """The position saved is the batches handed out, not those a worker process fetched ahead."""
    images, ids = random_images(40), torch.arange(40)

    def loader():
        return make_loader(loader_class, images, ids, 8, train=True, seed=2, num_workers=num_workers)

    full = loader()
    full.sampler.set_epoch(1)
    expected = [labels.tolist() for _, labels in full]
    partial = loader()
    partial.sampler.set_epoch(1)
    iterator = iter(partial)
    next(iterator), next(iterator)
    state = partial.state_dict()
    assert state == {"epoch": 1, "batches_done": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    assert [labels.tolist() for _, labels in resumed] == expected[2:]
    assert [labels.tolist() for _, labels in resumed] == expected  # and the next pass is a full epoch
    # a state saved at an epoch's end resumes into the next epoch from its start
    ended = loader()
    ended.load_state_dict({"epoch": 1, "batches_done": len(ended)})
    assert epoch_ids(ended, 2) == epoch_ids(loader(), 2)


def test_pickled_batches_with_a_damaged_file_name_it(tmp_path, make_batches):
    make_batches(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps([1, 2])[:3])
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(tmp_path, download=False)
