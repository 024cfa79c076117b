"""Shared fixtures: small CIFAR-10-shaped data sets written into temporary folders (never the network)."""

from __future__ import annotations

import os

# The fused CBAM's Triton kernels run on the CPU through Triton's interpreter here. Triton reads this
# switch when the kernels are defined (on import of cbam.models.fused), so it is set before any test imports cbam.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The test machines have few, shared cores: with two intra-op threads, a busy neighbour process makes
# every small convolution wait on a descheduled thread (observed: 0.5 s -> 24 s for the same 12 training
# steps). One thread keeps the suite's time predictable. Subprocesses get OMP_NUM_THREADS=1 likewise.
torch.set_num_threads(1)

#: class names deliberately created out of sorted order: the loaders must sort them
TINY_CLASSES = ["truck", "airplane", "cat", "bird", "ship", "deer", "dog", "frog", "horse", "automobile"]


def _write_batches(root: Path, *, per_batch: int = 6, num_test: int = 8, seed: int = 0) -> dict:
    """A ``cifar-10-batches-py`` folder in the real format (python pickles with bytes keys).

    Returns what was written: ``train_data`` (N, 3072) uint8, ``train_labels``, ``test_data``,
    ``test_labels``, ``classes``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    classes = sorted(TINY_CLASSES)  # batches.meta keeps the official (given) order; any order is fine
    written = {"train_data": [], "train_labels": [], "classes": classes}

    def dump(name: str, data: np.ndarray, labels: list[int]) -> None:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, handle, protocol=2)

    for index in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        dump(f"data_batch_{index}", data, labels)
        written["train_data"].append(data)
        written["train_labels"] += labels
    written["train_data"] = np.concatenate(written["train_data"])
    written["test_data"] = rng.integers(0, 256, (num_test, 3072), dtype=np.uint8)
    written["test_labels"] = rng.integers(0, 10, num_test).tolist()
    dump("test_batch", written["test_data"], written["test_labels"])
    with open(folder / "batches.meta", "wb") as handle:
        meta = {b"label_names": [name.encode() for name in classes], b"num_cases_per_batch": per_batch}
        pickle.dump(meta, handle, protocol=2)
    return written


def _write_image_folder(
    root: Path,
    *,
    classes: list[str] = TINY_CLASSES,
    train_per_class: int = 3,
    test_per_class: int = 2,
    train_suffix: str = ".png",
    test_suffix: str = ".jpg",
    seed: int = 0,
) -> dict:
    """``train/<class>/*`` and ``test/<class>/*`` random 32x32 RGB images.

    Returns ``{"train": [(path, pixels uint8 HWC, class name)], "test": [...]}``, listed in the order the
    loader must read them (classes sorted by name, files sorted by name). PNGs are random noise (lossless);
    JPEGs are flat colours, which JPEG keeps within a few levels.
    """
    rng = np.random.default_rng(seed)
    written = {"train": [], "test": []}
    splits = (("train", train_per_class, train_suffix), ("test", test_per_class, test_suffix))
    for split, count, suffix in splits:
        for name in classes:
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                if suffix == ".png":
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                else:
                    pixels = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (32, 32, 3)).copy()
                path = folder / f"img{index:03d}{suffix}"
                if suffix == ".png":
                    Image.fromarray(pixels).save(path)
                else:
                    Image.fromarray(pixels).save(path, quality=95)
                written[split].append((path, pixels, name))
    for split in written:
        written[split].sort(key=lambda item: (item[2], item[0].name))
    return written


@pytest.fixture
def make_batches():
    """Factory: ``make_batches(root, **options)`` writes a fake ``cifar-10-batches-py`` under root."""
    return _write_batches


@pytest.fixture
def make_image_folder():
    """Factory: ``make_image_folder(root, **options)`` writes a train/ + test/ image-folder tree."""
    return _write_image_folder


@pytest.fixture(scope="session")
def tiny_cifar_folder(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 image folder for end-to-end runs: 20 train and 5 test PNGs per class."""
    root = tmp_path_factory.mktemp("tiny_cifar")
    _write_image_folder(root, train_per_class=20, test_per_class=5, test_suffix=".png", seed=1)
    return root


@pytest.fixture
def quiet_trainer(tmp_path):
    """A factory of CPU Trainers that log, checkpoint, print and sanity-check nothing."""
    import pytorch_lightning as pl

    def make(**kwargs) -> pl.Trainer:
        options = dict(
            default_root_dir=tmp_path,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        return pl.Trainer(**(options | kwargs))

    return make


def compose_train(*overrides: str, hydra: bool = False):
    """conf/train.yaml composed in-process, as train.py would (Hydra's compose API; no run dir, no
    subprocess). ``hydra=True`` also returns the ``hydra`` node."""
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


def train_here(run_dir: Path, *overrides: str) -> tuple[int, list[str]]:
    """What ``python train.py hydra.run.dir=<run_dir> <overrides>`` runs (``cbam.training.run.main``), in this
    process, with Hydra's runtime config set as a run sets it (no Hydra job: no .hydra/ files, no logging
    set-up, no Hydra callbacks). Returns (exit status, Lightning's log messages). For fixtures of any scope;
    tests take :func:`train_in_process`, which also returns stderr."""
    import logging

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from cbam.training.run import main

    cfg = compose_train(*overrides, f"hydra.run.dir={run_dir}", hydra=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]  # as train.py receives it
    messages: list[str] = []
    recorder = logging.Handler()
    recorder.emit = lambda record: messages.append(record.getMessage())
    lightning = logging.getLogger("pytorch_lightning")
    lightning.addHandler(recorder)
    try:
        main(cfg)
        status = 0
    except SystemExit as stop:
        status = stop.code
    finally:
        lightning.removeHandler(recorder)
    return status, messages


@pytest.fixture
def compose_config():
    """``compose_config(*overrides)``: :func:`compose_train`."""
    return compose_train


@pytest.fixture
def train_in_process(capsys):
    """``train_in_process(run_dir, *overrides)``: :func:`train_here`; returns (exit status, stderr,
    Lightning's log messages). For what needs no process of its own: a subprocess spends most of its time
    importing torch and Lightning."""

    def train(run_dir: Path, *overrides: str) -> tuple[int, str, list[str]]:
        status, messages = train_here(run_dir, *overrides)
        return status, capsys.readouterr().err, messages

    return train


#: the test files that take longest, longest first (about 85, 55, 50, 45, 45, 40, 25, 20, 20, 20, 20, 10, 10,
#: 10 and 10 s of a full run with the real-data tests on the 2-core machine, quiet, measured 2026-12-07 with
#: the warm interpreter): collected first, so that with one file per xdist worker (``--dist loadfile``) no
#: long file starts last while the other worker runs out of work
SLOW_FILES = (
    "test_reliability.py",
    "test_research.py",
    "test_fused.py",
    "test_train_cli.py",
    "test_dead_process.py",
    "test_real_data.py",
    "test_ddp_eval.py",
    "test_inference.py",
    "test_faults.py",
    "test_compile.py",
    "test_study.py",
    "test_trackers.py",
    "test_warm_interpreter.py",
    "test_benchmarks.py",
    "test_datasets.py",
)


def pytest_collection_modifyitems(items) -> None:
    first = {name: index for index, name in enumerate(SLOW_FILES)}
    items.sort(
        key=lambda item: first.get(item.path.name, len(SLOW_FILES))
    )  # stable: each file keeps its order
