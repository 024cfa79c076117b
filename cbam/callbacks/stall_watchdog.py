"""A run whose batch never ends (stuck in a native kernel) is ended with one line instead of hanging."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from cbam.arguments import check_number
from cbam.errors import RunStalled, print_error
from cbam.runtime.checkpoints import describe_checkpoint, newest_checkpoint


def end_process(status: int) -> None:
    """End this process at once, whatever its main thread is doing."""
    os._exit(status)


class StallWatchdog(Callback):
    """Ends the process with :class:`~cbam.errors.RunStalled`'s line (exit status 6) when no batch (training,
    validation or test) and no checkpoint has finished for ``timeout_s`` seconds.

    A process stuck inside a native kernel (a oneDNN bug that loops, a deadlocked collective) never returns
    to Python's main thread, so neither SIGTERM's checkpoint nor any exception can end it; a thread can,
    since torch's operators release the GIL while they compute. It exits with ``os._exit``: the stuck thread
    holds the state, so nothing is saved and the last good checkpoint is the newest one on disk, which the
    line names (``ckpt_path=last`` resumes from it). The limit is absolute and generous: a batch's time is
    not known before it ends, and a first batch that compiles the network may take minutes.
    ``timeout_s=null`` turns the watchdog off.
    """

    def __init__(self, timeout_s: float | None = 1800) -> None:
        check_number("timeout_s", timeout_s, above=0, unit="seconds", null_ok=True, null_means="off")
        self.timeout_s = timeout_s
        self._trainer: pl.Trainer | None = None
        self._last_beat = time.monotonic()
        self._doing = "starting"
        self._stop = threading.Event()  # the running watch's (each setup starts a watch of its own)

    def _beat(self, doing: str) -> None:
        self._last_beat, self._doing = time.monotonic(), doing

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.timeout_s is None:
            return
        self._stop.set()
        self._trainer, self._stop = trainer, threading.Event()
        self._beat(f"{stage} starting")
        threading.Thread(target=self._watch, args=(self._stop,), name="stall-watchdog", daemon=True).start()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop.set()

    def _watch(self, stop: threading.Event) -> None:
        poll = min(30.0, self.timeout_s / 10)
        while not stop.wait(poll):
            stalled = time.monotonic() - self._last_beat
            if stalled > self.timeout_s:
                last_good = describe_checkpoint(newest_checkpoint(self._trainer))
                print_error(RunStalled(self._doing, stalled, self.timeout_s, last_good))
                sys.stderr.flush()
                end_process(RunStalled.exit_status)  # the main thread cannot be interrupted
                return

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._beat(f"training step {trainer.global_step + 1} (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._beat(f"after training step {trainer.global_step}")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._beat(f"validation batch {batch_idx} (epoch {trainer.current_epoch})")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._beat(f"after validation batch {batch_idx} (epoch {trainer.current_epoch})")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._beat(f"test batch {batch_idx}")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._beat(f"after test batch {batch_idx}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._beat(f"saving a checkpoint at step {trainer.global_step}")
