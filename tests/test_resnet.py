"""The CIFAR ResNets: standard parameter counts, shapes, and where the CBAM modules sit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbam import CBAM, build_resnet

#: depth -> (parameter count at width 64 without CBAM, residual blocks, bottleneck expansion)
TABLE = {
    18: (11_173_962, 8, 1),
    34: (21_282_122, 16, 1),
    50: (23_520_842, 16, 4),
    101: (42_512_970, 33, 4),
    152: (58_156_618, 50, 4),
}
DEPTHS = sorted(TABLE)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cbams(model: nn.Module) -> list[CBAM]:
    return [m for m in model.modules() if isinstance(m, CBAM)]


def meta_resnet(depth: int, **options) -> nn.Module:
    """Built on the meta device: the structure and parameter shapes, without memory or initialisation."""
    with torch.device("meta"):
        return build_resnet(depth, **options)


@pytest.mark.parametrize("depth", DEPTHS)
def test_standard_parameter_counts(depth):
    assert count_parameters(meta_resnet(depth)) == TABLE[depth][0]


def test_parameter_count_on_a_real_build():
    """The meta-device shortcut above counts what a normal build holds."""
    assert count_parameters(build_resnet(18)) == TABLE[18][0]


@pytest.mark.parametrize("depth", DEPTHS)
def test_forward_gives_logits_at_small_width(depth):
    torch.manual_seed(0)
    for options in ({}, {"use_cbam_block": True, "use_cbam_class": True, "reduction_ratio": 4}):
        model = build_resnet(depth, width=4, **options).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10)
        assert torch.isfinite(out).all()
    assert build_resnet(depth, width=4, num_classes=7).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("depth", DEPTHS)
def test_cbam_in_every_residual_block(depth):
    _, blocks, _ = TABLE[depth]
    assert len(cbams(meta_resnet(depth))) == 0
    assert len(cbams(meta_resnet(depth, use_cbam_block=True))) == blocks
    assert len(cbams(meta_resnet(depth, use_cbam_class=True))) == 1
    assert len(cbams(meta_resnet(depth, use_cbam_block=True, use_cbam_class=True))) == blocks + 1


def is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def run_with_hooks(model: nn.Module, x: torch.Tensor) -> list[tuple]:
    """Every module call as (event, module, input, output), in the order they happen: "pre" when a module
    starts, "post" when it returns (inputs are cloned, so later in-place ReLUs don't change them)."""
    events: list = []
    handles = []
    for module in model.modules():
        handles += [
            module.register_forward_pre_hook(lambda m, a: events.append(("pre", m, a[0].clone(), None))),
            module.register_forward_hook(lambda m, a, o: events.append(("post", m, None, o.clone()))),
        ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return events


@pytest.mark.parametrize("depth", [18, 50])
def test_block_cbam_follows_the_branch_batchnorm_and_precedes_the_addition(depth):
    torch.manual_seed(0)
    model = build_resnet(depth, width=8, use_cbam_block=True, reduction_ratio=2).eval()
    attention = set(map(id, cbams(model)))
    inside_cbam = {id(m) for c in cbams(model) for m in c.modules()}
    events = run_with_hooks(model, torch.randn(2, 3, 32, 32))

    checked = 0
    for index, (event, module, x, _) in enumerate(events):
        if event != "pre" or id(module) not in attention:
            continue
        # the layer that finished just before this CBAM started is a BatchNorm, and fed it
        finished = [e for e in events[:index] if e[0] == "post" and is_leaf(e[1])]
        finished = [e for e in finished if id(e[1]) not in inside_cbam]
        previous = finished[-1]
        assert isinstance(previous[1], nn.BatchNorm2d)
        torch.testing.assert_close(x, previous[3])
        # ...before the block's final ReLU: the CBAM sees negative values
        assert (x < 0).any()
        checked += 1
    assert checked == TABLE[depth][1]

    # In the blocks with an identity shortcut: block(x) == relu(cbam(branch(x)) + x), i.e. the CBAM output is
    # what gets added to the shortcut.
    blocks = [m for m in model.modules() if any(id(c) in attention for c in m.children())]
    assert len(blocks) == TABLE[depth][1]
    identity_blocks = 0
    for block in blocks:
        cbam = next(c for c in block.children() if id(c) in attention)
        block_in = next(e[2] for e in events if e[0] == "pre" and e[1] is block)
        block_out = next(e[3] for e in events if e[0] == "post" and e[1] is block)
        cbam_out = next(e[3] for e in events if e[0] == "post" and e[1] is cbam)
        if block_in.shape == block_out.shape:
            torch.testing.assert_close(block_out, torch.relu(cbam_out + block_in))
            identity_blocks += 1
    assert identity_blocks == TABLE[depth][1] - (4 if depth == 50 else 3)


@pytest.mark.parametrize("depth", [18, 50])
def test_classifier_cbam_acts_on_the_final_features(depth):
    torch.manual_seed(0)
    width, expansion = 4, TABLE[depth][2]
    model = build_resnet(depth, width=width, use_cbam_class=True, reduction_ratio=4).eval()
    (cbam,) = cbams(model)
    inside_cbam = set(map(id, cbam.modules()))
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside_cbam]
    assert len(classifier) == 1
    events = run_with_hooks(model, torch.randn(3, 3, 32, 32))
    cbam_in = next(e[2] for e in events if e[0] == "pre" and e[1] is cbam)
    cbam_out = next(e[3] for e in events if e[0] == "post" and e[1] is cbam)
    logits = next(e[3] for e in events if e[0] == "post" and e[1] is model)
    assert cbam_in.shape == (3, width * 8 * expansion, 4, 4)
    # the classifier sees the pooled CBAM output
    torch.testing.assert_close(logits, classifier[0](cbam_out.mean(dim=(2, 3))))
    # and the CBAM is the last module to touch the feature map: only pooling and the classifier follow
    cbam_done = next(i for i, e in enumerate(events) if e[0] == "post" and e[1] is cbam)
    after = [e[1] for e in events[cbam_done + 1 :]]
    assert all(isinstance(m, (nn.AdaptiveAvgPool2d, nn.Linear, nn.Flatten)) or m is model for m in after)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("width", [4, 16])
def test_width_scales_the_stage_widths(depth, width):
    expansion = TABLE[depth][2]
    model = meta_resnet(depth, width=width)
    planes = {width * 2**stage for stage in range(4)}
    expected = planes | {p * expansion for p in planes}
    assert {m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == expected
    (classifier,) = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert classifier.in_features == width * 8 * expansion
    assert classifier.out_features == 10


@pytest.mark.parametrize("depth", [0, 20, 44, 110, -18])
def test_unknown_depth_raises(depth):
    with pytest.raises(ValueError, match="depth"):
        build_resnet(depth)


def test_cbam_options_reach_every_cbam():
    model = meta_resnet(
        50, width=8, use_cbam_block=True, use_cbam_class=True, reduction_ratio=8, kernel_size=3
    )
    for cbam in cbams(model):
        convs = [m for m in cbam.modules() if isinstance(m, nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(3, 3)]
        fc1 = next(m for m in cbam.modules() if isinstance(m, nn.Linear))
        assert fc1.out_features == fc1.in_features // 8
