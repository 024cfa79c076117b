"""What a trained network needs to know about its data to be used on other images: :class:`DataFacts`.

``train.py``'s checkpoints record them under :data:`CHECKPOINT_KEY` (the LightningModule writes them from
the data module on every save); ``python -m cbam.predict`` and ``python -m cbam.export`` read them back, so an
image is prepared as the test images were (its size, the resize rule, the normalisation) and its prediction
named with the data's own class names. A checkpoint written before they were recorded has none
(:func:`DataFacts.from_checkpoint` gives None); inference then asks for them (:mod:`cbam.inference.trained`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cbam.errors import ConfigError

#: the checkpoint's key holding :meth:`DataFacts.to_dict`
CHECKPOINT_KEY = "data_facts"
#: the facts a network cannot be used without, as the command-line flags that give them
REQUIRED = ("classes", "image_size", "mean", "std")


@dataclass(frozen=True)
class DataFacts:
    """A data set as its network saw it.

    Args:
        dataset: its name (``CIFAR-10``, ``CIFAR-100``, ``image folder``).
        classes: the class names, in the order of the network's outputs.
        image_size: (height, width) of the network's input images.
        resize: how images of another size were brought to ``image_size``
            (:data:`cbam.data.sources.FIT_RULE`), or None when every image had that size.
        mean: per-channel mean (RGB, of pixel values in [0, 1]) subtracted before the network.
        std: per-channel standard deviation the images were then divided by.
    """

    dataset: str
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    resize: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        # (after the conversions of from_dict: these would be a bug in this project's code, or a foreign file)
        if not self.classes or not all(isinstance(name, str) for name in self.classes):
            raise ConfigError(f"classes={list(self.classes)}: must be one or more class names")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ConfigError(f"image_size={self.image_size}: must be (height, width), both >= 1")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean={self.mean}, std={self.std}: must be 3 values each (RGB), std > 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, strings and numbers: what a checkpoint read with ``weights_only=True`` may hold."""
        fields = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> DataFacts:
        try:
            return cls(
                dataset=str(fields["dataset"]),
                classes=tuple(fields["classes"]),
                image_size=tuple(int(side) for side in fields["image_size"]),
                resize=fields.get("resize"),
                mean=tuple(float(value) for value in fields["mean"]),
                std=tuple(float(value) for value in fields["std"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"unreadable data facts ({type(error).__name__}: {error})") from None

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> DataFacts | None:
        """The facts a checkpoint recorded, or None for one written before they were."""
        fields = checkpoint.get(CHECKPOINT_KEY)
        return cls.from_dict(fields) if fields is not None else None

    def describe(self) -> str:
        """One line: the data, the input size and the normalisation."""
        mean, std = (", ".join(f"{value:.4f}" for value in values) for values in (self.mean, self.std))
        return (
            f"{self.dataset}, {len(self.classes)} classes; input {self.image_size[0]}x{self.image_size[1]}, "
            f"mean ({mean}), std ({std})"
        )
