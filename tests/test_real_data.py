"""A short CPU training on real CIFAR-10 images must learn far beyond chance (10 %); the same images read
as an image folder (data=folder) and as CIFAR-10 (data=cifar10) give the same arrays.

Skipped unless CBAM_TEST_DATA names a CIFAR-10 image-folder tree (train/<class>/*, test/<class>/*), e.g.
an unpacked JPEG CIFAR-10. Nothing is written into that folder: the test trains on a subset linked into
tmp_path, with the decoded cache in tmp_path too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from cbam import CBAM
from cbam.data import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule, FolderSource, load_arrays, load_cifar10
from cbam.runtime.lightning_internals import cpu_has_native_bf16
from cbam.training.lightning_module import CBAMResNetModule

DATA = os.environ.get("CBAM_TEST_DATA")
pytestmark = pytest.mark.skipif(
    not DATA or not Path(DATA, "train").is_dir() or not Path(DATA, "test").is_dir(),
    reason="set CBAM_TEST_DATA to a CIFAR-10 image folder (train/<class>/, test/<class>/) to run",
)

TRAIN_PER_CLASS = 400  # 4000 images: 3000 to train on, 1000 held out for validation
TEST_PER_CLASS = 10
EPOCHS = 4
WIDTH = 8
# Calibration (this project's 2-core x86_64 machine, torch 2.14.1 CPU, one torch thread; ResNet18 width 8 with
# a CBAM in every block, batch 64, SGD lr 0.2 with one-cycle, 4 epochs of 3000 images). In fp32 (2026-12-01,
# fit 38-41 s on an idle machine): val acc on 1000 images 38.8, 39.2, 38.0, 39.6, 41.4 % for seeds 0-4. In
# bf16 autocast, which this CPU runs natively (the CPU recipe, trainer=cpu; 2026-12-04, fit 23-25 s with two
# seeds at a time): 39.9, 38.7, 40.9, 38.7, 40.1 %. (Width 16 took 67 s in fp32 for 44.6 % with seed 0: the step
# time of these small networks is mostly per-operator overhead, so width 8 costs little accuracy for 40 % less
# time.) The threshold sits 5 points (about four standard deviations of that spread) below the worst seed and
# 3.3 times above chance: a network or pipeline that does not learn cannot pass it. A CPU without bf16
# arithmetic trains in fp32, as train.py does there.
MIN_VAL_ACC = 0.33


def link_subset(source: Path, target: Path, train: int = TRAIN_PER_CLASS, test: int = TEST_PER_CLASS) -> None:
    """The first files of every class (by name), as symlinks: the real images, none copied or decoded."""
    for split, count in (("train", train), ("test", test)):
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            (target / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                (target / split / folder.name / image.name).symlink_to(image)


@pytest.mark.parametrize("seed", [0])
def test_short_cpu_training_learns_far_beyond_chance(tmp_path, seed, quiet_trainer):
    source = Path(DATA).expanduser().resolve()
    before = sorted(os.listdir(source))
    subset = tmp_path / "cifar10"
    link_subset(source, subset)

    datamodule = CIFAR10DataModule(
        root=str(subset),
        download=False,
        batch_size=64,
        num_workers=0,
        val_size=1000,
        seed=seed,
        loader="device",
        cache_dir=str(tmp_path / "cache"),
    )
    pl.seed_everything(seed)
    model = CBAMResNetModule(
        depth=18,
        width=WIDTH,
        use_cbam_block=True,
        reduction_ratio=4,
        optimizer={
            "_target_": "torch.optim.SGD",
            "_partial_": True,
            "lr": 0.2,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 5e-4,
        },
        scheduler={
            "_target_": "cbam.training.schedules.one_cycle",
            "_partial_": True,
            "warmup_fraction": 0.25,
        },
    )
    assert sum(isinstance(m, CBAM) for m in model.modules()) == 8
    trainer = quiet_trainer(max_epochs=EPOCHS, precision="bf16-mixed" if cpu_has_native_bf16() else "32-true")
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    elapsed = time.perf_counter() - start

    assert datamodule.classes == sorted(datamodule.classes) and len(datamodule.classes) == 10
    assert trainer.global_step == EPOCHS * ((10 * TRAIN_PER_CLASS - 1000) // 64)  # full batches
    val_acc = float(trainer.callback_metrics["val/acc"])
    print(f"seed {seed}: val/acc {val_acc:.3f} after {elapsed:.0f} s")
    assert val_acc >= MIN_VAL_ACC, f"val/acc {val_acc:.3f} < {MIN_VAL_ACC} after {EPOCHS} epochs"
    # nothing was written into the data folder
    assert sorted(os.listdir(source)) == before
    assert (tmp_path / "cache" / "cifar10-uint8.pt").is_file()


def test_the_jpeg_copy_read_as_a_folder_gives_the_arrays_and_labels_of_data_cifar10(tmp_path):
    """On a per-class sample of the real files (30 train, 10 test per class: every class, both splits, the
    real JPEG decoding; decoding all 60,000 would cost tens of seconds). On the whole copy the two gave equal
    arrays, labels and classes too, measured once (2026-12-01, CPU: 21 s and 16 s to build the caches)."""
    subset = tmp_path / "cifar10"
    link_subset(Path(DATA).expanduser().resolve(), subset, train=30, test=10)
    as_cifar = load_cifar10(subset, download=False, cache_dir=tmp_path / "cache")
    as_folder = load_arrays(FolderSource(), subset, cache_dir=tmp_path / "cache")
    assert as_folder.classes == as_cifar.classes and len(as_cifar.classes) == 10
    assert as_cifar.train_images.shape == (300, 32, 32, 3) and as_cifar.test_images.shape == (100, 32, 32, 3)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(as_folder, name), getattr(as_cifar, name)), name
    # the folder's own statistics are those of its images; CIFAR-10 keeps its published ones
    pixels = as_folder.train_images.double().reshape(-1, 3) / 255
    assert as_folder.mean == pytest.approx(pixels.mean(0).tolist(), abs=1e-12)
    assert (as_cifar.mean, as_cifar.std) == (CIFAR10_MEAN, CIFAR10_STD)
