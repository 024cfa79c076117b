"""CBAM's attention maps of images: where the CBAMs whose gates are shown sit (:func:`find_cbam_sites`), their
gates on a batch (:func:`attention_gates`), and the drawing of the spatial gates over the images
(:class:`SpatialMapDrawing`).

One code path for every figure of spatial attention: the training callback
(:class:`cbam.callbacks.AttentionMaps`, a mosaic of validation images every N epochs) and inference
(``python -m cbam.predict --attention DIR``, one figure per image, with Grad-CAM as one more column) both draw
through :class:`SpatialMapDrawing`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbam.models.cbam import CBAM
from cbam.models.torchvision_backbone import final_map_site
from cbam.runtime.lightning_internals import call_uncompiled


def find_cbam_sites(net: nn.Module) -> list[tuple[str, CBAM]]:
    """``[(name, cbam)]``: the last CBAM of each stage (``stage1``..``stage4``) and the classifier CBAM.

    Of a network without ``stages`` (torchvision's), the stages are its top-level modules, each named as it is
    (``layer1``..``layer4``; all of MobileNetV2's blocks are in ``features``), and the classifier CBAM is the one
    that :func:`cbam.models.torchvision_backbone.build_torchvision` put in its ``avgpool`` or ``features``.
    """
    stages = getattr(net, "stages", None)
    if stages is not None:
        parts = [(f"stage{index}", stage) for index, stage in enumerate(stages, start=1)]
        classifier = getattr(net, "attention", None)
    else:
        parts = list(net.named_children())
        site = final_map_site(net)
        classifier = getattr(site[0], "attention", None) if site is not None else None
    sites = []
    for name, part in parts:
        found = [module for module in part.modules() if isinstance(module, CBAM) and module is not classifier]
        if found:
            sites.append((name, found[-1]))
    if isinstance(classifier, CBAM):
        sites.append(("classifier", classifier))
    return sites


@torch.no_grad()
def attention_gates(
    net: nn.Module, images: torch.Tensor, sites: list[tuple[str, CBAM]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``net`` on ``images`` in eval mode and return, per site, ``spatial`` (N, 1, H, W) and
    ``channel`` (N, C) gates as float tensors on the CPU (a gate the variant switches off is left out).
    Every module's train/eval mode is restored."""
    gates: dict[str, dict[str, torch.Tensor]] = {name: {} for name, _ in sites}
    handles = []
    for name, cbam in sites:
        # On the CBAM's input, whatever implementation runs its forward (the fused one calls no submodule).
        def record(module, args, name=name):
            channel, spatial = module.gates(args[0])
            if channel is not None:
                gates[name]["channel"] = channel.flatten(1).float().cpu()
            if spatial is not None:
                gates[name]["spatial"] = spatial.float().cpu()

        handles.append(cbam.register_forward_pre_hook(record))
    modes = {module: module.training for module in net.modules()}
    net.eval()
    try:
        parameter = next(net.parameters())
        call_uncompiled(net, images.to(parameter.device, parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return gates


def to_display(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised NCHW images -> NHWC in [0, 1], with the data's channel ``mean`` and ``std`` (None: each
    image stretched to [0, 1], for a datamodule that does not say)."""
    if mean is None or std is None:
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        images = (images - low) / (images.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-8)
    else:
        images = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return images.clamp(0, 1).permute(0, 2, 3, 1)


@dataclass(frozen=True)
class SpatialMapDrawing:
    """How spatial maps are drawn over their images: each map upsampled bilinearly to the image, optionally
    stretched to [0, 1] (``normalize``), coloured by ``cmap`` and overlaid with opacity ``alpha``.

    A map is a ``{"spatial": (N, 1, h, w)}`` entry of :func:`attention_gates`' result; any map of that shape
    (a Grad-CAM map) is drawn the same way."""

    normalize: bool = True
    alpha: float = 0.5
    cmap: str = "jet"

    GAP = 2  # pixels between the tiles of the mosaic

    def mosaic(self, display: torch.Tensor, gates: dict) -> np.ndarray:
        """Rows: images (NHWC in [0, 1]); columns: the image, then its spatial map of every site overlaid on
        it, at the images' size."""
        from matplotlib import colormaps

        count, height, width, _ = display.shape
        gap = self.GAP
        colormap = colormaps[self.cmap]
        canvas = np.ones((count * (height + gap) - gap, (1 + len(gates)) * (width + gap) - gap, 3))
        for row in range(count):
            top = row * (height + gap)
            tiles = [display[row].numpy()]
            for gate in gates.values():
                spatial = gate["spatial"][row : row + 1]
                heat = F.interpolate(spatial, size=(height, width), mode="bilinear", align_corners=False)
                heat = heat[0, 0]
                if self.normalize:
                    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
                colour = colormap(heat.clamp(0, 1).numpy())[..., :3]
                tiles.append((1 - self.alpha) * tiles[0] + self.alpha * colour)
            for column, tile in enumerate(tiles):
                left = column * (width + gap)
                canvas[top : top + height, left : left + width] = tile
        return canvas

    def figure(
        self, display: torch.Tensor, row_labels: list[str], gates: dict, what: str = "CBAM spatial attention"
    ):
        """The mosaic with a heading per column (the site and its map's size), a label per row and a caption
        (``what``, and whether the maps were stretched)."""
        # (here: cbam.callbacks imports this module, for the training callback)
        from cbam.callbacks._utils import new_figure

        canvas = self.mosaic(display, gates)
        columns, rows = 1 + len(gates), len(display)
        height, width = display.shape[1:3]
        # inches: a tile (at least a screen pixel per image pixel at 100 dpi), the class names, headings, caption
        tile, left, top, bottom = max(1.1, max(height, width) / 100), 1.0, 0.5, 0.3
        width_in, height_in = tile * columns + left + 0.1, tile * rows + top + bottom
        figure = new_figure(width_in, height_in)
        box = (left / width_in, bottom / height_in, tile * columns / width_in, tile * rows / height_in)
        axis = figure.add_axes(box)
        axis.imshow(canvas, interpolation="nearest")
        sizes = {name: "x".join(map(str, gate["spatial"].shape[-2:])) for name, gate in gates.items()}
        headings = ["image"] + [f"{name}\n{size}" for name, size in sizes.items()]
        centres = [c * (width + self.GAP) + width / 2 - 0.5 for c in range(columns)]
        axis.set_xticks(centres, headings, fontsize=7)
        axis.xaxis.tick_top()
        middles = [r * (height + self.GAP) + height / 2 - 0.5 for r in range(rows)]
        axis.set_yticks(middles, row_labels, fontsize=7)
        axis.tick_params(length=0)
        for spine in axis.spines.values():
            spine.set_visible(False)
        stretched = " (each map stretched to [0, 1])" if self.normalize else ""
        axis.set_xlabel(f"{what}{stretched}", fontsize=7)
        return figure
