"""Training throughput of three pipelines on the same CBAM-ResNet, after warm-up.

* ``lightning``: this project's training path (CBAMResNetModule + Trainer, the device loader, bf16 autocast,
  channels_last, fused SGD on a GPU);
* ``plain``: a bare PyTorch loop over the same network, data path and precision: the ceiling that shows
  Lightning's overhead;
* ``conventional``: the usual DataLoader with PIL/torchvision transforms in worker processes, fp32: what
  the seed repositories do.

Rows: pipeline x depth x CBAM (none, block) x CBAM implementation (``--impl``: reference, fused; CBAM
rows only). Reports images/s, step time, MFU (training FLOPs counted by torch.utils.flop_counter over the
device's dense bf16 peak) and, on a GPU, the peak memory allocated during the run. Examples::

    python benchmarks/throughput.py --data /path/to/cifar10-jpeg --out results.json     # on a GPU
    python benchmarks/throughput.py --depths 50 --cbam block --impl reference,fused --pipelines plain
    python benchmarks/throughput.py --quick                                             # CPU smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    cifar_arrays,
    describe_device,
    peak_tflops,
    software_versions,
    training_flops_per_image,
)

from cbam.data import CIFAR10_MEAN, CIFAR10_STD, DeviceLoader, LoaderSpec, default_padding
from cbam.models.network_config import build_network, nest


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, loader, args, device: torch.device) -> float:
    """Seconds taken by ``args.steps`` calls of ``step(images, labels)`` after ``args.warmup`` untimed ones."""
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # the loader, over and over
    start = None
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            _synchronize(device)
            start = time.perf_counter()
        step(*next(batches))
    _synchronize(device)
    return time.perf_counter() - start


def train_spec(args, arrays) -> LoaderSpec:
    """The training batches of ``arrays`` as the data module cuts them (normalisation, crop padding)."""
    return LoaderSpec(
        args.batch_size,
        train=True,
        mean=tuple(arrays.mean),
        std=tuple(arrays.std),
        padding=default_padding(arrays.image_size),
    )


def network_options(cbam: bool, impl: str | None) -> dict:
    """The model config's keys of a row (``CBAMResNetModule``'s arguments): CBAM in every block or none."""
    return {"use_cbam_block": True, "cbam_impl": impl} if cbam else {"use_cbam_block": False}


def run_plain(args, arrays, depth: int, network: dict, device: torch.device) -> float:
    """Seconds for ``args.steps`` timed steps of a bare loop with this project's data path."""
    gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = gpu  # as trainer=gpu does
    net = build_network(nest({"depth": depth, "width": args.width, **network})).to(device)
    if gpu:
        net = net.to(memory_format=torch.channels_last)
    step_net = torch.compile(net, mode=args.compile_mode) if args.compile else net
    optimizer = torch.optim.SGD(
        net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=gpu or None
    )
    criterion = torch.nn.CrossEntropyLoss()
    loader = DeviceLoader(arrays.train_images, arrays.train_labels, train_spec(args, arrays), device=device)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = criterion(step_net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _time_steps(step, loader, args, device)
    if args.profile:
        _profile(step, loader, args, device, f"plain depth={depth} {network}")
    return seconds


def _profile(step, loader, args, device: torch.device, title: str) -> None:
    """Print the operators that took the most device (or, on a CPU, host) time over ``args.profile`` steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    with profile(activities=activities) as profiler:
        for _ in range(args.profile):
            step(*next(batches))
        _synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(
        f"# profile: {title}, {args.profile} steps\n"
        + profiler.key_averages().table(sort_by=sort_by, row_limit=25)
    )


class _PILDataset(Dataset):
    """What torchvision's CIFAR10 dataset does: a PIL image per item, v1 transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from torchvision import transforms

        self.images, self.labels = images.numpy(), labels.tolist()
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def run_conventional(args, arrays, depth: int, network: dict, device: torch.device) -> float:
    net = build_network(nest({"depth": depth, "width": args.width, **network})).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    loader = DataLoader(
        _PILDataset(arrays.train_images, arrays.train_labels),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = criterion(net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _time_steps(step, loader, args, device)


def run_lightning(args, arrays, depth: int, network: dict, device: torch.device) -> float:
    import pytorch_lightning as pl

    from cbam.training.lightning_module import CBAMResNetModule

    gpu = device.type == "cuda"

    class _Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DeviceLoader(
                arrays.train_images,
                arrays.train_labels,
                train_spec(args, arrays),
                device=self.trainer.strategy.root_device,
            )

    class _Clock(pl.Callback):
        start = end = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == args.warmup:
                _synchronize(device)
                self.start = time.perf_counter()

        def on_train_end(self, trainer, module):
            _synchronize(device)
            self.end = time.perf_counter()

    optimizer = {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": 0.05,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "fused": gpu or None,
    }
    scheduler = {
        "_target_": "cbam.training.schedules.constant",
        "_partial_": True,
    }  # the plain loop's constant rate
    module = CBAMResNetModule(
        depth=depth,
        width=args.width,
        optimizer=optimizer,
        scheduler=scheduler,
        channels_last=gpu,
        compile=args.compile,
        compile_mode=args.compile_mode,
        **network,
    )
    clock = _Clock()
    trainer = pl.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        benchmark=gpu or None,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=_Data())
    return clock.end - clock.start


PIPELINES = {"lightning": run_lightning, "plain": run_plain, "conventional": run_conventional}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="CIFAR-10 root (image folder or batches); random images if omitted")
    parser.add_argument("--cache-dir", help="where the decoded cache goes (default beside the data)")
    parser.add_argument("--pipelines", default="lightning,plain,conventional")
    parser.add_argument("--depths", default="18,50")
    parser.add_argument("--cbam", default="none,block", help="comma list of none,block")
    parser.add_argument(
        "--impl",
        default="reference",
        help="CBAM implementations (block rows): comma list of reference,fused,auto",
    )
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps (cuDNN autotuning, compile)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="conventional pipeline"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (lightning, plain)")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode with --compile: default, reduce-overhead (CUDA graphs), max-autotune, ...",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, print the top operators of N steps of the plain loop (torch.profiler)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU, for a smoke test")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch_size, args.warmup, args.steps, args.workers = 16, 32, 2, 3, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    arrays = cifar_arrays(
        args.data, args.cache_dir, num_images=args.batch_size * (args.warmup + args.steps + 1)
    )
    peak = peak_tflops(device)
    results = []
    report = {
        "device": describe_device(device),
        "peak_bf16_tflops": peak,
        "software": software_versions(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    rows = [
        (depth, cbam, impl)
        for depth in map(int, args.depths.split(","))
        for cbam in args.cbam.split(",")
        for impl in (args.impl.split(",") if cbam == "block" else [None])
    ]
    for depth, cbam, impl in rows:
        flops = training_flops_per_image(depth, cbam == "block", args.width)
        for pipeline in args.pipelines.split(","):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            seconds = PIPELINES[pipeline](args, arrays, depth, network_options(cbam == "block", impl), device)
            images_per_s = args.steps * args.batch_size / seconds
            row = {
                "pipeline": pipeline,
                "depth": depth,
                "cbam": cbam,
                "impl": impl,
                "batch_size": args.batch_size,
                "width": args.width,
                "precision": "bf16-mixed" if device.type == "cuda" and pipeline != "conventional" else "fp32",
                "compile": args.compile and pipeline != "conventional",
                "compile_mode": args.compile_mode if args.compile and pipeline != "conventional" else None,
                "images_per_s": round(images_per_s, 1),
                "step_ms": round(1000 * seconds / args.steps, 3),
                "train_gflops_per_image": round(flops / 1e9, 4),
                "mfu": round(flops * images_per_s / (peak * 1e12), 4) if peak else None,
                "peak_memory_gib": (
                    round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                    if device.type == "cuda"
                    else None
                ),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every row: a run cut short still leaves what it measured
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
