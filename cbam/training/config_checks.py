"""Checks of a resolved config before any work starts: each failure is one line naming the key.

The rules for the arguments of the model, the data, the callbacks and the DDP strategy live in their
constructors, which check them with :mod:`cbam.arguments` and raise :class:`cbam.errors.InvalidArgument`;
here the model is built on the meta device (no memory, no computation, even for ResNet152) and the data module
is constructed, and their errors are mapped to the config key they came from; the callbacks, constructed
once for the trainer (:func:`checked_callbacks`), are named the same way, before any work. This
module adds only what no constructor can know: the top-level keys, a sweep's need of a validation split,
the data on disk, the machine's GPUs, checkpoint files and combinations of keys.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from cbam.arguments import check_flag, check_integer
from cbam.errors import ConfigError, InvalidArgument
from cbam.models.network_config import (
    ATTENTION_DEFAULTS,
    DEFAULT_KIND,
    FLAT_KEYS,
    IMPLEMENTATION_KEYS,
    PLACEMENT_KEYS,
    config_key,
    flatten,
    nest,
    network_name,
    network_of,
)
from cbam.runtime.checkpoints import check_checkpoint, read_checkpoint
from cbam.training.lightning_module import build_optimizer, build_scheduler
from cbam.training.sweep_checks import in_sweep, sweep_refusal


def changed_model_settings(hparams: dict[str, Any], path: str | Path) -> list[str]:
    """``"model.<key>=<value> (the checkpoint's: <saved>)"`` for each network-defining setting of a model's
    ``hparams`` (all but :data:`~cbam.models.network_config.IMPLEMENTATION_KEYS`) that differs from the one
    saved in checkpoint ``path``."""
    saved = flatten(network_of(read_checkpoint(path, mmap=True).get("hyper_parameters", {})))
    ours = flatten(network_of(hparams))
    return [
        f"model.{key}={ours.get(key)} (the checkpoint's: {saved.get(key)})"
        for key in sorted(set(saved) | set(ours), key=[*ours, *saved].index)
        if key not in IMPLEMENTATION_KEYS and saved.get(key) != ours.get(key)
    ]


# ------------------------------------------------------------------------------------------------ config


def num_classes(cfg: DictConfig, data: Any) -> int:
    """The classifier's outputs: the data's class count (``data.class_count()``, read before any image
    is decoded), which an explicit ``model.num_classes`` must equal. The one place this rule lives: the
    config check and :func:`cbam.training.run.build_model` both ask here."""
    found = data.class_count()
    configured = OmegaConf.select(cfg, "model.num_classes")
    if configured is not None and configured != found:
        raise ConfigError(
            f"model.num_classes={configured}: the data ({data.description}) have {found} classes; leave "
            f"model.num_classes out (null) to follow the data"
        )
    return found


def constructed(group: str, build, kind: str | None = None, own_checks: tuple[type, ...] = ()) -> Any:
    """``build()``, with an :class:`InvalidArgument` of its constructor named by its config key (``kind``: the
    model's attention kind, whose options the key may name); ``own_checks``: the errors by which another
    library's constructor (Lightning's callbacks) refuses an argument, said in one line naming ``group``."""
    try:
        return build()
    except (InstantiationException, InvalidArgument, *own_checks) as error:
        # (Hydra wraps a constructor's own error; a partial's call raises it directly)
        cause = error.__cause__ if isinstance(error, InstantiationException) else error
        if isinstance(cause, InvalidArgument):
            key = cause.argument if kind is None else config_key(kind, cause.argument)
            raise ConfigError(f"{group}.{key}={cause.value}: {cause.accepted}") from None
        if isinstance(cause, (TypeError, *own_checks)):  # e.g. a key it has no argument for (+model.foo=1)
            reason = " ".join(str(cause).split()) or type(cause).__name__
            raise ConfigError(f"{group}: {reason}") from None
        raise


def _check_optimization(cfg: DictConfig) -> None:
    """``optim`` and ``scheduler``, built as the module builds them, over a one-weight network."""
    net = torch.nn.Linear(1, 1)
    torch_checks = (TypeError, ValueError)  # a partial's call raises these directly (an unknown key, lr < 0)
    optimizer = constructed("optim", lambda: build_optimizer(net, cfg.optim), own_checks=torch_checks)
    constructed("scheduler", lambda: build_scheduler(optimizer, cfg.scheduler, 100), own_checks=torch_checks)


def checked_callbacks(cfg: DictConfig) -> list[Any]:
    """The trainer's callbacks, each of ``cfg.callbacks`` constructed once (a callback's constructor may
    start something, e.g. a test's kill thread), with a bad setting said in one line naming its key:
    this project's callbacks check every argument (:mod:`cbam.arguments`), Lightning's their own.
    :func:`cbam.training.run.build_trainer` calls it, after :func:`check_config` and before any work."""
    lightning_checks = (MisconfigurationException, ValueError)
    return [
        constructed(f"callbacks.{name}", lambda: instantiate(callback), own_checks=lightning_checks)
        for name, callback in (cfg.get("callbacks") or {}).items()
        if callback is not None
    ]


def _check_sweep(cfg: DictConfig) -> None:
    """A job of a sweep: what the sweep needs of it (:mod:`cbam.training.sweep_checks`)."""
    refusal = sweep_refusal(cfg) if in_sweep() else None
    if refusal is not None:
        raise ConfigError(refusal)


def _check_gpu(cfg: DictConfig) -> None:
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: this machine has no usable CUDA GPU; run on a GPU machine, "
            f"or leave out trainer=gpu/ddp (trainer=default uses the CPU here, trainer=ddp_sim simulates DDP)"
        )


#: the loggers that need an optional extra: their ``_target_`` -> (the module they import, the extra)
LOGGER_EXTRAS = {
    "pytorch_lightning.loggers.MLFlowLogger": ("mlflow", "mlflow"),
    "pytorch_lightning.loggers.WandbLogger": ("wandb", "wandb"),
}


def _check_logger(cfg: DictConfig) -> None:
    target = OmegaConf.select(cfg, "logger._target_")
    if target not in LOGGER_EXTRAS:
        return
    module, extra = LOGGER_EXTRAS[target]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f'logger={extra}: {module} is not installed here; install it with pip install -e ".[{extra}]"'
        )


def _check_fused(cfg: DictConfig) -> None:
    if OmegaConf.select(cfg, "model.cbam_impl") != "fused":
        return
    from cbam.models.fused import fused_available

    on_cpu = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")) == "cpu"
    device = "cuda" if torch.cuda.is_available() and not on_cpu else "cpu"
    if not fused_available(device):
        raise ConfigError(
            "model.cbam_impl=fused: the fused CBAM needs Triton and a CUDA GPU; use "
            "model.cbam_impl=reference or auto here"
        )


def _checked_model(cfg: DictConfig, outputs: int) -> Any:
    """The LightningModule of ``cfg.model``, built on the meta device: its constructors' checks without
    allocating or initialising weights (even for ResNet152)."""
    kind = OmegaConf.select(cfg, "model.attention_kind", default=DEFAULT_KIND)

    def build():
        return instantiate(cfg.model, num_classes=outputs, _recursive_=False, _convert_="all")

    try:
        with torch.device("meta"):
            return constructed("model", build, kind)
    except InstantiationException as error:
        if not isinstance(error.__cause__, NotImplementedError):
            raise
    # A builder that reads values back from tensors (torchvision's RegNets compute their widths so) cannot
    # run on the meta device: such a network is checked on the CPU.
    return constructed("model", build, kind)


def _check_forward(model: Any, size: tuple[int, int], outputs: int) -> None:
    """The network (on the meta device) maps two images of ``size`` to ``outputs`` logits each: a torchvision
    network may not take 32-pixel images, or may return more than logits."""
    images = torch.zeros(2, 3, *size, device=next(model.net.parameters()).device)
    try:
        with torch.no_grad():
            logits = model.net.forward(images)  # (forward: never torch.compile's wrapper, with model.compile)
    except Exception as error:  # whatever the network's own forward raises: one line, naming the network
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"model: the network fails on {size[0]}x{size[1]} images ({type(error).__name__}: {reason})"
        ) from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, outputs):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"model: the network returns {shape} for 2 images, not (2, {outputs}) logits")


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first unusable value of ``cfg``."""
    check_integer("seed", cfg.seed)
    for key in ("train", "test", "skip_finished"):
        check_flag(key, cfg.get(key))
    _check_sweep(cfg)
    data = constructed("data", lambda: instantiate(cfg.data))
    outputs = num_classes(cfg, data)  # the data on disk are surveyed here, before any work
    if cfg.train:
        data.check_training_batch()
    model = _checked_model(cfg, outputs)
    size = data.source.declared_image_size()
    if size is not None:  # (an image folder of unknown size is checked when its first batch runs)
        _check_forward(model, size, outputs)
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    if isinstance(strategy, DictConfig):  # this project's DDP strategy (trainer=ddp, ddp_sim) checks its keys
        constructed("trainer.strategy", lambda: instantiate(strategy))
    if cfg.train:
        _check_optimization(cfg)
    _check_gpu(cfg)
    _check_fused(cfg)
    _check_logger(cfg)
    if not cfg.train and not cfg.test:
        raise ConfigError("train=false and test=false: nothing to do")
    if not cfg.train and cfg.ckpt_path in (None, "last"):
        raise ConfigError("train=false needs ckpt_path=<checkpoint file> to test")
    if cfg.ckpt_path not in (None, "last"):
        check_checkpoint(cfg.ckpt_path)
    weights_from = cfg.get("weights_from")
    if weights_from is not None:
        if cfg.ckpt_path is not None:
            raise ConfigError(
                f"weights_from={weights_from}: give either weights_from (weights only) or ckpt_path (resume)"
            )
        check_checkpoint(weights_from, key="weights_from")


def unplaced_attention_warning(cfg: DictConfig) -> str | None:
    """A warning when ``cfg`` trains a model whose attention keys differ from their defaults while no attention
    is placed (``attention=se`` with ``cbam=none``): settings that change nothing. Not an error: a multirun
    crossing ``cbam=none`` with attention variants trains its baselines this way."""
    model = cfg.model
    if not cfg.train or any(model.get(key) for key in PLACEMENT_KEYS):
        return None
    kind = model.get("attention_kind", DEFAULT_KIND)
    changed = [
        f"model.{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, default in ATTENTION_DEFAULTS[kind].items()
        if (value := model.get(key, default)) != default
    ]
    if not changed:
        return None
    network = network_name(nest({key: value for key, value in model.items() if key in FLAT_KEYS}))
    return (
        f"{', '.join(changed)} configure a {kind.upper()} that no placement uses (cbam=none): this run trains "
        f"{network} without attention. Place it with cbam=block|classifier|both"
    )
