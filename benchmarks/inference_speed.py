"""Inference speed on the CPU: images per second of a trained-network-shaped ResNet18, plain and with CBAM in
every block, under eager PyTorch, torch.compile and ONNX Runtime, at batch 1 and 256, in one run.

    python benchmarks/inference_speed.py [--width 16] [--batches 1,256] [--arms none,block]
        [--modes eager,compile,onnxruntime] [--seconds 5] [--out inference_speed.json]
    python benchmarks/inference_speed.py --quick        # a smoke run: width 4, batches 1 and 8, short timings

Each network is what ``python -m cbam.predict`` and ``python -m cbam.export`` run: eval mode, float32, NCHW
input of 32x32 images, the CBAMs on their reference code (random weights: speed does not depend on them).

* ``eager``: ``net(x)`` under ``torch.inference_mode()``;
* ``compile``: ``torch.compile(net, dynamic=False)`` (Inductor), compiled anew for each batch size; its first
  call (the compilation) is reported apart, as ``first_call_s``;
* ``onnxruntime``: the ONNX model ``cbam.export`` writes (torch's dynamo exporter, checked against eager), in
  an ONNX Runtime CPU session with as many intra-op threads as torch uses.

Each measurement calls the networks on one fixed batch after two warm-up calls, the plain and the CBAM
network in turn (so that other work on the CPU slows both alike), each at least 3 times and for at least
``--seconds``; the table gives the median call. The CPU's load average is recorded before and after:
figures taken while other work shares the cores are noisy. Prints a Markdown table; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam.data.facts import DataFacts  # noqa: E402
from cbam.runtime.provenance import git_state  # noqa: E402
from cbam.training.lightning_module import CBAMResNetModule  # noqa: E402

MODES = ("eager", "compile", "onnxruntime")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), with whether it computes bf16 (AVX512-BF16) and has AMX."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = [line.split(":", 1) for line in info.splitlines() if ":" in line]
    name = next((value.strip() for key, value in fields if key.strip() == "model name"), "?")
    flags = next((value.split() for key, value in fields if key.strip() == "flags"), [])
    features = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if flag in flags]
    return f"{name} ({os.cpu_count()} logical CPUs; {' '.join(features) or 'no AVX2'})"


def build(cbam: str, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    # (the default reduction ratio 16, or the width where that is narrower: a CBAM needs ratio <= channels)
    options = {"reduction_ratio": min(16, width), "cbam_impl": "reference"}
    module = CBAMResNetModule(width=width, use_cbam_block=cbam == "block", **options)
    return module.net.eval()


def timed(calls: dict[str, object], images: torch.Tensor, seconds: float) -> dict[str, tuple[float, float]]:
    """Per name of ``calls``: (its first call's seconds, the median seconds of its calls after two warm-up
    calls). The calls take turns (one of each, then again), so that other work on a shared CPU slows them
    alike and their ratio holds better than their absolute times."""
    first = {}
    for name, call in calls.items():
        started = time.perf_counter()
        call(images)
        first[name] = time.perf_counter() - started
        call(images)
    times: dict[str, list[float]] = {name: [] for name in calls}
    budget_end = time.perf_counter() + seconds * len(calls)
    while min(map(len, times.values())) < 3 or time.perf_counter() < budget_end:
        for name, call in calls.items():
            started = time.perf_counter()
            call(images)
            times[name].append(time.perf_counter() - started)
    return {name: (first[name], statistics.median(times[name])) for name in calls}


def runners(net: torch.nn.Module, mode: str, threads: int):
    """A function batch -> logits for ``mode``, made anew for each batch size (a fresh compilation)."""
    if mode == "eager":

        def eager(images):
            with torch.inference_mode():
                return net(images)

        return lambda: eager
    if mode == "compile":

        def fresh():
            compiled = torch.compile(net, dynamic=False)

            def call(images):
                with torch.inference_mode():
                    return compiled(images)

            return call

        return fresh
    from cbam.inference import export

    export.check_onnx_installed()
    facts = DataFacts("random", tuple(map(str, range(10))), (32, 32), None, (0.5,) * 3, (0.25,) * 3)
    model = export.to_onnx(net, export.export_program(net, facts), facts)  # checked against eager
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda: (lambda images: session.run(None, {"images": images.numpy()})[0])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, help="the ResNet18's width (default 16; --quick: 4)")
    parser.add_argument("--batches", help="batch sizes (default 1,256; --quick: 1,8)")
    parser.add_argument("--arms", default="none,block", help="none (plain), block (CBAM in every block)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--seconds", type=float, help="least time per measurement (default 5; --quick: 0.2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny network, short timings")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    args.width = args.width or (4 if args.quick else 16)
    args.batches = args.batches or ("1,8" if args.quick else "1,256")
    args.seconds = args.seconds if args.seconds is not None else (0.2 if args.quick else 5.0)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}; accepted: {', '.join(MODES)}")
    return args


def table(rows: list[dict]) -> str:
    """Markdown: a row per arm, mode and batch size, with CBAM's images/s against the plain network's."""
    plain = {(row["mode"], row["batch_size"]): row["images_per_s"] for row in rows if row["cbam"] == "none"}
    lines = [
        "| network | runtime | batch | images/s | ms per batch | vs plain | first call (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        baseline = plain.get((row["mode"], row["batch_size"]))
        ratio = f"{row['images_per_s'] / baseline:.2f}x" if baseline and row["cbam"] != "none" else "–"
        name = "plain" if row["cbam"] == "none" else "CBAM (every block)"
        lines.append(
            f"| {name} | {row['mode']} | {row['batch_size']} | {row['images_per_s']:.1f} | "
            f"{row['ms_per_batch']:.2f} | {ratio} | {row['first_call_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    revision, clean = git_state()
    report = {
        "device": cpu_model(),
        "threads": args.threads,
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "git_revision": revision,
        "git_clean": clean,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": os.getloadavg(),
        "args": {key: value for key, value in vars(args).items() if key != "out"},
        "results": rows,
    }
    if "onnxruntime" in args.modes:
        import onnxruntime

        report["software"]["onnxruntime"] = onnxruntime.__version__
    batches = [int(size) for size in args.batches.split(",")]
    arms = args.arms.split(",")
    nets = {cbam: build(cbam, args.width) for cbam in arms}
    for mode in args.modes.split(","):
        makers = {cbam: runners(nets[cbam], mode, args.threads) for cbam in arms}
        for size in batches:
            images = torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(size))
            measured = timed({cbam: make() for cbam, make in makers.items()}, images, args.seconds)
            for cbam, (first, median) in measured.items():
                row = {
                    "cbam": cbam,
                    "mode": mode,
                    "batch_size": size,
                    "width": args.width,
                    "images_per_s": round(size / median, 1),
                    "ms_per_batch": round(1000 * median, 3),
                    "first_call_s": round(first, 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    report["load_average_after"] = os.getloadavg()
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
