"""The error the constructors raise for an argument they cannot accept.

The constructors (the attention layer, the ResNet, the data module) own the rules for their arguments;
``cbam.checks`` maps an :class:`InvalidArgument` to the config key it came from (``model.<argument>``,
``data.<argument>``), so each rule is written once.
"""

from __future__ import annotations

from typing import Any


class InvalidArgument(ValueError):
    """``argument=value`` is not accepted; ``accepted`` says what is.

    ``argument`` is the constructor's parameter name, which is also the last part of its config key
    (``build_resnet`` renames the layer's ``impl`` to its own ``cbam_impl``).
    """

    def __init__(self, argument: str, value: Any, accepted: str) -> None:
        self.argument, self.value, self.accepted = argument, value, accepted
        super().__init__(f"{argument}={value}: {accepted}")
