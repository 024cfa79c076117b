"""Shared pieces of the benchmarks: data, FLOP counting, device description."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cbam import build_resnet
from cbam.data import CIFAR10_MEAN, CIFAR10_STD, ImageArrays, load_cifar10
from cbam.runtime.provenance import describe_device  # noqa: F401 (the benchmarks' device line, one definition)

# Dense bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s (fp32 peaks for fp32 runs are
# not used: MFU is quoted against the bf16 peak, the ceiling a mixed-precision run can aim at).
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "4090": 165.2}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def software_versions() -> dict[str, str]:
    import pytorch_lightning

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
        "pytorch_lightning": pytorch_lightning.__version__,
    }


def training_flops_per_image(depth: int, use_cbam_block: bool, width: int = 64) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by torch.utils.flop_counter
    (matrix products and convolutions) on a CPU copy of the network."""
    net = build_resnet(depth, use_cbam_block=use_cbam_block, width=width)
    images = torch.randn(2, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter:
        net(images).sum().backward()
    return counter.get_total_flops() / len(images)


def cifar_arrays(root: str | None, cache_dir: str | None, num_images: int) -> ImageArrays:
    """The real data when ``root`` is given, else random uint8 images of the same shape."""
    if root:
        return load_cifar10(Path(root), download=False, cache_dir=cache_dir)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_images, 32, 32, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (num_images,), generator=generator)
    names = [str(i) for i in range(10)]
    return ImageArrays(images, labels, images[:256], labels[:256], names, CIFAR10_MEAN, CIFAR10_STD)
