"""Check the fused CBAM (cbam.models.fused) against the reference layer on a GPU, eager and under torch.compile,
and time one CBAM-ResNet18 BasicBlock forward + backward with each (and without attention).

For each block shape (default: the first and last ResNet18 stages at batch 512) and each precision
(fp32; bf16 autocast on bf16 channels_last activations, as ``trainer=gpu`` trains), it reports the relative
difference (L2 norm) between fused and reference in the output, the input gradient, the parameter gradients
(the worst one) and the BatchNorm running statistics, and the median step time.
Prints JSON. Examples::

    python benchmarks/check_fused_gpu.py                  # on a GPU
    python benchmarks/check_fused_gpu.py --quick          # CPU, Triton interpreter, tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

if "--quick" in sys.argv:  # the interpreter must be on before the Triton kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import describe_device, software_versions

from cbam.models.cbam import CBAM
from cbam.models.fused import fused_available
from cbam.models.resnet import BasicBlock, build_resnet

#: largest accepted relative difference (L2 norm of the difference / L2 norm of the reference), per precision
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


def make_blocks(channels: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    reference = BasicBlock(channels, channels, 1, lambda c: CBAM(c, 16, 7))
    fused = copy.deepcopy(reference)
    fused.attention.impl = "fused"  # the same parameters, driven through the fused kernels
    plain = copy.deepcopy(reference)
    plain.attention = nn.Identity()
    return {
        name: block.to(device).to(memory_format=torch.channels_last)
        for name, block in (("plain", plain), ("reference", reference), ("fused", fused))
    }


def step(block: nn.Module, x: torch.Tensor, weights: torch.Tensor, precision: str) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        y = block(x)
    (y.float() * weights).sum().backward()
    return y


def relative_differences(reference: nn.Module, fused: nn.Module, x_ref, x_fused, y_ref, y_fused) -> dict:
    def worst(a: torch.Tensor, b: torch.Tensor) -> float:
        # relative L2 norm: a max-pooling gradient moved between two near-tied elements (bf16) shifts a
        # few entries by the whole gradient, which a max-norm would report as a 100% error
        return ((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12)).item()

    report = {"output": worst(y_ref, y_fused), "input_grad": worst(x_ref.grad, x_fused.grad)}
    fused_parameters = dict(fused.named_parameters())
    report["parameter_grads"] = max(
        worst(p.grad, fused_parameters[n].grad) for n, p in reference.named_parameters()
    )
    fused_buffers = dict(fused.named_buffers())
    report["running_stats"] = max(
        worst(b, fused_buffers[n]) for n, b in reference.named_buffers() if b.is_floating_point()
    )
    return report


def median_ms(run, device: torch.device, repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after up to three warm-up calls (none for one)."""
    for _ in range(min(3, repeats - 1)):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def forward_backward(block: nn.Module, x: torch.Tensor, weights: torch.Tensor, precision: str):
    """(y, x with its gradient) after one forward and backward from a fresh copy of ``x``."""
    x = x.detach().clone().requires_grad_()
    return step(block, x, weights, precision), x


def nonfinite(name: str, block: nn.Module, y: torch.Tensor, x: torch.Tensor) -> list[str]:
    """Which of the output, input gradient and parameter gradients hold a NaN or an infinity."""
    tensors = {"output": y, "input_grad": x.grad}
    tensors.update({f"{n}.grad": p.grad for n, p in block.named_parameters()})
    return [f"{name}:{key}" for key, value in tensors.items() if not value.float().isfinite().all()]


def check(channels: int, size: int, batch: int, precision: str, compiled: bool, device, repeats: int) -> dict:
    """fp32: fused against reference. bf16: ties among bf16 values make the max pooling's gradient
    implementation-defined (each implementation gives it to one of the tied maxima, not necessarily the
    same one), so each implementation is compared with its own fp32 twin on the same bf16-rounded input,
    and the fused error may be at most twice the reference's."""
    blocks = make_blocks(channels, device)
    generator = torch.Generator(device=device).manual_seed(1)
    shape = (batch, channels, size, size)
    x = torch.randn(shape, device=device, generator=generator).contiguous(memory_format=torch.channels_last)
    weights = torch.randn(shape, device=device, generator=generator)
    weights = weights.contiguous(memory_format=torch.channels_last)
    prepare = torch.compile if compiled else (lambda block: block)
    row = {"channels": channels, "size": size, "batch": batch, "precision": precision, "compiled": compiled}
    if precision == "fp32":
        runs = {
            name: forward_backward(prepare(blocks[name]), x, weights, "fp32")
            for name in ("reference", "fused")
        }
        (y_ref, x_ref), (y_fused, x_fused) = runs["reference"], runs["fused"]
        row["relative_difference"] = relative_differences(
            blocks["reference"], blocks["fused"], x_ref, x_fused, y_ref, y_fused
        )
        row["nonfinite"] = nonfinite("reference", blocks["reference"], y_ref, x_ref) + nonfinite(
            "fused", blocks["fused"], y_fused, x_fused
        )
        row["passed"] = not row["nonfinite"] and all(
            value <= TOLERANCE["fp32"] for value in row["relative_difference"].values()
        )
    else:
        x = x.to(torch.bfloat16)
        row["error_vs_fp32"], row["nonfinite"] = {}, []
        for name in ("reference", "fused"):
            high = copy.deepcopy(blocks[name])
            y_low, x_low = forward_backward(prepare(blocks[name]), x, weights, "bf16")
            y_high, x_high = forward_backward(prepare(high), x.float(), weights, "fp32")
            row["error_vs_fp32"][name] = relative_differences(
                high, blocks[name], x_high, x_low, y_high, y_low
            )
            row["nonfinite"] += nonfinite(name, blocks[name], y_low, x_low)
        errors = row["error_vs_fp32"]
        row["passed"] = not row["nonfinite"] and all(
            errors["fused"][key] <= 2 * errors["reference"][key] + 1e-3 for key in errors["fused"]
        )
    timed = {name: prepare(block) for name, block in blocks.items()}
    x = x.detach().requires_grad_()
    row["step_ms"] = {
        name: median_ms(lambda: step(block, x, weights, precision), device, repeats)
        for name, block in timed.items()
    }
    return row


def profile(channels: int, size: int, batch: int, device: torch.device) -> None:
    """The CUDA kernels of one eager bf16 forward + backward of each block, slowest first, on stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    blocks = make_blocks(channels, device)
    x = torch.randn(batch, channels, size, size, device=device).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    weights = torch.randn_like(x, dtype=torch.float32)
    for name, block in blocks.items():
        for _ in range(3):
            step(block, x, weights, "bf16")
        torch.cuda.synchronize()
        with profiler(activities=[ProfilerActivity.CUDA]) as trace:
            step(block, x, weights, "bf16")
            torch.cuda.synchronize()
        table = trace.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
        title = f"=== {name} block, C={channels}, {size}x{size}, batch {batch}, bf16 eager"
        print(f"{title}\n{table}", file=sys.stderr)


def network_step_ms(batch: int, device: torch.device, repeats: int, width: int) -> dict[str, float]:
    """One ResNet18 training step (forward, cross-entropy, backward; no optimizer), bf16 autocast,
    channels_last, eager: without attention, with the reference CBAM and with the fused one in every block."""
    torch.manual_seed(0)
    networks = {
        "plain": build_resnet(18, width=width),
        "reference": build_resnet(
            18, use_cbam_block=True, width=width, reduction_ratio=min(16, width), impl="reference"
        ),
    }
    networks["fused"] = copy.deepcopy(networks["reference"])
    for module in networks["fused"].modules():
        if isinstance(module, CBAM):
            module.impl = "fused"
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    times = {}
    for name, network in networks.items():
        network = network.to(device).to(memory_format=torch.channels_last)

        def train_step(network=network):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = nn.functional.cross_entropy(network(images), labels)
            loss.backward()

        times[name] = median_ms(train_step, device, repeats)
    return times


def opcheck_all(device: torch.device) -> dict:
    """torch.library.opcheck on the fused layer's op (schema, fake tensors, autograd registration, AOT
    dispatch), in training and in evaluation mode."""
    layer = CBAM(8, 2, 3).to(device, torch.float64)
    first, _, second = layer.channel.mlp
    bn = layer.spatial.bn
    x = torch.randn(2, 8, 5, 7, device=device, dtype=torch.float64, requires_grad=True)
    parameters = [
        first.weight,
        first.bias,
        second.weight,
        second.bias,
        layer.spatial.conv.weight,
        bn.weight,
        bn.bias,
    ]
    results = {}
    for training in (True, False):
        arguments = (x, *parameters, bn.running_mean, bn.running_var, "avg_max", training, bn.eps)
        try:
            torch.library.opcheck(torch.ops.cbam.fused_cbam.default, arguments)
            results[f"fused_cbam training={training}"] = "ok"
        except Exception as error:  # reported, not raised: the other checks still run
            results[f"fused_cbam training={training}"] = f"{type(error).__name__}: {str(error)[:300]}"
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="CPU under the Triton interpreter, tiny sizes")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--eager-only", action="store_true", help="skip the torch.compile checks (slow to build)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print each block's CUDA kernels (on stderr)"
    )
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.quick else "cuda")
    if not fused_available(device):
        sys.exit(f"check_fused_gpu: the fused kernels cannot run on {device} (needs CUDA, or --quick)")
    if args.quick:
        shapes, batch, repeats, width = [(16, 4)], 2, 1, 2
    else:  # the first and last ResNet18 stages; torch.compile (slow to build) on the first only
        shapes, batch, repeats, width = [(64, 32), (512, 4)], args.batch, args.repeats, 64
    report = {
        "device": describe_device(device),
        "software": software_versions(),
        "date": time.strftime("%Y-%m-%d"),
        "blocks": [],
    }

    def save() -> None:  # after every result: a run cut short by a time limit keeps what it has
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    # eager first, then the slow builds: torch.compile, opcheck's compiled dispatch
    for compiled in (False,) if args.quick or args.eager_only else (False, True):
        for index, (channels, size) in enumerate(shapes):
            if compiled and index > 0:  # torch.compile on the first shape only
                continue
            for precision in ("fp32",) if args.quick else ("fp32", "bf16"):  # bf16 is noise when tiny
                report["blocks"].append(check(channels, size, batch, precision, compiled, device, repeats))
                save()
    report["resnet18_step_ms"] = network_step_ms(batch, device, repeats, width)
    save()
    report["opcheck"] = None if args.quick else opcheck_all(device)
    save()
    print(json.dumps(report, indent=1))
    if args.profile and not args.quick:
        profile(*shapes[0], batch, device)
    return report


if __name__ == "__main__":
    main()
