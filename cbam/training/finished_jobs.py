"""A run that finished, as a re-run study sees it: ``skip_finished=true`` returns a finished run's metrics
instead of training it again.

A run that ends normally (trained and tested as its config says) records ``"finished": {"config_digest":
...}`` in its ``metrics.json``; the digest covers what decides the run's numbers (:data:`DIGESTED`, minus
:data:`NOT_DIGESTED`). A study re-run with the same command then skips its finished jobs, resumes its
unfinished ones from their ``last.ckpt`` (``ckpt_path=last``) and starts the missing ones. A finished run
whose digest differs from the new config's is refused with one line: its numbers belong to other settings.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cbam.errors import ConfigError
from cbam.models.network_config import DEFAULT_ARCH, DEFAULT_KIND
from cbam.training.lightning_module import MOVED_TARGETS, renamed_target
from cbam.training.run_files import (
    CONFIG_DIGEST,
    FINISHED,
    LAST_VAL_ACC,
    TEST_ACC,
    VAL_METRIC,
    read_metrics,
    run_dir,
    write_metrics,
)
#: the config's parts that decide a run's numbers
DIGESTED = ("seed", "model", "data", "optim", "scheduler", "trainer")
#: settings outside them that decide a run's numbers where they are set (a run recorded before them had none)
DIGESTED_WHERE_SET = ("callbacks.ema",)
#: keys within them that only say where things are or how they are fetched
NOT_DIGESTED = frozenset(
    {"data.root", "data.cache_dir", "data.download", "data.num_workers", "trainer.default_root_dir"}
)
#: keys that configs gained after runs were recorded, at the value those runs had without them: left out at
#: that value, so a run recorded before them still counts as finished with the same settings
ADDED_KEYS = {
    "model.arch": DEFAULT_ARCH,
    "model.attention_kind": DEFAULT_KIND,
    "model.test_time_flip": False,
    "model.compile_attention": False,
    "optim.exempt_norms_and_biases": False,
}
#: today's ``_target_`` prefixes -> those of runs recorded before the package was grouped by concern: such a
#: run, with the same settings, still counts as finished
FORMER_TARGETS = {current: former for former, current in MOVED_TARGETS.items()}


def _former_targets(value: Any) -> Any:
    """``value`` (a plain config) with every ``_target_`` at its path of :data:`FORMER_TARGETS`."""
    if isinstance(value, list):
        return [_former_targets(item) for item in value]
    if not isinstance(value, dict):
        return value
    value = {key: _former_targets(item) for key, item in value.items()}
    if isinstance(value.get("_target_"), str):
        value["_target_"] = renamed_target(value["_target_"], FORMER_TARGETS)
    return value


def config_digest(cfg: DictConfig, former_targets: bool = False) -> str:
    """A digest of the settings that decide the run's numbers (sorted JSON of :data:`DIGESTED`);
    ``former_targets``: as a run recorded before the package's regrouping computed it."""
    parts = {key: OmegaConf.select(cfg, key) for key in DIGESTED}
    parts |= {key: value for key in DIGESTED_WHERE_SET if (value := OmegaConf.select(cfg, key)) is not None}
    parts = {
        key: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for key, v in parts.items()
    }
    for dotted in NOT_DIGESTED:
        group, _, key = dotted.partition(".")
        if isinstance(parts.get(group), dict):
            parts[group].pop(key, None)
    for dotted, value in ADDED_KEYS.items():
        group, _, key = dotted.partition(".")
        if isinstance(parts.get(group), dict) and parts[group].get(key, value) == value:
            parts[group].pop(key, None)
    if former_targets:
        parts = _former_targets(parts)
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_metrics(cfg: DictConfig) -> dict[str, float] | None:
    """The metrics of the run in ``cfg``'s run dir if it finished with these settings, else None. Raises
    :class:`ConfigError` for a run there that finished with other settings."""
    folder = run_dir(cfg)
    metrics = read_metrics(folder)
    finished = (metrics or {}).get(FINISHED)
    if not finished:
        return None
    if finished.get(CONFIG_DIGEST) not in (config_digest(cfg), config_digest(cfg, former_targets=True)):
        raise ConfigError(
            f"skip_finished=true: {folder} holds a finished run with other settings than this command's (model, "
            f"data, optim, scheduler, trainer, seed or callbacks.ema differ); give this study its own hydra.sweep.dir"
        )
    return {
        name: metrics[key]
        for name, key in ((VAL_METRIC, LAST_VAL_ACC), ("test/acc", TEST_ACC))
        if metrics.get(key) is not None
    }


def mark_finished(cfg: DictConfig) -> None:
    """Record in the run dir's ``metrics.json`` (created if the run wrote none) that the run finished."""
    folder = run_dir(cfg)
    metrics = read_metrics(folder) or {}
    metrics[FINISHED] = {CONFIG_DIGEST: config_digest(cfg)}
    write_metrics(folder, metrics)
