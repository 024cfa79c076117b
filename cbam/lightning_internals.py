"""Every use of private (underscore) Lightning and torch API in this project, behind named functions.

Checked against pytorch-lightning 2.6.6 and torch 2.14.1 (and the versions pyproject.toml allows, on a
best-effort basis): after upgrading either, re-run tests/test_reliability.py, which exercises all of them.
Nothing else in ``cbam/`` may reach into an underscore attribute of Lightning or torch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer running ``module``, or None outside one (``module.trainer`` raises there)."""
    return module._trainer


def is_compiled(net: nn.Module) -> bool:
    """True once ``net.compile()`` (in place) has replaced the module's call with a compiled one."""
    return getattr(net, "_compiled_call_impl", None) is not None


def call_uncompiled(net: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``net(inputs)`` through the eager call, bypassing an in-place ``net.compile()``."""
    return net._call_impl(inputs) if is_compiled(net) else net(inputs)


def last_saved_step(callback: ModelCheckpoint) -> int:
    """The global step of the callback's most recent save (0 before the first)."""
    return callback._last_global_step_saved


def last_saved_path(callback: ModelCheckpoint) -> str:
    """The file of the callback's most recent save, whatever kind it was ("" before the first)."""
    return getattr(callback, "_last_checkpoint_saved", "")


def save_last_checkpoint(callback: ModelCheckpoint, trainer: pl.Trainer) -> None:
    """Write the callback's ``last.ckpt`` now, as ``ModelCheckpoint(save_last=True)`` does internally."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def last_checkpoint_candidates(callback: ModelCheckpoint, trainer: pl.Trainer) -> set[Path]:
    """The ``last*.ckpt`` files Lightning considers for ``ckpt_path="last"`` in the callback's folder."""
    with contextlib.suppress(Exception):  # no dirpath yet, an unreadable folder: nothing to resume from
        return {Path(path) for path in callback._find_last_checkpoints(trainer)}
    return set()


def avoid_inductor_gradient_bugs() -> None:
    """Switch off Inductor's mix-order reduction, which computed silently wrong gradients on GPUs
    (pytorch/pytorch#190796, bf16 gradients turning NaN; fixed by #193103 after torch 2.11). It only
    exists, and is on by default for GPUs, since torch 2.10."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False
