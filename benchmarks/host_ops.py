"""Host work of a training step (the rules: :mod:`cbam.analysis.host_ops`), in two modes.

Counting (the default): the operations of one CBAM layer (forward, backward) and of one training step,
plain / reference / fused, per depth. On the CPU, Triton runs through its interpreter (set here unless
TRITON_INTERPRET is already set) and the counts are those a GPU dispatches::

    python benchmarks/host_ops.py --depths 18,50 --out host_ops.json
    python benchmarks/host_ops.py --device cuda --out host_ops.json

``--profile``: where the host time of a training step goes (operators, Triton launches, the rest; the
kernels' device time on a GPU), as ``trainer=gpu`` runs the step::

    python benchmarks/host_ops.py --profile --impl fused --out step_profile.json     # on a GPU
    python benchmarks/host_ops.py --profile --quick                                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def _on_the_cpu(argv: list[str]) -> bool:
    """Whether this run's kernels run on the CPU: a count without ``--device cuda``, a ``--quick`` profile."""
    if "--profile" in argv:
        return "--quick" in argv or not torch.cuda.is_available()
    return "--device" not in argv or argv[argv.index("--device") + 1 :][:1] == ["cpu"]


if _on_the_cpu(sys.argv):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by Triton when the kernels are defined

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import describe_device, software_versions

from cbam.analysis.host_ops import block_counts, step_counts, step_profile


def profile_main(args) -> dict:
    if args.quick:
        args.width, args.batch, args.warmup, args.steps = 4, 2, 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    report = {
        "device": describe_device(device),
        "software": software_versions(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        **step_profile(args.depth, args.impl, args.width, args.batch, device, args.warmup, args.steps),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", default="18,50", help="comma-separated ResNet depths")
    parser.add_argument("--impls", default="reference,fused", help="CBAM implementations besides plain")
    parser.add_argument(
        "--width", type=int, help="model.width of the networks (8 counting, 64 with --profile)"
    )
    parser.add_argument("--batch", type=int, help="2 counting, 512 with --profile")
    parser.add_argument("--block-channels", type=int, default=64, help="channels of the single CBAM layer")
    parser.add_argument("--block-size", type=int, default=16, help="height and width of its input")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    profiling = parser.add_argument_group("--profile: where the host time of a step goes")
    profiling.add_argument("--profile", action="store_true")
    profiling.add_argument("--impl", default="fused", help="none (no CBAM), reference or fused")
    profiling.add_argument("--depth", type=int, default=18)
    profiling.add_argument("--warmup", type=int, default=10)
    profiling.add_argument("--steps", type=int, default=5)
    profiling.add_argument(
        "--quick", action="store_true", help="CPU under the Triton interpreter, tiny sizes"
    )
    args = parser.parse_args(argv)
    if args.profile:
        args.width, args.batch = args.width or 64, args.batch or 512  # a GPU step's sizes
        return profile_main(args)
    args.width, args.batch = args.width or 8, args.batch or 2
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
