"""CBAM (Woo et al., ECCV 2018) in CIFAR ResNets, trained with PyTorch Lightning and Hydra.

The package, by concern: ``models`` (the attention layers CBAM, SE, ECA and BAM, the networks, the fused
kernels, ``attach`` for torchvision networks), ``data``, ``training`` (the LightningModule, the run train.py
makes, config checks, schedules), ``callbacks``,
``runtime`` (checkpoints, DDP watch, run-dir lock, atomic writes, provenance), ``analysis`` (the sweep report,
its statistics, Grad-CAM); ``errors`` holds every error a command ends with.
"""

from cbam.models.cbam import CBAM, CBAMOptions, ChannelAttention, SpatialAttention
from cbam.models.resnet import build_resnet

__all__ = ["CBAM", "CBAMOptions", "ChannelAttention", "SpatialAttention", "attach", "build_resnet"]


def __getattr__(name: str):
    # cbam.attach imports torchvision, which nothing else of the layer needs: loaded on first use
    if name == "attach":
        from cbam.models.attach import attach

        return attach
    raise AttributeError(f"module 'cbam' has no attribute {name!r}")


__version__ = "0.1.0"
