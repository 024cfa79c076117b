"""Fault tolerance: atomic checkpoint files, an always-current last.ckpt (every epoch, every N steps, on
SIGTERM and Ctrl-C), a divergence guard, and the check of the checkpoint that ``ckpt_path=last`` resumes from.

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
from cbam.checks import ConfigError, check_checkpoint, read_checkpoint
from cbam.lightning_internals import (
    last_checkpoint_candidates,
    last_saved_path,
    last_saved_step,
    save_last_checkpoint,
)

#: prefix and suffix of a checkpoint being written; the name never contains "last", so Lightning's
#: ``ckpt_path="last"`` (which takes the newest ``last*.ckpt``) can never pick a partial file
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".ckpt-", ".partial"


# ------------------------------------------------------------------------------------ atomic checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the target's folder, fsynced, then renamed over the
    target: a process killed at any moment leaves either the previous file or the new one, never a
    truncated one. Leftover temporary files of killed saves (``.ckpt-*.partial``) are removed by the
    next save into the same folder. Remote paths (``s3://...``) fall back to Lightning's own writer.

    Checkpoints are read with ``weights_only=True`` (whatever Lightning asks for); one that cannot be
    read is reported as a :class:`ConfigError` naming the file and the problem (see
    :func:`cbam.checks.read_checkpoint`).
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
        text = os.fspath(path)
        if "://" in text and not text.startswith("file://"):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        # Onto the CPU unless asked otherwise: Lightning moves the states to the training device itself.
        return read_checkpoint(text.removeprefix("file://"), map_location=map_location or "cpu")


# ------------------------------------------------------------------------------------------ last.ckpt

#: exit status after Ctrl-C once last.ckpt is saved: the shell's convention for death by SIGINT (128 + 2)
SIGINT_EXIT_STATUS = 128 + signal.SIGINT


class StoppedBySigint(SystemExit):
    """Ends the run after Ctrl-C saved last.ckpt (exit status :data:`SIGINT_EXIT_STATUS`)."""

    def __init__(self) -> None:
        super().__init__(SIGINT_EXIT_STATUS)


def ends_epoch(trainer: pl.Trainer) -> bool:
    """True in the hooks of an epoch's last training batch (its validation and epoch end still to come)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.is_last_batch or progress.current.ready >= trainer.num_training_batches


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``<dirpath>/last.ckpt`` current, the file ``ckpt_path=last`` resumes from.

    It is written at the end of every training epoch (after its validation), every
    ``every_n_train_steps`` training steps when that is set (a kill then loses at most that many steps),
    and, with ``save_on_sigterm``, when the process receives SIGTERM or SIGINT (Ctrl-C): the signal only
    sets a flag, read after every training batch; the checkpoint of that batch is written and the run
    exits, with status 0 after SIGTERM (a scheduler's preemption) and :data:`SIGINT_EXIT_STATUS` after
    Ctrl-C. A second Ctrl-C interrupts at once (Lightning's handling: no checkpoint, status 1).

    Nothing is written after an epoch's last training batch: its epoch-end checkpoint follows the
    validation, and a stop signal read there stops the run after it. (Lightning 2.6 resumes a checkpoint
    of an epoch's last batch into a loop state that never counts the next epoch's start; a checkpoint
    of that next epoch's end then resumes past the epoch after it, which is never trained.)

    (Lightning 2.6's ``ModelCheckpoint(save_last=True)`` only rewrites last.ckpt when it also saves a
    top-k checkpoint, so with a monitored metric that stops improving last.ckpt goes stale: this
    callback owns last.ckpt instead.)

    Under DDP the signal flag is combined over the ranks every ``trainer.log_every_n_steps`` batches (one
    all-reduce of a small integer), so every rank stops after the same batch even when only one rank got
    the signal; a single process reads a Python flag after every batch, with no synchronisation.
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
        self._received = 0  # the stop signal's number (SIGTERM wins over SIGINT), 0 for none
        self._previous_handlers: dict[int, Any] = {}

    # -- SIGTERM and SIGINT -------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._received = max(self._received, signum)
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(
                signal.SIGINT, self._previous_handlers.get(signal.SIGINT, signal.default_int_handler)
            )
            # os.write, not print: a handler may run while the main thread is inside a print to stderr
            os.write(2, b"Ctrl-C: saving last.ckpt after this batch (press Ctrl-C again to stop at once)\n")

    def _install_handlers(self, trainer: pl.Trainer) -> None:
        # After Lightning's own SIGTERM handler (registered before training starts): that one stops the
        # run at the end of the batch without a checkpoint, so it is replaced for the training loop.
        if self.save_on_sigterm and threading.current_thread() is threading.main_thread():
            if trainer.received_sigterm:
                self._received = max(self._received, signal.SIGTERM)
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous = signal.signal(signum, self._on_signal)
                # None: a handler installed from C, which Python cannot reinstall; the default stands in
                self._previous_handlers[signum] = signal.SIG_DFL if previous is None else previous

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def _stop_signal(self, trainer: pl.Trainer, every_step: bool = False) -> int:
        """The signal that stops the run now (SIGTERM or SIGINT, on any rank), else 0."""
        if not self.save_on_sigterm:
            return 0
        if trainer.world_size > 1:
            # The ranks agree at the same steps (every log_every_n_steps steps, so the all-reduce and
            # its host synchronisation are rare), hence they stop after the same batch.
            interval = 1 if every_step else max(trainer.log_every_n_steps, 1)
            if trainer.global_step % interval:
                return 0
            received = torch.tensor(self._received, device=trainer.strategy.root_device)
            return int(trainer.strategy.reduce(received, reduce_op="max"))
        return self._received

    def _exit(self, trainer: pl.Trainer, signum: int, message: str) -> None:
        name = signal.Signals(signum).name
        if trainer.is_global_zero:
            print(f"{name}: {message}; exiting (resume with ckpt_path=last)", file=sys.stderr, flush=True)
        # SystemExits: Lightning tears the run down on their way out (SIGTERMException's status is 0)
        raise StoppedBySigint if signum == signal.SIGINT else SIGTERMException

    # -- hooks --------------------------------------------------------------------------------------

    def _saving_allowed(self, trainer: pl.Trainer) -> bool:
        return not (trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_handlers(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if ends_epoch(trainer):
            return  # the epoch-end save and stop come after the validation (see the class docstring)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # every N steps
        signum = self._stop_signal(trainer)
        if signum:
            if last_saved_step(self) != trainer.global_step and self._saving_allowed(trainer):
                save_last_checkpoint(self, trainer)
            self._exit(trainer, signum, f"saved {self.last_model_path} at step {trainer.global_step}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saving_allowed(trainer):
            save_last_checkpoint(self, trainer)
        signum = self._stop_signal(trainer, every_step=True)  # every rank ends the epoch here
        if signum:
            self._exit(trainer, signum, f"saved {self.last_model_path} at step {trainer.global_step}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # last.ckpt is the state at a batch's or an epoch's end, not after a mid-epoch validation

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        # Decided together: a rank that skipped testing alone would leave the others hanging in it.
        signum = self._stop_signal(trainer, every_step=True)
        if signum:  # came during the last epoch's end: skip testing
            self._exit(trainer, signum, f"training had finished, {self.last_model_path} is its final state")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException):
        self._restore_handlers()


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
                last_saved_path(callback),
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
    candidates: set[Path] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            candidates |= last_checkpoint_candidates(callback, trainer)
    files = [path for path in candidates if path.is_file()]
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
