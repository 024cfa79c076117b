"""The fused CBAM (cbam.models.fused) against plain PyTorch, on the CPU through Triton's interpreter (switched on
in conftest.py): outputs, input and parameter gradients, BatchNorm running statistics, float64 gradcheck,
the torch.library op, and the host work of a layer and of a training step.

torch.compile over the op cannot run under the interpreter; benchmarks/check_fused_gpu.py checks it on a GPU.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass

import pytest
import torch
from helpers import REPO, write_random_pngs
from torch import nn

from cbam import CBAM, build_resnet
from cbam.analysis import host_ops
from cbam.callbacks.model_stats import count_flops
from cbam.errors import InvalidArgument
from cbam.models.fused import cbam_fused, fused_available

sys.path.insert(0, str(REPO / "benchmarks"))  # the GPU check's script, run below as its smoke test

TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}


class Gates(nn.Module):
    """The small-tensor half of a CBAM layer, written here independently of cbam.models.cbam."""

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


def fused_cbam(gates: Gates, x: torch.Tensor, channel_pooling: str) -> torch.Tensor:
    """The same layer through the fused kernels, with the same parameters and buffers."""
    first, _, second = gates.mlp
    bn = gates.bn
    return cbam_fused(
        x, first.weight, first.bias, second.weight, second.bias, gates.conv.weight, bn.weight, bn.bias,
        bn.running_mean, bn.running_var, bn.num_batches_tracked, channel_pooling=channel_pooling,
        training=bn.training, momentum=bn.momentum, eps=bn.eps,
    )  # fmt: skip


@dataclass
class Case:
    shape: tuple[int, int, int, int]
    kernel_size: int = 3
    channels_last: bool = False
    training: bool = True
    dtype: torch.dtype = torch.float64
    channel_pooling: str = "avg_max"
    hidden: int | None = None  # default channels // 4


CASES = {
    "nchw-5x7-k3": Case((2, 6, 5, 7)),
    # more tiles than the interpreter's 3 persistent programs: programs loop over several tiles
    "nchw-5-samples-k5": Case((5, 6, 5, 7), kernel_size=5),
    "channels_last-5x7-k7": Case((2, 6, 5, 7), kernel_size=7, channels_last=True),
    "nchw-5x7-k7-eval": Case((2, 6, 5, 7), kernel_size=7, training=False),
    "channels_last-4x4-k3-eval-fp32": Case(
        (3, 8, 4, 4), channels_last=True, training=False, dtype=torch.float32
    ),
    "nchw-1x1-k1-fp32": Case((4, 8, 1, 1), kernel_size=1, dtype=torch.float32),
    "channels_last-C2048-fp32": Case((2, 2048, 2, 3), channels_last=True, dtype=torch.float32, hidden=128),
    "nchw-C2048": Case((2, 2048, 3, 2), kernel_size=1, hidden=128),
    # several pixel tiles in every loop over pixels; a hidden size that is no power of 2 (ratio 1)
    "nchw-24x24-hidden-20": Case((2, 20, 24, 24), kernel_size=7, hidden=20),
    "avg-pooling": Case((2, 6, 3, 5), channel_pooling="avg"),
    "max-pooling-channels_last": Case((2, 6, 3, 5), channels_last=True, channel_pooling="max"),
}


def make_gates(case: Case) -> Gates:
    channels = case.shape[1]
    hidden = case.hidden or max(channels // 4, 1)
    gates = Gates(channels, hidden, case.kernel_size).to(case.dtype)
    with torch.no_grad():  # BatchNorm away from its initial values, so every term shows
        gates.bn.running_mean.fill_(0.3)
        gates.bn.running_var.fill_(2.0)
        gates.bn.weight.fill_(1.3)
        gates.bn.bias.fill_(0.2)
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
    y_fused = fused_cbam(twin, x_fused, channel_pooling)
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


@pytest.mark.parametrize(
    "case", [CASES["channels_last-5x7-k7"], CASES["nchw-24x24-hidden-20"]], ids=["cl-k7", "24x24"]
)
def test_the_gpu_tile_plan_gives_the_same_numbers(case: Case, monkeypatch):
    """The tile sizes and persistent grids an H100 (132 multiprocessors) gets, run by the interpreter."""
    import cbam.models.fused.ops as ops

    monkeypatch.setattr(ops, "multiprocessors", lambda device: 132)
    torch.manual_seed(6)
    reference, fused = run_both(make_gates(case), make_input(case), case.channel_pooling)
    assert_same(reference, fused, TOLERANCES[case.dtype])


def test_cropped_input_and_broadcast_output_gradient():
    """A crop cannot flatten H and W into one stride, and ``y.sum()`` sends back a zero-stride gradient."""
    torch.manual_seed(1)
    case = Case((2, 5, 6, 8))
    x = make_input(case)[:, :, 1:, 2:]
    reference, fused = run_both(make_gates(case), x, "avg_max", loss=lambda y, w: y.sum())
    assert_same(reference, fused, TOLERANCES[torch.float64])


@pytest.mark.parametrize("training", [True, False])
def test_fused_layer_passes_gradcheck_in_float64(training):
    """Input and every parameter, through the BatchNorm's batch statistics (training) or its running ones."""
    torch.manual_seed(4)
    gates = make_gates(Case((3, 6, 4, 5), training=training))
    first, _, second = gates.mlp
    bn = gates.bn
    parameters = [first.weight, first.bias, second.weight, second.bias, gates.conv.weight, bn.weight, bn.bias]
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64, requires_grad=True)

    def layer(x, w1, b1, w2, b2, conv_w, bn_w, bn_b):
        return cbam_fused(
            x, w1, b1, w2, b2, conv_w, bn_w, bn_b, bn.running_mean, bn.running_var, bn.num_batches_tracked,
            training=training,
        )  # fmt: skip

    assert torch.autograd.gradcheck(layer, (x, *parameters), eps=1e-6, atol=1e-6, fast_mode=True)


def test_bfloat16_stays_close_to_float64():
    """bf16 storage, fp32 accumulation: within bf16 rounding of the fp64 result (C = 512 channel sums)."""
    torch.manual_seed(2)
    case = Case((2, 512, 3, 3))
    gates = make_gates(case)
    x = make_input(case)
    low = copy.deepcopy(gates).to(torch.bfloat16)
    x_low = x.to(torch.bfloat16).requires_grad_()
    y_low = fused_cbam(low, x_low, "avg_max")
    weights = torch.randn(x.shape, dtype=torch.float64)
    (y_low.double() * weights).sum().backward()
    x_high = x_low.detach().double().requires_grad_()  # the same rounded inputs
    y_high = reference_cbam(gates, x_high, "avg_max")
    (y_high * weights).sum().backward()
    assert y_low.dtype == torch.bfloat16 and x_low.grad.dtype == torch.bfloat16
    assert low.mlp[0].weight.grad.dtype == torch.bfloat16  # gradients in each parameter's own dtype
    for low_value, high_value in ((y_low, y_high), (x_low.grad, x_high.grad)):
        scale = high_value.abs().max()
        assert (low_value.double() - high_value).abs().max() <= 0.03 * scale


@pytest.mark.parametrize(
    "shape, channels_last",
    [((2, 3, 20, 20), False), ((2, 300, 2, 2), True), ((3, 5, 4, 6), False)],
    ids=["400-pixel-ties", "300-channel-ties", "small"],
)
def test_ties_send_the_max_gradient_where_the_reference_layer_does(shape, channels_last):
    """Inputs of a few integer values tie in both max poolings, also across the kernels' tiles (400
    pixels; 300 channels_last channels): the gradient goes to the first maximum, as torch.max (the
    reference layer's max) sends it."""
    torch.manual_seed(5)
    reference = CBAM(shape[1], 1, 3, impl="reference").double()
    fused = copy.deepcopy(reference)
    fused.impl = "fused"
    x = torch.randint(-2, 1, shape).double()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    weights = torch.randn(shape, dtype=torch.float64)
    for layer, value in zip((reference, fused), inputs):
        (layer(value) * weights).sum().backward()
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, **TOLERANCES[torch.float64])
    for (name, p_reference), (_, p_fused) in zip(reference.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(p_fused.grad, p_reference.grad, **TOLERANCES[torch.float64], msg=name)


def test_library_op_gives_what_the_eager_path_gives(monkeypatch):
    """torch.compile traces the torch.library op (which moves the running statistics outside the kernels);
    eager mode calls the autograd.Function. The same kernels: the same numbers."""
    torch.manual_seed(3)
    case = Case((2, 6, 5, 7), channels_last=True)
    gates = make_gates(case)
    x = make_input(case)
    twin = copy.deepcopy(gates)
    x_eager, x_library = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = fused_cbam(gates, x_eager, "avg_max")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the op path, run eagerly
    y_library = fused_cbam(twin, x_library, "avg_max")
    monkeypatch.undo()
    weights = torch.randn(x.shape, dtype=x.dtype)
    (y_eager * weights).sum().backward()
    (y_library * weights).sum().backward()
    assert torch.equal(y_eager, y_library) and torch.equal(x_eager.grad, x_library.grad)
    twin_parameters = dict(twin.named_parameters())
    for name, parameter in gates.named_parameters():
        assert torch.equal(parameter.grad, twin_parameters[name].grad), name
    twin_buffers = dict(twin.named_buffers())
    for name, buffer in gates.named_buffers():
        torch.testing.assert_close(twin_buffers[name], buffer, **TOLERANCES[torch.float64], msg=name)
    assert twin.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    """Schema and autograd registration. The fake-tensor and AOT-dispatch checks would run the
    interpreted kernels on fake tensors (the interpreter copies every argument to the host), so they
    run on a GPU, in benchmarks/check_fused_gpu.py."""
    gates = make_gates(Case((2, 6, 3, 5), training=training))
    first, _, second = gates.mlp
    bn = gates.bn
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    arguments = (
        x, first.weight, first.bias, second.weight, second.bias, gates.conv.weight, bn.weight, bn.bias,
        bn.running_mean, bn.running_var, "avg_max", training, bn.eps,
    )  # fmt: skip
    torch.library.opcheck(
        torch.ops.cbam.fused_cbam.default, arguments, test_utils=("test_schema", "test_autograd_registration")
    )


def test_the_launches_are_worked_out_for_symbolic_sizes():
    """torch.compile with dynamic shapes (as after a second batch size) runs the ops' host code on fake
    tensors with symbolic sizes: the launch plan, cached per shape, must not take a symbolic size as its key
    (it raised "unhashable type: SymInt"), and the grids follow the symbolic batch size. Traced with the
    launches recorded, not run (the interpreter would run the kernels on the fake tensors)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from cbam.models.fused import ops

    launched = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *arguments, **constants: launched.append((self.kernel.__name__, grid))

    def step(x, *tensors):
        parameters, (running_mean, running_var) = tensors[:7], tensors[7:]
        running = (running_mean, running_var, running_mean)
        y, saved = ops.forward(x, parameters, running, "avg_max", True, False, 0.0, 1e-5, Recorded)
        return y, ops.backward(torch.ones_like(y), x, parameters, saved, "avg_max", True, Recorded)[0]

    gates = make_gates(Case((4, 8, 6, 6)))
    first, _, second = gates.mlp
    bn = gates.bn
    weights = (first.weight, first.bias, second.weight, second.bias, gates.conv.weight, bn.weight, bn.bias)
    tensors = [t.detach() for t in weights] + [bn.running_mean, bn.running_var]
    make_fx(step, tracing_mode="symbolic")(torch.randn(4, 8, 6, 6, dtype=torch.float64), *tensors)
    assert [name.removesuffix("_kernel") for name, _ in launched] == [
        "channel_pool", "gate_conv", "gated_output", "output_backward", "spatial_backward", "input_backward"
    ]  # fmt: skip
    batch_grids = [grid for name, grid in launched if name in ("channel_pool_kernel", "gate_conv_kernel")]
    assert all(isinstance(grid[0], torch.SymInt) for grid in batch_grids), batch_grids


def test_fused_available(monkeypatch):
    assert fused_available("cpu")  # the interpreter is on in the tests
    assert not fused_available("meta")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fused_available(torch.device("cpu"))


def test_unknown_channel_pooling_is_an_invalid_argument():
    gates = make_gates(Case((1, 4, 2, 2)))
    with pytest.raises(InvalidArgument, match="channel_pooling=mean"):
        fused_cbam(gates, torch.randn(1, 4, 2, 2, dtype=torch.float64), "mean")


# ------------------------------------------------------------------------------------------- host work


def test_a_fused_block_is_its_six_kernel_launches_and_nothing_else():
    """Forward and backward of one CBAM layer: 3 + 3 Triton launches, no PyTorch operator around them
    (counted by cbam.analysis.host_ops's rules: views, metadata and allocations aside)."""
    forward = host_ops.block_counts("fused", channels=8, size=4, batch=2, device=torch.device("cpu"))
    launches = [name.removeprefix(host_ops.LAUNCH_PREFIX) for name in forward["operations"]]
    assert forward["forward"] == 3 and forward["backward"] == 3, forward["operations"]
    assert sorted(launches) == sorted(
        ["channel_pool_kernel", "gate_conv_kernel", "gated_output_kernel",
         "output_backward_kernel", "spatial_backward_kernel", "input_backward_kernel"]
    )  # fmt: skip
    reference = host_ops.block_counts("reference", channels=8, size=4, batch=2, device=torch.device("cpu"))
    assert reference["total"] > 4 * forward["total"]  # the counter sees the reference's many operators


def test_a_fused_resnet18_training_step_costs_under_1_3x_the_plain_steps_host_operations():
    cpu = torch.device("cpu")
    plain = host_ops.step_counts(18, "plain", width=2, batch=2, device=cpu)
    fused = host_ops.step_counts(18, "fused", width=2, batch=2, device=cpu)
    assert fused["triton_launches"] == 8 * 6  # 8 blocks, 6 launches each
    assert fused["operations"] - fused["triton_launches"] == plain["operations"]  # nothing else added
    assert fused["operations"] <= 1.3 * plain["operations"]


def test_host_ops_profile_quick_splits_a_fused_step_into_operators_and_launches(capsys):
    """benchmarks/host_ops.py --profile --quick: a fused step's host time, with its Triton launches."""
    import host_ops as script

    report = script.main(["--profile", "--quick"])
    assert report["settings"]["impl"] == "fused" and report["wall_ms_median"] > 0
    assert report["host_ms_in_operators"] > 0 and report["host_ms_in_triton_launches"] > 0
    assert any(entry["name"].startswith(host_ops.LAUNCH_PREFIX) for entry in report["top"])


def test_gpu_check_script_quick_run_agrees_and_reports(capsys):
    """benchmarks/check_fused_gpu.py --quick: the CPU smoke run of the GPU check (a check, not a timing),
    run in this process as the script would run it (the interpreter is on here already)."""
    import check_fused_gpu

    check_fused_gpu.main(["--quick"])
    report = json.loads(capsys.readouterr().out)
    (row,) = report["blocks"]
    assert row["passed"] and not row["nonfinite"] and row["relative_difference"]["input_grad"] < 1e-4
    assert set(report["resnet18_step_ms"]) == {"plain", "reference", "fused"}


# ------------------------------------------------------------------------------------------- train.py


def test_flops_are_counted_on_the_meta_device_the_same_for_every_implementation():
    """The FLOP counter and the config check build and run the network on the meta device, where the
    fused kernels cannot run: every implementation then computes the reference layer's function."""
    from cbam.models.cbam import IMPLS

    options = dict(width=4, reduction_ratio=4, use_cbam_block=True)
    counts = {impl: count_flops(build_resnet(18, impl=impl, **options)) for impl in IMPLS}
    assert len(set(counts.values())) == 1, counts
    assert counts["fused"] > count_flops(build_resnet(18, width=4))  # the CBAM's MLP and convolution count
    with torch.device("meta"):
        assert build_resnet(18, impl="fused", **options)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_train_py_fits_checkpoints_and_tests_with_the_fused_layer(tmp_path, train_in_process):
    """model.cbam_impl=fused through train.py's main (Triton's interpreter on the CPU): the FLOP count (meta
    device), fit, checkpoint, test; the checkpoint loads into the reference layer. One CBAM, before the
    classifier: each launch is slow in the interpreter, and a CBAM in every block made 96 of them."""
    root = write_random_pngs(tmp_path / "data", 2, 1, [f"class{i}" for i in range(10)])
    run_dir = tmp_path / "run"
    status, stderr, _ = train_in_process(
        run_dir, "cbam=classifier", "model.cbam_impl=fused", "model.width=2", "model.reduction_ratio=2",
        "data.batch_size=4", "data.val_size=4", "data.num_workers=0", f"data.root={root}",
        "data.download=false", "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
        "+trainer.limit_test_batches=1", "++trainer.num_sanity_val_steps=0", "callbacks.attention_maps=null",
    )  # fmt: skip
    assert status == 0, stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["test_acc"] <= 1 and metrics["global_step"] == 1
    reference = build_resnet(18, width=2, reduction_ratio=2, use_cbam_class=True, impl="reference")
    assert metrics["flops_per_image"] == count_flops(reference)  # counted on the meta device
    (checkpoint,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    reference.load_state_dict(
        {key.removeprefix("net."): value for key, value in state.items() if key.startswith("net.")}
    )
    assert state["net.attention.spatial.bn.num_batches_tracked"].item() == 1  # one fused step ran
