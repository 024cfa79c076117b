"""A workaround for oneDNN's AVX2 1x1-convolution bug (uxlfoundation/oneDNN#6035), which torch 2.14 ships.

oneDNN's AVX2 kernel for the weight gradient of a 1x1 convolution writes past its workspace when the
input or the weight is channels_last, the stride is above 1 and there are fewer than 8 input channels per
group (its block on AVX2). Depending on the machine and the thread count that gives silently wrong weight
gradients (10-130 % off), a segfault, heap corruption or a hang. CPUs with AVX-512 run other kernels and
are not affected; ``ONEDNN_MAX_CPU_ISA=AVX2``, set before torch is imported, runs the AVX2 ones there.

The CPU batches of this project are channels_last, so the ResNets' first strided shortcut has such a
convolution below ``width=8`` (a Bottleneck ResNet at ``width=1``); the Wide ResNets' have 16 or more input
channels, torchvision's ResNets 64 or more. Measured on an AVX2 CPU with torch
2.14.1 (kernels 1, 3 and 7, strides 1-4, 1-32 input channels, both memory formats, fp32 and bf16): only
the 1x1, stride > 1, fewer than 8 input channels, fp32 cases were wrong. Those convolutions run on
contiguous (NCHW) tensors on the CPU, where oneDNN takes another kernel; the others are left alone, so the
widths people train (every shortcut has 8 or more input channels) run exactly as before.

``python benchmarks/onednn_1x1_check.py`` runs the unguarded convolutions on oneDNN's AVX2 kernels (in
child processes: they may crash or hang) and says whether this torch still has the bug; remove this module
once it says no.
"""

from __future__ import annotations

import torch
from torch import nn

#: oneDNN's channel block on AVX2: 1x1 strided convolutions with fewer input channels per group are affected
AVX2_CHANNEL_BLOCK = 8


def is_affected(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution whose CPU weight gradient the bug can corrupt."""
    return (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == (1, 1)
        and any(stride > 1 for stride in conv.stride)
        and conv.in_channels // conv.groups < AVX2_CHANNEL_BLOCK
    )


def _nchw(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with NCHW strides. Not ``contiguous()``: a channels_last tensor with 1x1 spatial size (a
    1x1 weight) counts as contiguous and is returned as it is, and oneDNN still reads its strides as NHWC."""
    if tensor.stride() == torch.empty(tensor.shape, device="meta").stride():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class ContiguousOnCPUConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs on NCHW input and weight on the CPU: the same parameters, state_dict keys and
    results, through a oneDNN kernel without the bug. Elsewhere it is ``nn.Conv2d``."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if input.device.type == "cpu":
            input, weight = _nchw(input), _nchw(weight)
        return super()._conv_forward(input, weight, bias)


def avoid_onednn_1x1_bug(model: nn.Module) -> nn.Module:
    """``model`` with each affected ``nn.Conv2d`` (:func:`is_affected`) made a :class:`ContiguousOnCPUConv2d`
    in place (its class is swapped, as ``torch.nn.utils.parametrize`` does: parameters, hooks and keys stay);
    returns ``model``. The builders of this project call it; call it on a network of your own that has
    narrow strided 1x1 convolutions and trains on a CPU."""
    for module in model.modules():
        if type(module) is nn.Conv2d and is_affected(module):
            module.__class__ = ContiguousOnCPUConv2d
    return model

