"""Host work of a training step, counted: the operations a step dispatches, each of which is at least one
kernel launch with its host-side dispatch on a GPU.

A step (``zero_grad``, forward, cross-entropy, backward, SGD step) is recorded with ``torch.profiler``
(CPU activities) and counted as:

* every aten operator that does work of its own: an ``aten::`` event with no counted operator beneath it.
  Views, metadata and allocations (:data:`NOT_WORK`: view, t, detach, expand, empty, as_strided, resize_,
  promote_types, ...) are not counted; a composite operator that only calls others (``aten::linear``,
  ``aten::to`` that copies) counts through what it calls, so work inside a custom op or an
  ``autograd.Function`` counts too;
* every multi-tensor operator (``aten::_foreach_*``, ``aten::_fused_*``) once: on a GPU it is one
  dispatch (the CPU runs it as a loop of per-tensor operators, which are not counted);
* every Triton kernel launch once, whatever the launch runs inside (under ``TRITON_INTERPRET=1`` the
  interpreter's own tensor copies are not counted).

The optimizer is the project's SGD (``conf/optim/sgd.yaml``: momentum 0.9, Nesterov, weight decay 5e-4)
with ``foreach=True``, the implementation torch picks for CUDA tensors. Besides whole steps, the forward
and backward of one CBAM layer alone are counted (``per_block``).

Runs on the CPU (Triton through its interpreter, set here unless TRITON_INTERPRET is already set) or on a
GPU (``--device cuda``)::

    python benchmarks/host_ops.py --depths 18,50 --out host_ops.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
from pathlib import Path

if "--device" not in sys.argv or "cpu" in sys.argv[sys.argv.index("--device") + 1 :][:1]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by Triton when the kernels are defined

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam import CBAM, build_resnet

#: aten operators that do no work of their own: views, metadata, allocations, dtype queries
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


def step_counts(
    depth: int, network: str, width: int, batch: int, device: torch.device, warmup: int = 1
) -> dict:
    torch.manual_seed(0)
    net = build_resnet(
        depth,
        width=width,
        reduction_ratio=min(16, width),
        use_cbam_block=network != "plain",
        impl="reference" if network == "plain" else network,
    ).to(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.arange(batch, device=device) % 10
    counted = recorded_operations(training_step(net, images, labels), warmup)
    return {
        "operations": sum(counted.values()),
        "triton_launches": sum(n for name, n in counted.items() if name.startswith(LAUNCH_PREFIX)),
        "histogram": dict(counted.most_common()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", default="18,50", help="comma-separated ResNet depths")
    parser.add_argument("--impls", default="reference,fused", help="CBAM implementations besides plain")
    parser.add_argument("--width", type=int, default=8, help="model.width of the networks")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block-channels", type=int, default=64, help="channels of the single CBAM layer")
    parser.add_argument("--block-size", type=int, default=16, help="height and width of its input")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    impls = args.impls.split(",")
    report = {
        "device": args.device,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "per_block": {},
        "per_step": [],
    }

    def save() -> None:  # after every count: a run cut short by a time limit keeps what it has
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))

    for impl in impls:
        report["per_block"][impl] = block_counts(
            impl, args.block_channels, args.block_size, args.batch, device
        )
        print(
            f"one CBAM layer, {impl}: {report['per_block'][impl]['total']} operations "
            f"(forward {report['per_block'][impl]['forward']}, backward {report['per_block'][impl]['backward']})"
        )
        save()
    for depth in map(int, args.depths.split(",")):
        plain = None
        for network in ["plain", *impls]:
            row = {
                "depth": depth,
                "network": network,
                **step_counts(depth, network, args.width, args.batch, device),
            }
            plain = plain or row["operations"]
            row["vs_plain"] = round(row["operations"] / plain, 3)
            report["per_step"].append(row)
            print(
                f"ResNet{depth} {network}: {row['operations']} operations per step "
                f"({row['triton_launches']} Triton launches), {row['vs_plain']}x plain"
            )
            save()
    return report


if __name__ == "__main__":
    main()
