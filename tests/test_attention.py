"""CBAM, ChannelAttention and SpatialAttention against an independent re-statement of the paper's
(and the authors' released code's) formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbam import CBAM, ChannelAttention, SpatialAttention


def only(module: nn.Module, kind: type) -> nn.Module:
    found = [m for m in module.modules() if isinstance(m, kind)]
    assert len(found) == 1, f"expected exactly one {kind.__name__} in {module}, found {len(found)}"
    return found[0]


def linears(module: nn.Module) -> list[nn.Linear]:
    found = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert len(found) == 2, f"the channel MLP should have two Linear layers, found {len(found)}"
    return found


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial parameters and BatchNorm statistics, so the comparisons below mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) + 0.5)
    return module


# ------------------------------------------------------------------ the reference: the paper's formulas


def reference_channel(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """M_c = sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x))), MLP = Linear -> ReLU -> Linear, shared."""

    def mlp(v: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(v, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)

    avg = F.avg_pool2d(x, x.shape[2:]).flatten(1)
    mx = F.max_pool2d(x, x.shape[2:]).flatten(1)
    return x * torch.sigmoid(mlp(avg) + mlp(mx)).view(x.shape[0], x.shape[1], 1, 1)


def reference_spatial(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    stats: tuple[torch.Tensor, torch.Tensor],
    training: bool,
) -> torch.Tensor:
    """M_s = sigmoid(BN(conv_kxk([max over channels; mean over channels]))), BN momentum 0.01."""
    pooled = torch.cat([torch.max(x, dim=1, keepdim=True)[0], torch.mean(x, dim=1, keepdim=True)], dim=1)
    y = F.conv2d(pooled, conv.weight, None, padding=conv.kernel_size[0] // 2)
    running_mean, running_var = stats
    y = F.batch_norm(y, running_mean, running_var, bn.weight, bn.bias, training, 0.01, 1e-5)
    return x * torch.sigmoid(y)


def bn_stats(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    return bn.running_mean.clone(), bn.running_var.clone()


# -------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (3, 32, 7, 9), (1, 4, 1, 1)])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_cbam_keeps_the_input_shape(shape, kernel_size):
    cbam = CBAM(shape[1], reduction_ratio=4, kernel_size=kernel_size)
    x = torch.randn(shape)
    # BatchNorm needs more than one value per channel to train: a single 1x1 image is checked in eval only
    for mode in (True, False) if shape[0] * shape[2] * shape[3] > 1 else (False,):
        cbam.train(mode)
        assert cbam(x).shape == x.shape
        assert ChannelAttention(shape[1], 4).train(mode)(x).shape == x.shape
        assert SpatialAttention(kernel_size).train(mode)(x).shape == x.shape


def test_gates_are_strictly_between_zero_and_one():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 8, 8)
    channel, spatial = randomize(ChannelAttention(32, 8)), randomize(SpatialAttention(7), seed=1)
    for module, expected_shape in ((channel, (4, 32, 1, 1)), (spatial, (4, 1, 8, 8))):
        for mode in (True, False):
            gate = module.train(mode).gate(x)
            assert gate.shape == expected_shape
            assert gate.min() > 0 and gate.max() < 1
            # the gate is what the input is multiplied by, and it is not constant
            torch.testing.assert_close(module(x), x * gate)
            assert gate.std() > 1e-3


@pytest.mark.parametrize("training", [True, False])
def test_gradients_reach_the_input_and_every_parameter(training):
    torch.manual_seed(0)
    cbam = randomize(CBAM(16, reduction_ratio=4, kernel_size=3)).train(training)
    x = torch.randn(3, 16, 6, 6, requires_grad=True)
    (cbam(x) * torch.randn(3, 16, 6, 6)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    names = [name for name, _ in cbam.named_parameters()]
    assert len(names) == 4 + 1 + 2  # two Linear (weight, bias), conv weight, BN weight and bias
    for name, parameter in cbam.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: CBAM(16, kernel_size=4), "kernel_size"),
        (lambda: CBAM(16, kernel_size=0), "kernel_size"),
        (lambda: CBAM(16, kernel_size=-3), "kernel_size"),
        (lambda: SpatialAttention(6), "kernel_size"),
        (lambda: SpatialAttention(0), "kernel_size"),
        (lambda: CBAM(16, reduction_ratio=0), "reduction_ratio"),
        (lambda: CBAM(16, reduction_ratio=17), "reduction_ratio"),
        (lambda: ChannelAttention(16, 0), "reduction_ratio"),
        (lambda: ChannelAttention(8, 9), "reduction_ratio"),
        (lambda: ChannelAttention(8, -1), "reduction_ratio"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


@pytest.mark.parametrize("channels, ratio, hidden", [(64, 16, 4), (48, 5, 9), (7, 7, 1), (8, 1, 8)])
def test_channel_mlp_hidden_size_is_channels_over_ratio(channels, ratio, hidden):
    fc1, fc2 = linears(ChannelAttention(channels, ratio))
    assert (fc1.in_features, fc1.out_features) == (channels, hidden)
    assert (fc2.in_features, fc2.out_features) == (hidden, channels)
    assert fc1.bias is not None and fc2.bias is not None
    fc1, fc2 = linears(CBAM(channels, reduction_ratio=ratio))
    assert fc1.out_features == hidden


@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_spatial_conv_has_no_bias_and_bn_uses_momentum_001(kernel_size):
    spatial = SpatialAttention(kernel_size)
    conv, bn = only(spatial, nn.Conv2d), only(spatial, nn.BatchNorm2d)
    assert conv.bias is None
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (2, 1, (kernel_size, kernel_size))
    assert bn.num_features == 1 and bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-5)
    assert only(CBAM(8, 2, kernel_size), nn.BatchNorm2d).momentum == pytest.approx(0.01)


@pytest.mark.parametrize("training", [True, False])
def test_channel_attention_matches_the_formula(training):
    torch.manual_seed(1)
    channel = randomize(ChannelAttention(24, 3)).train(training)
    x = torch.randn(5, 24, 6, 7)
    fc1, fc2 = linears(channel)
    torch.testing.assert_close(channel(x), reference_channel(x, fc1, fc2))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kernel_size", [3, 7])
def test_spatial_attention_matches_the_formula(training, kernel_size):
    torch.manual_seed(2)
    spatial = randomize(SpatialAttention(kernel_size)).train(training)
    conv, bn = only(spatial, nn.Conv2d), only(spatial, nn.BatchNorm2d)
    x = torch.randn(4, 10, 9, 8) * 2 + 0.3
    stats = bn_stats(bn)
    expected = reference_spatial(x, conv, bn, stats, training)  # updates `stats` in training mode
    torch.testing.assert_close(spatial(x), expected)
    # the running statistics move (train) or stay (eval) exactly as with momentum 0.01
    torch.testing.assert_close(bn.running_mean, stats[0])
    torch.testing.assert_close(bn.running_var, stats[1])


@pytest.mark.parametrize("training", [True, False])
def test_cbam_is_spatial_after_channel_and_matches_the_formula(training):
    torch.manual_seed(3)
    cbam = randomize(CBAM(32, reduction_ratio=4, kernel_size=7)).train(training)
    channel, spatial = only(cbam, ChannelAttention), only(cbam, SpatialAttention)
    fc1, fc2 = linears(channel)
    conv, bn = only(spatial, nn.Conv2d), only(spatial, nn.BatchNorm2d)
    x = torch.randn(3, 32, 8, 8)
    stats = bn_stats(bn)
    expected = reference_spatial(reference_channel(x, fc1, fc2), conv, bn, stats, training)
    out = cbam(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(bn.running_mean, stats[0])
    # the other order gives something else: the test above can tell them apart
    swapped = reference_channel(reference_spatial(x, conv, bn, bn_stats(bn), False), fc1, fc2)
    assert not torch.allclose(out, swapped, atol=1e-3)


def test_reference_distinguishes_max_first_from_mean_first():
    """Guards the reference itself: swapping the pooled maps changes the result."""
    torch.manual_seed(4)
    spatial = randomize(SpatialAttention(3)).eval()
    conv, bn = only(spatial, nn.Conv2d), only(spatial, nn.BatchNorm2d)
    x = torch.randn(2, 6, 5, 5)
    flipped = nn.Conv2d(2, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        flipped.weight.copy_(conv.weight.flip(1))
    assert not torch.allclose(spatial(x), reference_spatial(x, flipped, bn, bn_stats(bn), False), atol=1e-4)
