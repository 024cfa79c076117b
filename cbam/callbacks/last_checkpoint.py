"""``checkpoints/last.ckpt``, always current: written at every epoch end, every N steps, and on SIGTERM or
Ctrl-C (then the run exits)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from cbam.arguments import check_flag, check_integer
from cbam.runtime.lightning_internals import last_saved_step, save_last_checkpoint

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
        check_integer("every_n_train_steps", every_n_train_steps, 0, null_ok=True, null_means="off, as 0 is")
        check_flag("save_on_sigterm", save_on_sigterm)
        steps = every_n_train_steps or 0
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
