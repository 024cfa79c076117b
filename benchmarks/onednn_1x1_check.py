"""Whether this torch's oneDNN still has the AVX2 1x1 weight-gradient bug (uxlfoundation/oneDNN#6035) that
cbam/models/onednn_workaround.py works around: the unguarded convolution, in child processes on oneDNN's
AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2, so on any x86 CPU with AVX2), for a few shapes and thread counts
(the bug's effect varies with both: wrong gradients, a crash or a hang).

    python benchmarks/onednn_1x1_check.py
"""

from __future__ import annotations

import os
import subprocess
import sys

#: the unguarded case, in a child process: prints the weight gradient's error relative to float64
_CASE = """
import torch
torch.manual_seed(0)
x = torch.randn(8, {channels}, {size}, {size})
conv = torch.nn.Conv2d({channels}, 8, 1, stride=2, bias=False)
out = conv(x.contiguous(memory_format=torch.channels_last))
upstream = torch.randn_like(out)
out.backward(upstream)
w64 = conv.weight.detach().double().requires_grad_()
torch.nn.functional.conv2d(x.double(), w64, stride=2).backward(upstream.double())
print(((conv.weight.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()).item())
"""


def _unguarded_result(channels: int, size: int, threads: int) -> str:
    """What the bug does to one case on this machine (it varies with the shape and the thread count)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": str(threads)}
    code = _CASE.format(channels=channels, size=size)
    try:
        child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "hangs"
    if child.returncode != 0:
        return f"crashes (exit status {child.returncode})"
    error = float(child.stdout)
    return f"{error:.1%} off" if error > 1e-4 else "exact"


if __name__ == "__main__":
    still = False
    for threads in (1, 2):
        for size in (16, 32):
            for channels in (3, 4, 5, 6):
                result = _unguarded_result(channels, size, threads)
                still |= result != "exact"
                print(f"Conv2d({channels}, 8, 1, stride=2), 8x{channels}x{size}x{size} channels_last input, "
                      f"{threads} thread(s), oneDNN AVX2: weight gradient {result}", flush=True)  # fmt: skip
    print("oneDNN#6035: still there, keep the workaround" if still else "oneDNN#6035 looks fixed: remove the workaround")
