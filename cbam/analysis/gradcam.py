"""Grad-CAM of trained models on the same test images, as in the CBAM paper's Figure 4.

    python -m cbam.gradcam CKPT [CKPT ...] [--data-root DIR] [--num-images 8] [--out PNG] [--run RUN_DIR]

For each checkpoint (one row of the figure) and each of the first ``--num-images`` test images (one
column): the Grad-CAM of the network's last stage for the image's true class, over the image, titled with
the model's softmax probability of that class. The first row shows the images. The maps come from
captum's ``LayerGradCam`` (ReLU of the gradient-weighted sum of the stage's channels), upsampled
bilinearly to the image and divided by each map's maximum. ``--run RUN_DIR`` also logs the figure as the
TensorBoard image ``gradcam`` under ``RUN_DIR/tensorboard``.

The data default to the first checkpoint's run: the ``data`` config of ``<run dir>/.hydra/config.yaml`` (a
checkpoint in ``<run dir>/checkpoints/``), so the images come at that data set's size, normalised with its
mean and std, titled with its class names; ``--data-root`` / ``--cache-dir`` replace its folders (without a
run config, ``--data-root`` is read as CIFAR-10). Bad input (a missing file, a file that is not a checkpoint of
this project, no data) ends with one line ``error: ...`` and exit status 2. Needs captum:
``pip install -e ".[interpret]"``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from cbam.callbacks._utils import new_figure, render
from cbam.data import DataError, ImageArrays, normalize
from cbam.errors import ConfigError, GradCamError, ProjectError, print_error
from cbam.models.network_config import (
    ATTENTION_DEFAULTS,
    IMPLEMENTATION_KEYS,
    attention_options,
    flatten,
    network_name,
)
from cbam.models.resnet import ResNet
from cbam.models.torchvision_backbone import final_map_site
from cbam.models.wide_resnet import WideResNet
from cbam.training.lightning_module import CBAMResNetModule

MISSING_CAPTUM = 'Grad-CAM needs captum, which is not installed: pip install -e ".[interpret]"'


def load_model(path: Path) -> CBAMResNetModule:
    """The checkpoint's module as inference loads it (:func:`cbam.inference.trained.load_trained`): eager and
    on the reference code, since Grad-CAM's hooks need the layers' own forward, on any machine."""
    from cbam.inference.trained import load_trained

    try:
        return load_trained(path)
    except ConfigError as error:  # missing, truncated, not a checkpoint, unsafe: one line naming the file
        raise GradCamError(str(error)) from None


def run_data(checkpoint: Path) -> dict:
    """The ``data`` config (resolved) of the run that wrote ``checkpoint``, or {} without its Hydra config."""
    config = checkpoint.resolve().parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return {}
    data = OmegaConf.load(config).get("data")
    return OmegaConf.to_container(data, resolve=True) if data is not None else {}


def load_test_data(checkpoint: Path, data_root: str | None, cache_dir: str | None) -> ImageArrays:
    """The data of ``checkpoint``'s run (:func:`run_data`; CIFAR-10 when it does not say), with ``data_root``
    and ``cache_dir`` replacing its folders when given; never downloaded."""
    data = {"_target_": "cbam.data.CIFAR10DataModule", **run_data(checkpoint)}
    data.update({key: value for key, value in (("root", data_root), ("cache_dir", cache_dir)) if value})
    if data.get("root") is None:
        raise GradCamError(
            f"no data root: {checkpoint} is not in a run dir with .hydra/config.yaml; pass --data-root"
        )
    try:
        return instantiate(data).load(download=False)
    except InstantiationException as error:  # the data module's own check of its arguments, e.g. root
        raise GradCamError(str(error.__cause__ or error).strip().splitlines()[0]) from None
    except DataError as error:
        raise GradCamError(str(error)) from None


def describe(module: CBAMResNetModule) -> str:
    """``ResNet18 + CBAM (blocks)``, with any attention option that is not its default (and the network's
    unusual stem, when it has one)."""
    net = module.hparams.net
    settings, kind = flatten(net), net["attention"]["kind"]
    network = network_name(net)
    blocks = "stages" if attention_options(net).between_stages else "blocks"  # (BAM goes between stages)
    places = [
        name
        for name, on in ((blocks, settings["use_cbam_block"]), ("classifier", settings["use_cbam_class"]))
        if on
    ]
    if not places:
        return network
    variants = [
        f"{key}={settings[key]}"
        for key, default in ATTENTION_DEFAULTS[kind].items()
        if key not in IMPLEMENTATION_KEYS and settings[key] != default
    ]
    return f"{network} + {kind.upper()} ({', '.join(places + variants)})"


def feature_layer(net: nn.Module) -> tuple[nn.Module, bool]:
    """The layer whose output (``False``) or input (``True``) is the network's final feature map, before the
    attention in front of the classifier, if any: the last stage of this project's ResNets, the final
    BatchNorm-ReLU of its Wide ResNets, the global pooling (or the end of ``features``) of torchvision's."""
    if isinstance(net, ResNet):
        return net.stages[-1], False
    if isinstance(net, WideResNet):
        return net.final, False
    site = final_map_site(net)
    if site is None:
        raise GradCamError(
            f"Grad-CAM needs the network's final feature map, and {type(net).__name__} has no stages, avgpool "
            f"or features module to take it from"
        )
    module, of_input = site
    attention = getattr(module, "attention", None)  # the classifier attention build_torchvision placed
    return (attention, True) if isinstance(attention, nn.Module) else (module, of_input)


def grad_cam(
    module: CBAMResNetModule, inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (N, H, W) in [0, 1] of the last stage for ``labels``, and the probabilities (N,) of ``labels``."""
    from captum.attr import LayerAttribution, LayerGradCam

    layer, of_input = feature_layer(module.net)
    attribution = LayerGradCam(module, layer).attribute(
        inputs, target=labels, relu_attributions=True, attribute_to_layer_input=of_input
    )
    maps = LayerAttribution.interpolate(
        attribution.detach(), tuple(inputs.shape[-2:]), interpolate_mode="bilinear"
    )
    maps = maps[:, 0].clamp(min=0)
    peaks = maps.flatten(1).amax(1).clamp(min=torch.finfo(maps.dtype).tiny)
    with torch.no_grad():
        probabilities = module(inputs).softmax(1).gather(1, labels[:, None])[:, 0]
    return maps / peaks[:, None, None], probabilities


def draw(images: torch.Tensor, names: list[str], rows: list[tuple[str, torch.Tensor, torch.Tensor]]):
    """The figure: the images, then per model its maps over them with P(true class)."""
    count = len(names)
    figure = new_figure(1.3 * count + 1.6, 1.45 * (len(rows) + 1), layout="constrained")
    axes = figure.subplots(len(rows) + 1, count, squeeze=False)
    for column, name in enumerate(names):
        axes[0][column].imshow(images[column].numpy())
        axes[0][column].set_title(name, fontsize=8)
    axes[0][0].set_ylabel("input", fontsize=8)
    for row, (label, maps, probabilities) in enumerate(rows, start=1):
        for column in range(count):
            axis = axes[row][column]
            axis.imshow(images[column].numpy())
            axis.imshow(maps[column].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axis.set_title(f"P = {probabilities[column]:.2f}", fontsize=8)
        axes[row][0].set_ylabel(label.replace(" + ", "\n+ "), fontsize=7)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    return figure


def gradcam_figure(checkpoints: list[Path], data_root: str | None, cache_dir: str | None, num_images: int):
    """The figure of ``checkpoints`` on the first ``num_images`` test images, as an (H, W, 3) uint8 array."""
    models = [load_model(path) for path in checkpoints]
    arrays = load_test_data(checkpoints[0], data_root, cache_dir)
    for path, module in zip(checkpoints, models):
        if module.num_classes != len(arrays.classes):
            raise GradCamError(
                f"checkpoint={path} has {module.num_classes} outputs, the data have "
                f"{len(arrays.classes)} classes: give checkpoints trained on the same data"
            )
    images, labels = arrays.test_images[:num_images], arrays.test_labels[:num_images]
    inputs = normalize(images, torch.tensor(arrays.mean), torch.tensor(arrays.std)).contiguous()
    rows = [(describe(module), *grad_cam(module, inputs, labels)) for module in models]
    names = [arrays.classes[label] for label in labels.tolist()]
    return render(draw(images, names, rows), dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbam.gradcam", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoints", nargs="+", type=Path, metavar="CKPT", help="a checkpoint (.ckpt) per row"
    )
    parser.add_argument(
        "--data-root", help="the data folder (default: data.root of the first checkpoint's run)"
    )
    parser.add_argument("--cache-dir", help="where the decoded cache is or goes (as data.cache_dir)")
    parser.add_argument("--num-images", type=int, default=8, help="the first N test images (default 8)")
    parser.add_argument("--out", type=Path, help="the PNG (default: RUN_DIR/gradcam.png, else gradcam.png)")
    parser.add_argument(
        "--run", type=Path, metavar="RUN_DIR", help="also log the figure to this run's TensorBoard"
    )
    args = parser.parse_args(argv)
    try:
        import captum  # noqa: F401 (optional: the interpret extra)
    except ImportError:
        return print_error(MISSING_CAPTUM)
    try:
        if args.num_images < 1:
            raise GradCamError(f"--num-images={args.num_images}: must be at least 1")
        if args.run is not None and not args.run.is_dir():
            raise GradCamError(f"--run={args.run}: no such run dir")
        image = gradcam_figure(args.checkpoints, args.data_root, args.cache_dir, args.num_images)
    except ProjectError as error:
        return print_error(error)
    from PIL import Image

    out = args.out or (args.run / "gradcam.png" if args.run is not None else Path("gradcam.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out)
    print(f"wrote {out}")
    if args.run is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(args.run / "tensorboard" / "gradcam")) as writer:
            writer.add_image("gradcam", image, dataformats="HWC")
        print(f"logged the TensorBoard image gradcam under {args.run / 'tensorboard' / 'gradcam'}")
    return 0
