"""Loss and accuracy per epoch (train and val) as ``<run dir>/curves.png`` and ``curves.csv``, redrawn after
every epoch."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from matplotlib.ticker import MaxNLocator

from cbam.arguments import check_names
from cbam.callbacks._utils import new_figure
from cbam.runtime.atomic import write_atomically
from cbam.training.run_files import CURVES_FIGURE, CURVES_TABLE, run_dir

#: the stages whose epoch metrics the curves can draw
STAGES = ("train", "val")


class TrainingCurves(pl.Callback):
    """Plot ``<stage>/<metric>`` for every metric (panels) and stage (lines) against the epoch.

    Args:
        metrics: the logged metric names without the stage prefix, one panel each.
        stages: the stage prefixes (of :data:`STAGES`), one line each.
    """

    def __init__(
        self,
        metrics: tuple[str, ...] | list[str] = ("loss", "acc"),
        stages: tuple[str, ...] | list[str] = STAGES,
    ) -> None:
        check_names("metrics", metrics)
        check_names("stages", stages, STAGES)
        self.metrics, self.stages = list(metrics), list(stages)
        # {"train/loss": {epoch: value}}; kept in checkpoints, so a resumed run keeps its earlier epochs
        self.history: dict[str, dict[int, float]] = {}

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {key: dict(values) for key, values in state_dict.get("history", {}).items()}

    def _record(self, epoch: int, stage: str, values: dict) -> None:
        for metric in self.metrics:
            value = values.get(f"{stage}/{metric}")
            if value is not None:
                self.history.setdefault(f"{stage}/{metric}", {})[epoch] = float(value)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            for stage in self.stages:
                if stage != "train":
                    self._record(trainer.current_epoch, stage, trainer.callback_metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "train" in self.stages:
            # Lightning runs this hook before the module logs the epoch's train metrics: take them from
            # the module (CBAMResNetModule.epoch_metrics), else from the last logged values.
            if hasattr(pl_module, "epoch_metrics"):
                values = {f"train/{name}": value for name, value in pl_module.epoch_metrics("train").items()}
            else:
                values = trainer.callback_metrics
            self._record(trainer.current_epoch, "train", values)
        if trainer.is_global_zero and self.history:
            folder = run_dir(trainer)
            self.draw(folder / CURVES_FIGURE)
            self.write_table(folder / CURVES_TABLE)

    def write_table(self, path: Path) -> Path:
        """The curves' values as CSV (``epoch`` from 1, then one column per ``<stage>/<metric>``, empty where an
        epoch has none): what a study report draws its curves from."""
        keys = sorted(self.history)
        epochs = sorted({epoch for values in self.history.values() for epoch in values})
        lines = [",".join(["epoch", *keys])]
        for epoch in epochs:
            cells = [repr(self.history[key][epoch]) if epoch in self.history[key] else "" for key in keys]
            lines.append(",".join([str(epoch + 1), *cells]))
        text = "\n".join(lines) + "\n"
        write_atomically(path, lambda file: file.write(text.encode()), prefix=f".{path.name}.")
        return path

    def draw(self, path):
        figure = new_figure(4.5 * len(self.metrics), 3.4)
        axes = figure.subplots(1, len(self.metrics), squeeze=False)[0]
        figure.subplots_adjust(left=0.1, right=0.98, bottom=0.15, top=0.9, wspace=0.3)
        for axis, metric in zip(axes, self.metrics):
            for stage in self.stages:
                points = sorted(self.history.get(f"{stage}/{metric}", {}).items())
                if points:
                    epochs, values = zip(*points)
                    axis.plot(
                        [e + 1 for e in epochs],
                        values,
                        marker="o" if len(points) < 30 else None,
                        markersize=3,
                        label=stage,
                    )
            last = max((epoch + 1 for values in self.history.values() for epoch in values), default=1)
            axis.set_xlim(0.5, last + 0.5)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_xlabel("epoch")
            axis.set_ylabel(metric)
            axis.set_title(metric)
            axis.grid(alpha=0.3)
            if axis.has_data():
                axis.legend()
        # atomically: a failed redraw (a full disk) keeps the previous epoch's figure
        write_atomically(
            path, lambda file: figure.savefig(file, format="png", dpi=100), prefix=f".{path.name}."
        )
        return path
