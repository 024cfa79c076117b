"""Weight gradients on the CPU equal a float64 reference where oneDNN's AVX2 1x1 kernel is wrong
(uxlfoundation/oneDNN#6035, :mod:`cbam.models.onednn_workaround`).

Without the workaround these tests hang, crash or fail on an AVX2-only CPU; on a CPU with AVX-512 they
check oneDNN's AVX2 kernels under ``ONEDNN_MAX_CPU_ISA=AVX2`` (``.ci/run`` runs this file so too).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from cbam import attach, build_resnet
from cbam.data import normalize
from cbam.models.onednn_workaround import ContiguousOnCPUConv2d, avoid_onednn_1x1_bug, is_affected

TOLERANCE = 1e-4  # max abs difference relative to the largest float64 gradient, per parameter


def loader_batch(images: int = 8, size: int = 32) -> torch.Tensor:
    """A batch as the project's loaders give it on a CPU: normalised, NCHW shape, channels_last memory."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, size, size, 3), dtype=torch.uint8, generator=generator)
    batch = normalize(pixels, torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26]))
    assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()
    return batch


def worst_weight_gradient_error(net: nn.Module, batch: torch.Tensor) -> tuple[float, str]:
    """The largest relative error of a parameter's gradient against the same network in float64, and the
    parameter's name. Eval mode: train-mode BatchNorm over a few images of a 4-channel network amplifies
    fp32 rounding past the tolerance, also on NCHW input where oneDNN is right; the convolutions' weight
    gradients, which the bug corrupts, are computed the same way in both modes."""
    net.eval()
    reference = copy.deepcopy(net).double()
    torch.manual_seed(0)
    out = net(batch)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    reference(batch.double()).backward(upstream.double())
    errors = [
        (((p.grad.double() - q.grad).abs().max() / q.grad.abs().max()).item(), name)
        for (name, p), q in zip(net.named_parameters(), reference.parameters())
    ]
    return max(errors)


@pytest.mark.parametrize("in_channels", [3, 4])
@pytest.mark.parametrize("weight_format", [torch.contiguous_format, torch.channels_last])
def test_strided_1x1_convolution_has_float64_weight_gradients(in_channels, weight_format):
    conv = avoid_onednn_1x1_bug(nn.Conv2d(in_channels, 8, 1, stride=2, bias=False))
    conv = conv.to(memory_format=weight_format)  # model.channels_last=true makes the weights channels_last
    batch = loader_batch()[:, :1].repeat(1, in_channels, 1, 1).contiguous(memory_format=torch.channels_last)
    error, _ = worst_weight_gradient_error(conv, batch)
    assert error < TOLERANCE


def _narrow_torchvision_network() -> nn.Module:
    """A network of a user's own: torchvision blocks at 4 channels, with a strided 1x1 shortcut."""
    shortcut = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    block = torchvision.models.resnet.BasicBlock(4, 8, stride=2, downsample=shortcut)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    return nn.Sequential(stem, block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


NETWORKS = {
    "resnet18 width 4": lambda: build_resnet(18, width=4),
    "cbam-resnet18 width 4": lambda: build_resnet(18, width=4, use_cbam_block=True, reduction_ratio=1),
    "resnet50 width 1": lambda: build_resnet(50, width=1),
    "imagenet-stem resnet18 width 4": lambda: build_resnet(18, width=4, stem="imagenet"),
    "attached user network": lambda: attach(_narrow_torchvision_network(), "cbam", reduction_ratio=1),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_narrow_networks_have_float64_weight_gradients(name):
    net = NETWORKS[name]()
    assert any(isinstance(m, ContiguousOnCPUConv2d) for m in net.modules())  # the case the bug bites
    error, parameter = worst_weight_gradient_error(net, loader_batch(size=64 if "imagenet" in name else 32))
    assert error < TOLERANCE, f"{parameter}: {error:.2e}"


def test_only_narrow_strided_1x1_convolutions_are_changed():
    assert is_affected(nn.Conv2d(7, 8, 1, stride=2)) and is_affected(nn.Conv2d(16, 16, 1, stride=(1, 2), groups=4))
    for conv in (nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, stride=2)):
        assert not is_affected(conv)
    for width in (8, 16, 64):  # the widths people train run every convolution exactly as before
        assert not any(isinstance(m, ContiguousOnCPUConv2d) for m in build_resnet(18, width=width).modules())
    narrow = build_resnet(18, width=4)
    swapped = [name for name, m in narrow.named_modules() if isinstance(m, ContiguousOnCPUConv2d)]
    assert swapped == ["stages.1.0.shortcut.0"]  # 4 -> 8 channels, stride 2; the next ones have 8 and 16
    # The same parameters, keys and results as nn.Conv2d.
    plain = nn.Conv2d(4, 8, 1, stride=2)
    guarded = avoid_onednn_1x1_bug(copy.deepcopy(plain))
    assert type(guarded) is ContiguousOnCPUConv2d and guarded.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(guarded(x), plain(x))
