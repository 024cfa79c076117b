"""Host work of a training step: the operations it dispatches, counted, and where its host time goes.

On a GPU each counted operation is at least one kernel launch with its host-side dispatch. A step
(``zero_grad``, forward, cross-entropy, backward, SGD step) is recorded with ``torch.profiler`` (CPU
activities) and counted as:

* every aten operator that does work of its own: an ``aten::`` event with no counted operator beneath it.
  Views, metadata and allocations (:data:`NOT_WORK`) are not counted; a composite operator that only calls
  others counts through what it calls, so work inside a custom op or an ``autograd.Function`` counts too;
* every multi-tensor operator (``aten::_foreach_*``, ``aten::_fused_*``) once: on a GPU it is one dispatch;
* every Triton kernel launch once, whatever the launch runs inside (under ``TRITON_INTERPRET=1`` the
  interpreter's own tensor copies are not counted).

The counting step's optimizer is the project's SGD (momentum 0.9, Nesterov, weight decay 5e-4) with
``foreach=True``, the implementation torch picks for CUDA tensors. :func:`step_profile` times a step as
``trainer=gpu`` runs it (bf16 autocast, channels_last, fused SGD on a GPU) and splits its wall time into
operators, Triton launches and the rest (Python and framework code between them).
"""

from __future__ import annotations

import collections
import contextlib
import os
import statistics
import time

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from cbam.models.cbam import CBAM
from cbam.models.resnet import build_resnet

NOT_WORK = frozenset(
    "aten::" + name
    for name in [
        "view",
        "view_as",
        "_unsafe_view",
        "reshape",
        "_reshape_alias",
        "t",
        "transpose",
        "permute",
        "expand",
        "expand_as",
        "squeeze",
        "unsqueeze",
        "flatten",
        "unflatten",
        "select",
        "slice",
        "narrow",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "alias",
        "detach",
        "as_strided",
        "as_strided_",
        "resize_",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
        "numpy_T",
        "promote_types",
        "result_type",
        "to",
        "_to_copy",
        "contiguous",
        "clone",
    ]
)
MULTI_TENSOR_PREFIXES = ("aten::_foreach_", "aten::_fused_")
LAUNCH_PREFIX = "triton launch: "


@contextlib.contextmanager
def launches_recorded():
    """Every Triton kernel launch inside becomes a profiler range ``triton launch: <kernel>``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        yield
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import GridExecutor as owner

        attribute = "__call__"
    else:
        from triton.runtime.jit import JITFunction as owner

        attribute = "run"
    original = getattr(owner, attribute)

    def recorded(self, *args, **kwargs):
        name = getattr(getattr(self, "fn", self), "__name__", "kernel")
        with record_function(LAUNCH_PREFIX + name):
            return original(self, *args, **kwargs)

    setattr(owner, attribute, recorded)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def _counted(event) -> list[str]:
    """The names counted in ``event``'s subtree (see the module doc)."""
    name = event.name
    if name.startswith(LAUNCH_PREFIX) or name.startswith(MULTI_TENSOR_PREFIXES):
        return [name]
    below = [counted for child in event.cpu_children for counted in _counted(child)]
    if below or not name.startswith("aten::") or name in NOT_WORK:
        return below
    return [name]


def count_operations(events) -> collections.Counter:
    """Counted operations of a profile, by name."""
    counter: collections.Counter = collections.Counter()
    for event in events:
        if event.cpu_parent is None:
            counter.update(_counted(event))
    return counter


def recorded_operations(run, warmup: int = 1) -> collections.Counter:
    """The operations of one call of ``run()``, after ``warmup`` calls (Triton compiles, lazy inits)."""
    with launches_recorded():
        for _ in range(warmup):
            run()
        with profile(activities=[ProfilerActivity.CPU]) as recording:
            run()
    return count_operations(recording.events())


def training_step(net: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.SGD(
        net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True
    )
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(net(images), labels).backward()
        optimizer.step()

    return step


def layer_pass(layer: nn.Module, x: torch.Tensor, backward: bool):
    """The forward (and, with ``backward``, the backward) of ``layer`` on a fresh leaf copy of ``x``."""
    grad = torch.randn_like(x)

    def run() -> None:
        layer.zero_grad(set_to_none=True)  # as a training step does: the gradients are assigned, not added
        y = layer(x.detach().requires_grad_())
        if backward:
            y.backward(grad)

    return run


def block_counts(
    impl: str, channels: int, size: int, batch: int, device: torch.device, warmup: int = 1
) -> dict:
    """Counted operations of one default CBAM layer (forward, backward, both) in training mode."""
    layer = CBAM(channels, reduction_ratio=min(16, channels), impl=impl).to(device).train()
    x = torch.randn(batch, channels, size, size, device=device)
    forward = recorded_operations(layer_pass(layer, x, backward=False), warmup)
    both = recorded_operations(layer_pass(layer, x, backward=True), warmup)
    return {
        "forward": sum(forward.values()),
        "backward": sum(both.values()) - sum(forward.values()),
        "total": sum(both.values()),
        "triton_launches": sum(n for name, n in both.items() if name.startswith(LAUNCH_PREFIX)),
        "operations": dict(both.most_common()),
    }


def measured_network(depth: int, impl: str, width: int, device: torch.device) -> nn.Module:
    """The ResNet a measurement trains (seeded): CBAM in every block run by ``impl``, or none for ``impl``
    plain (or none)."""
    torch.manual_seed(0)
    plain = impl in ("plain", "none")
    return build_resnet(
        depth,
        width=width,
        reduction_ratio=min(16, width),
        use_cbam_block=not plain,
        impl="reference" if plain else impl,
    ).to(device)


def step_counts(
    depth: int, network: str, width: int, batch: int, device: torch.device, warmup: int = 1
) -> dict:
    net = measured_network(depth, network, width, device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.arange(batch, device=device) % 10
    counted = recorded_operations(training_step(net, images, labels), warmup)
    return {
        "operations": sum(counted.values()),
        "triton_launches": sum(n for name, n in counted.items() if name.startswith(LAUNCH_PREFIX)),
        "histogram": dict(counted.most_common()),
    }


def profiled_step(net: torch.nn.Module, batch: int, device: torch.device):
    gpu = device.type == "cuda"
    images = torch.randn(batch, 3, 32, 32, device=device)
    if gpu:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch, device=device) % 10
    optimizer = torch.optim.SGD(
        net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=gpu or None
    )
    criterion = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = criterion(net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_profile(
    depth: int, impl: str, width: int, batch: int, device: torch.device, warmup: int, steps: int
) -> dict:
    """Where the host time of ``steps`` training steps goes (:func:`summarise`), after ``warmup`` steps."""
    gpu = device.type == "cuda"
    net = measured_network(depth, impl, width, device)
    if gpu:
        net = net.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    step = profiled_step(net, batch, device)
    with launches_recorded():
        for _ in range(warmup):
            step()
        synchronize(device)
        walls = []
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as recording:
            for _ in range(steps):
                started = time.perf_counter()
                step()
                synchronize(device)  # the wall time of each step on its own
                walls.append(time.perf_counter() - started)
    return summarise(recording, walls, steps, gpu)


def summarise(recording, walls: list[float], steps: int, gpu: bool) -> dict:
    """Per step: wall time, host time in operators and launches (outermost ones only, so nothing is
    counted twice), the rest (Python, and on a GPU the wait for it at the step's end: a step whose rest is
    small is host-bound), and the top entries by host time."""
    per_name: dict[str, dict] = {}
    operators_us = launches_us = 0.0

    def visit(event, inside_counted: bool) -> None:
        nonlocal operators_us, launches_us
        name = event.name
        counted = name.startswith(LAUNCH_PREFIX) or name.startswith("aten::") or name.startswith("cbam::")
        if counted and not inside_counted:
            entry = per_name.setdefault(name, {"calls": 0, "host_us": 0.0})
            entry["calls"] += 1
            entry["host_us"] += event.cpu_time_total
            if name.startswith(LAUNCH_PREFIX):
                launches_us += event.cpu_time_total
            else:
                operators_us += event.cpu_time_total
        for child in event.cpu_children:
            visit(child, inside_counted or counted)

    for event in recording.events():
        if event.cpu_parent is None:
            visit(event, False)
    wall_ms = 1000 * statistics.median(walls)
    host_ms = (operators_us + launches_us) / 1000 / steps
    top = sorted(per_name.items(), key=lambda item: -item[1]["host_us"])[:25]
    report = {
        "steps": steps,
        "wall_ms_median": round(wall_ms, 3),
        "host_ms_in_operators": round(operators_us / 1000 / steps, 3),
        "host_ms_in_triton_launches": round(launches_us / 1000 / steps, 3),
        "host_ms_elsewhere": round(wall_ms - host_ms, 3),
        "top": [
            {
                "name": name,
                "calls_per_step": entry["calls"] / steps,
                "host_us_per_step": round(entry["host_us"] / steps, 1),
            }
            for name, entry in top
        ],
    }
    if gpu:  # the kernels themselves: a CPU operator's device time is that of the kernels it launched
        kernels_us = sum(
            e.self_device_time_total
            for e in recording.key_averages()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        )
        report["device_ms_in_kernels"] = round(kernels_us / 1000 / steps, 3)
    return report
