"""The fused CBAM (cbam.fused) against plain PyTorch, on the CPU through Triton's interpreter (switched on
in conftest.py): outputs, input and parameter gradients, BatchNorm running statistics.

torch.compile over the ops cannot run under the interpreter; benchmarks/check_fused_gpu.py checks it on a GPU.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from cbam.errors import InvalidArgument
from cbam.fused import cbam_fused, fused_available
from helpers import run_python

TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}


class Gates(nn.Module):
    """The small-tensor half of a CBAM layer, written here independently of cbam.attention."""

    def __init__(self, channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)

    def channel_gate(self, average: torch.Tensor | None, maximum: torch.Tensor | None) -> torch.Tensor:
        logits = sum(self.mlp(d) for d in (average, maximum) if d is not None)
        return torch.sigmoid(logits)[:, :, None, None]

    def spatial_gate(self, maps: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(maps)))


def reference_cbam(gates: Gates, x: torch.Tensor, channel_pooling: str) -> torch.Tensor:
    """The formula in plain tensor ops: g from the pooled descriptors, s from the max/mean maps of x*g."""
    average = x.mean(dim=(2, 3)) if channel_pooling in ("avg", "avg_max") else None
    maximum = x.amax(dim=(2, 3)) if channel_pooling in ("max", "avg_max") else None
    gated = x * gates.channel_gate(average, maximum)
    maps = torch.cat((gated.amax(dim=1, keepdim=True), gated.mean(dim=1, keepdim=True)), dim=1)
    return gated * gates.spatial_gate(maps)


@dataclass
class Case:
    shape: tuple[int, int, int, int]
    kernel_size: int = 3
    channels_last: bool = False
    training: bool = True
    dtype: torch.dtype = torch.float64
    channel_pooling: str = "avg_max"


CASES = {
    "nchw-5x7-k3": Case((2, 6, 5, 7)),
    "channels_last-5x7-k7": Case((2, 6, 5, 7), kernel_size=7, channels_last=True),
    "nchw-5x7-k7-eval": Case((2, 6, 5, 7), kernel_size=7, training=False),
    "channels_last-4x4-k3-eval-fp32": Case(
        (3, 8, 4, 4), channels_last=True, training=False, dtype=torch.float32
    ),
    "nchw-1x1-k1-fp32": Case((4, 8, 1, 1), kernel_size=1, dtype=torch.float32),
    "channels_last-C2048-fp32": Case((2, 2048, 2, 3), channels_last=True, dtype=torch.float32),
    "nchw-C2048": Case((2, 2048, 3, 2), kernel_size=1),
    "avg-pooling": Case((2, 6, 3, 5), channel_pooling="avg"),
    "max-pooling-channels_last": Case((2, 6, 3, 5), channels_last=True, channel_pooling="max"),
}


def make_gates(case: Case) -> Gates:
    channels = case.shape[1]
    gates = Gates(channels, max(channels // 4, 1), case.kernel_size).to(case.dtype)
    with torch.no_grad():  # running statistics away from (0, 1), so eval mode uses them visibly
        gates.bn.running_mean.fill_(0.3)
        gates.bn.running_var.fill_(2.0)
    return gates.train(case.training)


def make_input(case: Case) -> torch.Tensor:
    x = torch.randn(case.shape, dtype=case.dtype)
    return x.contiguous(memory_format=torch.channels_last) if case.channels_last else x


def run_both(gates: Gates, x: torch.Tensor, channel_pooling: str, loss=lambda y, w: (y * w).sum()):
    """Forward and backward through the reference and the fused layer on twin copies of gates and x."""
    twin = copy.deepcopy(gates)
    x_reference, x_fused = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    weights = torch.randn(x.shape, dtype=x.dtype)
    y_reference = reference_cbam(gates, x_reference, channel_pooling)
    loss(y_reference, weights).backward()
    y_fused = cbam_fused(x_fused, twin.channel_gate, twin.spatial_gate, channel_pooling)
    loss(y_fused, weights).backward()
    return (y_reference, x_reference, gates), (y_fused, x_fused, twin)


def assert_same(reference, fused, tolerances) -> None:
    (y_reference, x_reference, gates), (y_fused, x_fused, twin) = reference, fused
    torch.testing.assert_close(y_fused, y_reference, **tolerances)
    torch.testing.assert_close(x_fused.grad, x_reference.grad, **tolerances)
    twin_parameters = dict(twin.named_parameters())
    for name, parameter in gates.named_parameters():
        torch.testing.assert_close(twin_parameters[name].grad, parameter.grad, **tolerances, msg=name)
    twin_buffers = dict(twin.named_buffers())
    for name, buffer in gates.named_buffers():
        torch.testing.assert_close(twin_buffers[name], buffer, **tolerances, msg=name)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_matches_the_plain_formula(case: Case):
    torch.manual_seed(0)
    gates = make_gates(case)
    x = make_input(case)
    reference, fused = run_both(gates, x, case.channel_pooling)
    assert_same(reference, fused, TOLERANCES[case.dtype])
    y_fused, x_fused, twin = fused
    assert y_fused.stride() == x.stride() and x_fused.grad.stride() == x.stride()  # the layout is kept
    if case.training:  # the BatchNorm saw a batch: its running statistics moved
        assert twin.bn.num_batches_tracked.item() == 1 and twin.bn.running_mean.item() != 0.3


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_pooled_maps_follow_the_input_layout(layout):
    """The spatial gate's convolution gets its maps in the network's memory format."""
    gates = make_gates(Case((2, 6, 3, 5)))
    seen = []

    def spatial_gate(maps: torch.Tensor) -> torch.Tensor:
        seen.append(maps)
        return gates.spatial_gate(maps)

    x = torch.randn(2, 6, 3, 5, dtype=torch.float64).contiguous(memory_format=layout)
    cbam_fused(x, gates.channel_gate, spatial_gate)
    assert seen[0].shape == (2, 2, 3, 5) and seen[0].is_contiguous(memory_format=layout)


def test_cropped_input_and_broadcast_output_gradient():
    """A crop cannot flatten H and W into one stride, and ``y.sum()`` sends back a zero-stride gradient."""
    torch.manual_seed(1)
    case = Case((2, 5, 6, 8))
    x = make_input(case)[:, :, 1:, 2:]
    reference, fused = run_both(make_gates(case), x, "avg_max", loss=lambda y, w: y.sum())
    assert_same(reference, fused, TOLERANCES[torch.float64])


def test_bfloat16_stays_close_to_float64():
    """bf16 storage, fp32 accumulation: within bf16 rounding of the fp64 result (C = 512 channel sums)."""
    torch.manual_seed(2)
    case = Case((2, 512, 3, 3))
    gates = make_gates(case)
    x = make_input(case)
    low = copy.deepcopy(gates).to(torch.bfloat16)
    x_low = x.to(torch.bfloat16).requires_grad_()
    y_low = cbam_fused(x_low, low.channel_gate, low.spatial_gate)
    weights = torch.randn(x.shape, dtype=torch.float64)
    (y_low.double() * weights).sum().backward()
    x_high = x_low.detach().double().requires_grad_()  # the same rounded inputs
    y_high = reference_cbam(gates, x_high, "avg_max")
    (y_high * weights).sum().backward()
    assert y_low.dtype == torch.bfloat16 and x_low.grad.dtype == torch.bfloat16
    for low_value, high_value in ((y_low, y_high), (x_low.grad, x_high.grad)):
        scale = high_value.abs().max()
        assert (low_value.double() - high_value).abs().max() <= 0.03 * scale


def test_max_gradient_goes_to_the_first_maximum_only():
    """Ties (a constant map, equal channels) send the max's gradient to one element, as max pooling does,
    also when the tie spans several of the kernels' tiles (400 pixels; 300 channels_last channels)."""
    x = torch.ones(1, 2, 20, 20, dtype=torch.float64, requires_grad=True)
    _, maximum, pixel = torch.ops.cbam.channel_pool(x)
    maximum.sum().backward()
    expected = torch.zeros_like(x)
    expected[:, :, 0, 0] = 1
    assert pixel.eq(0).all()
    torch.testing.assert_close(x.grad, expected)

    x = torch.ones(1, 300, 2, 2, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    gate = torch.full((1, 300, 1, 1), 0.5, dtype=torch.float64)
    maps, channel = torch.ops.cbam.gated_pool(x, gate)
    maps[:, 0].sum().backward()
    expected = torch.zeros_like(x)
    expected[:, 0] = 0.5
    assert channel.eq(0).all()
    torch.testing.assert_close(x.grad, expected)


def test_library_ops_give_what_the_eager_path_gives():
    """torch.compile traces the torch.library ops; eager mode calls their autograd.Function twins."""
    torch.manual_seed(3)
    case = Case((2, 6, 5, 7), channels_last=True)
    gates = make_gates(case)
    x = make_input(case)
    twin = copy.deepcopy(gates)
    x_eager, x_library = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = cbam_fused(x_eager, gates.channel_gate, gates.spatial_gate)
    average, maximum, _ = torch.ops.cbam.channel_pool(x_library)
    gate = twin.channel_gate(average, maximum)
    maps, _ = torch.ops.cbam.gated_pool(x_library, gate)
    y_library = torch.ops.cbam.gated_output(x_library, gate, twin.spatial_gate(maps))
    weights = torch.randn(x.shape, dtype=x.dtype)
    (y_eager * weights).sum().backward()
    (y_library * weights).sum().backward()
    assert torch.equal(y_eager, y_library) and torch.equal(x_eager.grad, x_library.grad)
    twin_parameters = dict(twin.named_parameters())
    for name, parameter in gates.named_parameters():
        assert torch.equal(parameter.grad, twin_parameters[name].grad), name


@pytest.mark.parametrize("name", ["channel_pool", "gated_pool", "gated_output"])
def test_opcheck(name):
    """Schema and autograd registration. The fake-tensor and AOT-dispatch checks would run the
    interpreted kernels on fake tensors (the interpreter copies every argument to the host), so they
    run on a GPU, in benchmarks/check_fused_gpu.py."""
    x = torch.randn(2, 3, 3, 5, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    spatial = torch.rand(2, 1, 3, 5, dtype=torch.float64, requires_grad=True)
    arguments = {"channel_pool": (x,), "gated_pool": (x, gate), "gated_output": (x, gate, spatial)}[name]
    op = getattr(torch.ops.cbam, name).default
    torch.library.opcheck(op, arguments, test_utils=("test_schema", "test_autograd_registration"))


def test_fused_available(monkeypatch):
    assert fused_available("cpu")  # the interpreter is on in the tests
    assert not fused_available("meta")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fused_available(torch.device("cpu"))


def test_unknown_channel_pooling_is_an_invalid_argument():
    gates = make_gates(Case((1, 4, 2, 2)))
    with pytest.raises(InvalidArgument, match="channel_pooling=mean"):
        x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
        cbam_fused(x, gates.channel_gate, gates.spatial_gate, "mean")


def test_gpu_check_script_quick_run_agrees_and_reports():
    """benchmarks/check_fused_gpu.py --quick: the CPU smoke run of the GPU check (a check, not a timing)."""
    result = run_python(["benchmarks/check_fused_gpu.py", "--quick"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    (row,) = report["blocks"]
    assert row["passed"] and not row["nonfinite"] and row["relative_difference"]["input_grad"] < 1e-4
    assert set(report["resnet18_step_ms"]) == {"plain", "reference", "fused"}
