"""Exact evaluation under DDP: a 2-process ``trainer=ddp_sim`` test of a checkpoint counts every test image
exactly once, with either loader, and reports the accuracy a single process computes.

The test set has 101 images, so two ranks cannot split it evenly: a sampler that pads (Lightning's
DistributedSampler) would count 102.
"""

from __future__ import annotations

import csv
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import conf_file, run_train
from PIL import Image

from cbam.data import CIFAR10DataModule
from cbam.training.lightning_module import CBAMResNetModule

CLASSES = [f"class{label}" for label in range(10)]
TEST_PER_CLASS = 10  # + one more image of class 3: 101


def write_colour_coded_images(root: Path) -> Path:
    """Noisy images whose mean colour depends on the class: learnable in a few steps, not perfectly."""
    rng = np.random.default_rng(0)
    palette = rng.integers(40, 216, (len(CLASSES), 3))
    for split, count in (("train", 8), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count + (split == "test" and label == 3)):
                noise = rng.normal(0, 60, (32, 32, 3))
                pixels = np.clip(palette[label] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> dict:
    """A briefly trained width-4 checkpoint, its per-class results computed here in one process, and
    the 2-process test runs of train.py with each loader (side by side)."""
    base = tmp_path_factory.mktemp("ddp_eval")
    root = write_colour_coded_images(base / "data")
    data = CIFAR10DataModule(
        root=str(root), download=False, batch_size=16, num_workers=0, val_size=0, loader="device"
    )
    torch.manual_seed(0)
    training = {"optimizer": conf_file("optim/sgd.yaml"), "scheduler": conf_file("scheduler/cosine.yaml")}
    model = CBAMResNetModule(depth=18, width=4, use_cbam_block=True, reduction_ratio=2, **training)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    checkpoint = base / "model.ckpt"
    trainer.save_checkpoint(checkpoint)

    model.eval()
    correct, total = np.zeros(len(CLASSES), int), np.zeros(len(CLASSES), int)
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            hits = model(images).argmax(1) == labels
            np.add.at(total, labels.numpy(), 1)
            np.add.at(correct, labels.numpy(), hits.numpy())

    def ddp_test(loader: str):
        run_dir = base / loader
        result = run_train([
            "train=false", f"ckpt_path={checkpoint}", "trainer=ddp_sim", "logger=csv",
            f"hydra.run.dir={run_dir}",
            f"data.root={root}", "data.download=false", f"data.loader={loader}", "data.num_workers=1",
            "data.batch_size=8", "data.val_size=0",
            # each rank tries to take the run dir's lock (tests/test_faults.py: one process per run dir)
            "+callbacks.lock_probe._target_=fault_callbacks.RecordRunDirHolder",
            f"+callbacks.lock_probe.record={base / f'holders_{loader}.txt'}",
        ])  # fmt: skip
        return result, run_dir

    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(("workers", "device"), pool.map(ddp_test, ("workers", "device"))))
    return {"correct": correct, "total": total, "runs": runs, "base": base}


@pytest.mark.parametrize("loader", ["workers", "device"])
def test_two_process_test_counts_every_image_once_with_the_single_process_accuracy(evaluation, loader):
    correct, total = evaluation["correct"], evaluation["total"]
    assert total.sum() == len(CLASSES) * TEST_PER_CLASS + 1 == 101
    # the model tells classes apart (a constant prediction would make the accuracies trivially equal)
    assert 0.2 < correct.sum() / total.sum() < 1.0, correct

    result, run_dir = evaluation["runs"][loader]
    assert result.returncode == 0, result.stderr[-4000:]
    reported = re.search(r"test/acc = ([\d.]+) \((\d+)/(\d+) test images\)", result.stdout)
    assert reported, result.stdout[-4000:]
    assert (int(reported[2]), int(reported[3])) == (correct.sum(), 101)
    # Lightning's table: the module's metric, summed over the ranks
    logged = re.search(r"test/acc\s*│\s*([\d.]+)", result.stdout)
    assert logged and abs(float(logged[1]) - correct.sum() / 101) < 1e-6, result.stdout[-4000:]
    with open(run_dir / "per_class_accuracy.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["total"]) for row in rows] == total.tolist()
    assert [int(row["correct"]) for row in rows] == correct.tolist()


@pytest.mark.parametrize("loader", ["workers", "device"])
def test_rank_0_holds_the_run_dir_lock_for_every_rank(evaluation, loader):
    # one process per run dir (README, Reliability): rank 0 locks the dir; rank 1, started into the same dir
    # by Lightning's launcher, is not refused, and neither rank could take the lock as a second run would
    result, run_dir = evaluation["runs"][loader]
    assert result.returncode == 0, result.stderr[-4000:]
    lines = (evaluation["base"] / f"holders_{loader}.txt").read_text().splitlines()
    (_, rank0_pid, _, seen_by_0), (_, _, rank1_parent, seen_by_1) = sorted(
        line.split(" ", 3) for line in lines
    )
    assert rank1_parent == rank0_pid  # Lightning's launcher: rank 0 is the process train.py started
    for seen in (seen_by_0, seen_by_1):
        assert seen.startswith(f"run dir {run_dir} is in use by process {rank0_pid} on host "), seen
    # released when the run ended (its forked loader worker, with the workers loader, held nothing)
    assert (run_dir / ".run.lock").read_text() == ""
