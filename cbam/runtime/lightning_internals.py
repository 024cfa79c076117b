"""Every use of private (underscore) Lightning and torch API in this project, behind named functions.

Checked against pytorch-lightning 2.6.6 and torch 2.14.1 (and the versions pyproject.toml allows, on a
best-effort basis): after upgrading either, re-run tests/test_reliability.py and tests/test_dead_process.py,
which exercise all of them.
Nothing else in ``cbam/`` may reach into an underscore attribute of Lightning or torch.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
import threading
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


def launched_processes(strategy: pl.strategies.Strategy) -> list[subprocess.Popen]:
    """The processes Lightning's launcher started in this process for the node's other ranks (none under
    torchrun or SLURM, in those processes themselves, or with one process per node)."""
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = strategy.launcher
    return list(launcher.procs) if isinstance(launcher, _SubprocessScriptLauncher) else []


def stop_child_process_observer() -> None:
    """End the thread with which Lightning's launcher checks the processes it started every 5 s: when one
    exits with an error it SIGKILLs them all, itself included, before anyone can say which rank died or
    what to resume from (cbam.runtime.distributed does that job). It ends at its next check, finding nothing
    left to watch."""
    try:
        from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:  # a Lightning without it
        return
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            thread._child_processes = []


def avoid_inductor_gradient_bugs() -> None:
    """Switch off Inductor's mix-order reduction, which computed silently wrong gradients on GPUs
    (pytorch/pytorch#190796, bf16 gradients turning NaN; fixed by #193103 after torch 2.11). It only
    exists, and is on by default for GPUs, since torch 2.10."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False


def allow_compiled_variants(count: int) -> None:
    """Let torch.compile keep at least ``count`` compiled variants of one function before it falls back to
    eager code (Dynamo's ``recompile_limit``, 8 by default)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, count)


def cpu_has_native_bf16() -> bool:
    """True where this CPU computes bf16 in hardware (x86: AVX512-BF16 or AMX; Arm: the BF16 extension).
    Elsewhere oneDNN emulates bf16, slower than fp32."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        with contextlib.suppress(OSError):
            return " bf16" in Path("/proc/cpuinfo").read_text()
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
