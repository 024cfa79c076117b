"""Attention maps of a fixed set of validation images, every N validation epochs.

For the last CBAM of every stage (and the classifier CBAM, ``use_cbam_class``) the callback draws the
spatial gate upsampled and overlaid on each image, and summarises the channel gates as histograms. It logs
both to TensorBoard (``attention/spatial_maps``, ``attention/channel_histograms`` and one histogram
``attention/channel/<site>`` per CBAM) and saves the same figures under ``<run dir>/attention/``.
A network without CBAM makes it do nothing.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch import nn

from cbam.attention import CBAM
from cbam.callbacks._utils import class_names, new_figure, run_dir, save_figure, tensorboard_writers
from cbam.data import CIFAR10_MEAN, CIFAR10_STD

log = logging.getLogger(__name__)


def find_cbam_sites(net: nn.Module) -> list[tuple[str, CBAM]]:
    """``[(name, cbam)]``: the last CBAM of each stage (``stage1``..``stage4``) and the classifier CBAM.

    A network without ``stages`` gives every CBAM it holds, under its module name.
    """
    if not hasattr(net, "stages"):
        return [(name, module) for name, module in net.named_modules() if isinstance(module, CBAM)]
    sites = []
    for index, stage in enumerate(net.stages, start=1):
        found = [module for module in stage.modules() if isinstance(module, CBAM)]
        if found:
            sites.append((f"stage{index}", found[-1]))
    if isinstance(getattr(net, "attention", None), CBAM):
        sites.append(("classifier", net.attention))
    return sites


@torch.no_grad()
def attention_gates(
    net: nn.Module, images: torch.Tensor, sites: list[tuple[str, CBAM]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``net`` on ``images`` in eval mode and return, per site, ``spatial`` (N, 1, H, W) and
    ``channel`` (N, C) gates as float tensors on the CPU. Every module's train/eval mode is restored."""
    gates: dict[str, dict[str, torch.Tensor]] = {name: {} for name, _ in sites}
    handles = []
    for name, cbam in sites:

        def channel_hook(module, args, output, name=name):
            gates[name]["channel"] = module.gate(args[0]).flatten(1).float().cpu()

        def spatial_hook(module, args, output, name=name):
            gates[name]["spatial"] = module.gate(args[0]).float().cpu()

        handles.append(cbam.channel.register_forward_hook(channel_hook))
        handles.append(cbam.spatial.register_forward_hook(spatial_hook))
    modes = {module: module.training for module in net.modules()}
    net.eval()
    try:
        parameter = next(net.parameters())
        net(images.to(parameter.device, parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return gates


def _to_display(images: torch.Tensor) -> torch.Tensor:
    """Normalised NCHW images -> NHWC in [0, 1]."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


class AttentionMaps(pl.Callback):
    """Log CBAM attention of ``num_images`` fixed validation images every ``every_n_epochs`` validation
    epochs (and after the last epoch).

    Args:
        every_n_epochs: draw after every N-th validation epoch.
        num_images: the first N images of the validation set (its loader does not shuffle).
        normalize: stretch each spatial map to [0, 1] before overlaying it (else the raw gate values).
        alpha: opacity of the overlaid map.
        cmap: matplotlib colormap of the overlay.
        dirname: folder of the run dir receiving ``spatial_epochNNN.png`` and ``channel_epochNNN.png``.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        num_images: int = 8,
        normalize: bool = True,
        alpha: float = 0.5,
        cmap: str = "jet",
        dirname: str = "attention",
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.normalize, self.alpha, self.cmap, self.dirname = normalize, alpha, cmap, dirname
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

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        missing = self.num_images - self._collected()
        if dataloader_idx != 0 or missing <= 0 or not isinstance(batch, (tuple, list)):
            return
        self._images.append(batch[0][:missing].detach().float().cpu())
        self._labels.append(batch[1][:missing].detach().cpu())

    def _due(self, trainer: pl.Trainer) -> bool:
        last = bool(trainer.max_epochs) and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs
        return self._validation_epochs % self.every_n_epochs == 0 or last

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validation_epochs += 1
        if not self._due(trainer) or not trainer.is_global_zero or not self._images:
            return
        net = getattr(pl_module, "net", pl_module)
        sites = find_cbam_sites(net)
        if not sites:
            if not self._warned:
                log.info("AttentionMaps: the network has no CBAM, no attention maps to draw")
                self._warned = True
            return
        images, labels = torch.cat(self._images), torch.cat(self._labels)
        gates = attention_gates(net, images, sites)
        names = class_names(trainer, int(getattr(pl_module.hparams, "num_classes", 0) or labels.max() + 1))
        epoch, step = trainer.current_epoch, trainer.global_step
        spatial = self._spatial_figure(images, labels, names, gates)
        channel = self._channel_figure(gates)
        folder = run_dir(trainer) / self.dirname
        save_figure(spatial, folder / f"spatial_epoch{epoch:03d}.png")
        save_figure(channel, folder / f"channel_epoch{epoch:03d}.png")
        for writer in tensorboard_writers(trainer):
            writer.add_figure("attention/spatial_maps", spatial, global_step=step)
            writer.add_figure("attention/channel_histograms", channel, global_step=step)
            for name, gate in gates.items():
                writer.add_histogram(f"attention/channel/{name}", gate["channel"], global_step=step)

    def _spatial_figure(self, images, labels, names, gates):
        display = _to_display(images)
        rows, columns = len(images), 1 + len(gates)
        figure = new_figure(1.5 * columns, 1.5 * rows + 0.3)
        axes = figure.subplots(rows, columns, squeeze=False)
        size = display.shape[1:3]
        for row in range(rows):
            axes[row][0].imshow(display[row].numpy())
            label = int(labels[row])
            axes[row][0].set_title(names[label] if label < len(names) else str(label), fontsize=8)
            for column, (name, gate) in enumerate(gates.items(), start=1):
                raw = gate["spatial"][row : row + 1]
                heat = torch.nn.functional.interpolate(raw, size=size, mode="bilinear", align_corners=False)[0, 0]
                if self.normalize:
                    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
                axes[row][column].imshow(display[row].numpy())
                axes[row][column].imshow(heat.numpy(), cmap=self.cmap, alpha=self.alpha, vmin=0, vmax=1)
                if row == 0:
                    height, width = raw.shape[-2:]
                    axes[row][column].set_title(f"{name} {height}x{width}", fontsize=8)
        for axis in axes.flat:
            axis.set_axis_off()
        figure.suptitle("CBAM spatial attention" + (" (each map stretched to [0, 1])" if self.normalize else ""),
                        fontsize=9)
        return figure

    def _channel_figure(self, gates):
        figure = new_figure(2.6 * len(gates), 2.4)
        axes = figure.subplots(1, len(gates), squeeze=False)[0]
        for axis, (name, gate) in zip(axes, gates.items()):
            values = gate["channel"]
            axis.hist(values.flatten().numpy(), bins=30, range=(0, 1), color="tab:blue")
            axis.set_title(f"{name}: {values.shape[1]} channels", fontsize=8)
            axis.set_xlabel("channel gate", fontsize=8)
            axis.tick_params(labelsize=7)
        axes[0].set_ylabel("count (images x channels)", fontsize=8)
        figure.suptitle("CBAM channel attention", fontsize=9)
        return figure
