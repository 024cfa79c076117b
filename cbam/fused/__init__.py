"""A fused CBAM layer: Triton kernels for the passes over the full activation tensor, the small gate
math (channel MLP, spatial convolution and BatchNorm) left to the layer's own PyTorch modules.

The forward makes three passes over the full (N, C, H, W) tensor (pool x; pool x * g without storing
it; write x * g * s), the backward three more, one per forward op, whose input gradients autograd adds.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

import torch
from torch import Tensor

from cbam.errors import InvalidArgument

#: channel_pooling -> (uses the average descriptor, uses the max descriptor)
_DESCRIPTORS = {"avg_max": (True, True), "avg": (True, False), "max": (False, True)}

TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
if TRITON_IMPORTABLE:
    # Registers the torch.library ops; Triton reads TRITON_INTERPRET when the kernels are defined.
    from cbam.fused import ops as _ops


def fused_available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device``: Triton is installed and the device is a GPU, or
    the CPU with Triton's interpreter switched on (``TRITON_INTERPRET=1``, for tests)."""
    device = torch.device(device)
    if not TRITON_IMPORTABLE:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def cbam_fused(
    x: Tensor,
    channel_gate: Callable[[Optional[Tensor], Optional[Tensor]], Tensor],
    spatial_gate: Callable[[Tensor], Tensor],
    channel_pooling: str = "avg_max",
) -> Tensor:
    """CBAM (channel gate, then spatial gate) on ``x`` (N, C, H, W), any strides.

    Args:
        x: the activations.
        channel_gate: ``(avg, max) -> g`` (N, C, 1, 1) in (0, 1) from the (N, C) descriptors; the one not
            used by ``channel_pooling`` is passed as None.
        spatial_gate: ``maps -> s`` (N, 1, H, W) in (0, 1) from the (N, 2, H, W) channel-wise max and
            mean maps of ``x * g`` (max first).
        channel_pooling: ``avg_max``, ``avg`` or ``max``: the descriptors fed to ``channel_gate``.

    Returns:
        ``x * g * s``, in x's dtype and memory layout.
    """
    if channel_pooling not in _DESCRIPTORS:
        raise InvalidArgument("channel_pooling", channel_pooling, f"one of {', '.join(_DESCRIPTORS)}")
    use_average, use_maximum = _DESCRIPTORS[channel_pooling]
    average, maximum, _ = _ops.call("channel_pool", x)
    gate = channel_gate(average if use_average else None, maximum if use_maximum else None)
    maps, _ = _ops.call("gated_pool", x, gate)
    return _ops.call("gated_output", x, gate, spatial_gate(maps))
