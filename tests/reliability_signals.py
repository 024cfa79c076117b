"""Test-only Lightning callback for tests/test_reliability.py: the training process signals itself after
given training steps (SIGKILL: a crash; SIGTERM: a preemption; SIGUSR1: SLURM's requeue warning), and
records the global step it started training from.

Enabled in a train.py subprocess with ``+callbacks.signals._target_=reliability_signals.SignalAtSteps``
and ``tests/`` on PYTHONPATH. It runs before the checkpoint callbacks of the same step (Lightning calls
checkpoint callbacks last), so a SIGKILL at step k loses step k: the run resumes from an earlier save.
"""

from __future__ import annotations

import os
import signal

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
