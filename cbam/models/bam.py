"""BAM: Bottleneck Attention Module (Park, Woo, Lee, Kweon, BMVC 2018).

``F + F * M(F)`` with ``M(F) = sigmoid(Mc(F) + Ms(F))``, the channel logits Mc (N, C, 1, 1) and the spatial
logits Ms (N, 1, H, W) broadcast to (N, C, H, W). The branches have the shapes of the authors' released code
(github.com/Jongchan/attention-module, ``MODELS/bam.py``):

* channel: global average pool, ``Linear(C, C/r)``, ``BatchNorm1d``, ReLU, ``Linear(C/r, C)``;
* spatial: 1x1 conv ``C -> C/r``, BN, ReLU, then two 3x3 convolutions of dilation d (``C/r -> C/r``), each
  with BN and ReLU, then a 1x1 conv ``C/r -> 1``.

The released code and the paper differ in two places; the defaults follow the paper, the switches give the
released code:

* ``branch_norm``: the paper's Eqs. (3) and (4) end each branch with a BatchNorm (so that the two logits
  are on one scale before they are added); the released code has none;
* ``combine``: the paper adds the logits (Eq. (2), the best of its Table 2 "combining methods"); the
  released code multiplies them; ``max`` is the third method of that table.

So ``BAMOptions(combine="product", branch_norm=False)`` is the released code's layer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from cbam.arguments import check_choice, check_flag, check_integer

COMBINES = ("sum", "product", "max")


def _check_reduction_ratio(reduction_ratio: int, channels: int) -> None:
    check_integer("channels", channels, 1)
    check_integer("reduction_ratio", reduction_ratio, 1, channels, maximum_is="the channels of this BAM")


@dataclass(frozen=True)
class BAMOptions:
    """What a :class:`BAM` is made of besides its channel count, checked on construction.

    Args:
        reduction_ratio: both branches' reduction r (hidden size ``C // r``), ``1 <= r <= C``.
        dilation: dilation d of the spatial branch's two 3x3 convolutions.
        combine: how the two logits make one: ``sum`` (the paper), ``product`` (the released code) or ``max``.
        branch_norm: a BatchNorm at the end of each branch (the paper; the released code has none).
    """

    kind: ClassVar[str] = "bam"
    #: BAM goes between stages (the stage boundaries of BAM's paper), not in every block
    between_stages: ClassVar[bool] = True

    reduction_ratio: int = 16
    dilation: int = 4
    combine: str = "sum"
    branch_norm: bool = True

    def __post_init__(self) -> None:
        check_integer("reduction_ratio", self.reduction_ratio, 1)
        check_integer("dilation", self.dilation, 1)
        check_choice("combine", self.combine, COMBINES)
        check_flag("branch_norm", self.branch_norm)

    def build(self, channels: int) -> BAM:
        """The layer for ``channels`` input channels."""
        return BAM(channels, options=self)


class BAMChannelGate(nn.Module):
    """The channel logits Mc(F), shape (N, C, 1, 1) (training needs N > 1: a BatchNorm1d over the batch)."""

    def __init__(self, channels: int, reduction_ratio: int = 16, branch_norm: bool = True) -> None:
        super().__init__()
        hidden = channels // reduction_ratio
        layers = OrderedDict(
            fc_reduce=nn.Linear(channels, hidden),
            bn_reduce=nn.BatchNorm1d(hidden),
            relu=nn.ReLU(inplace=True),
            fc_expand=nn.Linear(hidden, channels),
        )
        if branch_norm:
            layers["bn_out"] = nn.BatchNorm1d(channels)
        self.mlp = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.mean(dim=(2, 3)))[:, :, None, None]


class BAMSpatialGate(nn.Module):
    """The spatial logits Ms(F), shape (N, 1, H, W)."""

    def __init__(
        self, channels: int, reduction_ratio: int = 16, dilation: int = 4, branch_norm: bool = True
    ) -> None:
        super().__init__()
        hidden = channels // reduction_ratio
        layers = OrderedDict(
            conv_reduce=nn.Conv2d(channels, hidden, 1),
            bn_reduce=nn.BatchNorm2d(hidden),
            relu_reduce=nn.ReLU(inplace=True),
        )
        for index in range(2):
            layers[f"conv_dilated{index}"] = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
            layers[f"bn_dilated{index}"] = nn.BatchNorm2d(hidden)
            layers[f"relu_dilated{index}"] = nn.ReLU(inplace=True)
        layers["conv_final"] = nn.Conv2d(hidden, 1, 1)
        if branch_norm:
            layers["bn_out"] = nn.BatchNorm2d(1)
        self.convs = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class BAM(nn.Module):
    """Bottleneck attention; the output has the input's shape.

    Args:
        channels: number of input channels C.
        options: a :class:`BAMOptions` (default: the paper's layer).
    """

    def __init__(self, channels: int, options: BAMOptions | None = None) -> None:
        super().__init__()
        options = options if options is not None else BAMOptions()
        _check_reduction_ratio(options.reduction_ratio, channels)
        self.options = options
        self.channel_gate = BAMChannelGate(channels, options.reduction_ratio, options.branch_norm)
        self.spatial_gate = BAMSpatialGate(
            channels, options.reduction_ratio, options.dilation, options.branch_norm
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The attention M(F), shape (N, C, H, W), values in (0, 1)."""
        channel, spatial = self.channel_gate(x), self.spatial_gate(x)
        if self.options.combine == "sum":
            logits = channel + spatial
        elif self.options.combine == "product":
            logits = channel * spatial
        else:
            logits = torch.maximum(channel, spatial)
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * self.gate(x)
