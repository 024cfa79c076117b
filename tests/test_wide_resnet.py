"""The CIFAR Wide ResNets: the published sizes, attention in the blocks, one training step, bad depths."""

from __future__ import annotations

import pytest
import torch

from cbam.errors import InvalidArgument
from cbam.models.cbam import CBAM, CBAMOptions
from cbam.models.eca import ECA, ECAOptions
from cbam.models.wide_resnet import build_wide_resnet


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth, widen_factor, expected", [(28, 10, 36_479_194), (16, 8, 10_961_370)])
def test_wide_resnets_have_the_published_parameter_counts(depth, widen_factor, expected):
    with torch.device("meta"):  # sizes only: no memory, no initialisation
        assert parameters(build_wide_resnet(depth, widen_factor)) == expected


def test_cbam_in_every_block_adds_the_layers_parameters():
    r, k = 16, 7
    with torch.device("meta"):
        plain = parameters(build_wide_resnet(16, 8))
        attended = build_wide_resnet(16, 8, use_cbam_block=True)
    widths = [128] * 2 + [256] * 2 + [512] * 2  # (16 - 4) / 6 = 2 blocks per group, widths 16k, 32k, 64k
    expected = sum(2 * c * (c // r) + c // r + c + 2 * k * k + 2 for c in widths)
    assert sum(isinstance(m, CBAM) for m in attended.modules()) == 6
    assert parameters(attended) - plain == expected


def test_a_small_wide_resnet_with_eca_trains_one_step_and_keeps_its_output_shape():
    torch.manual_seed(0)
    net = build_wide_resnet(
        10, 1, num_classes=7, use_cbam_block=True, use_cbam_class=True, attention=ECAOptions()
    )
    assert sum(isinstance(m, ECA) for m in net.modules()) == 3 + 1
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and net(images).shape == (4, 7)
    assert all(m.conv.weight.grad is not None for m in net.modules() if isinstance(m, ECA))


def test_the_projection_shortcut_sees_the_activated_input():
    net = build_wide_resnet(10, 2, attention=CBAMOptions()).eval()
    block = net.stages[1][0]  # width 16k -> 32k, stride 2: a projection
    x = torch.randn(2, 32, 8, 8)
    activated = block.relu(block.bn1(x))
    branch = block.conv2(block.relu(block.bn2(block.conv1(activated))))
    torch.testing.assert_close(block(x), branch + block.shortcut(activated))


@pytest.mark.parametrize("depth", [12, 27, 4, True])
def test_a_depth_that_is_not_6n_plus_4_is_one_clear_error(depth):
    with pytest.raises(InvalidArgument, match=r"depth=.*6n \+ 4"):
        build_wide_resnet(depth, 2)
