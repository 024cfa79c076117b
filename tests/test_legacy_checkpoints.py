"""Checkpoints written before the package was grouped by concern load, evaluate to the same numbers and resume.

Such a checkpoint holds the network's options as flat hyperparameters (``depth``, ``use_cbam_block``, ...,
``cbam_impl``) beside the optimizer and the schedule, whose ``_target_`` named ``cbam.schedules.<name>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, load_checkpoint, write_random_pngs

from cbam.training.lightning_module import CBAMResNetModule

#: the hyperparameters of a checkpoint written before the regrouping, in the order it wrote them (read from a
#: CBAM-ResNet18 checkpoint of that code)
LEGACY_NETWORK_KEYS = (
    "depth", "use_cbam_block", "use_cbam_class", "reduction_ratio", "kernel_size", "channel_pooling",
    "spatial_pooling", "gate_order", "use_channel_gate", "use_spatial_gate", "cbam_impl", "width", "stem",
    "num_classes",
)  # fmt: skip
TINY = [
    *TINY_RUN,
    "model.reduction_ratio=2",
    "cbam=block",
    "trainer.max_epochs=2",
    "logger=csv",
    "callbacks.periodic_checkpoint.every_n_epochs=1",
]


def write_legacy(checkpoint: Path, out: Path) -> None:
    """``checkpoint`` (today's layout) rewritten as the code before the regrouping wrote it."""
    saved = load_checkpoint(checkpoint)
    hyperparameters = dict(saved["hyper_parameters"])
    net = hyperparameters.pop("net")
    attention = {key: value for key, value in net["attention"].items() if key != "kind"}
    options = {**net, **attention, "cbam_impl": attention.pop("impl")}
    flat = {key: options[key] for key in LEGACY_NETWORK_KEYS}
    scheduler = dict(hyperparameters["scheduler"])
    scheduler["_target_"] = scheduler["_target_"].replace("cbam.training.schedules.", "cbam.schedules.")
    hyperparameters["scheduler"] = scheduler
    saved["hyper_parameters"] = {**flat, **hyperparameters}
    assert "net" not in saved["hyper_parameters"] and saved["hyper_parameters"]["use_cbam_block"] is True
    torch.save(saved, out)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_random_pngs(tmp_path_factory.mktemp("images"), 10, 2, [f"class{i}" for i in range(10)])


def test_legacy_checkpoint_loads_evaluates_and_resumes(images, tmp_path, train_in_process):
    data = f"data.root={images}"
    status, stderr, _ = train_in_process(tmp_path / "full", data, *TINY)
    assert status == 0, stderr
    first_epoch = tmp_path / "full" / "checkpoints" / "epoch000.ckpt"
    legacy = tmp_path / "legacy.ckpt"
    write_legacy(first_epoch, legacy)

    loaded = CBAMResNetModule.load_from_checkpoint(legacy, map_location="cpu")
    today = CBAMResNetModule.load_from_checkpoint(first_epoch, map_location="cpu")
    assert loaded.hparams.net == today.hparams.net and loaded.hparams.net["attention"]["reduction_ratio"] == 2
    assert loaded.hparams.scheduler["_target_"] == today.hparams.scheduler["_target_"]
    assert loaded.hparams.scheduler["_target_"].startswith("cbam.training.schedules.")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), today.state_dict().values()))

    evaluated = {}
    for name, path in (("today", first_epoch), ("legacy", legacy)):
        status, stderr, _ = train_in_process(
            tmp_path / f"eval-{name}", data, *TINY, "train=false", f"ckpt_path={path}"
        )
        assert status == 0, stderr
        metrics = json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text())
        evaluated[name] = {key: value for key, value in metrics.items() if key.startswith("test_")}
    assert evaluated["legacy"] == evaluated["today"] and "test_acc" in evaluated["legacy"]

    # Resumed from the legacy file for the second epoch, the run ends with the weights of the uninterrupted one.
    status, stderr, _ = train_in_process(tmp_path / "resumed", data, *TINY, f"ckpt_path={legacy}")
    assert status == 0, stderr
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    uninterrupted = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert (
        resumed["global_step"] == uninterrupted["global_step"] > load_checkpoint(first_epoch)["global_step"]
    )
    assert "net" in resumed["hyper_parameters"]  # written in today's layout
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
