"""Helpers shared by the callbacks: which TensorBoard writers exist, class names, figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from cbam.runtime.atomic import write_atomically


def plain_network(pl_module: nn.Module) -> nn.Module:
    """The module's ``net`` (else the module itself). ``model.compile`` compiles it in place, so its
    submodules are the plain ones (:func:`cbam.runtime.lightning_internals.call_uncompiled` runs it uncompiled)."""
    return getattr(pl_module, "net", pl_module)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (none with the CSV logger)."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def class_names(trainer: pl.Trainer, num_classes: int) -> list[str]:
    """The datamodule's ``classes`` when it has one name per class, else "0", "1", ..."""
    names = list(getattr(trainer.datamodule, "classes", None) or [])
    return names if len(names) == num_classes else [str(index) for index in range(num_classes)]


def data_input_size(trainer: pl.Trainer) -> tuple[int, int, int] | None:
    """(3, H, W) of the datamodule's images (known after its setup), else None."""
    size = getattr(trainer.datamodule, "image_size", None)
    return (3, *size) if size else None


def new_figure(width: float, height: float, layout: str | None = None):
    """A matplotlib figure drawn by the Agg canvas, outside pyplot (no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def render(figure, dpi: int = 100) -> np.ndarray:
    """The figure drawn once, as an (H, W, 3) uint8 array."""
    figure.set_dpi(dpi)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_figure(figure, path: Path, dpi: int = 100) -> np.ndarray:
    """Draw ``figure`` once and save it as the PNG ``path`` (atomically); returns the drawn image."""
    from PIL import Image

    image = render(figure, dpi)
    write_atomically(
        path, lambda file: Image.fromarray(image).save(file, format="PNG"), prefix=f".{path.name}."
    )
    return image


def publish_figure(trainer: pl.Trainer, figure, path: Path, tag: str, dpi: int = 100) -> Path:
    """Draw ``figure`` once, save it as the PNG ``path`` and log it to every TensorBoard logger as the
    image ``tag`` (at the trainer's global step)."""
    image = save_figure(figure, path, dpi)
    for writer in tensorboard_writers(trainer):
        writer.add_image(tag, image, global_step=trainer.global_step, dataformats="HWC")
    return path
