"""What a sweep needs of its jobs: a validation split, since a sweep compares and optimises validation
accuracy (what train.py returns to the sweeper) and never the test accuracy.

The rule is :func:`sweep_refusal`. :class:`SweepCheck` (a Hydra callback, ``hydra.callbacks`` in
conf/train.yaml) applies it to the sweep's config when the sweep starts, before the sweeper creates an
Optuna study or launches a job; :func:`cbam.training.config_checks.check_config` applies it again in every
job, whose own settings a sweep may choose (``data.val_size=0,5000``). This module imports neither torch nor
Lightning: the sweep's parent process never needs them.
"""

from __future__ import annotations

from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cbam.errors import stop


def in_sweep() -> bool:
    """This process runs a job of a Hydra multirun (``-m``: a grid, the arms sweeper, an Optuna search)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_refusal(cfg: DictConfig) -> str | None:
    """Why ``cfg`` cannot be a sweep's job (one line naming the key), or None: a job that trains with no
    validation split would leave the sweep nothing to compare, or the test accuracy to steer by."""
    val_size = OmegaConf.select(cfg, "data.val_size")
    if OmegaConf.select(cfg, "train") is not False and val_size == 0:
        return (
            "data.val_size=0: a sweep (-m) compares and optimises validation accuracy, and its jobs would "
            "have no validation split; give data.val_size > 0 (e.g. 5000), or run the job as a single run"
        )
    return None


class SweepCheck(Callback):
    """Hydra callback: a sweep whose config has no validation split stops with one line, exit status 2,
    before any job starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refusal = sweep_refusal(config)
        if refusal is not None:
            stop(refusal)  # an exception of a callback Hydra would only log as a warning
