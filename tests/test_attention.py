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


# ------------------------------------------------- the paper's ablations as switches, in float64


def mlp_of(channel: ChannelAttention):
    fc1, fc2 = linears(channel)
    return lambda v: F.linear(F.relu(F.linear(v, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)


def channel_gate_formula(x: torch.Tensor, channel: ChannelAttention, pooling: str) -> torch.Tensor:
    """sigmoid of the shared MLP summed over the chosen descriptors (Table 1)."""
    mlp = mlp_of(channel)
    descriptors = {"avg": [x.mean(dim=(2, 3))], "max": [x.amax(dim=(2, 3))]}
    descriptors["avg_max"] = descriptors["avg"] + descriptors["max"]
    return torch.sigmoid(sum(mlp(d) for d in descriptors[pooling]))[:, :, None, None]


def spatial_gate_formula(
    x: torch.Tensor, spatial: SpatialAttention, pooling: str, training: bool
) -> torch.Tensor:
    """sigmoid(BN(conv_k(maps))): maps = [max_c; mean_c] or a 1x1 convolution across channels (Table 2)."""
    conv, bn = spatial.conv, spatial.bn
    if pooling == "conv":
        maps = F.conv2d(x, spatial.pool.weight)
    else:
        maps = torch.cat([x.max(dim=1, keepdim=True)[0], x.mean(dim=1, keepdim=True)], dim=1)
    y = F.conv2d(maps, conv.weight, None, padding=conv.kernel_size[0] // 2)
    stats = bn_stats(bn)
    y = F.batch_norm(y, stats[0], stats[1], bn.weight, bn.bias, training, 0.01, 1e-5)
    return torch.sigmoid(y)


VARIANTS = {
    "cbam": {},
    "se": dict(channel_pooling="avg", use_spatial_gate=False),
    "channel_max": dict(channel_pooling="max", use_spatial_gate=False),
    "channel_only": dict(use_spatial_gate=False),
    "spatial_only": dict(use_channel_gate=False),
    "spatial_first": dict(gate_order="spatial_first"),
    "parallel": dict(gate_order="parallel"),
    "conv_pooling": dict(spatial_pooling="conv"),
    "avg_pooling_spatial_first": dict(channel_pooling="avg", gate_order="spatial_first"),
}


def variant_formula(x: torch.Tensor, cbam: CBAM, options: dict, training: bool) -> torch.Tensor:
    pooling = options.get("channel_pooling", "avg_max")
    spatial_pooling = options.get("spatial_pooling", "max_mean")
    order = options.get("gate_order", "channel_first")
    channel = (lambda v: channel_gate_formula(v, cbam.channel, pooling)) if cbam.channel else None
    spatial = (
        (lambda v: spatial_gate_formula(v, cbam.spatial, spatial_pooling, training)) if cbam.spatial else None
    )
    if order == "parallel":
        return x * channel(x) * spatial(x)
    for gate in (channel, spatial) if order == "channel_first" else (spatial, channel):
        if gate is not None:
            x = x * gate(x)
    return x


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
def test_every_variant_matches_its_formula_in_float64(name, training):
    torch.manual_seed(5)
    options = VARIANTS[name]
    cbam = randomize(CBAM(12, reduction_ratio=3, kernel_size=3, **options)).double().train(training)
    x = torch.randn(3, 12, 6, 5, dtype=torch.float64)
    expected = variant_formula(x, cbam, options, training)
    out = cbam(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # gates() gives what forward multiplies by
    channel, spatial = cbam.gates(x)
    assert (channel is None) == (cbam.channel is None) and (spatial is None) == (cbam.spatial is None)
    product = x * (channel if channel is not None else 1) * (spatial if spatial is not None else 1)
    torch.testing.assert_close(cbam(x), product, rtol=1e-12, atol=1e-12)


def test_the_variants_differ_from_each_other():
    """Guards the test above: each switch changes the output of one and the same set of weights."""
    torch.manual_seed(6)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    outputs = {}
    for name, options in VARIANTS.items():
        if options.get("spatial_pooling") == "conv":
            continue  # an extra parameter: not the same weights
        torch.manual_seed(7)
        outputs[name] = randomize(CBAM(8, 2, 3, **options)).double().eval()(x)
    names = list(outputs)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not torch.allclose(outputs[first], outputs[second], atol=1e-6), (first, second)


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, lambda c, h, k: (c * h + h) + (h * c + c) + 2 * k * k + 2),
        (dict(channel_pooling="avg", use_spatial_gate=False), lambda c, h, k: (c * h + h) + (h * c + c)),
        (dict(use_channel_gate=False), lambda c, h, k: 2 * k * k + 2),
        (dict(spatial_pooling="conv"), lambda c, h, k: (c * h + h) + (h * c + c) + c + k * k + 2),
        (dict(gate_order="parallel"), lambda c, h, k: (c * h + h) + (h * c + c) + 2 * k * k + 2),
    ],
)
def test_parameter_counts_of_the_variants(options, expected):
    channels, ratio, kernel = 64, 16, 7
    cbam = CBAM(channels, ratio, kernel, **options)
    assert sum(p.numel() for p in cbam.parameters()) == expected(channels, channels // ratio, kernel)


@pytest.mark.parametrize(
    "options, argument",
    [
        (dict(use_channel_gate=False, use_spatial_gate=False), "use_spatial_gate"),
        (dict(channel_pooling="mean"), "channel_pooling"),
        (dict(spatial_pooling="avg"), "spatial_pooling"),
        (dict(gate_order="sideways"), "gate_order"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_variant_options_name_the_argument(options, argument):
    from cbam.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=f"^{argument}=") as error:
        CBAM(16, **options)
    assert error.value.argument == argument


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("placement", ["block", "classifier"])
def test_every_variant_trains_in_every_placement(name, placement):
    from cbam import build_resnet

    torch.manual_seed(0)
    net = build_resnet(
        18,
        width=4,
        reduction_ratio=2,
        kernel_size=3,
        use_cbam_block=placement == "block",
        use_cbam_class=placement == "classifier",
        **VARIANTS[name],
    )
    cbams = [m for m in net.modules() if isinstance(m, CBAM)]
    assert len(cbams) == (8 if placement == "block" else 1)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    for module in cbams:
        for parameter_name, parameter in module.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name


# ------------------------------------------------------------------------------- every dtype


@pytest.mark.parametrize("training", [True, False])
def test_cbam_passes_gradcheck_in_float64(training):
    torch.manual_seed(8)
    cbam = randomize(CBAM(6, reduction_ratio=2, kernel_size=3)).double().train(training)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cbam, (x,), eps=1e-6, atol=1e-5)


def test_double_cbam_trains_as_a_new_user_would_call_it():
    """CBAM(16, 4, 3).double() in training mode used to raise 'expected dtype double for end'."""
    cbam = CBAM(16, reduction_ratio=4, kernel_size=3).double().train()
    out = cbam(torch.randn(2, 16, 5, 5, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert cbam.spatial.bn.running_mean.dtype == torch.float64
    assert cbam.spatial.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_batch_statistics_in_float32(dtype):
    torch.manual_seed(9)
    spatial = SpatialAttention(3).train()
    x = (torch.randn(4, 8, 6, 6) * 3 + 1).to(dtype)
    maps = spatial.pooled_maps(x)
    assert maps.dtype == dtype
    conv_out = F.conv2d(maps.float(), spatial.conv.weight, padding=1)
    expected_mean, expected_var = conv_out.mean(), conv_out.var(unbiased=True)
    bn = spatial.bn
    out = bn(spatial.conv.to(dtype)(maps))
    assert out.dtype == dtype
    assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    # statistics of the half-precision conv output, computed in float32 (rounding of the conv output only)
    tolerance = dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(bn.running_mean, (0.99 * 0 + 0.01 * expected_mean).reshape(1), **tolerance)
    torch.testing.assert_close(bn.running_var, (0.99 * 1 + 0.01 * expected_var).reshape(1), **tolerance)
    # and the normalisation itself runs in float32: the same as float32 BN on the upcast input, rounded once
    reference = F.batch_norm(spatial.conv(maps).float(), None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    torch.testing.assert_close(out, reference.to(dtype))


def test_max_pooling_sends_the_gradient_to_one_maximum_as_the_authors_max_pool_does():
    """Tied maxima: max pooling (and the layer) gives the whole gradient to one of them; amax would split it."""
    channel = ChannelAttention(2, 1, pooling="max")
    x = torch.zeros(1, 2, 2, 2)
    x[:, :, 0, 0] = x[:, :, 1, 1] = 1.0  # two tied maxima per channel
    x.requires_grad_(True)
    channel.descriptors(x)[1].sum().backward()
    assert sorted(x.grad.flatten(2)[0, 0].tolist()) == [0.0, 0.0, 0.0, 1.0]
    spatial = SpatialAttention(1)
    y = torch.ones(1, 3, 1, 1, requires_grad=True)  # three tied channels
    spatial.pooled_maps(y)[:, 0].sum().backward()
    assert sorted(y.grad.flatten().tolist()) == [0.0, 0.0, 1.0]  # the max map only


@pytest.mark.parametrize("name", ["cbam", "se", "spatial_only", "parallel"])
def test_attention_maps_record_the_gates_each_variant_has(name):
    from cbam import build_resnet
    from cbam.callbacks.attention_maps import attention_gates, find_cbam_sites

    options = VARIANTS[name]
    net = build_resnet(18, width=4, reduction_ratio=2, kernel_size=3, use_cbam_block=True, **options).train()
    images = torch.randn(3, 3, 8, 8)
    gates = attention_gates(net, images, find_cbam_sites(net))
    assert list(gates) == ["stage1", "stage2", "stage3", "stage4"]
    cbam = CBAM(4, reduction_ratio=2, **VARIANTS[name])
    for gate in gates.values():
        assert ("channel" in gate) == (cbam.channel is not None)
        assert ("spatial" in gate) == (cbam.spatial is not None)
    if "spatial" in gates["stage1"]:
        assert gates["stage1"]["spatial"].shape == (3, 1, 8, 8) and gates["stage4"]["spatial"].shape == (
            3,
            1,
            1,
            1,
        )
    assert net.training  # the mode is restored


# ------------------------------------------------- impl=fused: the same layer through Triton kernels
# (tests/conftest.py switches Triton's interpreter on, so the kernels run on CPU tensors here)


@pytest.mark.parametrize("channel_pooling", ["avg_max", "max"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_impl_equals_the_reference_layer(channel_pooling, training):
    torch.manual_seed(10)
    reference = randomize(CBAM(8, 2, 3, channel_pooling=channel_pooling, impl="reference")).train(training)
    fused = CBAM(8, 2, 3, channel_pooling=channel_pooling, impl="fused").train(training)
    assert list(fused.state_dict()) == list(reference.state_dict())
    fused.load_state_dict(reference.state_dict())  # checkpoints move between the two
    x = torch.randn(3, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    weight = torch.randn(3, 8, 5, 6)
    outputs = [module(v) for module, v in zip((reference, fused), inputs)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for output in outputs:
        (output * weight).sum().backward()
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, rtol=1e-4, atol=1e-6)
    for (name, p_ref), (_, p_fused) in zip(reference.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(fused.state_dict()[name], buffer, msg=name)


def test_auto_runs_the_reference_code_on_the_cpu_and_variants_without_kernels_fall_back_once(
    caplog, monkeypatch
):
    import cbam.models.fused

    calls = []
    monkeypatch.setattr(
        cbam.models.fused, "cbam_fused", lambda *args, **kwargs: calls.append(args) or args[0]
    )
    CBAM(8, 2, 3, impl="auto")(torch.randn(2, 8, 4, 4))
    assert calls == []  # auto: reference on the CPU
    CBAM(8, 2, 3, impl="fused")(torch.randn(2, 8, 4, 4))
    assert len(calls) == 1
    import cbam.models.cbam as attention

    monkeypatch.setattr(attention, "_logged", set())
    with caplog.at_level("WARNING", logger="cbam.models.cbam"):
        for _ in range(3):
            CBAM(8, 2, 3, gate_order="parallel", impl="fused")(torch.randn(2, 8, 4, 4))
    assert len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "CBAM impl=fused: this variant has no fused kernels; it runs the reference code"
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_channels_last_input_gives_the_same_outputs_and_gradients_in_its_own_format(dtype):
    """The CPU code reduces a channels_last input along its memory order (cbam.models.cbam.channel_max,
    spatial_max): the same numbers as a contiguous input, and gradients that keep the input's format."""
    torch.manual_seed(0)
    layer = CBAM(16, reduction_ratio=4, kernel_size=7).to(dtype)
    x = torch.randn(4, 16, 8, 8, dtype=dtype)
    outputs, gradients = [], []
    for fmt in (torch.contiguous_format, torch.channels_last):
        inputs = x.clone(memory_format=fmt).requires_grad_()
        y = layer(inputs)
        (y * torch.arange(y.numel(), dtype=dtype).view_as(y).sin()).sum().backward()
        outputs.append(y.detach())
        gradients.append(inputs.grad)
        assert inputs.grad.is_contiguous(memory_format=fmt)
    tolerance = {"atol": 1e-12, "rtol": 0} if dtype == torch.float64 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(outputs[1], outputs[0], **tolerance)
    torch.testing.assert_close(gradients[1], gradients[0], **tolerance)
