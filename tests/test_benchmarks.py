"""The benchmark scripts run and write the JSON they promise (tiny CPU runs: a smoke test, not a timing)."""

from __future__ import annotations

import json
import math

from helpers import run_python


def test_throughput_quick_writes_one_row_per_pipeline(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_python(
        ["benchmarks/throughput.py", "--quick", "--depths", "18", "--cbam", "block", "--out", out]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["software"]["torch"]
    rows = report["results"]
    assert [row["pipeline"] for row in rows] == ["lightning", "plain", "conventional"]
    for row in rows:
        assert (row["depth"], row["cbam"], row["batch_size"]) == (18, "block", 32)
        assert row["images_per_s"] > 0 and row["step_ms"] > 0
        assert math.isclose(row["images_per_s"] * row["step_ms"] / 1000, 32, rel_tol=0.01)
        assert row["train_gflops_per_image"] > 0 and row["mfu"] is None  # no peak known for a CPU


def test_time_to_accuracy_quick_records_every_epoch(tiny_cifar_folder, tmp_path):
    out = tmp_path / "tta.json"
    result = run_python(
        ["benchmarks/time_to_accuracy.py", "--quick", f"data.root={tiny_cifar_folder}", "data.download=false",
         f"data.cache_dir={tmp_path}", "model.width=4", "model.reduction_ratio=2", "--out", out]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [epoch["epoch"] for epoch in report["epochs"]] == [0, 1]
    for epoch in report["epochs"]:
        assert 0 <= epoch["test_acc"] <= 1 and math.isfinite(epoch["train_loss"]) and epoch["train_seconds"] > 0
    assert set(report["seconds_to_accuracy"]) == {"0.94", "0.95"}
    assert report["train_seconds"] == report["epochs"][-1]["train_seconds"]
