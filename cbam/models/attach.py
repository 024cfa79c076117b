"""Add attention to a torchvision network in place: :func:`attach`.

* ``cbam``, ``se``, ``eca``: in every residual block, on the residual branch's output before the addition
  (CBAM's Fig. 3): after ``bn2`` of a ``BasicBlock``, after ``bn3`` of a ``Bottleneck`` (resnet*, resnext*,
  wide_resnet*), after the last BatchNorm of a MobileNetV2 ``InvertedResidual``. MobileNetV2's blocks without
  a residual connection (a stride of 2 or a change of width) get none: there is no addition for the
  attention to come before, and CBAM's paper places it in residual blocks only. (ECA's authors put ECA in
  every MobileNetV2 block; attach does not.)
* ``bam``: one BAM after each of ``layer1``, ``layer2``, ``layer3`` of a torchvision ResNet, the
  bottlenecks between stages of BAM's paper (none after the last stage).

The block's last BatchNorm ``bn`` becomes ``Attended(norm=bn, attention=...)``, so its keys move from
``layer1.0.bn2.weight`` to ``layer1.0.bn2.norm.weight``, next to ``layer1.0.bn2.attention.*``; a BAM is
``layer1.attention``. The keys depend on the network alone, so a state_dict loads strictly into a freshly
attached copy. Load pretrained torchvision weights before attaching.

``se`` is the project's SE: ``CBAMOptions(channel_pooling="avg", use_spatial_gate=False)``, the layer of
Hu et al. (``x * sigmoid(W2 relu(W1 avgpool(x)))``, with biases) that the CBAM ablations compare against.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from cbam.arguments import check_choice
from cbam.errors import InvalidArgument
from cbam.models.attention_options import ATTENTION_KINDS, stages_followed
from cbam.models.bam import BAMOptions
from cbam.models.cbam import CBAMOptions
from cbam.models.compiled_attention import ATTENTION_LAYERS
from cbam.models.eca import ECAOptions
from cbam.models.onednn_workaround import avoid_onednn_1x1_bug

#: the options kinds, and after ``cbam`` ``se``: a CBAM made an SE by :data:`SE_FIXED`
KINDS = ("cbam", "se", *(kind for kind in ATTENTION_KINDS if kind != "cbam"))
#: the blocks attach finds, as its error says them
KNOWN_BLOCKS = (
    "torchvision's BasicBlock, Bottleneck (resnet*, resnext*, wide_resnet*) "
    "and InvertedResidual (mobilenet_v2)"
)
#: the stages of a torchvision ResNet
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
#: what ``se`` fixes, and the CBAMOptions fields it leaves to the caller
SE_FIXED = {"channel_pooling": "avg", "use_spatial_gate": False}
SE_OPTIONS = ("reduction_ratio", "impl")


class Attended(nn.Module):
    """``attention(norm(x))``: a residual branch's last normalization, followed by the attention."""

    def __init__(self, norm: nn.Module, attention: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.norm(x))


def _options(kind: str, given: dict[str, Any]) -> CBAMOptions | ECAOptions | BAMOptions:
    """The options dataclass of ``kind`` with the ``given`` fields; an unknown field is an InvalidArgument."""
    if kind == "se":
        accepted, cls, fixed = SE_OPTIONS, CBAMOptions, SE_FIXED
    else:
        cls = ATTENTION_KINDS[kind]
        accepted, fixed = tuple(field.name for field in dataclasses.fields(cls)), {}
    for name, value in given.items():
        if name not in accepted:
            raise InvalidArgument(
                name, value, f"not an option of kind={kind}; accepted options are {', '.join(accepted)}"
            )
    return cls(**fixed, **given)


def _residual_norms(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(parent, name, channels) of the last normalization of every residual branch, in module order."""
    found = []
    for module in model.modules():
        # The channels come from the convolution before the norm: any norm_layer torchvision accepts works.
        if isinstance(module, BasicBlock):
            found.append((module, "bn2", module.conv2.out_channels))
        elif isinstance(module, Bottleneck):
            found.append((module, "bn3", module.conv3.out_channels))
        elif isinstance(module, InvertedResidual) and module.use_res_connect:
            found.append((module.conv, str(len(module.conv) - 1), module.conv[-2].out_channels))
    return found


def _placed_like(attention: nn.Module, reference: nn.Module) -> nn.Module:
    """``attention`` on the device and in the floating-point dtype of ``reference``'s parameters."""
    parameter = next(reference.parameters(), None)
    if parameter is None:
        return attention
    return attention.to(device=parameter.device, dtype=parameter.dtype)


def _already_attached(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, (Attended, *ATTENTION_LAYERS)):
            return f"{name or 'the model'} is a {type(module).__name__}"
    return None


def attach(model: nn.Module, kind: str = "cbam", **options: Any) -> nn.Module:
    """Add attention of ``kind`` (``cbam``, ``se``, ``eca``, ``bam``) to ``model`` in place; return ``model``.

    ``options`` are fields of the kind's options (:class:`~cbam.models.cbam.CBAMOptions`,
    :class:`~cbam.models.eca.ECAOptions`, :class:`~cbam.models.bam.BAMOptions`; ``se`` takes
    ``reduction_ratio`` and ``impl``). Raises :class:`~cbam.errors.InvalidArgument` for an unknown kind or
    option, a network without a known block, and a network that already has attention.
    """
    check_choice("kind", kind, KINDS)
    return attach_options(model, _options(kind, options))


def attach_options(model: nn.Module, options: CBAMOptions | ECAOptions | BAMOptions) -> nn.Module:
    """:func:`attach` with the attention given as its options object (BAM between stages, the others in
    every residual block)."""
    present = _already_attached(model)
    if present is not None:
        raise InvalidArgument(
            "model", type(model).__name__, f"already has attention ({present}); attach to a model without any"
        )
    norms = _residual_norms(model)
    if not norms:
        raise InvalidArgument(
            "model", type(model).__name__, f"no residual block found; attach knows {KNOWN_BLOCKS}"
        )
    if options.between_stages:
        _attach_bam(model, options)
    else:
        for parent, name, channels in norms:
            attention = _placed_like(options.build(channels), parent)
            setattr(parent, name, Attended(getattr(parent, name), attention))
    return avoid_onednn_1x1_bug(model)  # a network of the caller's may have narrow strided shortcuts


def _attach_bam(model: nn.Module, options: BAMOptions) -> None:
    names = stages_followed(RESNET_STAGES)
    stages = [getattr(model, name, None) for name in names]
    blocks = (BasicBlock, Bottleneck)
    if not all(isinstance(stage, nn.Sequential) and isinstance(stage[-1], blocks) for stage in stages):
        raise InvalidArgument(
            "kind",
            "bam",
            f"BAM follows {', '.join(names[:-1])} and {names[-1]} of a torchvision ResNet; "
            f"{type(model).__name__} has no such stages",
        )
    for stage in stages:
        last = stage[-1]
        channels = (last.conv2 if isinstance(last, BasicBlock) else last.conv3).out_channels
        # Appended to the stage's Sequential: the blocks keep their keys, the BAM is ``layerN.attention``.
        stage.add_module("attention", _placed_like(options.build(channels), last))
