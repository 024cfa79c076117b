"""ResNets with optional CBAM: the CIFAR ResNets (3x3 stem, no max-pool, four stages), after
kuangliu/pytorch-cifar, or with the ImageNet stem of He et al. (7x7 stride 2, 3x3 max-pool).

One generic :class:`ResNet`; the depths are rows of :data:`DEPTHS`, the stems of :data:`STEMS`. With
``width=64`` and no CBAM the parameter counts are the standard ones (CIFAR stem, 10 classes: ResNet18
11,173,962 ... ResNet152 58,156,618; ImageNet stem, 1000 classes: torchvision's, ResNet18 11,689,512).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from cbam.arguments import check_choice, check_flag, check_integer
from cbam.models.attention_options import (
    AttentionFactory,
    AttentionOptions,
    attention_factories,
    stages_followed,
)
from cbam.models.cbam import CBAMOptions
from cbam.models.onednn_workaround import avoid_onednn_1x1_bug

def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class _ResidualBlock(nn.Module):
    """``relu(attention(branch(x)) + shortcut(x))``; subclasses only define the branch's layers."""

    expansion: int = 1

    def __init__(self, in_channels: int, planes: int, stride: int, attention: AttentionFactory | None):
        super().__init__()
        out_channels = planes * self.expansion
        self.branch = nn.Sequential(*self.branch_layers(in_channels, planes, stride))
        # CBAM sits after the branch's last BatchNorm and before the addition, as in the paper (Fig. 3).
        self.attention = attention(out_channels) if attention else nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def branch_layers(self, in_channels: int, planes: int, stride: int) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.attention(self.branch(x)) + self.shortcut(x))


class BasicBlock(_ResidualBlock):
    """Two 3x3 convolutions (ResNet18/34)."""

    expansion = 1

    def branch_layers(self, in_channels: int, planes: int, stride: int) -> list[nn.Module]:
        return [
            *_conv_bn(in_channels, planes, 3, stride),
            nn.ReLU(inplace=True),
            *_conv_bn(planes, planes, 3),
        ]


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4 (ResNet50/101/152)."""

    expansion = 4

    def branch_layers(self, in_channels: int, planes: int, stride: int) -> list[nn.Module]:
        return [
            *_conv_bn(in_channels, planes, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(planes, planes, 3, stride),
            nn.ReLU(inplace=True),
            *_conv_bn(planes, planes * self.expansion, 1),
        ]


#: stem -> its layers, from the image's 3 channels to ``width``: CIFAR's keeps the resolution, ImageNet's
#: divides it by 4 (the paper's ResNets, for images of 64 px and more)
STEMS: dict[str, Callable[[int], list[nn.Module]]] = {
    "cifar": lambda width: [*_conv_bn(3, width, 3), nn.ReLU(inplace=True)],
    "imagenet": lambda width: [
        *_conv_bn(3, width, 7, stride=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    ],
}

#: depth -> (block type, number of blocks in each of the four stages)
DEPTHS: dict[int, tuple[type[_ResidualBlock], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """A ResNet: a stem, four stages (strides 1, 2, 2, 2), global average pool, linear classifier.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        num_blocks: blocks per stage.
        width: channels of the first stage; the stages have ``width * (1, 2, 4, 8)`` planes.
        num_classes: size of the classifier's output.
        block_attention: builds the attention module of every residual block from its channel count.
        stage_attention: builds the attention module that follows every stage but the last (BAM's place).
        classifier_attention: builds the attention module applied to the final feature map.
        stem: a key of :data:`STEMS`.
    """

    def __init__(
        self,
        block: type[_ResidualBlock],
        num_blocks: tuple[int, ...],
        *,
        width: int = 64,
        num_classes: int = 10,
        block_attention: AttentionFactory | None = None,
        stage_attention: AttentionFactory | None = None,
        classifier_attention: AttentionFactory | None = None,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*STEMS[stem](width))
        in_channels = width
        stages = []  # (stage, its output channels)
        for index, blocks in enumerate(num_blocks):
            planes = width * 2**index
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            layers = []
            for stride in strides:
                layers.append(block(in_channels, planes, stride, block_attention))
                in_channels = planes * block.expansion
            stages.append((nn.Sequential(*layers), in_channels))
        if stage_attention:
            for stage, channels in stages_followed(stages):
                stage.add_module("attention", stage_attention(channels))
        self.stages = nn.Sequential(*(stage for stage, _ in stages))
        self.attention = classifier_attention(in_channels) if classifier_attention else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map, after the classifier CBAM (if any) and before pooling."""
        return self.attention(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_resnet(
    depth: int = 18,
    *,
    use_cbam_block: bool = False,
    use_cbam_class: bool = False,
    num_classes: int = 10,
    width: int = 64,
    stem: str = "cifar",
    attention: AttentionOptions | None = None,
    **attention_fields: Any,
) -> ResNet:
    """Build a ResNet of ``depth`` in {18, 34, 50, 101, 152}, with attention where asked.

    Args:
        depth: network depth.
        use_cbam_block: the attention in every residual block, after the branch's last BatchNorm (a BAM:
            after every stage but the last).
        use_cbam_class: the attention on the final feature map, before pooling and the classifier.
        num_classes: number of classes.
        width: channels of the first stage (64 gives the standard networks).
        stem: ``cifar`` (3x3 convolution, stride 1) or ``imagenet`` (7x7 stride 2 and a 3x3 max-pool).
        attention: the attention's options (:class:`AttentionOptions`; default: the authors' CBAM,
            :class:`~cbam.models.cbam.CBAMOptions`), checked even when no attention is placed, so a sweep cannot carry an unusable value unnoticed;
            or its fields as keyword arguments (``build_resnet(50, use_cbam_block=True, reduction_ratio=8)``).
    """
    check_choice("depth", depth, DEPTHS)
    check_integer("width", width, 1)
    check_integer("num_classes", num_classes, 1)
    check_choice("stem", stem, STEMS)
    check_flag("use_cbam_block", use_cbam_block)
    check_flag("use_cbam_class", use_cbam_class)
    if attention is not None and attention_fields:
        raise TypeError("build_resnet takes attention or its fields, not both")
    attention = attention if attention is not None else CBAMOptions(**attention_fields)
    block, num_blocks = DEPTHS[depth]
    network = ResNet(
        block,
        num_blocks,
        width=width,
        num_classes=num_classes,
        **attention_factories(attention, use_cbam_block, use_cbam_class),
        stem=stem,
    )
    return avoid_onednn_1x1_bug(network)  # the first strided shortcut below width 8
