"""Test-only pieces for tests/test_faults.py and tests/test_ddp_eval.py: a file that fills up like a full disk,
a training step that hangs, and two Lightning callbacks enabled in a train.py subprocess with ``+callbacks.<name>._target_=fault_callbacks.<Class>`` (``tests/`` on
PYTHONPATH): one makes every checkpoint written from a given step on fail as on a full disk (where no small
file system can be mounted), one records, on every DDP rank, which process holds the run dir's lock.
"""

from __future__ import annotations

import errno
import os
import threading

import torch
from pytorch_lightning.callbacks import Callback

from cbam.errors import RunDirInUse
from cbam.runtime.run_dir_lock import RunDirLock


class FillsUp:
    """A binary file that takes ``room`` more bytes, then fails every write as a full disk does."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exception) -> None:
        self.file.close()


class FullDiskFrom(Callback):
    """From the end of global step ``step`` on, ``torch.save`` in this process writes through :class:`FillsUp`
    (4 KB of room): torch's zip writer meets ENOSPC as on a real full disk. Runs before the checkpoint
    callbacks of the same step (Lightning calls those last)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            save = torch.save
            torch.save = lambda obj, file, *args, **kwargs: save(obj, FillsUp(file, 4096), *args, **kwargs)


class RecordRunDirHolder(Callback):
    """When the trainer sets up (fit or test, on every DDP rank), try to take the run dir's lock as a second
    process would and append ``<global rank> <pid> <parent pid> <refusal message>`` to the file ``record``."""

    def __init__(self, record: str) -> None:
        self.record = record

    def setup(self, trainer, pl_module, stage: str) -> None:
        try:
            RunDirLock(trainer.default_root_dir).acquire()
            outcome = "not refused"
        except RunDirInUse as error:
            outcome = str(error)
        with open(self.record, "a") as handle:
            handle.write(f"{trainer.global_rank} {os.getpid()} {os.getppid()} {outcome}\n")


#: set by a test to let :class:`HangAtStep`'s step go on (the watchdog's exit was replaced by a recorder)
hang_released = threading.Event()


class HangAtStep(Callback):
    """Training step ``step + 1`` waits up to ``seconds`` before it starts, without holding the GIL, as a
    native kernel stuck in a loop does (or until :data:`hang_released` is set)."""

    def __init__(self, step: int, seconds: float = 600) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            hang_released.wait(self.seconds)
