"""Where a CBAM layer's training time goes on a CPU: forward + backward of the whole layer and of its parts,
at the input shape of each stage of the CIFAR ResNet18, timed round-robin in one process (so that drift slows
every part alike); the median over rounds, in ms, and per training step (two layers a stage).

Parts: the channel gate (``x * channel_gate(x)``), the spatial gate (``x * spatial_gate(x)``), and the spatial
gate's k x k convolution alone (2 input channels, 1 output) on its pooled maps: channels_last, as the layer
runs it on a CPU, NCHW, and NCHW with oneDNN switched off (PyTorch's own kernel). All eager (``--compiled``
adds the layer compiled, as ``model.compile_attention`` runs it), fp32, one ``--threads`` setting; the input
channels_last, as the device loader and the network give it.

    python benchmarks/attention_parts.py --compiled --out attention_parts.json
    python benchmarks/attention_parts.py --quick      # smoke run: tiny sizes, one round
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

#: ResNet18's stages: (channels as multiples of the width, feature map side on 32x32 images)
STAGES = ((1, 32), (2, 16), (4, 8), (8, 4))
#: CBAM layers per stage in ResNet18 (one per BasicBlock)
LAYERS_PER_STAGE = 2
PARTS = ("layer", "channel_gate", "spatial_gate", "conv_channels_last", "conv_nchw", "conv_nchw_native")
#: with ``--compiled``: the layer as ``model.compile_attention`` (trainer=cpu) runs it
COMPILED_PART = "layer_compiled"


def part_steps(channels: int, side: int, batch: int, reduction_ratio: int, compiled: bool) -> dict:
    """A forward + backward function for each of :data:`PARTS` (and :data:`COMPILED_PART`) at one stage's
    shape."""
    from torch import nn

    from cbam import CBAM
    from cbam.models.compiled_attention import compile_attention_layers
    from cbam.runtime.lightning_internals import allow_compiled_variants

    layer = CBAM(channels, reduction_ratio=reduction_ratio)
    x = torch.randn(batch, channels, side, side).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    maps = layer.spatial.pooled_maps(x).detach()
    weight = layer.spatial.conv.weight
    padding = layer.spatial.conv.padding

    leaves = [x, *layer.parameters()]  # (and what is made below)

    def backward(out: torch.Tensor) -> None:
        out.backward(torch.ones_like(out))
        for leaf in leaves:  # written afresh by each call, as after a training step's zero_grad
            leaf.grad = None

    def conv(memory_format: torch.memory_format, onednn: bool):
        pooled = maps.contiguous(memory_format=memory_format).requires_grad_(True)
        leaves.append(pooled)

        def step() -> None:
            with torch.backends.mkldnn.flags(enabled=onednn):
                backward(F.conv2d(pooled, weight, padding=padding))

        return step

    steps = {
        "layer": lambda: backward(layer(x)),
        "channel_gate": lambda: backward(layer.channel(x)),
        "spatial_gate": lambda: backward(layer.spatial(x)),
        "conv_channels_last": conv(torch.channels_last, True),
        "conv_nchw": conv(torch.contiguous_format, True),
        "conv_nchw_native": conv(torch.contiguous_format, False),
    }
    if compiled:
        holder = nn.Sequential(CBAM(channels, reduction_ratio=reduction_ratio))
        allow_compiled_variants(compile_attention_layers(holder))
        leaves.extend(holder.parameters())
        steps[COMPILED_PART] = lambda: backward(holder(x))
    return steps


def measure(args) -> list[dict]:
    """One row per (stage, part): the median over ``args.rounds`` of ``args.repeats`` calls, ms per call."""
    cases = []
    for multiple, side in STAGES:
        channels = multiple * args.width
        steps = part_steps(channels, side, args.batch_size, args.reduction_ratio, args.compiled)
        for part, step in steps.items():
            for _ in range(args.warmup):
                step()
            cases.append(({"channels": channels, "side": side, "part": part}, step, []))
    for _ in range(args.rounds):
        for _, step, times in cases:
            started = time.perf_counter()
            for _ in range(args.repeats):
                step()
            times.append(1000 * (time.perf_counter() - started) / args.repeats)
    return [{**row, "ms": round(statistics.median(times), 3), "ms_min": round(min(times), 3)}
            for row, _, times in cases]  # fmt: skip


def per_step(rows: list[dict]) -> dict[str, float]:
    """Each part's time in one training step of ResNet18 (every stage, :data:`LAYERS_PER_STAGE` layers)."""
    parts = dict.fromkeys(row["part"] for row in rows)
    totals = {part: sum(row["ms"] for row in rows if row["part"] == part) for part in parts}
    return {part: round(LAYERS_PER_STAGE * total, 2) for part, total in totals.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=16, help="the network's width (stage 1's channels)")
    parser.add_argument("--reduction-ratio", type=int, default=16, help="of the channel gate's MLP")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5, help="calls per part and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="also the layer as trainer=cpu compiles it")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
    parser.add_argument("--out", help="write the report here as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.reduction_ratio, args.batch_size = 4, 4, 8
        args.rounds, args.repeats, args.warmup = 1, 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from cbam.runtime.provenance import run_record

    rows = measure(args)
    report = {
        **run_record(torch.device("cpu"), "32-true", data=None),  # as a run's metrics.json records it
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "per_step_ms": per_step(rows),
    }
    print(json.dumps(report["per_step_ms"], indent=1), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
