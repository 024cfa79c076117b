"""torchvision's classification networks as backbones: :func:`build_torchvision`.

Any name of ``torchvision.models.list_models(module=torchvision.models)`` (resnet50, resnext50_32x4d,
wide_resnet50_2, mobilenet_v2, densenet121, efficientnet_b0, ...), built untrained with the data's class count.

* ``stem="cifar"`` fits the network to 32-pixel images as the CIFAR ResNets do: the first convolution keeps
  the resolution (stride 1; a kernel larger than 3 becomes 3x3) and a max-pool before the second convolution
  is dropped. ``stem="imagenet"`` leaves torchvision's network as it is.
* ``use_cbam_block``: the attention in every residual block, or BAM between the stages, by
  :func:`cbam.models.attach.attach_options`.
* ``use_cbam_class``: the attention on the final feature map, before the global pooling: in front of the
  network's ``avgpool`` module (``avgpool.attention``), else at the end of its ``features``
  (``features.attention``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn

from cbam.arguments import check_choice, check_flag, check_integer
from cbam.errors import InvalidArgument
from cbam.models.attach import attach_options
from cbam.models.attention_options import AttentionOptions
from cbam.models.cbam import CBAMOptions
from cbam.models.meta_pass import meta_forward
from cbam.models.onednn_workaround import avoid_onednn_1x1_bug
from cbam.models.resnet import STEMS

#: the classification networks torchvision builds
MODELS = tuple(torchvision.models.list_models(module=torchvision.models))
#: networks that return auxiliary classifiers' logits too in training unless told not to (and warn unless
#: their initialisation is chosen): built with ``aux_logits=False, init_weights=True``
AUXILIARY_OUTPUTS = ("googlenet", "inception_v3")


def _replace(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def cifar_stem(model: nn.Module) -> None:
    """Keep the input's resolution through the stem of ``model``, in place (see the module's docstring)."""
    convolutions = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convolutions:
        return
    name, first = convolutions[0]
    if first.stride != (1, 1):
        if max(first.kernel_size) > 3:
            replacement = nn.Conv2d(
                first.in_channels, first.out_channels, 3, padding=1, bias=first.bias is not None
            )
        else:
            replacement = first
            first.stride = (1, 1)
        _replace(model, name, replacement)
    second = convolutions[1][0] if len(convolutions) > 1 else None
    for name, module in model.named_modules():
        if name == second:
            break
        if isinstance(module, nn.MaxPool2d):
            _replace(model, name, nn.Identity())
            break


def _pooled_channels(model: nn.Module, site: nn.Module, output: bool) -> int:
    """The channels of the feature map that ``site`` (a module of ``model``) takes in (or, with ``output``,
    gives out), from one pass on the meta device (:func:`~cbam.models.meta_pass.meta_forward`)."""
    shapes = []
    handle = site.register_forward_hook(
        lambda module, inputs, result: shapes.append((result if output else inputs[0]).shape[1])
    )
    try:
        meta_forward(model, torch.empty(1, 3, 224, 224, device="meta"))
    finally:
        handle.remove()
    return shapes[0]


def final_map_site(net: nn.Module) -> tuple[nn.Module, bool] | None:
    """Where a torchvision network's final feature map is: ``(avgpool, True)``, the module that takes it in,
    else ``(features, False)``, the Sequential that gives it out; None for a network with neither. The
    attention before the classifier is that module's ``attention``."""
    pool, features = getattr(net, "avgpool", None), getattr(net, "features", None)
    if isinstance(pool, nn.Module):
        return pool, True
    if isinstance(features, nn.Sequential):
        return features, False
    return None


def _attend_before_pooling(model: nn.Module, name: str, options: AttentionOptions) -> None:
    site = final_map_site(model)
    if site is None:
        raise InvalidArgument(
            "use_cbam_class",
            True,
            f"attention before the classifier goes in front of an avgpool module or after a features "
            f"Sequential; torchvision's {name} has neither",
        )
    module, takes_it_in = site
    attention = options.build(_pooled_channels(model, module, output=not takes_it_in))
    if takes_it_in:
        model.avgpool = nn.Sequential(OrderedDict(attention=attention, pool=module))
    else:
        module.add_module("attention", attention)


def build_torchvision(
    name: str = "resnet18",
    *,
    num_classes: int = 10,
    stem: str = "cifar",
    use_cbam_block: bool = False,
    use_cbam_class: bool = False,
    attention: AttentionOptions | None = None,
) -> nn.Module:
    """torchvision's network ``name``, untrained, with ``num_classes`` outputs, the stem ``stem``
    (``cifar`` or ``imagenet``) and the attention where asked (default: the authors' CBAM)."""
    if name not in MODELS:
        raise InvalidArgument(
            "name",
            name,
            "not a torchvision classification model; accepted: the names of "
            "torchvision.models.list_models(module=torchvision.models), e.g. resnet50, mobilenet_v2",
        )
    check_integer("num_classes", num_classes, 1)
    check_choice("stem", stem, STEMS)
    check_flag("use_cbam_block", use_cbam_block)
    check_flag("use_cbam_class", use_cbam_class)
    attention = attention if attention is not None else CBAMOptions()
    options = {"aux_logits": False, "init_weights": True} if name in AUXILIARY_OUTPUTS else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
    if stem == "cifar":
        cifar_stem(model)
    if use_cbam_block:
        try:
            attach_options(model, attention)
        except InvalidArgument as error:
            raise InvalidArgument("use_cbam_block", True, f"{name}: {error.accepted}") from None
    if use_cbam_class:
        _attend_before_pooling(model, name, attention)
    return avoid_onednn_1x1_bug(model)
