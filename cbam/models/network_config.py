"""The model config's flat keys (``model.arch``, ``model.depth``, ``model.use_cbam_block``,
``model.attention_kind``, ``model.reduction_ratio``, ...) as a network's nested description, and back: the one
place where the config's names meet the builders' arguments and the attention's options objects.

A network's description (``net``, what the LightningModule saves in its checkpoints) is its architecture,
the builder's arguments, and the attention as its own mapping::

    {"arch": "resnet", "depth": 18, "use_cbam_block": True, ..., "attention": {"kind": "cbam", ...}}

* ``arch`` picks the builder (:data:`ARCHITECTURES`); the flat network keys are that builder's argument names.
* ``attention_kind`` picks the options class (:data:`ATTENTION_KINDS`); the flat option keys are its field
  names, but for those :data:`CONFIG_NAMES` renames (``cbam_impl``, ``eca_kernel_size``, ``bam_dilation``...),
  so that one key means one thing whichever kind a run uses (``reduction_ratio`` is CBAM's and BAM's alike).
* An option key of another kind than the run's is accepted at its default only (a config may carry CBAM's
  keys into an ECA run unchanged; a changed one would change nothing, so it is an error). ``cbam_impl`` is
  the exception: it picks CBAM's code, never weights, and is ignored by the other kinds.

Descriptions saved before ``arch`` and ``kind`` existed are ResNets with CBAM, which are the defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Callable

from torch import nn

from cbam.arguments import check_choice
from cbam.models.attention_options import ATTENTION_KINDS
from cbam.models.bam import BAMOptions
from cbam.models.cbam import CBAMOptions
from cbam.models.eca import ECAOptions
from cbam.models.resnet import build_resnet
from cbam.models.torchvision_backbone import build_torchvision
from cbam.models.wide_resnet import build_wide_resnet

#: ``model.arch`` -> the builder of that network
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet": build_resnet,
    "wide_resnet": build_wide_resnet,
    "torchvision": build_torchvision,
}
DEFAULT_ARCH, DEFAULT_KIND = "resnet", "cbam"
#: per kind, the option fields whose config key differs from the field's name
CONFIG_NAMES = {
    "cbam": {"impl": "cbam_impl"},
    "eca": {"kernel_size": "eca_kernel_size", "gamma": "eca_gamma", "b": "eca_b"},
    "bam": {"dilation": "bam_dilation", "combine": "bam_combine", "branch_norm": "bam_branch_norm"},
}
#: per architecture, the builder's arguments other than the attention, with their defaults
NETWORK_DEFAULTS = {
    arch: {
        name: parameter.default
        for name, parameter in inspect.signature(builder).parameters.items()
        if name != "attention" and parameter.kind is not parameter.VAR_KEYWORD
    }
    for arch, builder in ARCHITECTURES.items()
}
#: the config keys that place the attention (every builder takes them)
PLACEMENT_KEYS = ("use_cbam_block", "use_cbam_class")
#: per kind, its option keys with their defaults: with no attention placed they have no effect
ATTENTION_DEFAULTS = {
    kind: {CONFIG_NAMES[kind].get(field.name, field.name): field.default for field in dataclasses.fields(cls)}
    for kind, cls in ATTENTION_KINDS.items()
}
#: the keys that pick code, not weights: left out where two networks are compared
IMPLEMENTATION_KEYS = frozenset({"cbam_impl"})
#: the option keys of every kind
OPTION_KEYS = frozenset(key for defaults in ATTENTION_DEFAULTS.values() for key in defaults)
_ALL_NETWORK_KEYS = frozenset(key for defaults in NETWORK_DEFAULTS.values() for key in defaults)
#: every key a network description's flat form may hold
FLAT_KEYS = frozenset({"arch", "attention_kind", *_ALL_NETWORK_KEYS, *OPTION_KEYS})


def config_key(kind: str, argument: str) -> str:
    """The model config's key for ``argument`` (an option of ``kind`` or a builder's argument)."""
    return CONFIG_NAMES.get(kind, {}).get(argument, argument)


def nest(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The whole network description of flat ``settings`` (keys of the model config; absent ones at their
    defaults). A key that the architecture does not know raises TypeError naming it, as a constructor would;
    so does a changed option of another attention kind."""
    arch = settings.get("arch", DEFAULT_ARCH)
    kind = settings.get("attention_kind", DEFAULT_KIND)
    check_choice("arch", arch, ARCHITECTURES)
    check_choice("attention_kind", kind, ATTENTION_KINDS)
    network = NETWORK_DEFAULTS[arch]
    unknown = sorted(set(settings) - {"arch", "attention_kind", *network, *OPTION_KEYS})
    if unknown:
        raise TypeError(f"arch={arch} takes no argument {', '.join(map(repr, unknown))}")
    for other, defaults in ATTENTION_DEFAULTS.items():
        for key, default in defaults.items():
            value = settings.get(key, default)
            if key not in ATTENTION_DEFAULTS[kind] and key not in IMPLEMENTATION_KEYS and value != default:
                raise TypeError(
                    f"{key}={value} is an option of attention_kind={other}; this network's is {kind}"
                )
    fields = {
        field.name: settings.get(config_key(kind, field.name), field.default)
        for field in dataclasses.fields(ATTENTION_KINDS[kind])
    }
    return {
        "arch": arch,
        **{key: settings.get(key, default) for key, default in network.items()},
        "attention": {"kind": kind, **fields},
    }


def flatten(net: Mapping[str, Any]) -> dict[str, Any]:
    """The flat config keys of network description ``net`` (the inverse of :func:`nest`)."""
    flat = {key: value for key, value in net.items() if key != "attention"}
    attention = dict(net.get("attention", {}))
    kind = attention.pop("kind", net.get("attention_kind", DEFAULT_KIND))
    return {
        **flat,
        "attention_kind": kind,
        **{config_key(kind, key): value for key, value in attention.items()},
    }


def network_of(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """The network description in a LightningModule's saved hyperparameters: its ``net``, or the flat keys
    that checkpoints written before the description existed hold."""
    flat = {key: value for key, value in hyperparameters.items() if key in FLAT_KEYS}
    return nest({**flatten(hyperparameters.get("net") or {}), **flat})


def attention_options(net: Mapping[str, Any]) -> CBAMOptions | ECAOptions | BAMOptions:
    """The attention's options object of network description ``net``."""
    fields = dict(net.get("attention", {}))
    return ATTENTION_KINDS[fields.pop("kind", DEFAULT_KIND)](**fields)


def build_network(net: Mapping[str, Any]) -> nn.Module:
    """The network that description ``net`` describes."""
    arguments = {key: value for key, value in net.items() if key not in ("arch", "attention")}
    return ARCHITECTURES[net.get("arch", DEFAULT_ARCH)](**arguments, attention=attention_options(net))


def network_name(net: Mapping[str, Any]) -> str:
    """``ResNet18``, ``WRN-28-10``, ``torchvision resnet50``: the network without its attention, with a stem
    that is not its architecture's usual one."""
    arch = net.get("arch", DEFAULT_ARCH)
    if arch == "wide_resnet":
        return f"WRN-{net['depth']}-{net['widen_factor']}"
    if arch == "torchvision":
        return f"torchvision {net['name']}" + (" (cifar stem)" if net["stem"] == "cifar" else "")
    return f"ResNet{net['depth']}" + (" (imagenet stem)" if net["stem"] == "imagenet" else "")
