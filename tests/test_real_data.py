"""A short CPU training on real CIFAR-10 images must learn far beyond chance (10 %).

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

from cbam import CBAM
from cbam.data import CIFAR10DataModule
from cbam.module import CBAMResNetModule

DATA = os.environ.get("CBAM_TEST_DATA")
pytestmark = pytest.mark.skipif(
    not DATA or not Path(DATA, "train").is_dir() or not Path(DATA, "test").is_dir(),
    reason="set CBAM_TEST_DATA to a CIFAR-10 image folder (train/<class>/, test/<class>/) to run",
)

TRAIN_PER_CLASS = 400  # 4000 images: 3000 to train on, 1000 held out for validation
TEST_PER_CLASS = 10
EPOCHS = 4
# Calibration (2-core CPU, one torch thread, ResNet18 width 16 with a CBAM in every block, batch 64,
# SGD lr 0.2 with one-cycle, 4 epochs of 3000 images; fit 31-52 s depending on the machine's load):
#   seed 0: 42.8 %, seed 1: 41.3 %, seed 2: 42.3 %, seed 3: 43.0 %, seed 4: 45.4 %  (val acc on 1000 images;
#   this test, seed 0: 43.2 % after 41 s)
# The threshold sits 6 points (about four standard deviations of that spread) below the worst seed and
# 3.5 times above chance: a network or pipeline that does not learn cannot pass it.
MIN_VAL_ACC = 0.35


def link_subset(source: Path, target: Path) -> None:
    """The first files of every class (by name), as symlinks: the real images, none copied or decoded."""
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
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
        width=16,
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
        scheduler={"_target_": "cbam.schedules.one_cycle", "_partial_": True, "warmup_fraction": 0.25},
    )
    assert sum(isinstance(m, CBAM) for m in model.modules()) == 8
    trainer = quiet_trainer(max_epochs=EPOCHS)
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
