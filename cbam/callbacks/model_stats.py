"""Parameters and FLOPs per image, printed and logged with the hyperparameters at the start of every run."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cbam.arguments import check_integer
from cbam.callbacks._utils import data_input_size, plain_network
from cbam.errors import InvalidArgument
from cbam.models.meta_pass import meta_forward
from cbam.runtime.lightning_internals import call_uncompiled

log = logging.getLogger(__name__)


def count_parameters(net: nn.Module) -> int:
    return sum(parameter.numel() for parameter in net.parameters())


class _Eager(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return call_uncompiled(self.net, inputs)


def count_flops(net: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> int:
    """FLOPs of one forward pass of one image, as ``torch.utils.flop_counter`` counts them (2 per
    multiply-accumulate of convolutions and matrix products; normalisations and activations are not
    counted).

    The pass runs in eval mode on the "meta" device, with the weights swapped for meta tensors for the
    call: FLOPs depend on shapes only, and this takes well under a second even for ResNet152, on any
    device, leaving the network untouched (every module's mode is restored).
    """
    image = torch.zeros(1, *input_size, device="meta", dtype=next(net.parameters()).dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        meta_forward(_Eager(net), image)
    return int(counter.get_total_flops())


class ModelStats(pl.Callback):
    """At fit start (or test start, for a test-only run): count the network's parameters and FLOPs per
    image, print them, and log them as ``model/params`` and ``model/flops_per_image``: with the
    hyperparameters (TensorBoard's HPARAMS tab and hparams.yaml) and as metrics at step 0.

    Args:
        input_size: (C, H, W) of one image; None: the data's (3, H, W), once the datamodule is set up.
    """

    def __init__(self, input_size: tuple[int, ...] | list[int] | None = None) -> None:
        if input_size is not None:
            if isinstance(input_size, str) or not isinstance(input_size, Sequence) or len(input_size) != 3:
                accepted = "must be [C, H, W], or null (the data's size)"
                raise InvalidArgument("input_size", input_size, accepted)
            for size in input_size:
                check_integer("input_size", size, 1)
        self.input_size = tuple(input_size) if input_size is not None else None
        self.params: int | None = None
        self.flops_per_image: int | None = None

    def summary(self) -> dict[str, int]:
        return {"model/params": self.params, "model/flops_per_image": self.flops_per_image}

    def measure(self, pl_module: pl.LightningModule, input_size: tuple[int, ...]) -> dict[str, int]:
        net = plain_network(pl_module)
        self.params = count_parameters(net)
        self.flops_per_image = count_flops(net, input_size)
        return self.summary()

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.params is not None:
            return
        input_size = self.input_size or data_input_size(trainer) or (3, 32, 32)
        summary = self.measure(pl_module, input_size)
        if trainer.is_global_zero:
            print(
                f"model: {self.params:,} parameters, {self.flops_per_image / 1e6:,.2f} MFLOPs per "
                f"{'x'.join(map(str, input_size))} image",
                flush=True,
            )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # One HPARAMS entry holding the run's config (logged by cbam.training) and the summary.
                logger.log_hyperparams({**dict(logger.hparams), **summary}, metrics=summary, step=0)
            else:
                logger.log_hyperparams(summary)
                logger.log_metrics(summary, step=0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module)
