"""CBAM (Woo et al., ECCV 2018) in CIFAR ResNets, trained with PyTorch Lightning and Hydra."""

from cbam.attention import CBAM, ChannelAttention, SpatialAttention
from cbam.resnet import build_resnet

__all__ = ["CBAM", "ChannelAttention", "SpatialAttention", "build_resnet"]
__version__ = "0.1.0"
