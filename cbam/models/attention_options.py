"""The attention kinds as the builders see them: each kind's options class (:data:`ATTENTION_KINDS`) and
the one rule of where a network places its attention (:func:`attention_factories`, :func:`stages_followed`).

* ``use_cbam_block``: in every residual block, or, for a kind placed between stages (BAM), after every stage
  but the last: BAM's paper puts its modules at the bottlenecks between stages, none after the last one.
* ``use_cbam_class``: once, on the final feature map, before pooling and the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, ClassVar, Protocol, TypeVar

from torch import nn

from cbam.models.bam import BAMOptions
from cbam.models.cbam import CBAMOptions
from cbam.models.eca import ECAOptions

AttentionFactory = Callable[[int], nn.Module]


class AttentionOptions(Protocol):
    """What the builders take as ``attention``: an options object of CBAM, ECA or BAM
    (:class:`~cbam.models.cbam.CBAMOptions`, :class:`~cbam.models.eca.ECAOptions`,
    :class:`~cbam.models.bam.BAMOptions`)."""

    kind: ClassVar[str]
    #: placed between stages (BAM) rather than in every residual block
    between_stages: ClassVar[bool]

    def build(self, channels: int) -> nn.Module: ...


#: ``attention_kind`` -> its options class
ATTENTION_KINDS: dict[str, type] = {
    options.kind: options for options in (CBAMOptions, ECAOptions, BAMOptions)
}

Stage = TypeVar("Stage")


def attention_factories(
    attention: AttentionOptions, use_cbam_block: bool, use_cbam_class: bool
) -> dict[str, AttentionFactory | None]:
    """The builders' ``block_attention``, ``stage_attention`` and ``classifier_attention``: ``attention``'s
    layer factory where the two switches place it, None elsewhere."""
    return {
        "block_attention": attention.build if use_cbam_block and not attention.between_stages else None,
        "stage_attention": attention.build if use_cbam_block and attention.between_stages else None,
        "classifier_attention": attention.build if use_cbam_class else None,
    }


def stages_followed(stages: Sequence[Stage]) -> list[Stage]:
    """The stages that an attention placed between stages follows: every one but the last."""
    return list(stages[:-1])
