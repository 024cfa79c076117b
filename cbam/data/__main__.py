"""What a data config finds, before any training: ``python -m cbam.data [Hydra overrides]``, e.g.

    python -m cbam.data data=folder data.root=/data/flowers data.image_size=64

composes ``conf/train.yaml`` with the overrides as train.py does, runs train.py's checks, builds (or reads)
the decoded cache and prints what the run will use: the data set, its class names with their training,
validation and test images, the image size, the train/val/test split, the crop padding, the channel mean
and std, and the classifier's outputs. Bad input is one line ``error: ...`` and exit status 2; a cache
that cannot be written (disk full, read-only, no permission), one line and exit status 4.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"


def describe(overrides: list[str]) -> str:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from cbam.training.config_checks import check_config, num_classes

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    check_config(cfg)
    data = instantiate(cfg.data)
    outputs = num_classes(cfg, data)
    data.prepare_data()
    data.setup()  # prints the line every run prints at its start
    counts = data.class_counts()
    width = max(len("class"), *(len(name) for name in data.classes))
    lines = [f"{'class':<{width}}  {'train':>7}  {'val':>6}  {'test':>6}"]
    lines += [
        f"{name:<{width}}  {train:>7}  {val:>6}  {test:>6}"
        for name, train, val, test in zip(data.classes, counts["train"], counts["val"], counts["test"])
    ]
    lines.append(f"classifier outputs (model.num_classes): {outputs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cbam.errors import ProjectError, print_error

    try:
        print(describe(sys.argv[1:] if argv is None else argv))
    except (ProjectError, HydraException, OmegaConfBaseException) as error:  # bad input; a failed cache write
        return print_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
