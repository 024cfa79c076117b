"""Every kind of network train.py builds, exported as ``python -m cbam.export`` exports it (ONNX through
torch's dynamo exporter, checked with ONNX Runtime; the ExportedProgram, saved and loaded back), each checked
against eager PyTorch at batches 1 and 7 with the tolerance of the command (1e-4 x the largest logit):

    python benchmarks/export_networks.py [--width 16] [--formats onnx,exported-program] [--only NAME,...]

The networks are composed from the config groups as train.py composes them (``model=...``, ``cbam=...``,
``attention=...``), untrained (random weights; BatchNorm at its initial statistics) at ``--width`` (the CIFAR
ResNets; the others at their own sizes) with 10 outputs, 32x32 inputs. Prints a line per network and format,
and exits with status 8 when any export fails or disagrees.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam.data.facts import DataFacts  # noqa: E402
from cbam.errors import EXPORT_FAILED_EXIT_STATUS, ProjectError  # noqa: E402
from cbam.inference import export  # noqa: E402

#: name -> the overrides of train.py that build it
NETWORKS = {
    "resnet18-plain": ["cbam=none"],
    "resnet18-cbam-both": ["cbam=both"],
    "resnet50-cbam-block": ["model=resnet50", "cbam=block"],
    "resnet18-imagenet-stem-cbam": ["cbam=block", "model.stem=imagenet"],
    **{
        f"resnet18-{kind}": ["cbam=block", f"attention={kind}"]
        for kind in (
            "se", "channel_only", "channel_max", "conv_pooling", "spatial_only", "spatial_first", "parallel",
            "eca", "bam", "bam_released",
        )
    },  # fmt: skip
    "wrn-10-2-cbam-both": ["model=wide_resnet", "model.depth=10", "model.widen_factor=2", "cbam=both"],
    "torchvision-resnet18-cbam-both": ["model=torchvision", "model.name=resnet18", "cbam=both"],
    "torchvision-mobilenet_v2-eca": [
        "model=torchvision", "model.name=mobilenet_v2", "cbam=block", "attention=eca",
    ],  # fmt: skip
}
FACTS = DataFacts("random", tuple(f"class{i}" for i in range(10)), (32, 32), None, (0.5,) * 3, (0.25,) * 3)


def build(overrides: list[str], width: int) -> torch.nn.Module:
    """The network train.py would build from ``overrides`` (as cbam.training.run.build_model), in eval
    mode."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    resnet = not any(word.startswith(("model=wide_resnet", "model=torchvision")) for word in overrides)
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *([f"model.width={width}"] if resnet else [])])
    torch.manual_seed(0)
    module = instantiate(cfg.model, num_classes=10, cbam_impl="reference", _recursive_=False, _convert_="all")
    return module.net.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=16, help="the CIFAR ResNets' width (default 16)")
    parser.add_argument("--formats", default="onnx,exported-program")
    parser.add_argument("--only", help="comma-separated names of NETWORKS")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(NETWORKS)
    failed = 0
    for name in names:
        net = build(NETWORKS[name], args.width)
        for form in args.formats.split(","):
            started = time.perf_counter()
            try:
                program = export.export_program(net, FACTS)
                (export.to_onnx if form == "onnx" else export.to_exported_program)(net, program, FACTS)
                verdict = "ok"
            except ProjectError as error:
                verdict, failed = f"FAILED: {error}", failed + 1
            print(f"== {name} {form}: {verdict} ({time.perf_counter() - started:.1f} s)", flush=True)
    return EXPORT_FAILED_EXIT_STATUS if failed else 0


if __name__ == "__main__":
    sys.exit(main())
