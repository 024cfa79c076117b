"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018).

By default the layer equals the authors' released code (github.com/Jongchan/attention-module,
``MODELS/cbam.py``): a channel gate whose MLP is shared by the average- and max-pooled descriptors,
followed by a spatial gate made of a k x k convolution (no bias) and a BatchNorm over the stacked
channel-wise max and mean maps.
"""

from __future__ import annotations

import torch
from torch import nn


def _check_arguments(channels: int, reduction_ratio: int, kernel_size: int) -> None:
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if not 1 <= reduction_ratio <= channels:
        raise ValueError(
            f"reduction_ratio must be between 1 and channels ({channels}), got {reduction_ratio}"
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size}")


class ChannelAttention(nn.Module):
    """Channel gate: ``x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one shared MLP.

    Args:
        channels: number of input channels C.
        reduction_ratio: the MLP's hidden size is ``C // reduction_ratio``.
    """

    def __init__(self, channels: int, reduction_ratio: int = 16) -> None:
        super().__init__()
        _check_arguments(channels, reduction_ratio, 1)
        hidden = channels // reduction_ratio  # >= 1, since reduction_ratio <= channels
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights, shape (N, C, 1, 1), values in (0, 1)."""
        # Both descriptors go through the MLP as one batch of 2N rows. (amax, unlike the authors' max
        # pooling, shares the gradient among exactly tied maxima; it fuses under torch.compile, where
        # max pooling with indices ran 1.6x slower on an H100.)
        descriptors = torch.cat((x.mean(dim=(2, 3)), x.amax(dim=(2, 3))), dim=0)
        avg_out, max_out = self.mlp(descriptors).chunk(2, dim=0)
        return torch.sigmoid(avg_out + max_out)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class MapBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d(1)`` computed with whole-tensor reductions: the same numbers, parameters, buffers
    and state_dict keys.

    Batch-norm kernels spread their work over channels; with a single channel a training step runs each
    of them on a handful of GPU blocks, which made the spatial gate the slowest part of a CBAM block.
    """

    def __init__(self, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(1, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        values = x.float()
        var, mean = torch.var_mean(values, correction=0)
        with torch.no_grad():  # the running estimates use the unbiased variance, as BatchNorm2d does
            count = values.numel()
            self.running_mean.lerp_(mean.reshape(1), self.momentum)
            self.running_var.lerp_((var * count / max(count - 1, 1)).reshape(1), self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return ((values - mean) * scale + self.bias).to(x.dtype)


class SpatialAttention(nn.Module):
    """Spatial gate: ``x * sigmoid(BN(conv_k([max_c(x), mean_c(x)])))``.

    The max map comes first, as in the authors' ``ChannelPool``; the BatchNorm (:class:`MapBatchNorm`)
    uses their ``momentum=0.01``.

    Args:
        kernel_size: odd size k of the k x k convolution.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        _check_arguments(1, 1, kernel_size)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = MapBatchNorm(eps=1e-5, momentum=0.01)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map, shape (N, 1, H, W), values in (0, 1)."""
        pooled = torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Channel attention followed by spatial attention; the output has the input's shape.

    Args:
        channels: number of input channels C.
        reduction_ratio: channel-MLP reduction r (hidden size ``C // r``), ``1 <= r <= C``.
        kernel_size: odd spatial-attention kernel size k >= 1.
    """

    def __init__(self, channels: int, reduction_ratio: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        _check_arguments(channels, reduction_ratio, kernel_size)
        self.channel = ChannelAttention(channels, reduction_ratio)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
