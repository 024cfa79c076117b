"""train.py with the experiment trackers, on the real libraries: logger=mlflow (a local store in the run dir)
and logger=wandb (offline), each training a backbone other than this project's ResNets, so that these runs
also show model=torchvision and model=wide_resnet end to end (parameters, FLOPs, attention maps, report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: one short epoch of a full-width network on the tiny image folder
SHORT = [
    "data.download=false",
    "data.loader=device",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.val_size=20",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=1",
    "trainer.deterministic=true",
]


def test_mlflow_run_of_a_torchvision_network_holds_params_metrics_and_figures(
    tiny_cifar_folder, tmp_path, train_in_process
):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    overrides = ["model=torchvision", "model.name=resnet18", "cbam=both", "logger=mlflow"]
    status, stderr, _ = train_in_process(run_dir, f"data.root={tiny_cifar_folder}", *SHORT, *overrides)
    assert status == 0, stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "cbam-torchvision-resnet18"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["model/arch"] == "torchvision" and run.data.params["model/name"] == "resnet18"
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test_acc"])
    # torchvision's resnet18 with the CIFAR stem (the CIFAR ResNet18's 11,173,962) and CBAM in its 8 blocks
    # and before the classifier
    assert run.data.metrics["model/params"] == metrics["params"] > 11_173_962
    assert run.data.metrics["model/flops_per_image"] == metrics["flops_per_image"] > 0
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "curves.csv", "metrics.json", "confusion_matrix.png", "attention"} <= artifacts
    attention = {Path(item.path).name for item in client.list_artifacts(run.info.run_id, "attention")}
    assert {"spatial_epoch000.png", "channel_epoch000.png"} <= attention, attention
    assert (run_dir / "mlartifacts").is_dir()  # the artifacts stay in the run dir too


def test_wandb_offline_run_of_a_wide_resnet_with_eca_keeps_figures_and_tables(
    tiny_cifar_folder, tmp_path, train_in_process, monkeypatch, caplog
):
    import logging

    import wandb

    caplog.set_level(logging.INFO, logger="cbam.callbacks.attention_maps")

    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    overrides = ["model=wide_resnet", "model.depth=10", "model.widen_factor=1", "attention=eca", "cbam=block"]
    try:
        status, stderr, _ = train_in_process(
            run_dir, f"data.root={tiny_cifar_folder}", *SHORT, *overrides, "logger=wandb"
        )
    finally:
        wandb.finish()
        wandb.teardown()  # the wandb service process
    assert status == 0, stderr
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert (offline / f"run-{offline.name.rsplit('-', 1)[1]}.wandb").stat().st_size > 0
    saved = {path.relative_to(offline / "files").as_posix() for path in (offline / "files").rglob("*")}
    assert {"curves.png", "curves.csv", "metrics.json", "confusion_matrix.png"} <= saved, saved
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # WRN-10-1 without attention has 77,850 parameters; ECA adds k = 3, 3, 3 (16, 32, 64 channels: Eq. 12)
    assert metrics["params"] == 77_850 + 3 + 3 + 3
    # (attention maps are CBAM's gates: for ECA, one line says there are none)
    assert "AttentionMaps: the network has no CBAM" in caplog.text
