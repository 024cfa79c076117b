"""What train.py runs: check the config, build data, model, callbacks, logger and trainer, fit, test."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from cbam.data import ImageDataModule
from cbam.errors import ConfigError, ScheduleLengthChanged, one_line_errors, say
from cbam.runtime.checkpoints import (
    check_last_checkpoint,
    describe_checkpoint,
    newest_checkpoint,
    read_checkpoint,
    weights_mismatch,
)
from cbam.runtime.distributed import leave_on_error
from cbam.runtime.lightning_internals import cpu_has_native_bf16
from cbam.runtime.write_failures import silence_failed_writes_in_threads, write_failure
from cbam.training.config_checks import (
    changed_model_settings,
    check_config,
    checked_callbacks,
    num_classes,
    unplaced_attention_warning,
)
from cbam.training.finished_jobs import finished_metrics, mark_finished
from cbam.training.lightning_module import CBAMResNetModule
from cbam.training.run_files import VAL_METRIC, run_dir


def build_model(cfg: DictConfig, data: ImageDataModule) -> CBAMResNetModule:
    """The LightningModule of ``cfg.model``, with as many outputs as ``data`` has classes
    (:func:`cbam.training.config_checks.num_classes`) and the optimizer and schedule of ``cfg.optim`` and ``cfg.scheduler``
    (passed as configs: the module instantiates them and saves them as hparams)."""
    return instantiate(
        cfg.model,
        num_classes=num_classes(cfg, data),
        optimizer=cfg.optim,
        scheduler=cfg.scheduler,
        _recursive_=False,
        _convert_="all",
    )


def load_weights(model: CBAMResNetModule, path: str) -> None:
    """Start ``model`` from the weights of checkpoint ``path`` (``weights_from``): no optimizer, schedule
    or step count, so the run trains ``trainer.max_epochs`` more epochs with a schedule of its own."""
    try:
        model.load_state_dict(read_checkpoint(path, key="weights_from")["state_dict"])
    except RuntimeError as error:
        reason = weights_mismatch(error)
        if reason is None:
            raise
        raise ConfigError(
            f"weights_from={path}: its weights do not fit this model.* config ({reason})"
        ) from None


def cpu_precision(cfg: DictConfig) -> str | None:
    """The precision to train in instead of ``trainer.precision``, or None to keep it: bf16 autocast on a
    CPU that emulates bf16 (slower than fp32 there) trains in fp32, said in one info line."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if str(cfg.trainer.get("precision")) != "bf16-mixed" or not on_cpu or cpu_has_native_bf16():
        return None
    if rank_zero_only.rank == 0:
        say(
            "info: this CPU has no bf16 arithmetic (AVX512-BF16, AMX or Arm BF16): trainer.precision="
            "bf16-mixed trains in fp32 (32-true) here"
        )
    return "32-true"


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    callbacks = checked_callbacks(cfg)  # a bad setting: one line naming its key
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    return instantiate_trainer(cfg, callbacks=callbacks, logger=logger)


def instantiate_trainer(cfg: DictConfig, **options) -> pl.Trainer:
    """The Trainer of ``cfg.trainer`` with ``options`` on top, in the precision that :func:`cpu_precision`
    resolves; a setting the Trainer refuses is one line naming ``trainer``."""
    precision = cpu_precision(cfg)
    if precision:
        options["precision"] = precision
    try:
        return instantiate(cfg.trainer, **options)
    except InstantiationException as error:  # Hydra's wrapper around the Trainer's check of its arguments
        if isinstance(error.__cause__, (MisconfigurationException, ValueError)):
            reason = str(error.__cause__).strip().splitlines()[0]
            raise ConfigError(f"trainer: {reason}") from None
        raise


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    """The best checkpoint by a monitored metric, if a callback kept one (else test the final weights).

    Not ``trainer.checkpoint_callback``: that is merely the first ModelCheckpoint, which may be the
    periodic or the last-checkpoint callback when the best one is switched off.
    """
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor is not None and callback.best_model_path:
            return callback.best_model_path
    return None


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and/or test as ``cfg`` says; returns the final metrics. The death of another process of the
    run (a DDP rank, a DataLoader worker) raises :class:`ProcessDied`, whatever error it caused here; a
    write that fails (disk full, read-only, no permission) raises :class:`WriteFailed` naming the file and
    the newest intact checkpoint. With ``skip_finished``, a run dir that holds this run finished returns
    its metrics without any work (:mod:`cbam.training.finished_jobs`)."""
    if cfg.get("skip_finished") is True:
        finished = finished_metrics(cfg)
        if finished is not None:
            if rank_zero_only.rank == 0:
                say(f"skipped: {run_dir(cfg)} holds this run, finished")
            return finished
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    trainer = build_trainer(cfg)
    warning = unplaced_attention_warning(cfg)  # once the run is known to start: bad input is one line alone
    if warning and rank_zero_only.rank == 0:
        say(f"warning: {warning}")
    try:
        metrics = fit_and_test(cfg, trainer, datamodule)
        if trainer.is_global_zero:
            mark_finished(cfg)
        return metrics
    except Exception as error:
        death = leave_on_error(error, trainer)  # also tells the other processes of the run why this one stops
        if death is not None:
            raise death from None
        failure = write_failure(error, where=trainer.default_root_dir)
        if failure is None:
            raise
        failure.last_good = describe_checkpoint(newest_checkpoint(trainer))
        raise failure from None


def fit_and_test(
    cfg: DictConfig, trainer: pl.Trainer, datamodule: pl.LightningDataModule
) -> dict[str, float]:
    """The fitting and testing of :func:`run`."""
    if cfg.train and cfg.ckpt_path == "last":
        check_last_checkpoint(trainer)  # a corrupt last.ckpt: one error line naming it
    metrics = {}  # trainer.test resets callback_metrics: keep fit's (val/acc, which the sweepers maximise)
    if cfg.train:
        model = build_model(cfg, datamodule)
        if cfg.weights_from:
            load_weights(model, cfg.weights_from)
        if trainer.logger:
            trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        except ScheduleLengthChanged as error:  # raised while the checkpoint is restored, before any step
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path}: {error}. Resume with the settings the run had; to train longer, "
                f"start a new run from its weights: weights_from=<checkpoint> (new schedule over "
                f"trainer.max_epochs), or use scheduler=constant, which resumes with any length"
            ) from None
        except RuntimeError as error:  # the weights restored before any step do not fit the model
            reason = weights_mismatch(error)
            if reason is None:
                raise
            changed = changed_model_settings(model.hparams, trainer.ckpt_path)
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path}: its weights do not fit this model.* config ({reason}); resume "
                f"with the settings the run had" + (f", not {', '.join(changed)}" if changed else "")
            ) from None
        metrics.update(trainer.callback_metrics)
    else:
        # The checkpoint alone rebuilds the model it was trained with, whatever cfg.model says; only how the
        # CBAM runs (the same weights) follows this machine's config, checked above.
        impl = OmegaConf.select(cfg, "model.cbam_impl")  # (absent with another attention kind than CBAM)
        model = CBAMResNetModule.load_from_checkpoint(
            cfg.ckpt_path, map_location="cpu", **({"cbam_impl": impl} if impl is not None else {})
        )
        classes = datamodule.class_count()
        if model.num_classes != classes:
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path}: its model has {model.num_classes} outputs, but the data "
                f"({datamodule.description}) have {classes} classes; test it on the data it was trained on"
            )
    if cfg.test:
        trainer.test(model, datamodule=datamodule, ckpt_path=best_checkpoint(trainer) if cfg.train else None)
    metrics.update(trainer.callback_metrics)
    return {key: float(value) for key, value in metrics.items()}


def sweep_objective(metrics: dict[str, float]) -> float | None:
    """What train.py returns to a Hydra sweeper: the validation accuracy, never the test accuracy. A sweep's
    jobs have a validation split (:mod:`cbam.training.sweep_checks`); a single run without one gets None."""
    return metrics.get(VAL_METRIC)


def main(cfg: DictConfig) -> dict[str, float]:
    """:func:`run`, with any :class:`~cbam.errors.ProjectError` (bad input, divergence, a failed write, the
    death of another process of the run) reported as one line on stderr and its exit status, no traceback."""
    silence_failed_writes_in_threads()  # TensorBoard's writer thread: its error comes back as the line
    with one_line_errors(rank=rank_zero_only.rank):
        return run(cfg)
