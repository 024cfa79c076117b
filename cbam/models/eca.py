"""ECA: Efficient Channel Attention (Wang et al., CVPR 2020, "ECA-Net").

``x * sigmoid(conv1d_k(avgpool(x)))``: the channel descriptor goes through one 1D convolution of odd size k
across the channels (no bias, no dimensionality reduction), so the layer has k parameters. The layer is the
authors' ``eca_layer`` (github.com/BangguWu/ECANet, ``models/eca_module.py``); with ``kernel_size=None``, k
follows from the channel count by the paper's Eq. (12), :func:`eca_kernel_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from cbam.arguments import check_integer


def _check_gamma_b(gamma: int, b: int) -> None:
    check_integer("gamma", gamma, 1)
    check_integer("b", b)


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The paper's adaptive kernel size, Eq. (12): ``|log2(C) / gamma + b / gamma|`` made odd.

    As the authors compute it: ``t = int(abs((log2(C) + b) / gamma))``, then ``t`` if odd, else ``t + 1``
    (so C = 64, 128, 256, 512, 1024, 2048 give 3, 5, 5, 5, 5, 7 with gamma=2, b=1).
    """
    check_integer("channels", channels, 1)
    _check_gamma_b(gamma, b)
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@dataclass(frozen=True)
class ECAOptions:
    """What an :class:`ECA` is made of besides its channel count, checked on construction.

    Args:
        kernel_size: odd size k of the 1D convolution; None picks it from the channel count
            (:func:`eca_kernel_size`).
        gamma, b: the constants of the adaptive kernel size (the paper's gamma=2, b=1).
    """

    kind: ClassVar[str] = "eca"
    #: in every residual block, not between stages
    between_stages: ClassVar[bool] = False

    kernel_size: int | None = None
    gamma: int = 2
    b: int = 1

    def __post_init__(self) -> None:
        check_integer("kernel_size", self.kernel_size, 1, odd=True, null_ok=True, null_means="adaptive")
        _check_gamma_b(self.gamma, self.b)

    def kernel_size_for(self, channels: int) -> int:
        """The kernel size the layer for ``channels`` channels gets."""
        if self.kernel_size is not None:
            return self.kernel_size
        return eca_kernel_size(channels, self.gamma, self.b)

    def build(self, channels: int) -> ECA:
        """The layer for ``channels`` input channels."""
        return ECA(channels, options=self)


class ECA(nn.Module):
    """Efficient channel attention; the output has the input's shape.

    Args:
        channels: number of input channels C.
        options: an :class:`ECAOptions` (default: the adaptive kernel size).
    """

    def __init__(self, channels: int, options: ECAOptions | None = None) -> None:
        super().__init__()
        options = options if options is not None else ECAOptions()
        self.options = options
        self.kernel_size = options.kernel_size_for(channels)
        self.conv = nn.Conv1d(1, 1, self.kernel_size, padding=(self.kernel_size - 1) // 2, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights of ``x``, shape (N, C, 1, 1), values in (0, 1)."""
        descriptor = x.mean(dim=(2, 3))  # (N, C)
        # The channels are the 1D convolution's length axis: (N, 1, C).
        return torch.sigmoid(self.conv(descriptor.unsqueeze(1))).squeeze(1)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)
