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
        # Both descriptors go through the MLP as one batch of 2N rows: one matmul pair instead of two.
        descriptors = torch.cat((x.mean(dim=(2, 3)), x.amax(dim=(2, 3))), dim=0)
        avg_out, max_out = self.mlp(descriptors).chunk(2, dim=0)
        return torch.sigmoid(avg_out + max_out)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SpatialAttention(nn.Module):
    """Spatial gate: ``x * sigmoid(BN(conv_k([max_c(x), mean_c(x)])))``.

    The max map comes first, as in the authors' ``ChannelPool``; the BatchNorm uses their
    ``momentum=0.01``.

    Args:
        kernel_size: odd size k of the k x k convolution.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        _check_arguments(1, 1, kernel_size)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

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
