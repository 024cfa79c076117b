"""Checks of a resolved config before any work starts: each failure is one line naming the key."""

from __future__ import annotations

import zipfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cbam.data import find_source
from cbam.resnet import DEPTHS, smallest_attention_channels


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and what is accepted."""


def check_checkpoint(path: str | Path, key: str = "ckpt_path") -> None:
    """A checkpoint written by torch.save is a zip archive; test every member's CRC, which catches
    missing, truncated, corrupted and foreign files without unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            if damaged is not None:
                raise ConfigError(f"{key}={path} is corrupt (bad member {damaged})")
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise ConfigError(f"{key}={path} is not a PyTorch checkpoint")
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ConfigError(f"{key}={path} is not a readable checkpoint (truncated or corrupt: {error})") from None


def _require(cfg: DictConfig, key: str, kind: type, described: str) -> None:
    value = OmegaConf.select(cfg, key)
    # bool is a subclass of int: true is not a batch size
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value}: must be {described}")


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first unusable value of ``cfg``."""
    model, data = cfg.model, cfg.data
    for key in ("model.depth", "model.width", "model.kernel_size", "model.reduction_ratio", "data.batch_size",
                "data.num_workers", "data.val_size"):
        _require(cfg, key, int, "an integer")
    for key in ("model.use_cbam_block", "model.use_cbam_class", "data.download", "train", "test"):
        _require(cfg, key, bool, "true or false")
    if model.depth not in DEPTHS:
        raise ConfigError(f"model.depth={model.depth}: accepted depths are {', '.join(map(str, DEPTHS))}")
    if model.width < 1:
        raise ConfigError(f"model.width={model.width}: must be an integer >= 1")
    if model.kernel_size < 1 or model.kernel_size % 2 == 0:
        raise ConfigError(f"model.kernel_size={model.kernel_size}: must be an odd integer >= 1")
    if model.reduction_ratio < 1:
        raise ConfigError(f"model.reduction_ratio={model.reduction_ratio}: must be an integer >= 1")
    if model.use_cbam_block or model.use_cbam_class:
        smallest = smallest_attention_channels(
            model.depth, use_cbam_block=model.use_cbam_block, use_cbam_class=model.use_cbam_class, width=model.width
        )
        if not 1 <= model.reduction_ratio <= smallest:
            raise ConfigError(
                f"model.reduction_ratio={model.reduction_ratio}: must be between 1 and {smallest}, the "
                f"smallest channel count a CBAM sees in this network"
            )
    if data.batch_size < 1:
        raise ConfigError(f"data.batch_size={data.batch_size}: must be an integer >= 1")
    if data.num_workers < 0:
        raise ConfigError(f"data.num_workers={data.num_workers}: must be an integer >= 0")
    if not 0 <= data.val_size < 50000:
        raise ConfigError(f"data.val_size={data.val_size}: must be in [0, 50000)")
    if data.loader not in ("auto", "device", "workers"):
        raise ConfigError(f"data.loader={data.loader}: accepted values are auto, device, workers")
    if not data.download and find_source(Path(data.root).expanduser()) is None:
        root = Path(data.root).expanduser()
        state = "does not exist" if not root.exists() else "holds no CIFAR-10"
        raise ConfigError(
            f"data.root={data.root} {state} and data.download=false: point it at a folder with "
            f"cifar-10-batches-py/ or train/<class>/ + test/<class>/ images"
        )
    if not cfg.train and not cfg.test:
        raise ConfigError("train=false and test=false: nothing to do")
    if not cfg.train and cfg.ckpt_path in (None, "last"):
        raise ConfigError("train=false needs ckpt_path=<checkpoint file> to test")
    if cfg.ckpt_path not in (None, "last"):
        check_checkpoint(cfg.ckpt_path)
