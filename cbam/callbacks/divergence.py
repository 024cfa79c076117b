"""A NaN/inf training loss stops the run with one line; the diverged state is never saved."""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from cbam.arguments import check_integer
from cbam.errors import TrainingDiverged
from cbam.runtime.checkpoints import newest_checkpoint


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
        check_integer(
            "check_every_n_steps",
            check_every_n_steps,
            1,
            null_ok=True,
            null_means="every step on the CPU, every trainer.log_every_n_steps steps on a GPU",
        )
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
