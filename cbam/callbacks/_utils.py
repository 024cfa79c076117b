"""Helpers shared by the callbacks: where files go, which TensorBoard writers exist, class names, figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's folder: ``trainer.default_root_dir``, which conf/trainer sets to the Hydra run dir."""
    return Path(trainer.default_root_dir)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (none with the CSV logger)."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def class_names(trainer: pl.Trainer, num_classes: int) -> list[str]:
    """The datamodule's ``classes`` when it has one name per class, else "0", "1", ..."""
    names = list(getattr(trainer.datamodule, "classes", None) or [])
    return names if len(names) == num_classes else [str(index) for index in range(num_classes)]


def new_figure(width: float, height: float):
    """A matplotlib figure drawn by the Agg canvas, outside pyplot (no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: Path, dpi: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
