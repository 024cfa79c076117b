"""Fault tolerance: atomic checkpoint files, an always-current last.ckpt (every epoch, every N steps, on
SIGTERM), a divergence guard, and the check of the checkpoint that ``ckpt_path=last`` resumes from.

What each piece guarantees, and the test that checks it, is listed in the README's "Reliability" section.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from cbam.atomic import write_atomically
from cbam.checks import ConfigError, check_checkpoint

#: prefix and suffix of a checkpoint being written; the name never contains "last", so Lightning's
#: ``ckpt_path="last"`` (which takes the newest ``last*.ckpt``) can never pick a partial file
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".ckpt-", ".partial"


# ------------------------------------------------------------------------------------ atomic checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the target's folder, fsynced, then renamed over the
    target: a process killed at any moment leaves either the previous file or the new one, never a
    truncated one. Leftover temporary files of killed saves (``.ckpt-*.partial``) are removed by the
    next save into the same folder. Remote paths (``s3://...``) fall back to Lightning's own writer.

    A checkpoint that cannot be read is reported as a :class:`ConfigError` naming the file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        text = os.fspath(path)
        if storage_options is not None or ("://" in text and not text.startswith("file://")):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(text.removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        write_atomically(target, lambda file: torch.save(checkpoint, file), PARTIAL_PREFIX, PARTIAL_SUFFIX)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            return super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        except FileNotFoundError:
            raise ConfigError(f"checkpoint {path}: no such file") from None
        except Exception as error:  # torch's zip reader, a short or foreign pickle, ...
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            message = f"checkpoint {path} cannot be loaded (corrupt or truncated? {reason})"
            raise ConfigError(message) from None


# ------------------------------------------------------------------------------------------ last.ckpt


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``<dirpath>/last.ckpt`` current, the file ``ckpt_path=last`` resumes from.

    It is written at the end of every training epoch (after its validation), every
    ``every_n_train_steps`` training steps when that is set (a kill then loses at most that many steps),
    and, with ``save_on_sigterm``, when the process receives SIGTERM: the flag set by the signal is read
    after every training batch; the checkpoint of that batch is written and the run exits with status 0.

    (Lightning 2.6's ``ModelCheckpoint(save_last=True)`` only rewrites last.ckpt when it also saves a
    top-k checkpoint, so with a monitored metric that stops improving last.ckpt goes stale: this
    callback owns last.ckpt instead.)

    Under DDP the SIGTERM flag is combined over the ranks every ``trainer.log_every_n_steps`` batches (one
    all-reduce of a boolean), so every rank stops after the same batch; a single process reads a Python
    flag after every batch, with no synchronisation.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        every_n_train_steps: int | None = None,
        save_on_sigterm: bool = True,
    ) -> None:
        steps = int(every_n_train_steps or 0)
        if steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 or null, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=steps,
            every_n_epochs=0,  # epoch ends are handled below: the parent class would skip them
            enable_version_counter=False,  # always last.ckpt, never last-v1.ckpt
        )
        self.save_on_sigterm = save_on_sigterm
        self._sigterm = False
        self._previous_handler: Any = None

    # -- SIGTERM ------------------------------------------------------------------------------------

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._sigterm = True

    def _install_handler(self, trainer: pl.Trainer) -> None:
        # After Lightning's own handler (registered before training starts): that one stops the run
        # at the end of the batch without a checkpoint, so it is replaced for the training loop.
        if self.save_on_sigterm and threading.current_thread() is threading.main_thread():
            self._sigterm = self._sigterm or bool(getattr(trainer, "received_sigterm", False))
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None

    def _stop_requested(self, trainer: pl.Trainer, every_step: bool = False) -> bool:
        if not self.save_on_sigterm:
            return False
        if trainer.world_size > 1:
            # The ranks agree at the same steps (every log_every_n_steps steps, so the all-reduce and
            # its host synchronisation are rare), hence they stop after the same batch.
            interval = 1 if every_step else max(trainer.log_every_n_steps, 1)
            if trainer.global_step % interval:
                return False
            return trainer.strategy.reduce_boolean_decision(self._sigterm, all=False)
        return self._sigterm

    def _exit(self, trainer: pl.Trainer, message: str) -> None:
        if trainer.is_global_zero:
            print(f"SIGTERM: {message}; exiting (resume with ckpt_path=last)", file=sys.stderr, flush=True)
        raise SIGTERMException  # a SystemExit with status 0; Lightning tears the run down on its way out

    # -- hooks --------------------------------------------------------------------------------------

    def _saving_allowed(self, trainer: pl.Trainer) -> bool:
        return not (trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit")

    def _save_last(self, trainer: pl.Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_handler(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # every N steps
        if self._stop_requested(trainer):
            if self._last_global_step_saved != trainer.global_step and self._saving_allowed(trainer):
                self._save_last(trainer)
            self._exit(trainer, f"saved {self.last_model_path} at step {trainer.global_step}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saving_allowed(trainer):
            self._save_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # last.ckpt is the state at a batch's or an epoch's end, not after a mid-epoch validation

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()
        # Decided together: a rank that skipped testing alone would leave the others hanging in it.
        if self._stop_requested(trainer, every_step=True):  # came during the last epoch's end: skip testing
            self._exit(trainer, f"training had finished, {self.last_model_path} is its final state")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException):
        self._restore_handler()


# --------------------------------------------------------------------------------------------- divergence


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""

    def __init__(self, step: int, checkpoint: str | None, what: str = "loss") -> None:
        self.step, self.checkpoint = step, checkpoint
        last_good = checkpoint or "none"
        message = f"training diverged: non-finite {what} at step {step}; last good checkpoint: {last_good}"
        super().__init__(message)


def newest_checkpoint(trainer: pl.Trainer) -> str | None:
    """The most recently written checkpoint file this run knows of (written by its checkpoint callbacks,
    or resumed from), or None."""
    candidates = {trainer.ckpt_path} if trainer.ckpt_path else set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            candidates |= {
                callback.last_model_path,
                callback.best_model_path,
                getattr(callback, "_last_checkpoint_saved", ""),
            }
    files = [Path(path) for path in candidates if path and Path(path).is_file()]
    return str(max(files, key=lambda path: path.stat().st_mtime_ns)) if files else None


class DivergenceGuard(Callback):
    """Stops training with :class:`TrainingDiverged` once the training loss is NaN or infinite.

    Every step records ``isfinite(loss)`` as a device tensor (no host synchronisation); the recorded
    flags are read every ``check_every_n_steps`` steps (default: every step on the CPU, where reading is
    free, else every ``trainer.log_every_n_steps`` steps, when the logged loss is read anyway), before
    every checkpoint is written (so the diverged state is never saved: last.ckpt stays the last good
    one) and when training ends. The error names the first step with a non-finite loss (the trainer's
    global step after it), found over all DDP ranks. A checkpoint about to be written whose weights or
    buffers are not finite is refused the same way ("non-finite weights at step N").
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1 or null, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._every = 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        on_cpu = trainer.strategy.root_device.type == "cpu"
        self._every = self.check_every_n_steps or (1 if on_cpu else max(1, trainer.log_every_n_steps))
        self._pending = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._pending.append((trainer.global_step, torch.isfinite(loss.detach()).all()))
        if trainer.global_step % self._every == 0:
            self.check(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict):
        # This rank's flags only: a save may come from a signal handler (SLURM's SIGUSR1), at a different
        # point on each rank, where a collective could pair up with another one and hang. A NaN of another
        # rank reaches these weights through the gradient all-reduce, and the weight check below sees it.
        self.check(trainer, across_ranks=False)
        tensors = [t for t in checkpoint.get("state_dict", {}).values() if torch.is_floating_point(t)]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise TrainingDiverged(trainer.global_step, newest_checkpoint(trainer), what="weights")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: pl.Trainer, across_ranks: bool = True) -> None:
        """Raise :class:`TrainingDiverged` if a recorded loss was not finite (on any rank, when
        ``across_ranks``: then every rank must call it at the same step)."""
        across_ranks = across_ranks and trainer.world_size > 1
        if not across_ranks and not self._pending:
            return
        pending, self._pending = self._pending, []
        never = torch.iinfo(torch.int64).max
        first_bad = never
        if pending:
            finite = torch.stack([flag for _, flag in pending]).cpu()
            bad = (~finite).nonzero()
            if len(bad):
                first_bad = pending[int(bad[0])][0]
        if across_ranks:  # every rank checks at the same steps: agree on the first bad step
            device = trainer.strategy.root_device
            first_bad = int(trainer.strategy.reduce(torch.tensor(first_bad, device=device), reduce_op="min"))
        if first_bad != never:
            raise TrainingDiverged(first_bad, newest_checkpoint(trainer))


# ---------------------------------------------------------------------------------------- ckpt_path=last


def last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The file Lightning resumes from for ``ckpt_path="last"``: the newest ``last*.ckpt`` in the
    folders of the trainer's checkpoint callbacks (None when there is none yet)."""
    candidates: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            with contextlib.suppress(Exception):
                candidates |= callback._find_last_checkpoints(trainer)
    files = [Path(path) for path in candidates if Path(path).is_file()]
    return max(files, key=lambda path: path.stat().st_mtime_ns) if files else None


def check_last_checkpoint(trainer: pl.Trainer) -> None:
    """For ``ckpt_path=last``: raise :class:`ConfigError` naming the file if the checkpoint it resumes from
    is truncated or corrupt (no checkpoint yet is fine: training starts from scratch)."""
    path = last_checkpoint(trainer)
    if path is None:
        return
    try:
        check_checkpoint(path)
    except ConfigError as error:
        hint = "picked by ckpt_path=last; delete it or pass another ckpt_path"
        raise ConfigError(f"{error} [{hint}]") from None
