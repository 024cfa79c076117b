"""Per-step learning-rate schedules; each takes the optimizer and the run's total number of steps."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.0, final_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_fraction`` of the steps, then cosine decay to
    ``final_lr_ratio`` times the base learning rate."""
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def one_cycle(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.25,
    start_lr_ratio: float = 0.04,
    final_lr_ratio: float = 1e-4,
) -> OneCycleLR:
    """torch's one-cycle policy peaking at the optimizer's learning rate after ``warmup_fraction`` of
    the steps, with linear ramps and the optimizer's momentum left alone."""
    peak = [group["lr"] for group in optimizer.param_groups]
    # torch divides by the number of steps of each phase minus one: keep both phases >= 2 steps long.
    if total_steps >= 4:
        warmup_fraction = min(max(warmup_fraction, 2 / total_steps), 1 - 2 / total_steps)
    return OneCycleLR(
        optimizer,
        max_lr=peak,
        total_steps=total_steps,
        pct_start=warmup_fraction,
        anneal_strategy="linear",
        cycle_momentum=False,
        div_factor=1 / start_lr_ratio,
        final_div_factor=start_lr_ratio / final_lr_ratio,
    )


def constant(optimizer: Optimizer, total_steps: int) -> LambdaLR:
    """The optimizer's learning rate throughout."""
    return LambdaLR(optimizer, lambda step: 1.0)
