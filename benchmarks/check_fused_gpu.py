"""Check the fused CBAM (cbam.fused) against the reference layer on a GPU, eager and under torch.compile,
and time one CBAM-ResNet18 BasicBlock forward + backward with each (and without attention).

For each block shape (default: the first and last ResNet18 stages at batch 512) and each precision
(fp32; bf16 autocast on bf16 channels_last activations, as ``trainer=gpu`` trains), it reports the largest
difference between fused and reference in the output, the input gradient, every parameter gradient and
the BatchNorm running statistics, relative to the largest reference value, and the median step time.
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

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import describe_device, software_versions  # noqa: E402

from cbam.attention import CBAM  # noqa: E402
from cbam.fused import cbam_fused, fused_available  # noqa: E402
from cbam.resnet import BasicBlock  # noqa: E402

#: largest accepted difference relative to the largest reference value, per precision
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


class FusedCBAM(nn.Module):
    """The reference layer's parameters driven through cbam_fused."""

    def __init__(self, reference: CBAM) -> None:
        super().__init__()
        self.channel, self.spatial = reference.channel, reference.spatial

    def channel_gate(self, average: torch.Tensor, maximum: torch.Tensor) -> torch.Tensor:
        both = self.channel.mlp(torch.cat((average, maximum), dim=0))
        return torch.sigmoid(sum(both.chunk(2, dim=0)))[:, :, None, None]

    def spatial_gate(self, maps: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.spatial.bn(self.spatial.conv(maps)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cbam_fused(x, self.channel_gate, self.spatial_gate)


def make_blocks(channels: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    reference = BasicBlock(channels, channels, 1, lambda c: CBAM(c, 16, 7))
    fused = copy.deepcopy(reference)
    fused.attention = FusedCBAM(fused.attention)
    plain = copy.deepcopy(reference)
    plain.attention = nn.Identity()
    return {name: block.to(device).to(memory_format=torch.channels_last)
            for name, block in (("plain", plain), ("reference", reference), ("fused", fused))}


def step(block: nn.Module, x: torch.Tensor, weights: torch.Tensor, precision: str) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        y = block(x)
    (y.float() * weights).sum().backward()
    return y


def relative_differences(reference: nn.Module, fused: nn.Module, x_ref, x_fused, y_ref, y_fused) -> dict:
    def worst(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-12)).item()

    report = {"output": worst(y_ref, y_fused), "input_grad": worst(x_ref.grad, x_fused.grad)}
    fused_parameters = dict(fused.named_parameters())
    report["parameter_grads"] = max(worst(p.grad, fused_parameters[n].grad) for n, p in reference.named_parameters())
    fused_buffers = dict(fused.named_buffers())
    report["running_stats"] = max(
        worst(b, fused_buffers[n]) for n, b in reference.named_buffers() if b.is_floating_point()
    )
    return report


def timed_ms(block: nn.Module, x: torch.Tensor, weights: torch.Tensor, precision: str, repeats: int) -> float:
    for _ in range(3):
        step(block, x, weights, precision)
    times = []
    for _ in range(repeats):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(block, x, weights, precision)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def check(channels: int, size: int, batch: int, precision: str, compiled: bool, device, repeats: int) -> dict:
    blocks = make_blocks(channels, device)
    if compiled:
        blocks = {name: torch.compile(block) for name, block in blocks.items()}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, channels, size, size, device=device, generator=generator)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    weights = torch.randn(x.shape, device=device, generator=generator).contiguous(memory_format=torch.channels_last)
    inputs = {name: x.clone().requires_grad_() for name in blocks}
    outputs = {name: step(blocks[name], inputs[name], weights, precision) for name in ("reference", "fused")}
    row = {"channels": channels, "size": size, "batch": batch, "precision": precision, "compiled": compiled}
    row["relative_difference"] = relative_differences(
        blocks["reference"], blocks["fused"], inputs["reference"], inputs["fused"],
        outputs["reference"], outputs["fused"],
    )
    row["passed"] = all(value <= TOLERANCE[precision] for value in row["relative_difference"].values())
    row["step_ms"] = {name: timed_ms(block, inputs[name], weights, precision, repeats)
                      for name, block in blocks.items()}
    return row


def opcheck_all(device: torch.device) -> dict:
    """torch.library.opcheck on every op (schema, fake tensors, autograd registration, AOT dispatch)."""
    x = torch.randn(2, 8, 5, 7, device=device, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(2, 8, 1, 1, device=device, dtype=torch.float64, requires_grad=True)
    spatial = torch.rand(2, 1, 5, 7, device=device, dtype=torch.float64, requires_grad=True)
    cases = {
        "channel_pool": (torch.ops.cbam.channel_pool.default, (x,)),
        "gated_pool": (torch.ops.cbam.gated_pool.default, (x, gate)),
        "gated_output": (torch.ops.cbam.gated_output.default, (x, gate, spatial)),
    }
    results = {}
    for name, (op, args) in cases.items():
        try:
            torch.library.opcheck(op, args)
            results[name] = "ok"
        except Exception as error:  # reported, not raised: the other checks still run
            results[name] = f"{type(error).__name__}: {str(error)[:300]}"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU under the Triton interpreter, tiny sizes")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick else "cuda")
    if not fused_available(device):
        sys.exit(f"check_fused_gpu: the fused kernels cannot run on {device} (needs CUDA, or --quick)")
    if args.quick:
        shapes, batch, repeats, precisions, modes = [(16, 4)], 2, 1, ["fp32"], [False]
    else:
        shapes, batch, repeats = [(64, 32), (512, 4)], args.batch, args.repeats
        precisions, modes = ["fp32", "bf16"], [False, True]
    report = {"device": describe_device(device), "software": software_versions(), "date": time.strftime("%Y-%m-%d"),
              "opcheck": opcheck_all(device) if not args.quick else None, "results": []}
    for channels, size in shapes:
        for precision in precisions:
            for compiled in modes:
                report["results"].append(check(channels, size, batch, precision, compiled, device, repeats))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
