"""``<run dir>/metrics.json``: the run's final numbers, read by ``python -m cbam.report``.

Written at the end of fit (best and last val/acc, training time, epochs, optimizer steps, time per step)
and again at the end of test (with every ``test/*`` metric), with where the run ran (device, torch
version, git revision, precision, data, date: :func:`cbam.runtime.provenance.run_record`). A job of a sweep without
this file has not finished.
"""

from __future__ import annotations

import json
import time

import pytorch_lightning as pl

from cbam.callbacks._utils import data_input_size, plain_network, run_dir
from cbam.callbacks.model_stats import ModelStats, count_flops, count_parameters
from cbam.runtime.atomic import write_atomically
from cbam.runtime.provenance import run_record


class RunMetrics(pl.Callback):
    """Collect the run's final metrics and write them as JSON into the run dir (rank 0).

    Args:
        filename: file of the run dir receiving them.
        monitor: the validation metric whose best value is kept (higher is better).
    """

    def __init__(self, filename: str = "metrics.json", monitor: str = "val/acc") -> None:
        self.filename, self.monitor = filename, monitor
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.last: float | None = None
        self.train_time_s = 0.0  # of earlier sessions of a resumed run
        self._started: float | None = None
        self.values: dict = {}

    def state_dict(self) -> dict:
        elapsed = time.perf_counter() - self._started if self._started is not None else 0.0
        return {"best": self.best, "best_epoch": self.best_epoch, "train_time_s": self.train_time_s + elapsed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")
        self.train_time_s = state_dict.get("train_time_s", 0.0)

    def _model_numbers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        measured = [c for c in trainer.callbacks if isinstance(c, ModelStats) and c.params is not None]
        if measured:
            stats = measured[0]
            return {"params": stats.params, "flops_per_image": stats.flops_per_image}
        net = plain_network(pl_module)
        flops = count_flops(net, data_input_size(trainer) or (3, 32, 32))
        return {"params": count_parameters(net), "flops_per_image": flops}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.last = float(value)
        if self.best is None or self.last > self.best:
            self.best, self.best_epoch = self.last, trainer.current_epoch

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started is not None:
            self.train_time_s += time.perf_counter() - self._started
            self._started = None
        key = self.monitor.replace("/", "_")
        self.values.update(
            {
                f"best_{key}": self.best,
                f"best_{key}_epoch": self.best_epoch,
                f"last_{key}": self.last,
                "epochs": trainer.current_epoch,
                "global_step": trainer.global_step,
                "train_time_s": round(self.train_time_s, 3),
                # The whole fit (validation included) per optimizer step: what a configuration costs to train.
                "step_time_s": self.train_time_s / trainer.global_step if trainer.global_step else None,
            }
        )
        self._write(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith("test/"):
                self.values[key.replace("/", "_")] = float(value)
        self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        numbers = self._model_numbers(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        data = getattr(trainer.datamodule, "description", None)
        record = run_record(trainer.strategy.root_device, trainer.precision, data)
        text = json.dumps({**self.values, **numbers, **record}, indent=2) + "\n"
        path = run_dir(trainer) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        # a reader (cbam.report, while the sweep runs) never sees a half-written file
        write_atomically(path, lambda file: file.write(text.encode()), prefix=f".{path.name}.")
