"""The run's figures and tables as artifacts of its MLflow or Weights & Biases run.

TensorBoard gets the figures as images while they are drawn (:func:`cbam.callbacks._utils.publish_figure`);
an experiment tracker gets the files themselves, once they are final: at the end of fitting and again at
the end of testing, every ``*.png`` and ``*.csv`` of the run dir and of its ``attention/`` folder, and
``metrics.json``, under their paths relative to the run dir. MLflow stores them as artifacts
(``MlflowClient.log_artifact``); W&B saves them with the run (``Run.save``, synced with ``wandb sync`` when
offline) and shows the figures as images (``log_image``). Other loggers get nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger, WandbLogger

from cbam.training.run_files import ATTENTION_DIR, METRICS_FILE, run_dir

#: the run dir's files that are artifacts
PATTERNS = ("*.png", "*.csv", METRICS_FILE, f"{ATTENTION_DIR}/*.png")


def artifact_files(folder: Path) -> list[Path]:
    """The files of run dir ``folder`` that :data:`PATTERNS` name, sorted."""
    return sorted({path for pattern in PATTERNS for path in folder.glob(pattern) if path.is_file()})


class TrackerArtifacts(pl.Callback):
    """Log the run dir's figures and tables to every MLflow and W&B logger (see the module's docstring)."""

    def _publish(self, trainer: pl.Trainer) -> None:
        trackers = [logger for logger in trainer.loggers if isinstance(logger, (MLFlowLogger, WandbLogger))]
        if not trainer.is_global_zero or not trackers:
            return
        folder = run_dir(trainer)
        files = artifact_files(folder)
        for logger in trackers:
            if isinstance(logger, MLFlowLogger):
                for path in files:
                    parent = path.parent.relative_to(folder).as_posix()
                    logger.experiment.log_artifact(
                        logger.run_id, str(path), None if parent == "." else parent
                    )
            elif isinstance(logger, WandbLogger):
                for path in files:
                    logger.experiment.save(str(path), base_path=str(folder), policy="now")
                figures = [path for path in files if path.suffix == ".png"]
                for path in figures:
                    key = path.relative_to(folder).with_suffix("").as_posix()
                    logger.log_image(key=f"figures/{key}", images=[str(path)], step=trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(trainer)
