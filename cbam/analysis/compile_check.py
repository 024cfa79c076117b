"""Eager against compiled training steps of the same network: the loss and every parameter gradient.

Used by ``tests/test_compile.py`` and ``benchmarks/legacy/compile_diagnosis.py``; needs only torch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StepResult:
    loss: float
    gradients: dict[str, torch.Tensor]  # parameter name -> fp32 gradient (None-gradients as zeros)


def training_step(
    net: nn.Module, images: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None
) -> StepResult:
    """Forward (under autocast to ``autocast_dtype`` when given), cross-entropy, backward, with fresh
    gradients. The weights are not updated; in training mode BatchNorm normalises with the batch's
    statistics, so repeated calls see the same function of the same weights."""
    net.zero_grad(set_to_none=True)
    net.train()
    with torch.autocast(
        images.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        loss = nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    gradients = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float()
        for name, p in net.named_parameters()
    }
    return StepResult(loss.item(), gradients)


def compiled_copy(net: nn.Module, backend: str) -> nn.Module:
    """A deep copy of ``net`` compiled in place (as ``CBAMResNetModule(compile=True)`` does), so its
    parameter names stay the eager ones."""
    compiled = copy.deepcopy(net)
    compiled.compile(backend=backend)
    return compiled


def _relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.norm().item()
    difference = (candidate - reference).norm().item()
    return difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)


def compare_steps(reference: StepResult, candidate: StepResult) -> dict:
    """How far ``candidate`` (e.g. compiled) is from ``reference`` (eager, same dtype).

    ``non_finite``: parameters whose candidate gradient has a NaN or inf; ``zeroed``: parameters whose
    candidate gradient is all zero while the reference's is not (a gradient lost on the way);
    ``relative_error``: per parameter, ``||g - g_ref|| / ||g_ref||``; ``global_relative_error``: the same
    over all gradients concatenated (robust to tiny parameters whose gradient is mostly cancellation).
    """
    non_finite, zeroed, relative = [], [], {}
    for name, expected in reference.gradients.items():
        got = candidate.gradients[name]
        if not torch.isfinite(got).all():
            non_finite.append(name)
            continue
        if not got.any() and expected.any():
            zeroed.append(name)
        relative[name] = _relative_error(got, expected)
    finite = [name for name in reference.gradients if name not in non_finite]
    if finite:
        stacked_candidate = torch.cat([candidate.gradients[n].flatten() for n in finite])
        stacked_reference = torch.cat([reference.gradients[n].flatten() for n in finite])
        global_error = _relative_error(stacked_candidate, stacked_reference)
    else:
        global_error = math.inf
    worst = max(relative, key=relative.get) if relative else None
    return {
        "loss_reference": reference.loss,
        "loss": candidate.loss,
        "loss_relative_error": abs(candidate.loss - reference.loss) / max(abs(reference.loss), 1e-12),
        "non_finite": non_finite,
        "zeroed": zeroed,
        "global_relative_error": global_error,
        "max_relative_error": relative[worst] if worst else math.inf,
        "worst_parameter": worst,
        "relative_error": relative,
    }
