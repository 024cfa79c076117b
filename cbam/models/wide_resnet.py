"""Wide ResNets for CIFAR (Zagoruyko and Komodakis, BMVC 2016): WRN-d-k, pre-activation, with attention where
asked.

A 3x3 stem of 16 channels, three groups of ``(d - 4) / 6`` blocks of width 16k, 32k and 64k (strides 1, 2, 2),
then BatchNorm, ReLU, global average pooling and the classifier. Each block is
``conv3x3(relu(bn(conv3x3(relu(bn(x)))))) + shortcut(x)``, the shortcut a 1x1 convolution where the width or
the stride changes; convolutions have no bias. The attention (any options object with ``build(channels)``:
CBAM, SE, ECA) goes on the residual branch's output, before the addition, as in CBAM's Fig. 3.
"""

from __future__ import annotations

import torch
from torch import nn

from cbam.arguments import check_flag, check_integer, check_number
from cbam.errors import InvalidArgument
from cbam.models.attention_options import (
    AttentionFactory,
    AttentionOptions,
    attention_factories,
    stages_followed,
)
from cbam.models.cbam import CBAMOptions


class WideBlock(nn.Module):
    """A pre-activation wide block: ``attention(branch(x)) + shortcut(x)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        dropout: float,
        attention: AttentionFactory | None,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.attention = attention(out_channels) if attention else nn.Identity()
        self.projects = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if self.projects
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.bn1(x))
        # Where the shape changes, the shortcut sees the activated input, as in the authors' code.
        shortcut = self.shortcut(activated) if self.projects else x
        branch = self.conv1(activated)
        branch = self.conv2(self.dropout(self.relu(self.bn2(branch))))
        return self.attention(branch) + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 images; see :func:`build_wide_resnet`."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        dropout: float,
        block_attention: AttentionFactory | None,
        stage_attention: AttentionFactory | None,
        classifier_attention: AttentionFactory | None,
    ) -> None:
        super().__init__()
        blocks_per_group = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        groups, in_channels = [], 16  # (group, its width)
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = nn.Sequential()
            for index in range(blocks_per_group):
                blocks.append(
                    WideBlock(in_channels, width, stride if index == 0 else 1, dropout, block_attention)
                )
                in_channels = width
            groups.append((blocks, width))
        if stage_attention:
            for blocks, width in stages_followed(groups):
                blocks.add_module("attention", stage_attention(width))
        self.stages = nn.Sequential(*(blocks for blocks, _ in groups))
        self.final = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        self.attention = classifier_attention(in_channels) if classifier_attention else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.attention(self.final(self.stages(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(features), 1))


def build_wide_resnet(
    depth: int = 28,
    widen_factor: int = 10,
    *,
    num_classes: int = 10,
    dropout: float = 0.0,
    use_cbam_block: bool = False,
    use_cbam_class: bool = False,
    attention: AttentionOptions | None = None,
) -> WideResNet:
    """WRN-``depth``-``widen_factor``: ``depth`` = 6n + 4 (16, 22, 28, 40, ...); ``attention`` is the layer's
    options object (default: the authors' CBAM), placed in every block (a BAM: after the first two groups)
    and/or before the classifier."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise InvalidArgument(
            "depth", depth, "a Wide ResNet's depth is 6n + 4 with n >= 1: 10, 16, 22, 28, 40, ..."
        )
    check_integer("widen_factor", widen_factor, 1)
    check_integer("num_classes", num_classes, 1)
    check_number("dropout", dropout, minimum=0.0, below=1.0)
    check_flag("use_cbam_block", use_cbam_block)
    check_flag("use_cbam_class", use_cbam_class)
    attention = attention if attention is not None else CBAMOptions()
    return WideResNet(
        depth,
        widen_factor,
        num_classes,
        dropout,
        **attention_factories(attention, use_cbam_block, use_cbam_class),
    )
