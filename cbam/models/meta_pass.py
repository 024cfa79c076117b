"""One forward pass on the meta device: shapes (and FLOPs) of any network, without memory or computation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def meta_forward(net: nn.Module, *inputs: torch.Tensor) -> Any:
    """``net(*inputs)`` (meta tensors) in eval mode, with the weights swapped for meta tensors for the call:
    the network's own stay untouched, and every module's mode is restored. (Eval mode: a batch of one image
    would fail a BatchNorm1d in training mode.)"""
    state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*net.named_parameters(), *net.named_buffers()]
    }
    modes = {module: module.training for module in net.modules()}
    net.eval()
    try:
        return torch.func.functional_call(net, state, inputs)
    finally:
        for module, training in modes.items():
            module.training = training
