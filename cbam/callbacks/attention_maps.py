"""Attention maps of a fixed set of validation images, every N validation epochs.

For the last CBAM of every stage (and the classifier CBAM, ``use_cbam_class``) the callback draws the
spatial gate upsampled and overlaid on each image, and summarises the channel gates as histograms. It logs
both to TensorBoard (``attention/spatial_maps``, ``attention/channel_histograms`` and one histogram
``attention/channel/<site>`` per CBAM) and saves the same figures under ``<run dir>/attention/``.
A network without CBAM (none placed, or ECA or BAM: gates of another shape) makes it say so in one line
and draw nothing.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch

from cbam.analysis.attention_maps import (  # noqa: F401 (find_cbam_sites, to_display: imported from here too)
    SpatialMapDrawing,
    attention_gates,
    find_cbam_sites,
    to_display,
)
from cbam.arguments import check_flag, check_integer, check_number
from cbam.callbacks._utils import class_names, new_figure, plain_network, publish_figure, tensorboard_writers
from cbam.data import IGNORED_LABEL
from cbam.errors import InvalidArgument
from cbam.training.run_files import ATTENTION_DIR, run_dir

log = logging.getLogger(__name__)


class AttentionMaps(pl.Callback):
    """Log CBAM attention of ``num_images`` fixed validation images every ``every_n_epochs`` validation
    epochs (and after the last epoch).

    Args:
        every_n_epochs: draw after every N-th validation epoch.
        num_images: the first N images of the validation set (its loader does not shuffle).
        normalize: stretch each spatial map to [0, 1] before overlaying it (else the raw gate values).
        alpha: opacity of the overlaid map, in [0, 1].
        cmap: matplotlib colormap of the overlay.

    The figures, ``spatial_epochNNN.png`` and ``channel_epochNNN.png``, go to the run dir's ``attention/``.
    """

    GAP = SpatialMapDrawing.GAP  # pixels between the tiles of the mosaic

    def __init__(
        self,
        every_n_epochs: int = 10,
        num_images: int = 8,
        normalize: bool = True,
        alpha: float = 0.5,
        cmap: str = "jet",
    ) -> None:
        from matplotlib import colormaps

        check_integer("every_n_epochs", every_n_epochs, 1)
        check_integer("num_images", num_images, 1)
        check_flag("normalize", normalize)
        check_number("alpha", alpha, minimum=0.0, maximum=1.0)
        if cmap not in colormaps:
            raise InvalidArgument("cmap", cmap, "must be a matplotlib colormap, e.g. jet, viridis, inferno")
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.drawing = SpatialMapDrawing(normalize=normalize, alpha=alpha, cmap=cmap)
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._validation_epochs = 0
        self._warned = False

    def state_dict(self) -> dict:
        return {"validation_epochs": self._validation_epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self._validation_epochs = state_dict.get("validation_epochs", 0)

    def _collected(self) -> int:
        return sum(len(images) for images in self._images)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        missing = self.num_images - self._collected()
        # (not from the sanity check: a validation set smaller than num_images would be collected twice)
        if (
            trainer.sanity_checking
            or dataloader_idx != 0
            or missing <= 0
            or not isinstance(batch, (tuple, list))
        ):
            return
        real = batch[1] != IGNORED_LABEL  # not the rows that fill up a short batch
        self._images.append(batch[0][real][:missing].detach().float().cpu())
        self._labels.append(batch[1][real][:missing].detach().cpu())

    def _due(self, trainer: pl.Trainer) -> bool:
        final = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        return self._validation_epochs % self.every_n_epochs == 0 or final

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validation_epochs += 1
        if not self._due(trainer) or not trainer.is_global_zero or not self._images:
            return
        net = plain_network(pl_module)
        sites = find_cbam_sites(net)
        if not sites:
            if not self._warned:
                log.info(
                    "AttentionMaps: the network has no CBAM (attention maps are CBAM's spatial and channel "
                    "gates), so none are drawn"
                )
                self._warned = True
            return
        images, labels = torch.cat(self._images), torch.cat(self._labels)
        gates = attention_gates(net, images, sites)
        names = class_names(trainer, int(getattr(pl_module, "num_classes", 0) or labels.max() + 1))
        folder, epoch, step = run_dir(trainer) / ATTENTION_DIR, trainer.current_epoch, trainer.global_step
        spatial_gates = {name: gate for name, gate in gates.items() if "spatial" in gate}
        if spatial_gates:
            datamodule = trainer.datamodule
            display = to_display(images, getattr(datamodule, "mean", None), getattr(datamodule, "std", None))
            figure = self.spatial_figure(display, labels, names, spatial_gates)
            publish_figure(
                trainer, figure, folder / f"spatial_epoch{epoch:03d}.png", "attention/spatial_maps"
            )
        channel_gates = {name: gate for name, gate in gates.items() if "channel" in gate}
        if channel_gates:
            figure = self.channel_figure(channel_gates)
            path = folder / f"channel_epoch{epoch:03d}.png"
            publish_figure(trainer, figure, path, "attention/channel_histograms")
        for writer in tensorboard_writers(trainer):
            for name, gate in channel_gates.items():
                writer.add_histogram(f"attention/channel/{name}", gate["channel"], global_step=step)

    def mosaic(self, display: torch.Tensor, gates: dict) -> np.ndarray:
        """The images and their spatial maps, as :meth:`SpatialMapDrawing.mosaic` draws them."""
        return self.drawing.mosaic(display, gates)

    def spatial_figure(self, display, labels, names, gates):
        """The mosaic of :class:`SpatialMapDrawing`, a row per image labelled with its class."""
        rows = [names[int(label)] if int(label) < len(names) else str(int(label)) for label in labels]
        return self.drawing.figure(display, rows, gates)

    def channel_figure(self, gates):
        figure = new_figure(2.4 * len(gates), 2.3)
        axes = figure.subplots(1, len(gates), squeeze=False)[0]
        left = 0.08 / max(len(gates) / 4, 0.5)
        figure.subplots_adjust(left=left, right=0.98, bottom=0.2, top=0.82, wspace=0.3)
        for axis, (name, gate) in zip(axes, gates.items()):
            values = gate["channel"]
            axis.hist(values.flatten().numpy(), bins=30, range=(0, 1), color="tab:blue")
            axis.set_title(f"{name}: {values.shape[1]} channels", fontsize=8)
            axis.set_xlabel("channel gate", fontsize=7)
            axis.tick_params(labelsize=6)
        axes[0].set_ylabel("images x channels", fontsize=7)
        figure.suptitle("CBAM channel attention", fontsize=8)
        return figure
