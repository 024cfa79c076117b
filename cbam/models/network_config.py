"""The model config's flat keys (``model.depth``, ``model.use_cbam_block``, ``model.reduction_ratio``, ...) as
a network's nested description, and back: the one place where the config's names meet the builders' arguments
and the attention's options object.

A network's description (``net``, what the LightningModule saves in its checkpoints) is the builder's
arguments with the attention as its own mapping::

    {"depth": 18, "use_cbam_block": True, ..., "attention": {"kind": "cbam", "reduction_ratio": 16, ...}}

The flat keys are the builder's argument names and the options' field names; the one option named otherwise
in the config is the layer's ``impl``, ``model.cbam_impl`` (:data:`CONFIG_NAMES`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from cbam.models.cbam import CBAMOptions
from cbam.models.resnet import build_resnet

#: the option fields whose config key differs from the field's name
CONFIG_NAMES = {"impl": "cbam_impl"}
#: the builder's arguments other than the attention, with their defaults
NETWORK_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(build_resnet).parameters.items()
    if name != "attention" and parameter.kind is not parameter.VAR_KEYWORD
}
NETWORK_KEYS = tuple(NETWORK_DEFAULTS)
#: the config keys that place the attention
PLACEMENT_KEYS = ("use_cbam_block", "use_cbam_class")
#: the attention's config keys with their defaults: with no attention placed they have no effect
ATTENTION_DEFAULTS = {
    CONFIG_NAMES.get(field.name, field.name): field.default for field in dataclasses.fields(CBAMOptions)
}
#: the config keys that decide which network the weights belong to: all but ``cbam_impl``, which only picks
#: the code that runs the same weights
ARCHITECTURE_KEYS = tuple(key for key in (*NETWORK_KEYS, *ATTENTION_DEFAULTS) if key != "cbam_impl")
_FIELD_NAMES = {config: field for field, config in CONFIG_NAMES.items()}


def nest(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The whole network description of flat ``settings`` (keys of the model config; absent ones at their
    defaults). A key the network does not know raises TypeError naming it, as a constructor would."""
    unknown = sorted(set(settings) - {*NETWORK_KEYS, *ATTENTION_DEFAULTS})
    if unknown:
        raise TypeError(f"the network takes no argument {', '.join(map(repr, unknown))}")
    flat = {**NETWORK_DEFAULTS, **ATTENTION_DEFAULTS, **settings}
    attention = {_FIELD_NAMES.get(key, key): flat[key] for key in ATTENTION_DEFAULTS}
    return {**{key: flat[key] for key in NETWORK_KEYS}, "attention": {"kind": CBAMOptions.kind, **attention}}


def flatten(net: Mapping[str, Any]) -> dict[str, Any]:
    """The flat config keys of network description ``net`` (the inverse of :func:`nest`)."""
    flat = {key: value for key, value in net.items() if key != "attention"}
    attention = {key: value for key, value in net.get("attention", {}).items() if key != "kind"}
    return {**flat, **{CONFIG_NAMES.get(key, key): value for key, value in attention.items()}}


def network_of(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """The network description in a LightningModule's saved hyperparameters: its ``net``, or the flat keys
    that checkpoints written before the description existed hold."""
    flat = {
        key: value
        for key, value in hyperparameters.items()
        if key in NETWORK_KEYS or key in ATTENTION_DEFAULTS
    }
    return nest({**flatten(hyperparameters.get("net") or {}), **flat})


def attention_options(net: Mapping[str, Any]) -> CBAMOptions:
    """The attention's options object of network description ``net``."""
    fields = {key: value for key, value in net.get("attention", {}).items() if key != "kind"}
    return CBAMOptions(**fields)


def build_network(net: Mapping[str, Any]) -> nn.Module:
    """The network that description ``net`` describes."""
    arguments = {key: value for key, value in net.items() if key != "attention"}
    return build_resnet(**arguments, attention=attention_options(net))
