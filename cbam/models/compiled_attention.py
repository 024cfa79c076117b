"""``model.compile_attention``: ``torch.compile`` of a network's attention layers alone.

Inductor turns an attention layer's pooling, gates and products into a few fused loops over the feature map,
forward and backward, where eager PyTorch makes a pass per operator (CBAM: about twenty per training step);
the convolutions stay eager, where compiling made the CPU step slower (docs/benchmarks.md, "CBAM at the
price of its FLOPs").
"""

from __future__ import annotations

from torch import nn

from cbam.models.bam import BAM
from cbam.models.cbam import CBAM
from cbam.models.eca import ECA

#: the attention layers the builders and :func:`cbam.attach` place (SE is a channel-only CBAM)
ATTENTION_LAYERS = (CBAM, ECA, BAM)
#: compiled variants kept per attention layer: training and evaluation mode, each at up to two batch sizes
VARIANTS_PER_LAYER = 4


def attention_layers(net: nn.Module) -> list[nn.Module]:
    """The attention layers of ``net``, in module order."""
    return [module for module in net.modules() if isinstance(module, ATTENTION_LAYERS)]


def compile_attention_layers(net: nn.Module) -> int:
    """Compile each attention layer of ``net`` in place (its state_dict keys unchanged) for static shapes,
    and return how many variants torch.compile must be allowed to keep of one layer class's ``forward``.

    Static shapes: one compiled variant per input shape (the layers of one stage share it); dynamic shapes
    hit an Inductor error on these layers in torch 2.14. Dynamo keys its cache by the code of ``forward``,
    which every layer of a class shares, so its default limit of 8 variants would send the later stages back
    to eager code.
    """
    layers = attention_layers(net)
    for layer in layers:
        layer.compile(dynamic=False)
    return VARIANTS_PER_LAYER * len(layers)
