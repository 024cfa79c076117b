"""The fused CBAM layer: the whole default layer, its gate math included (channel MLP, spatial convolution,
BatchNorm, sigmoids), in Triton kernels: three launches forward, three backward (see
:mod:`cbam.models.fused.kernels`), with the parameters, buffers and numbers of :class:`cbam.CBAM`.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from cbam.arguments import check_choice
from cbam.models.running_statistics import move_running_statistics

TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
if TRITON_IMPORTABLE:
    # Registers the torch.library ops; Triton reads TRITON_INTERPRET when the kernels are defined.
    from cbam.models.fused import ops as _ops


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
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    conv_w: Tensor,
    bn_w: Tensor,
    bn_b: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    batches_tracked: Tensor,
    *,
    channel_pooling: str = "avg_max",
    training: bool = True,
    momentum: float = 0.01,
    eps: float = 1e-5,
) -> Tensor:
    """CBAM (channel gate, then a max/mean spatial gate) on ``x`` (N, C, H, W), any strides.

    Args:
        x: the activations.
        w1, b1, w2, b2: the channel MLP, ``Linear(C, hidden)`` then ``Linear(hidden, C)``.
        conv_w: the spatial convolution's weight, (1, 2, k, k), no bias (max map first).
        bn_w, bn_b, running_mean, running_var, batches_tracked: the one-channel BatchNorm after it.
        channel_pooling: ``avg_max``, ``avg`` or ``max``: the descriptors fed to the MLP.
        training: BatchNorm with batch statistics, moving the running statistics by ``momentum``
            (as ``nn.BatchNorm2d``), else with the running statistics.

    Returns:
        ``x * g * s``, in x's dtype and memory layout.
    """
    check_choice("channel_pooling", channel_pooling, _ops.DESCRIPTORS)
    parameters = (w1, b1, w2, b2, conv_w, bn_w, bn_b)  # in the order of cbam.models.fused.ops.PARAMETERS
    if not torch.compiler.is_compiling():
        options, running = (
            (channel_pooling, training, momentum, eps),
            (running_mean, running_var, batches_tracked),
        )
        return _ops.EagerCBAM.apply(x, options, running, *parameters)
    y, *_, stats = torch.ops.cbam.fused_cbam(
        x, *parameters, running_mean, running_var, channel_pooling, training, eps
    )
    if training:  # the op is functional: the running statistics move here (Inductor fuses these)
        count = x.numel() // x.shape[1]
        move_running_statistics(
            running_mean, running_var, batches_tracked, stats[0], stats[2], count, momentum
        )
    return y
