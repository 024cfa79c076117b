"""cbam.attach: CBAM, SE, ECA and BAM added to torchvision networks; the ECA and BAM layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cbam.errors import InvalidArgument
from cbam.models.attach import Attended, attach
from cbam.models.bam import BAM, BAMOptions
from cbam.models.cbam import CBAM, CBAMOptions
from cbam.models.eca import ECA, ECAOptions, eca_kernel_size

#: output channels of the residual blocks, written out rather than read from the networks
RESNET18_BLOCKS = [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2
RESNET50_BLOCKS = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # Bottleneck: C = 4 * planes
MOBILENET_V2_RESIDUAL_BLOCKS = [24] + [32] * 2 + [64] * 3 + [96] * 2 + [160] * 2


def count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def cbam_params(channels: int, r: int = 16, k: int = 7) -> int:
    """Shared MLP C -> C/r -> C with biases, a k x k convolution on 2 maps without bias, a BatchNorm of 1."""
    return 2 * channels * (channels // r) + channels // r + channels + 2 * k * k + 2


def se_params(channels: int, r: int = 16) -> int:
    return 2 * channels * (channels // r) + channels // r + channels


def bam_params(channels: int, r: int = 16) -> int:
    h = channels // r
    channel = (channels * h + h) + 2 * h + (h * channels + channels) + 2 * channels  # fc, bn, fc, bn_out
    spatial = (
        (channels * h + h) + 2 * h + 2 * (9 * h * h + h + 2 * h) + (h + 1) + 2
    )  # ..., conv_final, bn_out
    return channel + spatial


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, (CBAM, ECA, BAM))}


def on_meta(builder, **kwargs) -> nn.Module:
    """A torchvision network on the meta device: its parameters counted without being initialised."""
    with torch.device("meta"):
        return builder(weights=None, **kwargs)


# (a), (b): parameter counts


@pytest.mark.parametrize("channels", [24, 64, 256, 2048])
def test_cbam_layer_has_the_formula_parameters(channels):
    assert count(CBAM(channels)) == cbam_params(channels)
    assert count(CBAM(channels, options=CBAMOptions(reduction_ratio=8, kernel_size=3))) == cbam_params(
        channels, 8, 3
    )


def test_resnet18_cbam_adds_the_formula_parameters_in_every_block():
    model = torchvision.models.resnet18(num_classes=10)
    before = count(model)
    assert attach(model, "cbam") is model
    assert count(model) - before == sum(cbam_params(c) for c in RESNET18_BLOCKS)
    assert len(attention_modules(model)) == len(RESNET18_BLOCKS)


@pytest.mark.parametrize("builder", ["resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_bottleneck_networks_get_the_formula_parameters(builder):
    model = on_meta(getattr(torchvision.models, builder))
    before = count(model)
    attach(model, "cbam")
    assert count(model) - before == sum(cbam_params(c) for c in RESNET50_BLOCKS)
    # The attention goes where the block's weights are.
    assert all(parameter.is_meta for parameter in model.parameters())


def test_resnet50_cbam_forward_keeps_the_output_shape():
    torch.manual_seed(0)
    model = attach(torchvision.models.resnet50(weights=None, num_classes=10), "cbam").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_se_is_the_channel_gate_with_average_pooling():
    model = torchvision.models.resnet18(num_classes=10)
    before = count(model)
    attach(model, "se", reduction_ratio=8)
    assert count(model) - before == sum(se_params(c, 8) for c in RESNET18_BLOCKS)
    for layer in attention_modules(model).values():
        assert layer.spatial is None and layer.channel.pooling == "avg"


def test_attention_comes_before_the_addition():
    torch.manual_seed(0)
    model = attach(torchvision.models.resnet18(num_classes=10), "cbam").eval()
    block = model.layer2[0]  # with a downsampling shortcut
    x = torch.randn(2, 64, 8, 8)
    branch = block.bn2.norm(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    expected = torch.relu(block.bn2.attention(branch) + block.downsample(x))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)


# (c), (d): ECA


def test_eca_kernel_size_follows_the_papers_formula():
    # t = int(|(log2 C + 1) / 2|), made odd by adding 1:
    # 64: 3.5 -> 3; 128: 4 -> 5; 256: 4.5 -> 4 -> 5; 512: 5; 1024: 5.5 -> 5; 2048: 6 -> 7
    expected = {64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    assert {c: eca_kernel_size(c) for c in expected} == expected
    assert {c: ECA(c).kernel_size for c in expected} == expected
    assert eca_kernel_size(64, gamma=1, b=0) == 7  # log2(64) = 6 -> 7
    assert ECA(64, ECAOptions(kernel_size=9)).kernel_size == 9


def test_eca_adds_k_parameters_per_block():
    model = on_meta(torchvision.models.resnet50)
    before = count(model)
    attach(model, "eca")
    # 3 blocks of 256 (k=5), 4 of 512 (5), 6 of 1024 (5), 3 of 2048 (7)
    assert count(model) - before == 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7
    model = torchvision.models.resnet18(num_classes=10)
    before = count(model)
    attach(model, "eca", kernel_size=3)
    assert count(model) - before == 3 * len(RESNET18_BLOCKS)


@pytest.mark.parametrize("channels", [16, 256])
def test_eca_forward_is_avgpool_conv1d_sigmoid_multiply(channels):
    torch.manual_seed(0)
    layer = ECA(channels).double()
    k = layer.kernel_size
    x = torch.randn(2, channels, 5, 4, dtype=torch.float64)
    weight = layer.conv.weight.detach().flatten()
    padded = F.pad(x.mean(dim=(2, 3)), ((k - 1) // 2, (k - 1) // 2))  # zero padding across the channels
    logits = sum(weight[j] * padded[:, j : j + channels] for j in range(k))
    expected = x * torch.sigmoid(logits)[:, :, None, None]
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("bad", [{"kernel_size": 4}, {"kernel_size": 0}, {"gamma": 0}, {"b": 1.5}])
def test_eca_options_are_checked(bad):
    with pytest.raises(InvalidArgument, match=next(iter(bad))):
        ECAOptions(**bad)


# (e): BAM


@pytest.mark.parametrize(
    "options, combine",
    [(BAMOptions(), torch.add), (BAMOptions(combine="product", branch_norm=False), torch.mul)],
)
def test_bam_output_is_f_plus_f_times_the_gate(options, combine):
    torch.manual_seed(0)
    layer = BAM(64, options)
    x = torch.randn(4, 64, 6, 6)
    layer(x)  # a training step moves the running statistics away from their initial values
    layer.eval()
    with torch.no_grad():
        channel, spatial = layer.channel_gate(x), layer.spatial_gate(x)
        assert channel.shape == (4, 64, 1, 1) and spatial.shape == (4, 1, 6, 6)
        torch.testing.assert_close(layer(x), x + x * torch.sigmoid(combine(channel, spatial)))
    has_branch_norm = hasattr(layer.channel_gate.mlp, "bn_out") and hasattr(
        layer.spatial_gate.convs, "bn_out"
    )
    assert has_branch_norm == options.branch_norm


def test_bam_layer_parameters_and_dilation():
    layer = BAM(256)
    assert count(layer) == bam_params(256)
    dilated = [
        m for m in layer.spatial_gate.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert [(m.in_channels, m.out_channels, m.dilation, m.padding) for m in dilated] == [
        (16, 16, (4, 4), (4, 4))
    ] * 2
    assert count(BAM(256, BAMOptions(branch_norm=False))) == bam_params(256) - 2 * 256 - 2


def test_bam_follows_the_first_three_stages_of_a_resnet():
    model = torchvision.models.resnet18(num_classes=10)
    before = count(model)
    attach(model, "bam")
    assert list(attention_modules(model)) == ["layer1.attention", "layer2.attention", "layer3.attention"]
    assert count(model) - before == sum(bam_params(c) for c in (64, 128, 256))


# (f): MobileNetV2


def test_mobilenet_v2_gets_attention_in_its_residual_blocks_only():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    before = count(model)
    attach(model, "cbam")
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.mobilenetv2.InvertedResidual)]
    assert sum(block.use_res_connect for block in blocks) == len(MOBILENET_V2_RESIDUAL_BLOCKS)
    for block in blocks:
        assert isinstance(block.conv[-1], Attended if block.use_res_connect else nn.BatchNorm2d)
    assert count(model) - before == sum(cbam_params(c) for c in MOBILENET_V2_RESIDUAL_BLOCKS)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# (g): training, state_dict

KEYS = {
    "cbam": ["layer1.0.bn2.norm.weight", "layer1.0.bn2.attention.channel.mlp.0.weight"],
    "se": ["layer4.1.bn2.norm.running_var", "layer4.1.bn2.attention.channel.mlp.2.bias"],
    "eca": ["layer2.0.bn2.norm.bias", "layer2.0.bn2.attention.conv.weight"],
    "bam": ["layer1.0.bn2.weight", "layer3.attention.channel_gate.mlp.fc_reduce.weight"],
}


@pytest.mark.parametrize("kind", ["cbam", "se", "eca", "bam"])
def test_attached_model_trains_and_its_state_dict_loads_into_a_fresh_copy(kind):
    torch.manual_seed(0)
    model = attach(torchvision.models.resnet18(num_classes=10), kind)
    attention = [p for layer in attention_modules(model).values() for p in layer.parameters()]
    initial = [p.detach().clone() for p in attention]
    # Batch 4: with 2, the BatchNorms over layer4's 1x1 maps make gradients of ~1e4 that one step at a
    # moderate learning rate turns into non-finite outputs (the plain resnet18 too).
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 7, 0, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(x)
    assert out.shape == (4, 10)
    loss = F.cross_entropy(out, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attention)
    assert sum(p.grad.abs().sum() for p in attention) > 0
    optimizer.step()
    assert any(not torch.equal(p, q) for p, q in zip(attention, initial))

    state = model.state_dict()
    assert set(KEYS[kind]) <= set(state)
    if kind != "bam":
        assert "layer1.0.bn2.weight" not in state
    fresh = attach(torchvision.models.resnet18(num_classes=10), kind)
    fresh.load_state_dict(state, strict=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_impl_passes_through_to_the_cbam_options():
    model = attach(torchvision.models.resnet18(num_classes=10), "cbam", impl="fused", kernel_size=3)
    assert {(m.impl, m.options.kernel_size) for m in attention_modules(model).values()} == {("fused", 3)}
    model = attach(torchvision.models.resnet18(num_classes=10), "se", impl="reference")
    assert {m.options.impl for m in attention_modules(model).values()} == {"reference"}


# (h): errors


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_an_unsupported_network_names_the_known_blocks():
    with pytest.raises(InvalidArgument) as error:
        attach(nn.Sequential(nn.Conv2d(3, 8, 3)))
    message = one_line(error)
    assert all(name in message for name in ("BasicBlock", "Bottleneck", "InvertedResidual"))


def test_an_unknown_kind_names_the_accepted_kinds():
    with pytest.raises(InvalidArgument) as error:
        attach(torchvision.models.resnet18(num_classes=10), "cbm")
    assert "kind=cbm" in one_line(error) and "cbam, se, eca, bam" in one_line(error)


@pytest.mark.parametrize(
    "kind, option, accepted",
    [
        ("eca", "reduction_ratio", "kernel_size, gamma, b"),
        ("eca", "impl", "kernel_size, gamma, b"),
        ("se", "kernel_size", "reduction_ratio, impl"),
        ("bam", "impl", "reduction_ratio, dilation, combine, branch_norm"),
        ("cbam", "reduction", "reduction_ratio, kernel_size, channel_pooling"),
    ],
)
def test_an_unknown_option_names_it_and_the_accepted_ones(kind, option, accepted):
    model = torchvision.models.resnet18(num_classes=10)
    before = count(model)
    with pytest.raises(InvalidArgument) as error:
        attach(model, kind, **{option: 8})
    message = one_line(error)
    assert message.startswith(f"{option}=8") and accepted in message
    assert count(model) == before  # nothing attached


def test_a_bad_option_value_is_refused_by_the_options():
    for kind, option in [("eca", {"kernel_size": 4}), ("bam", {"combine": "mean"}), ("cbam", {"impl": "x"})]:
        with pytest.raises(InvalidArgument, match=next(iter(option))):
            attach(torchvision.models.resnet18(num_classes=10), kind, **option)


def test_attaching_twice_is_refused():
    model = attach(torchvision.models.resnet18(num_classes=10), "cbam")
    attached = count(model)
    for kind in ("cbam", "eca", "bam"):
        with pytest.raises(InvalidArgument, match="already has attention"):
            attach(model, kind)
    assert count(model) == attached


def test_bam_on_mobilenet_v2_is_refused():
    model = on_meta(torchvision.models.mobilenet_v2)
    with pytest.raises(InvalidArgument) as error:
        attach(model, "bam")
    assert "layer1, layer2 and layer3 of a torchvision ResNet" in one_line(error)
    assert not attention_modules(model)


def test_the_package_offers_attach_as_a_function():
    import cbam

    assert cbam.attach is attach and callable(cbam.attach)
