"""Compile the fused CBAM's Triton kernels for NVIDIA GPUs, on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``), which the tests run the kernels with, executes them as numpy
code: it cannot see what only the GPU compiler rejects (a type that changes across a loop, an operation a
GPU backend lacks, too many registers). This script runs the fused layer under the interpreter for each
configuration, records every kernel launch (arguments' types, compile-time constants), then compiles each
distinct launch with Triton's compiler for the chosen GPU architectures (PTX and cubin through the
``ptxas`` that ships with Triton: no GPU, no driver needed) and reports registers, spills and shared
memory per kernel. Exit status 1 if any kernel fails to compile.

    python benchmarks/compile_kernels.py                    # every configuration, sm_90 and sm_80
    python benchmarks/compile_kernels.py --configs default  # bf16 channels_last training and eval only
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: configuration -> (dtype, channels_last, channel_pooling, training, kernel size)
CONFIGS = {
    "bf16-channels_last-train": ("bfloat16", True, "avg_max", True, 7),
    "bf16-channels_last-eval": ("bfloat16", True, "avg_max", False, 7),
    "fp32-nchw-train": ("float32", False, "avg_max", True, 7),
    "fp16-nchw-avg-train": ("float16", False, "avg", True, 3),
    "fp32-channels_last-max-train": ("float32", True, "max", True, 5),
    "fp64-nchw-train": ("float64", False, "avg_max", True, 7),
}
DEFAULT_CONFIGS = ("bf16-channels_last-train", "bf16-channels_last-eval")
TYPES = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float64": "fp64",
    "int32": "i32",
    "int64": "i64",
}


def record_launches(configs: list[str], multiprocessors: int) -> list[dict]:
    """Distinct (kernel, signature, constants) launched by the fused layer's forward and backward, with the
    tile sizes the layer picks on a GPU of ``multiprocessors``."""
    import torch
    from triton.runtime import interpreter

    from cbam import CBAM
    from cbam.models.fused import ops

    gpu_plan = functools.partial(ops.plan.__wrapped__, gpu=multiprocessors)

    launches: dict[str, dict] = {}
    original = interpreter.GridExecutor.__call__

    def recorded(self, *args, **kwargs):
        signature, constants = {}, {}
        for name, value in zip(self.arg_names, (*args, *[kwargs[n] for n in self.arg_names[len(args) :]])):
            if name in kwargs and not isinstance(value, torch.Tensor):
                constants[name] = str(value) if not isinstance(value, (bool, int, float)) else value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TYPES[str(value.dtype).removeprefix("torch.")]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        entry = {"kernel": self.fn.__name__, "signature": signature, "constants": constants}
        launches[json.dumps(entry, sort_keys=True)] = entry
        return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = recorded
    original_plan, ops.plan = ops.plan, lambda *shape: gpu_plan(*shape[:-1])
    try:
        for name in configs:
            dtype, channels_last, pooling, training, kernel_size = CONFIGS[name]
            dtype = getattr(torch, dtype)
            layer = CBAM(64, 16, kernel_size, channel_pooling=pooling, impl="fused").train(training)
            layer = layer.to(torch.float64 if dtype == torch.float64 else torch.float32)
            x = torch.randn(2, 64, 8, 8, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            layer(x.requires_grad_()).float().sum().backward()
    finally:
        interpreter.GridExecutor.__call__ = original
        ops.plan = original_plan
    return list(launches.values())


def resource_usage(cubin: bytes) -> dict:
    """Registers and local memory (spills) per thread of a cubin, from the cuobjdump that ships with Triton."""
    import re
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(tool), "-res-usage", file.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    return (
        {"registers": int(found[1]), "local_bytes": int(found[2])}
        if found
        else {"resource_usage": text[-300:]}
    )


def compile_launches(launches: list[dict], architectures: list[int]) -> list[dict]:
    """Compile each launch for each architecture (Triton's compiler, no GPU)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cbam.models.fused import kernels

    dtypes = {"fp32": tl.float32, "fp64": tl.float64}
    results = []
    for launch in launches:
        kernel = getattr(kernels, launch["kernel"])
        constants = {
            name: dtypes[value.removeprefix("triton.language.")] if isinstance(value, str) else value
            for name, value in launch["constants"].items()
        }
        signature = {name: launch["signature"].get(name, "constexpr") for name in kernel.arg_names}
        for architecture in architectures:
            row = {"kernel": launch["kernel"], "sm": architecture, "constants": launch["constants"]}
            started = time.perf_counter()
            try:
                source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
                compiled = triton.compile(source, target=GPUTarget("cuda", architecture, 32))
                row.update(ok=True, shared=compiled.metadata.shared, **resource_usage(compiled.asm["cubin"]))
            except Exception as error:  # reported per kernel: the others still compile
                row.update(ok=False, error=f"{type(error).__name__}: {str(error)[-2000:]}")
            row["seconds"] = round(time.perf_counter() - started, 2)
            results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", default="all", help="'all', 'default' or a comma list of " + ", ".join(CONFIGS)
    )
    parser.add_argument("--sm", default="90,80", help="GPU architectures (compute capability x 10)")
    parser.add_argument(
        "--multiprocessors", type=int, default=132, help="of the GPU whose tile plan is used (H100: 132)"
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--compile-from", type=Path, help=argparse.SUPPRESS)  # the second, compiling process
    args = parser.parse_args(argv)
    architectures = [int(sm) for sm in args.sm.split(",")]
    if args.compile_from:
        results = compile_launches(json.loads(args.compile_from.read_text()), architectures)
        print(json.dumps(results))
        return 0
    configs = {"all": list(CONFIGS), "default": list(DEFAULT_CONFIGS)}.get(
        args.configs
    ) or args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configuration {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    os.environ["TRITON_INTERPRET"] = "1"  # before cbam.models.fused defines the kernels
    launches = record_launches(configs, args.multiprocessors)
    # Compiled in a fresh process: under the interpreter the kernels are not compilable JIT functions.
    launch_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"cbam_launches_{os.getpid()}.json"
    launch_file.write_text(json.dumps(launches))
    try:
        environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, __file__, "--compile-from", str(launch_file), "--sm", args.sm]
        finished = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    finally:
        launch_file.unlink(missing_ok=True)
    if finished.returncode != 0:
        print(finished.stderr[-4000:], file=sys.stderr)
        return 1
    results = json.loads(finished.stdout.strip().splitlines()[-1])
    for row in results:
        status = (
            f"{row.get('registers')} registers, {row.get('local_bytes')} B local (spills), {row['shared']} B shared"
            if row["ok"]
            else row["error"].splitlines()[0][:200]
        )
        print(f"sm_{row['sm']} {row['kernel']:<24} {'ok  ' if row['ok'] else 'FAIL'} {status}")
    report = {"configs": configs, "architectures": architectures, "kernels": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if all(row["ok"] for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
