"""The files of a run dir and the keys of its ``metrics.json``, named here once: the callbacks write them,
``skip_finished`` (:mod:`cbam.training.finished_jobs`), ``python -m cbam.report`` and the tracker artifacts
read them. Their names are fixed (no config key renames them), so every reader finds what a run wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cbam.runtime.atomic import write_atomically

#: the run's final numbers (:class:`cbam.callbacks.RunMetrics`), and whether it finished
METRICS_FILE = "metrics.json"
#: the training curves, as a figure and as a table (:class:`cbam.callbacks.TrainingCurves`)
CURVES_FIGURE, CURVES_TABLE = "curves.png", "curves.csv"
#: the per-class test accuracy and the confusion matrix (:class:`cbam.callbacks.ClassReport`)
CLASS_TABLE, CONFUSION_FIGURE = "per_class_accuracy.csv", "confusion_matrix.png"
#: the folder of the attention figures (:class:`cbam.callbacks.AttentionMaps`)
ATTENTION_DIR = "attention"
#: the run's config as Hydra records it
HYDRA_FILES = (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml")

# The keys of metrics.json.
BEST_VAL_ACC, BEST_VAL_ACC_EPOCH, LAST_VAL_ACC = "best_val_acc", "best_val_acc_epoch", "last_val_acc"
TEST_ACC = "test_acc"
EPOCHS, GLOBAL_STEP = "epochs", "global_step"
#: the whole fit's wall-clock time, and that per optimizer step (validation included)
TRAIN_TIME, STEP_TIME = "train_time_s", "step_time_s"
#: the wall-clock time of each training step: {"median", "p10", "p90", "steps"} (seconds; steps measured)
TRAIN_STEP = "train_step_s"
#: the machine's 1-minute load average while the run trained: {"mean", "max", "samples"}, and its cores
LOAD_AVERAGE, CPUS = "load_average", "cpus"
PARAMS, FLOPS = "params", "flops_per_image"
#: ``{"config_digest": ...}``: the run ended normally (:func:`cbam.training.finished_jobs.mark_finished`)
FINISHED, CONFIG_DIGEST = "finished", "config_digest"
#: the validation metric whose best and last values are kept
VAL_METRIC = "val/acc"


def metric_key(metric: str) -> str:
    """The key of a logged metric in metrics.json: ``test/acc`` -> ``test_acc``."""
    return metric.replace("/", "_")


def run_dir(where: Any) -> Path:
    """The run's folder: ``trainer.default_root_dir`` (which conf/trainer sets to the Hydra run dir), of a
    run's config or of its Trainer."""
    root = where.trainer.default_root_dir if isinstance(where, DictConfig) else where.default_root_dir
    return Path(root)


def read_metrics(folder: Path) -> dict | None:
    """``<folder>/metrics.json``, or None where there is none or it cannot be read (half-written, damaged)."""
    try:
        metrics = json.loads((Path(folder) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def write_metrics(folder: Path, metrics: dict) -> Path:
    """``<folder>/metrics.json`` replaced whole (a reader, e.g. the report while a sweep runs, never sees a
    half-written file); its path."""
    text = json.dumps(metrics, indent=2) + "\n"
    path = Path(folder) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda file: file.write(text.encode()), prefix=f".{path.name}.")
    return path
