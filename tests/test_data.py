"""cbam.data on small data sets written into tmp_path: the three sources, the uint8 cache, the split and
both batch paths (torchvision transforms in DataLoader workers, and the DeviceLoader)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

import cbam.data as data
from cbam.data import (
    CACHE_NAME,
    CIFAR10DataModule,
    DataError,
    DeviceLoader,
    ImageDataset,
    load_cifar10,
    normalize,
    split_train_val,
)


def cache_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def assert_no_temporary_files(folder):
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts the images decoded from an image folder (the expensive step the cache saves)."""
    calls = []
    original = data._decode_image

    def counting(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(data, "_decode_image", counting)
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


def test_image_folder_is_read_with_sorted_classes(tmp_path, make_image_folder):
    written = make_image_folder(
        tmp_path, classes=["zebra", "cat", "mouse"], train_per_class=3, test_per_class=2
    )
    arrays = load_cifar10(tmp_path, download=False)
    assert arrays.classes == ["cat", "mouse", "zebra"]
    assert arrays.train_images.shape == (9, 32, 32, 3) and arrays.test_images.shape == (6, 32, 32, 3)
    assert arrays.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert arrays.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    # PNG is lossless: exact pixels, in (class, file name) order
    for image, (_, pixels, name) in zip(arrays.train_images, written["train"]):
        assert torch.equal(image, torch.from_numpy(pixels)), name
    # JPEG is lossy: the flat colours come back within a few levels
    for image, (_, pixels, _) in zip(arrays.test_images, written["test"]):
        assert (image.int() - torch.from_numpy(pixels).int()).abs().max() <= 4


def test_image_folder_with_different_test_classes_is_rejected(tmp_path, make_image_folder):
    make_image_folder(tmp_path, classes=["a", "b"], train_per_class=1, test_per_class=1)
    (tmp_path / "test" / "b").rename(tmp_path / "test" / "c")
    with pytest.raises(DataError, match="classes"):
        load_cifar10(tmp_path, download=False)


def test_image_of_the_wrong_size_is_rejected_naming_it(tmp_path, make_image_folder):
    from PIL import Image

    make_image_folder(tmp_path, classes=["a"], train_per_class=1, test_per_class=1)
    Image.new("RGB", (16, 32)).save(tmp_path / "train" / "a" / "small.png")
    with pytest.raises(DataError, match="small.png"):
        load_cifar10(tmp_path, download=False)


def test_download_is_called_for_an_empty_root(tmp_path, monkeypatch, make_batches):
    calls = []

    def fake_download(root):
        calls.append(root)
        make_batches(root, per_batch=2, num_test=3)

    monkeypatch.setattr(data, "_download", fake_download)
    root = tmp_path / "new" / "data"
    arrays = load_cifar10(root, download=True)
    assert calls == [root]
    assert arrays.train_images.shape == (10, 32, 32, 3) and arrays.test_images.shape == (3, 32, 32, 3)
    # once there, nothing is downloaded again
    load_cifar10(root, download=True)
    assert len(calls) == 1


def test_empty_root_without_download_raises_naming_data_root(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda root: pytest.fail("must not download"))
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
    original = data._read_batches
    monkeypatch.setattr(data, "_read_batches", lambda root: calls.append(root) or original(root))
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
    assert torch.equal(arrays.train_images[1], torch.from_numpy(changed))
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
    assert len(arrays.train_labels) == 5 and arrays.train_labels.tolist() == [0, 0, 1, 1, 1]
    assert (arrays.train_images[4] == 7).all()
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
    for image, (_, pixels, _) in zip(arrays.train_images, written["train"]):
        assert torch.equal(image, torch.from_numpy(pixels))
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
    torch.testing.assert_close(val_images, normalize(arrays.train_images[val_idx]))
    assert torch.equal(val_labels, arrays.train_labels[val_idx])

    test_images, test_labels = collect(module.test_dataloader())
    torch.testing.assert_close(test_images, normalize(arrays.test_images))
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


def test_datamodule_rejects_unknown_loader():
    with pytest.raises(DataError, match="data.loader"):
        CIFAR10DataModule(loader="gpu")


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
    return normalize(crops)


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


def test_workers_dataset_crops_shifted_flipped_copies():
    torch.manual_seed(0)
    images = random_images(4)
    dataset = ImageDataset(images, torch.arange(4), augment=True)
    candidates = [candidate_crops(image) for image in images]
    offsets = []
    for draw in range(400):
        index = draw % 4
        crop, label = dataset[index]
        assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32 and label == index
        offsets.append(identify(crop, candidates[index]))
    check_augmentation_statistics(offsets)


def test_device_loader_crops_shifted_flipped_copies():
    images = random_images(20, seed=1)
    ids = torch.arange(20)  # the labels identify the source image
    loader = DeviceLoader(images, ids, batch_size=10, train=True, seed=3)
    candidates = [candidate_crops(image) for image in images]
    offsets = []
    for epoch in range(20):
        loader.sampler.set_epoch(epoch)
        for batch, labels in loader:
            assert batch.shape == (10, 3, 32, 32) and batch.dtype == torch.float32
            offsets += [identify(crop, candidates[int(i)]) for crop, i in zip(batch, labels)]
    assert len(offsets) == 400
    check_augmentation_statistics(offsets)


def test_unaugmented_paths_give_the_same_normalised_values():
    images = random_images(6, seed=2)
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    expected = normalize(images)
    assert expected.shape == (6, 3, 32, 32)
    # the usual CIFAR-10 channel statistics
    mean = torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64)[:, None, None]
    std = torch.tensor([0.2470, 0.2435, 0.2616], dtype=torch.float64)[:, None, None]
    manual = (images.permute(0, 3, 1, 2).double() / 255 - mean) / std
    torch.testing.assert_close(expected.double(), manual, atol=1e-5, rtol=0)
    dataset = ImageDataset(images, labels, augment=False)
    for i in range(6):
        image, label = dataset[i]
        torch.testing.assert_close(image, expected[i], atol=1e-6, rtol=0)
        assert label == labels[i]
    batches = list(DeviceLoader(images, labels, batch_size=4, train=False))
    assert [len(b[1]) for b in batches] == [4, 2]  # evaluation keeps the last partial batch
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), expected, atol=1e-6, rtol=0)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)


# ------------------------------------------------------------------------------------------ DeviceLoader


def epoch_ids(loader: DeviceLoader, epoch: int) -> list[int]:
    loader.sampler.set_epoch(epoch)
    return [int(i) for _, labels in loader for i in labels]


def test_device_loader_length():
    ids = torch.arange(103)
    images = random_images(103)
    assert len(DeviceLoader(images, ids, 10, train=True)) == 10  # drops the partial batch
    assert len(DeviceLoader(images, ids, 10, train=False)) == 11  # keeps it
    assert len(DeviceLoader(images, ids, 10, train=True, rank=1, world_size=2)) == 5
    assert len(DeviceLoader(images, ids, 10, train=False, rank=1, world_size=2)) == 6  # 51 images
    loader = DeviceLoader(images, ids, 10, train=True)
    assert len(list(loader)) == len(loader)


@pytest.mark.parametrize("total", [100, 101])
def test_device_loader_shards_are_disjoint_and_equally_sized(total):
    images, ids = random_images(total), torch.arange(total)
    shards = [
        epoch_ids(DeviceLoader(images, ids, 10, train=True, seed=5, rank=rank, world_size=2), epoch=0)
        for rank in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 50
    assert len(set(shards[0])) == 50 and set(shards[0]).isdisjoint(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 100
    # evaluation: every image exactly once over the two ranks
    evaluation = [
        epoch_ids(DeviceLoader(images, ids, 10, train=False, rank=rank, world_size=2), 0) for rank in (0, 1)
    ]
    assert sorted(evaluation[0] + evaluation[1]) == list(range(total))


def test_device_loader_reshuffles_per_epoch_and_is_deterministic():
    images, ids = random_images(64), torch.arange(64)

    def loader(seed):
        return DeviceLoader(images, ids, 8, train=True, seed=seed)

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


def test_device_loader_resumes_within_an_epoch():
    images, ids = random_images(40), torch.arange(40)
    full = DeviceLoader(images, ids, 8, train=True, seed=2)
    full.sampler.set_epoch(1)
    expected = [labels.tolist() for _, labels in full]
    partial = DeviceLoader(images, ids, 8, train=True, seed=2)
    partial.sampler.set_epoch(1)
    iterator = iter(partial)
    next(iterator), next(iterator)
    state = partial.state_dict()
    resumed = DeviceLoader(images, ids, 8, train=True, seed=2)
    resumed.load_state_dict(state)
    assert [labels.tolist() for _, labels in resumed] == expected[2:]
    assert [labels.tolist() for _, labels in resumed] == expected  # and the next pass is a full epoch


def test_pickled_batches_with_a_damaged_file_name_it(tmp_path, make_batches):
    make_batches(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps([1, 2])[:3])
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(tmp_path, download=False)
