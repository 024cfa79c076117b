"""Test-only Lightning callbacks for tests/test_reliability.py and tests/test_dead_process.py: a training
process signals itself after given training steps, or SIGKILLs a process of its run at a named moment.

Enabled in a train.py subprocess with ``+callbacks.signals._target_=reliability_signals.SignalAtSteps`` (or
``KillAt``) and ``tests/`` on PYTHONPATH. They run before the checkpoint callbacks of the same hook (Lightning
calls checkpoint callbacks last), so a kill at the end of step k loses step k: the run resumes from an
earlier save.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from pytorch_lightning.callbacks import Callback


class SignalAtSteps(Callback):
    """Send ``signals[i]`` to this process at the end of global step ``steps[i]`` (only in the process of
    DDP rank ``rank``, when given); append the global step of the first training batch to the file
    ``record`` (when given)."""

    def __init__(
        self,
        steps: list[int] = (),
        signals: list[str] = (),
        record: str | None = None,
        rank: int | None = None,
    ) -> None:
        if len(steps) != len(signals):
            raise ValueError("steps and signals must have the same length")
        self.plan = {int(step): getattr(signal, name) for step, name in zip(steps, signals)}
        self.record, self.rank = record, rank
        self._recorded = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.record and not self._recorded:
            self._recorded = True
            with open(self.record, "a") as handle:
                handle.write(f"{trainer.global_step}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self.plan.get(trainer.global_step)
        if signum is not None and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signum)


def _children(pid: int) -> list[int]:
    """The pids of the live processes whose parent is ``pid`` (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


class KillAt(Callback):
    """SIGKILL, at ``moment``, the process of DDP rank ``rank`` (``target="self"``) or its first child process
    (``target="child"``: for rank 0 at ``launched``, the process of rank 1; for another rank, its first
    DataLoader worker), and write the time of the kill (``time.time()``) to the file ``record``.

    Moments: ``launched`` (rank 0 has started the other processes, which are starting up),
    ``train_batch_end:<global step>``, ``validation_start:<epoch>`` (the validation at the end of that
    epoch, after its last training step), ``train_epoch_start:<epoch>``, ``save_checkpoint:<global step>``
    (a checkpoint of that step is being saved: rank 0 writes it, the others wait for it).
    """

    def __init__(self, moment: str, rank: int = 0, target: str = "self", record: str | None = None) -> None:
        self.hook, _, value = moment.partition(":")
        self.value = int(value) if value else None
        self.rank, self.target, self.record = rank, target, record
        if self.hook == "launched" and rank == 0 == int(os.environ.get("LOCAL_RANK", "0")):
            threading.Thread(target=self._kill_once_launched, daemon=True).start()

    def _kill_once_launched(self) -> None:
        while not _children(os.getpid()):
            time.sleep(0.05)
        self._kill()

    def _kill(self) -> None:
        victim = os.getpid() if self.target == "self" else _children(os.getpid())[0]
        if self.record:
            Path(self.record).write_text(f"{time.time()}\n")
        os.kill(victim, signal.SIGKILL)

    def _at(self, trainer, hook: str, value: int) -> None:
        if hook == self.hook and value == self.value and trainer.global_rank == self.rank:
            self._kill()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._at(trainer, "train_batch_end", trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._at(trainer, "validation_start", trainer.current_epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._at(trainer, "train_epoch_start", trainer.current_epoch)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._at(trainer, "save_checkpoint", trainer.global_step)


class SignalOnce(Callback):
    """Send ``signal_name`` to this process at the end of global step ``step`` of the run whose dir name contains
    ``only_in``, unless the file ``marker`` exists (which it then writes: a re-run is not signalled again).
    Appends ``<run dir name> <global step of the first training batch>`` to the file ``record``."""

    def __init__(self, step: int, signal_name: str, marker: str, record: str, only_in: str = "") -> None:
        self.step, self.signum, self.marker, self.record = (
            int(step),
            getattr(signal, signal_name),
            marker,
            record,
        )
        self.only_in = only_in
        self._recorded = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._recorded:
            self._recorded = True
            with open(self.record, "a") as handle:
                handle.write(f"{Path(trainer.default_root_dir).name} {trainer.global_step}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        chosen = self.only_in in Path(trainer.default_root_dir).name
        if chosen and trainer.global_step == self.step and not os.path.exists(self.marker):
            Path(self.marker).write_text("signalled\n")
            os.kill(os.getpid(), self.signum)
