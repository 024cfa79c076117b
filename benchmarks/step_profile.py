"""Where the host time of a training step goes: a CBAM-ResNet training step (forward, cross-entropy,
backward, SGD; bf16 autocast, channels_last and fused SGD on a GPU, as ``trainer=gpu``) recorded with
``torch.profiler``'s CPU activities.

Per step, it reports the wall time, the host time spent inside PyTorch operators and inside Triton
launches (each launch is a profiler range ``triton launch: <kernel>``, see benchmarks/host_ops.py), and
what is left: Python and framework code between them (autograd, module calls, the layer's own Python).
The operators and launches with the most host time are listed, with their calls per step. On a GPU the
step is host-bound when the wall time follows the host time rather than the kernels' time. Examples::

    python benchmarks/step_profile.py --impl fused --out step_profile.json      # on a GPU
    python benchmarks/step_profile.py --quick                                   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--quick" in sys.argv:  # the interpreter must be on before the Triton kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import describe_device, software_versions
from host_ops import LAUNCH_PREFIX, launches_recorded

from cbam import build_resnet


def make_step(net: torch.nn.Module, batch: int, device: torch.device):
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


def measure(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    net = build_resnet(
        args.depth,
        width=args.width,
        reduction_ratio=min(16, args.width),
        use_cbam_block=args.impl != "none",
        impl="reference" if args.impl == "none" else args.impl,
    ).to(device)
    if gpu:
        net = net.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    step = make_step(net, args.batch, device)
    with launches_recorded():
        for _ in range(args.warmup):
            step()
        synchronize(device)
        walls = []
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as recording:
            for _ in range(args.steps):
                started = time.perf_counter()
                step()
                synchronize(device)  # the wall time of each step on its own
                walls.append(time.perf_counter() - started)
    return summarise(recording, walls, args.steps, gpu)


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impl", default="fused", help="none (no CBAM), reference or fused")
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="CPU under the Triton interpreter, tiny sizes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.warmup, args.steps = 4, 2, 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    report = {
        "device": describe_device(device),
        "software": software_versions(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        **measure(args, device),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
