"""Per-step learning-rate schedules; each takes the optimizer and the run's total number of steps.

The schedules with a shape over the run (warm-up + cosine, one-cycle) keep their length in their state,
and refuse to resume from a checkpoint whose schedule had another length: a resumed run with a larger
``trainer.max_epochs`` would otherwise jump to another curve (cosine) or fail part-way (one-cycle).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from cbam.arguments import check_number
from cbam.errors import ScheduleLengthChanged


def _check_length(state: dict, total_steps: int) -> None:
    saved = state.get("total_steps")
    if saved is not None and saved != total_steps:
        raise ScheduleLengthChanged(saved, total_steps)


class FixedLengthLambdaLR(LambdaLR):
    """LambdaLR whose state records ``total_steps`` (LambdaLR saves its attributes) and checks it on load."""

    def __init__(self, optimizer: Optimizer, factor, total_steps: int) -> None:
        self.total_steps = total_steps
        super().__init__(optimizer, factor)

    def load_state_dict(self, state_dict: dict) -> None:
        _check_length(state_dict, self.total_steps)
        super().load_state_dict(state_dict)


class FixedLengthOneCycleLR(OneCycleLR):
    """OneCycleLR that refuses a saved state of another length (torch would take the saved length and
    fail once the new run steps past it)."""

    def load_state_dict(self, state_dict: dict) -> None:
        _check_length(state_dict, self.total_steps)
        super().load_state_dict(state_dict)


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.0, final_lr_ratio: float = 0.0
) -> FixedLengthLambdaLR:
    """Linear warm-up from 0 over ``warmup_fraction`` of the steps, then cosine decay to
    ``final_lr_ratio`` times the base learning rate."""
    check_number("warmup_fraction", warmup_fraction, minimum=0.0, below=1.0)
    check_number("final_lr_ratio", final_lr_ratio, minimum=0.0, maximum=1.0)
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return FixedLengthLambdaLR(optimizer, factor, total_steps)


def one_cycle(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.25,
    start_lr_ratio: float = 0.04,
    final_lr_ratio: float = 1e-4,
) -> FixedLengthOneCycleLR:
    """torch's one-cycle policy peaking at the optimizer's learning rate after ``warmup_fraction`` of
    the steps, with linear ramps and the optimizer's momentum left alone."""
    check_number("warmup_fraction", warmup_fraction, above=0.0, below=1.0)
    # (torch divides by both ratios: neither may be 0)
    check_number("start_lr_ratio", start_lr_ratio, above=0.0, maximum=1.0)
    check_number("final_lr_ratio", final_lr_ratio, above=0.0, maximum=1.0)
    peak = [group["lr"] for group in optimizer.param_groups]
    # torch divides by the number of steps of each phase minus one: keep both phases >= 2 steps long.
    if total_steps >= 4:
        warmup_fraction = min(max(warmup_fraction, 2 / total_steps), 1 - 2 / total_steps)
    return FixedLengthOneCycleLR(
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
    """The optimizer's learning rate throughout (any length: a resumed run may train longer)."""
    return LambdaLR(optimizer, lambda step: 1.0)
