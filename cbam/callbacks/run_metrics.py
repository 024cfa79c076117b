"""``<run dir>/metrics.json``: the run's final numbers, read by ``python -m cbam.report``.

Written at the end of fit (best and last val/acc, training time, epochs, optimizer steps, time per step, the
spread of the training steps' wall-clock times and the machine's load while it trained) and again at the
end of test (with every ``test/*`` metric), with where the run ran (device, torch version, git revision and
whether the tree was clean, precision, data, date: :func:`cbam.runtime.provenance.run_record`). A job of a
sweep without this file has not finished. The file and its keys: :mod:`cbam.training.run_files`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque

import pytorch_lightning as pl
import torch

from cbam.callbacks._utils import data_input_size, plain_network
from cbam.callbacks.model_stats import ModelStats, count_flops, count_parameters
from cbam.runtime.provenance import run_record
from cbam.training import run_files

#: the training steps whose times are kept (the latest: a long run's steady state)
KEPT_STEPS = 10_000
#: the load average is read every this many training steps
LOAD_EVERY_N_STEPS = 20


def step_summary(durations: list[float]) -> dict | None:
    """``{"median", "p10", "p90", "steps"}`` of step ``durations`` (seconds), None without any."""
    if not durations:
        return None
    if len(durations) == 1:
        low = high = durations[0]
    else:
        deciles = statistics.quantiles(durations, n=10, method="inclusive")
        low, high = deciles[0], deciles[-1]
    return {
        "median": statistics.median(durations),
        "p10": low,
        "p90": high,
        "steps": len(durations),
    }


class StepClock:
    """The wall-clock time of each training step: from one step's end to the next's (the first of an epoch
    from its start), so a step's time includes fetching its batch. On a GPU the marks are CUDA events,
    read at the epoch's end: the device's timeline, without a synchronisation per step."""

    def __init__(self) -> None:
        self.durations: deque[float] = deque(maxlen=KEPT_STEPS)
        self._marks: list = []
        self._cuda = False

    def start_epoch(self, device: torch.device) -> None:
        self._cuda, self._marks = device.type == "cuda", []

    def _mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def step_starts(self) -> None:
        if not self._marks:
            self._marks.append(self._mark())

    def step_ends(self) -> None:
        if self._marks:
            self._marks.append(self._mark())

    def end_epoch(self) -> None:
        """Turn the epoch's marks into step times."""
        marks, self._marks = self._marks, []
        if len(marks) < 2:
            return
        if self._cuda:
            marks[-1].synchronize()
            self.durations.extend(a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:]))
        else:
            self.durations.extend(b - a for a, b in zip(marks, marks[1:]))


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the system does not tell it)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class RunMetrics(pl.Callback):
    """Collect the run's final metrics and write them as JSON into the run dir (rank 0): the best and last
    ``val/acc`` (higher is better), test metrics, cost and provenance (see the module's docstring)."""

    def __init__(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.last: float | None = None
        self.train_time_s = 0.0  # of earlier sessions of a resumed run
        self._started: float | None = None
        self.values: dict = {}
        self.clock = StepClock()
        self.loads: deque[float] = deque(maxlen=KEPT_STEPS)

    def state_dict(self) -> dict:
        elapsed = time.perf_counter() - self._started if self._started is not None else 0.0
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "train_time_s": self.train_time_s + elapsed,
            "step_times_s": list(self.clock.durations),
            "load_averages": list(self.loads),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")
        self.train_time_s = state_dict.get("train_time_s", 0.0)
        self.clock.durations.extend(state_dict.get("step_times_s", ()))
        self.loads.extend(state_dict.get("load_averages", ()))

    def _model_numbers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        measured = [c for c in trainer.callbacks if isinstance(c, ModelStats) and c.params is not None]
        if measured:
            stats = measured[0]
            params, flops = stats.params, stats.flops_per_image
        else:
            net = plain_network(pl_module)
            params, flops = count_parameters(net), count_flops(net, data_input_size(trainer) or (3, 32, 32))
        return {run_files.PARAMS: params, run_files.FLOPS: flops}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.start_epoch(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.step_starts()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.step_ends()
        if batch_idx % LOAD_EVERY_N_STEPS == 0 and (load := load_average()) is not None:
            self.loads.append(load)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.end_epoch()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(run_files.VAL_METRIC)
        if trainer.sanity_checking or value is None:
            return
        self.last = float(value)
        if self.best is None or self.last > self.best:
            self.best, self.best_epoch = self.last, trainer.current_epoch

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started is not None:
            self.train_time_s += time.perf_counter() - self._started
            self._started = None
        self.clock.end_epoch()  # an epoch that a stop left unfinished
        loads = list(self.loads)
        load = {"mean": statistics.fmean(loads), "max": max(loads), "samples": len(loads)} if loads else None
        self.values.update(
            {
                run_files.BEST_VAL_ACC: self.best,
                run_files.BEST_VAL_ACC_EPOCH: self.best_epoch,
                run_files.LAST_VAL_ACC: self.last,
                run_files.EPOCHS: trainer.current_epoch,
                run_files.GLOBAL_STEP: trainer.global_step,
                run_files.TRAIN_TIME: round(self.train_time_s, 3),
                # The whole fit (validation included) per optimizer step: what a configuration costs to train.
                run_files.STEP_TIME: self.train_time_s / trainer.global_step if trainer.global_step else None,
                run_files.TRAIN_STEP: step_summary(list(self.clock.durations)),
                run_files.LOAD_AVERAGE: load,
                run_files.CPUS: os.cpu_count(),
            }
        )
        self._write(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith("test/"):
                self.values[run_files.metric_key(key)] = float(value)
        self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        numbers = self._model_numbers(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        data = getattr(trainer.datamodule, "description", None)
        record = run_record(trainer.strategy.root_device, trainer.precision, data)
        run_files.write_metrics(run_files.run_dir(trainer), {**self.values, **numbers, **record})
