"""A trained network for inference: loaded from its checkpoint alone (:func:`load_trained`), with the facts of
its data (:func:`data_facts`).

The facts come from the checkpoint (train.py's checkpoints record them, :mod:`cbam.data.facts`). For a
checkpoint written before they were, inference asks for them by key: the training data as at training
(``data=cifar10 data.root=DIR``, ``data=folder data.root=DIR data.image_size=64``: composed with
``conf/train.yaml``, the facts then read from the data), or each fact by its flag (``--classes``,
``--image-size``, ``--mean``, ``--std``). A flag given for a checkpoint that records the fact replaces it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cbam.data.facts import REQUIRED, DataFacts
from cbam.errors import ConfigError
from cbam.training.lightning_module import CBAMResNetModule

CONF = Path(__file__).resolve().parents[2] / "conf"
#: a command-line word that is a Hydra override of the data config group
DATA_OVERRIDE = re.compile(r"\+{0,2}data(\.[A-Za-z_][\w.]*)?=.*")
#: the flag that gives each fact
FLAGS = {"classes": "--classes", "image_size": "--image-size", "mean": "--mean", "std": "--std"}


def is_data_override(word: str) -> bool:
    return DATA_OVERRIDE.fullmatch(word) is not None


def load_trained(path: str | Path) -> CBAMResNetModule:
    """The LightningModule of checkpoint ``path``, in eval mode, on the CPU, uncompiled, its CBAMs on the
    reference code (the fused kernels compute the same function; hooks, Grad-CAM and exporters need the
    layers' own forward). A file that is not a checkpoint of this project raises :class:`ConfigError` naming
    it."""
    try:
        module = CBAMResNetModule.load_from_checkpoint(
            path, map_location="cpu", cbam_impl="reference", compile=False
        )
    except ConfigError:  # missing, truncated, not a checkpoint, unsafe: one line naming the file
        raise
    except Exception as error:  # any unpickling or key failure: the file is someone else's checkpoint
        reason = " ".join(str(error).split())  # one line, whatever the library's message
        raise ConfigError(
            f"checkpoint={path} is not a CBAM-ResNet checkpoint ({type(error).__name__}: {reason})"
        ) from None
    return module.eval()


def facts_of_data(overrides: Sequence[str]) -> DataFacts:
    """The facts of the data that ``overrides`` (``data=...``, ``data.<key>=...``, as at training) describe,
    read from the data (decoded into their cache on first use, never downloaded)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    from cbam.training.config_checks import constructed

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides))
        data = constructed("data", lambda: instantiate(cfg.data))
    except (HydraException, OmegaConfBaseException) as error:  # an unknown key or option, a bad value
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{' '.join(overrides)}: {text}") from None
    return data.facts()


def _words(flag: str, value: str) -> list[str]:
    words = [word.strip() for word in value.split(",")]
    if not all(words):
        raise ConfigError(f"{flag}={value}: a comma-separated list without empty entries")
    return words


def _numbers(flag: str, value: str, count: int) -> list[float]:
    try:
        numbers = [float(word) for word in _words(flag, value)]
    except ValueError:
        numbers = []
    if len(numbers) != count:
        raise ConfigError(f"{flag}={value}: must be {count} comma-separated numbers (R,G,B)")
    return numbers


def _image_size(value: str) -> list[int]:
    found = re.fullmatch(r"(\d+)(?:x(\d+))?", value.strip())
    if found is None or int(found[1]) < 1 or int(found[2] or found[1]) < 1:
        raise ConfigError(f"--image-size={value}: must be S (an SxS square) or HxW, in pixels")
    return [int(found[1]), int(found[2] or found[1])]


def parse_fact_flags(
    classes: str | None, image_size: str | None, mean: str | None, std: str | None
) -> dict[str, Any]:
    """The facts given by the command-line flags (their text as typed), by field name."""
    parsed = {
        "classes": _words("--classes", classes) if classes is not None else None,
        "image_size": _image_size(image_size) if image_size is not None else None,
        "mean": _numbers("--mean", mean, 3) if mean is not None else None,
        "std": _numbers("--std", std, 3) if std is not None else None,
    }
    return {key: value for key, value in parsed.items() if value is not None}


def data_facts(
    module: CBAMResNetModule,
    checkpoint: str | Path,
    data_overrides: Sequence[str] = (),
    given: dict[str, Any] | None = None,
) -> DataFacts:
    """The facts of ``module``'s data: those of ``data_overrides`` when given, else the checkpoint's, each
    replaced by one ``given`` by its flag (:func:`parse_fact_flags`). Raises :class:`ConfigError` in one line
    asking for what is missing, or when the class names do not match the network's outputs."""
    base = facts_of_data(data_overrides) if data_overrides else module.data_facts
    fields = base.to_dict() if base is not None else {"dataset": "given on the command line", "resize": None}
    fields.update(given or {})
    missing = [FLAGS[key] for key in REQUIRED if key not in fields]
    if missing:
        raise ConfigError(
            f"checkpoint={checkpoint} does not record its data (it was written before checkpoints did): give "
            f"the data it was trained on as at training (data=cifar10 data.root=DIR, data=folder "
            f"data.root=DIR ...), or {', '.join(FLAGS.values())} (missing: {', '.join(missing)})"
        )
    facts = DataFacts.from_dict(fields)
    if len(facts.classes) != module.num_classes:
        source = "--classes names" if "classes" in (given or {}) else f"the data ({facts.dataset}) have"
        raise ConfigError(
            f"checkpoint={checkpoint}: its network has {module.num_classes} outputs, but {source} "
            f"{len(facts.classes)} classes"
        )
    return facts


def add_fact_flags(parser) -> None:
    """The flags of :func:`parse_fact_flags` on an argparse parser."""
    group = parser.add_argument_group(
        "the data, for a checkpoint that does not record it (or to replace what it records); or data=<name> "
        "data.root=DIR ... as at training"
    )
    group.add_argument("--classes", metavar="A,B,...", help="the class names, in the order of the outputs")
    group.add_argument("--image-size", metavar="S|HxW", help="the network's input size")
    group.add_argument("--mean", metavar="R,G,B", help="the normalisation's channel mean (pixels in [0, 1])")
    group.add_argument("--std", metavar="R,G,B", help="the normalisation's channel std")
