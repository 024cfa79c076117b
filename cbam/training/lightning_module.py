"""The LightningModule: a CBAM-ResNet classifier trained with SGD and a per-step LR schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cbam.arguments import check_choice, check_flag, check_number
from cbam.data.batches import IGNORED_LABEL
from cbam.data.facts import CHECKPOINT_KEY, DataFacts
from cbam.errors import ConfigError
from cbam.models.compiled_attention import compile_attention_layers
from cbam.models.network_config import build_network, flatten, nest
from cbam.runtime.checkpoints import check_checkpoint
from cbam.runtime.lightning_internals import (
    allow_compiled_variants,
    attached_trainer,
    avoid_inductor_gradient_bugs,
)

#: torch.compile's modes (``model.compile_mode``): ``reduce-overhead`` and ``max-autotune`` replay the
#: network's forward and backward as CUDA graphs on a GPU (on a CPU Inductor compiles and skips the graphs)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def _plain(config: Any) -> Any:
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config


class ImageMeanLoss(MeanMetric):
    """An epoch's mean loss per image, from each batch's mean loss and its number of images.

    Not MeanMetric's own ``update(value, weight)``: torchmetrics 1.9 drops the weights under
    ``nan_strategy="disable"``, and its NaN checks cost a host synchronisation every step.
    """

    def update(self, loss: torch.Tensor, images: torch.Tensor | int) -> None:
        self.mean_value += loss * images
        self.weight += images


#: ``_target_`` prefixes before the package was grouped by concern -> today's: what the optimizer and schedule
#: configs of checkpoints written then name, and the settings of runs recorded then
#: (:mod:`cbam.training.finished_jobs`)
MOVED_TARGETS = {
    "cbam.module.": "cbam.training.lightning_module.",
    "cbam.schedules.": "cbam.training.schedules.",
    "cbam.reliability.": "cbam.runtime.checkpoints.",
    "cbam.distributed.": "cbam.runtime.distributed.",
}


def renamed_target(target: str, renames: dict[str, str]) -> str:
    """``target`` with the first prefix of ``renames`` it starts with replaced by that prefix's value."""
    for old, new in renames.items():
        if target.startswith(old):
            return new + target.removeprefix(old)
    return target


def _current_targets(config: Any) -> Any:
    """``config`` (a saved optimizer or schedule config) with each moved ``_target_`` at its current path."""
    if not isinstance(config, dict) or not isinstance(config.get("_target_"), str):
        return config
    return {**config, "_target_": renamed_target(config["_target_"], MOVED_TARGETS)}


def parameter_groups(net: nn.Module, exempt_norms_and_biases: bool) -> Iterable[nn.Parameter] | list[dict]:
    """What the optimizer gets: all of ``net``'s parameters as one group, or with ``exempt_norms_and_biases``
    two groups, the second (every parameter of at most one dimension: the scales and shifts of the norms, the
    biases) without weight decay: decay keeps the weights that feed a normalisation at a scale where the
    learning rate acts; on the norms' own scales and shifts and on biases it only pulls them towards zero."""
    if not exempt_norms_and_biases:
        return net.parameters()
    decayed, exempt = [], []
    for parameter in net.parameters():
        (exempt if parameter.ndim <= 1 else decayed).append(parameter)
    return [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]


def build_optimizer(net: nn.Module, config: dict) -> torch.optim.Optimizer:
    """The optimizer of ``config`` (a partial, e.g. conf/optim/sgd.yaml) over ``net``'s parameters."""
    options = dict(config)
    exempt = options.pop("exempt_norms_and_biases", False)  # this module's key, not the optimizer's
    check_flag("exempt_norms_and_biases", exempt)
    return instantiate(options)(parameter_groups(net, exempt_norms_and_biases=exempt))


def build_scheduler(optimizer: torch.optim.Optimizer, config: dict, total_steps: int) -> Any:
    """The schedule of ``config`` (a partial of :mod:`cbam.training.schedules`) over ``total_steps``."""
    return instantiate(config)(optimizer, total_steps=total_steps)


class CBAMResNetModule(pl.LightningModule):
    """A classifier around the network that ``net`` describes (:mod:`cbam.models.network_config`); what it
    is built from is saved, so a checkpoint alone rebuilds the model
    (``CBAMResNetModule.load_from_checkpoint(path)``).

    Args:
        net: the network's description, ``{"depth": ..., "attention": {"kind": "cbam", ...}}``.
        optimizer: Hydra config of a partial optimizer (``_target_`` and arguments but the parameters);
            needed for training only (the defaults are ``conf/optim/sgd.yaml``).
        scheduler: Hydra config of a partial schedule taking ``(optimizer, total_steps)``, stepped
            every training step; needed for training only (default: ``conf/scheduler/cosine.yaml``).
        label_smoothing: cross-entropy label smoothing.
        channels_last: run the network in NHWC memory format (faster convolutions on tensor cores).
        compile: wrap the network in ``torch.compile``.
        compile_attention: ``torch.compile`` only the network's attention layers
            (:mod:`cbam.models.compiled_attention`); implied by ``compile``.
        compile_mode: the ``torch.compile`` mode, one of :data:`COMPILE_MODES` (used only with ``compile``).
        test_time_flip: validation and test score each image by the mean of the class probabilities of it and
            its mirror image (:meth:`evaluation_logits`); training is unchanged.
        settings: the network as the model config's flat keys (``depth=50, use_cbam_block=True``, as
            ``conf/model/`` passes them and checkpoints of earlier versions hold them), on top of ``net``.

    Every checkpoint it saves records what inference needs of the data (the trainer's data module's
    :meth:`~cbam.data.ImageDataModule.facts`: class names, image size and resize rule, mean and std, the data
    set's name) under :data:`cbam.data.facts.CHECKPOINT_KEY`; a module loaded from a checkpoint has them as
    :attr:`data_facts` (None for a checkpoint written before they were recorded).
    """

    def __init__(
        self,
        net: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        test_time_flip: bool = False,
        compile_attention: bool = False,
        **settings: Any,
    ) -> None:
        super().__init__()
        check_choice("compile_mode", compile_mode, COMPILE_MODES)
        check_flag("channels_last", channels_last)
        check_flag("compile", compile)
        check_flag("test_time_flip", test_time_flip)
        check_flag("compile_attention", compile_attention)
        check_number("label_smoothing", label_smoothing, minimum=0.0, below=1.0)
        net = nest({**flatten(_plain(net) or {}), **settings})
        # Plain dicts, so checkpoints hold no OmegaConf objects.
        optimizer, scheduler = (_current_targets(_plain(config)) for config in (optimizer, scheduler))
        self.save_hyperparameters(
            {
                "net": net,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "label_smoothing": label_smoothing,
                "channels_last": channels_last,
                "compile": compile,
                "compile_mode": compile_mode,
                "test_time_flip": test_time_flip,
                "compile_attention": compile_attention,
            }
        )
        self.net = build_network(net)
        #: the data this network was trained on, from the checkpoint it was loaded from (None: not recorded)
        self.data_facts: DataFacts | None = None
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile or compile_attention:
            avoid_inductor_gradient_bugs()
        if compile:
            # In place: the state_dict keeps its plain keys, so checkpoints load with or without compile.
            self.net.compile(mode=compile_mode)
        elif compile_attention:
            allow_compiled_variants(compile_attention_layers(self.net))
        # The rows that fill up a short evaluation batch (cbam.data.batches.fill_batch) are labelled
        # IGNORED_LABEL: the loss and the evaluation metrics leave them out. Training batches are never
        # filled up (the last partial one is dropped), so their metrics skip the masking.
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing, ignore_index=IGNORED_LABEL)
        # (ModuleDict keys may not be "train": that is nn.Module.train.)
        stages = ("train", "val", "test")
        self.metrics = nn.ModuleDict(
            {
                f"{s}_acc": MulticlassAccuracy(
                    self.num_classes,
                    average="micro",
                    validate_args=False,
                    ignore_index=None if s == "train" else IGNORED_LABEL,
                )
                for s in stages
            }
            | {f"{s}_loss": ImageMeanLoss() for s in stages}
        )

    @property
    def num_classes(self) -> int:
        """The classifier's outputs."""
        return self.hparams.net["num_classes"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def evaluation_logits(self, images: torch.Tensor, flip: bool | None = None) -> torch.Tensor:
        """What validation and test score: the network's logits, or with ``flip`` (default: the
        ``test_time_flip`` setting) the log of the mean of the softmax probabilities of ``images`` and of their
        mirror images, whose softmax is that mean (so the loss and the accuracy score the averaged prediction)."""
        logits = self(images)
        if not (self.hparams.test_time_flip if flip is None else flip):
            return logits
        mirrored = self(images.flip(-1))
        both = torch.stack((logits.log_softmax(dim=1), mirrored.log_softmax(dim=1)))
        return torch.logsumexp(both, dim=0) - math.log(2)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss and the logits it scored."""
        images, labels = batch
        logits = self(images) if stage == "train" else self.evaluation_logits(images)
        loss = self.criterion(logits, labels)  # the mean over the batch's real images
        # Accumulated on the device; read (and synchronised across ranks) once, at the epoch's end.
        # (Argument validation is off: it costs a host synchronisation every step.)
        self.metrics[f"{stage}_acc"].update(logits.detach(), labels)
        real_images = labels.numel() if stage == "train" else (labels != IGNORED_LABEL).sum()
        self.metrics[f"{stage}_loss"].update(loss.detach(), real_images)
        return loss, logits

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """``{"loss": ..., "acc": ...}`` of the stage's epoch so far, synchronised across ranks.

        For callbacks whose epoch-end hook runs before this module's (Lightning calls the callbacks'
        ``on_train_epoch_end`` first): the values are the ones this module is about to log. Every rank
        must call it (torchmetrics gathers the states); the result is cached until the next update.
        """
        return {
            name: self.metrics[f"{stage}_{name}"].compute()
            for name in ("loss", "acc")
            if self.metrics[f"{stage}_{name}"].update_called
        }

    def _log_epoch(self, stage: str) -> None:
        for name, value in self.epoch_metrics(stage).items():
            self.log(f"{stage}/{name}", value, prog_bar=stage != "train" or name == "acc")
        for name in ("loss", "acc"):
            self.metrics[f"{stage}_{name}"].reset()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch, "train")
        # Logged only every trainer.log_every_n_steps steps: each self.log costs CPU time that a fast GPU
        # step cannot hide.
        trainer = attached_trainer(self)  # None when the step is called outside a Trainer
        # The steps at which Lightning writes step metrics to the logger.
        every = trainer.log_every_n_steps if trainer is not None else 0
        if every and (self.global_step + 1) % every == 0:
            self.log("train/loss_step", loss.detach())
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The logits the test scored (with test_time_flip, the flip average, not the last forward pass's):
        # what the class report counts.
        return self._step(batch, "test")[1].detach()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        # The data module's facts once it is set up (during fit); else those this module was loaded with.
        facts = datamodule.facts() if getattr(datamodule, "classes", None) else self.data_facts
        if facts is not None:
            checkpoint[CHECKPOINT_KEY] = facts.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.data_facts = DataFacts.from_checkpoint(checkpoint)

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs
    ):
        """Lightning's loader, with ``weights_only=True`` and a :class:`cbam.errors.ConfigError` naming the
        file when it is missing, truncated, not a checkpoint, or needs arbitrary code to unpickle."""
        check_checkpoint(checkpoint_path, key="checkpoint_path")
        kwargs["weights_only"] = True
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, **kwargs)

    def configure_optimizers(self) -> dict:
        missing = [name for name in ("optimizer", "scheduler") if not self.hparams[name]]
        if missing:
            raise ConfigError(
                f"CBAMResNetModule needs {' and '.join(missing)} to train: Hydra configs such as "
                "conf/optim/sgd.yaml and conf/scheduler/cosine.yaml (train.py passes cfg.optim, "
                "cfg.scheduler)"
            )
        total_steps = int(self.trainer.estimated_stepping_batches)
        if total_steps < 1:  # every epoch drops its only, partial batch (the data module checks one process;
            # under DDP each process gets its share of the training images)
            raise ConfigError(
                "data.batch_size: no full training batch (each process's share of the training images, after "
                "data.val_size, is smaller than one batch); lower data.batch_size or data.val_size"
            )
        optimizer = build_optimizer(self.net, self.hparams.optimizer)
        scheduler = build_scheduler(optimizer, self.hparams.scheduler, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
