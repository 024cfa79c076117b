"""A BatchNorm's running statistics moved by one batch, as ``nn.BatchNorm2d`` moves them: shared by the
reference spatial gate (:class:`cbam.models.cbam.MapBatchNorm`) and the fused layer under torch.compile
(whose library op returns the batch statistics instead of moving them)."""

from __future__ import annotations

import torch


@torch.no_grad()
def move_running_statistics(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batches_tracked: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """Move the running estimates towards the batch's ``mean`` and the unbiased variance of its ``count``
    values (``variance`` is the biased one, the batch statistics' own), and count the batch."""
    unbiased = variance * count / max(count - 1, 1)
    running_mean.lerp_(mean.to(running_mean.dtype).reshape(running_mean.shape), momentum)
    running_var.lerp_(unbiased.to(running_var.dtype).reshape(running_var.shape), momentum)
    batches_tracked.add_(1)
