"""Label your own images with a trained network:

    python -m cbam.predict CKPT IMAGE|FOLDER|GLOB [...] [--top-k 5] [--out predictions.csv] [--device auto]
        [--tta | --no-tta] [--attention DIR [--gradcam]] [--batch-size 128]

The network comes from the checkpoint alone, in eval mode; each image is prepared as its test images were
(the size, resize rule, mean and std the checkpoint records, :mod:`cbam.inference.images`) and scored as test
scores it (:meth:`~cbam.training.lightning_module.CBAMResNetModule.evaluation_logits`: with the flip average
where the run's recipe used it, ``model.test_time_flip``; ``--tta`` / ``--no-tta`` choose). It prints a short
table and writes ``predictions.csv`` (``--out``): a row per image, columns
``file,class_1,prob_1,...,class_k,prob_k``, the ``--top-k`` most probable classes (default 5, at most the
number of classes).

``--attention DIR`` writes, per image, ``DIR/<its path below the inputs' common folder>.png``: the image and
the spatial gate of every CBAM site over it, drawn by the training's attention-map code
(:class:`cbam.analysis.attention_maps.SpatialMapDrawing`); ``--gradcam`` adds the Grad-CAM map of the
predicted class (:func:`cbam.analysis.gradcam.grad_cam`; needs captum, ``pip install -e ".[interpret]"``).

For a checkpoint that does not record its data (written before checkpoints did), give it as at training
(``data=cifar10 data.root=DIR``) or by flags (:mod:`cbam.inference.trained`). A file that is not a readable
image is named in one line ``error: cannot decode image <file>: ...`` and skipped; the others are predicted
and the exit status is 7. No image at all, a bad checkpoint, a bad flag or key: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from cbam.errors import (
    IMAGES_SKIPPED_EXIT_STATUS,
    ConfigError,
    OneLineArgumentParser,
    ProjectError,
    print_error,
)
from cbam.inference.images import find_images, read_batch
from cbam.inference.trained import (
    add_fact_flags,
    data_facts,
    is_data_override,
    load_trained,
    parse_fact_flags,
)
from cbam.runtime.atomic import write_atomically

#: rows and classes per row of the printed table (the CSV holds all)
TABLE_ROWS, TABLE_CLASSES = 20, 3


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device={name}: accepted values are auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: this machine has no CUDA GPU (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device={name}: accepted values are auto, cpu, cuda, cuda:N")
    return device


def csv_header(top_k: int) -> list[str]:
    return ["file", *(f"{kind}_{rank}" for rank in range(1, top_k + 1) for kind in ("class", "prob"))]


def table(rows: list[list[str]], shown_classes: int) -> str:
    """The first :data:`TABLE_ROWS` rows: the file, then its first ``shown_classes`` classes with their
    probabilities."""
    lines = [["file", *(f"top-{rank}" for rank in range(1, shown_classes + 1))]]
    for row in rows[:TABLE_ROWS]:
        pairs = [f"{row[1 + 2 * rank]} {float(row[2 + 2 * rank]):.3f}" for rank in range(shown_classes)]
        lines.append([row[0], *pairs])
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    text = "\n".join("  ".join(map(str.ljust, line, widths)).rstrip() for line in lines)
    if len(rows) > TABLE_ROWS:
        text += f"\n... and {len(rows) - TABLE_ROWS} more"
    return text


class AttentionWriter:
    """Per image, the figure of its CBAM spatial gates (and with ``gradcam`` its Grad-CAM of the predicted
    class) under ``folder``, named by its path below ``common`` (the inputs' common folder)."""

    def __init__(self, module, facts, folder: Path, common: Path, gradcam: bool) -> None:
        from cbam.analysis.attention_maps import SpatialMapDrawing, find_cbam_sites

        self.module, self.facts, self.folder, self.common = module, facts, folder, common
        self.gradcam = gradcam
        self.sites = [(name, cbam) for name, cbam in find_cbam_sites(module.net) if cbam.spatial is not None]
        self.drawing = SpatialMapDrawing()
        self.written = 0

    def write(self, inputs: torch.Tensor, paths: list[Path], classes: torch.Tensor, probabilities) -> None:
        from cbam.analysis.attention_maps import attention_gates, to_display
        from cbam.callbacks._utils import save_figure

        maps = {
            name: {"spatial": gate["spatial"]}
            for name, gate in attention_gates(self.module.net, inputs, self.sites).items()
            if "spatial" in gate
        }
        what = "CBAM spatial attention" if maps else ""
        if self.gradcam:
            from cbam.analysis.gradcam import grad_cam

            cams, _ = grad_cam(self.module, inputs, classes.to(inputs.device))
            maps["Grad-CAM"] = {"spatial": cams.detach().float().cpu()[:, None]}
            cam = "Grad-CAM of the predicted class"
            what = f"{what} and {cam}" if what else cam
        display = to_display(inputs.float().cpu(), self.facts.mean, self.facts.std)
        for index, path in enumerate(paths):
            label = f"{self.facts.classes[int(classes[index])]} {float(probabilities[index]):.2f}"
            single = {name: {"spatial": found["spatial"][index : index + 1]} for name, found in maps.items()}
            figure = self.drawing.figure(display[index : index + 1], [label], single, what)
            save_figure(figure, self.folder / f"{path.resolve().relative_to(self.common)}.png")
            self.written += 1


def check_attention(args, module) -> None:
    """Bad ``--attention`` / ``--gradcam`` input, before any work."""
    if args.gradcam and args.attention is None:
        raise ConfigError("--gradcam draws into the --attention DIR: give --attention DIR too")
    if args.attention is None:
        return
    from cbam.analysis.attention_maps import find_cbam_sites

    if not any(cbam.spatial is not None for _, cbam in find_cbam_sites(module.net)) and not args.gradcam:
        raise ConfigError(
            f"--attention: the network of {args.checkpoint} has no CBAM spatial gate to draw (no CBAM "
            "placed, or another attention kind); add --gradcam for its Grad-CAM maps"
        )
    if args.gradcam:
        from cbam.analysis.gradcam import MISSING_CAPTUM, feature_layer

        try:
            import captum  # noqa: F401 (optional: the interpret extra)
        except ImportError:
            raise ConfigError(MISSING_CAPTUM) from None
        feature_layer(module.net)  # a network without a final feature map: one line


def predict(args) -> int:
    """What :func:`main` runs; returns the exit status (raises :class:`ProjectError` for bad input)."""
    overrides = [word for word in args.inputs if is_data_override(word)]
    inputs = [word for word in args.inputs if not is_data_override(word)]
    module = load_trained(args.checkpoint)
    given = parse_fact_flags(args.classes, args.image_size, args.mean, args.std)
    facts = data_facts(module, args.checkpoint, overrides, given)
    classes = len(facts.classes)
    if not 1 <= args.top_k <= classes:
        raise ConfigError(f"--top-k={args.top_k}: must be between 1 and the network's {classes} classes")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size}: must be at least 1")
    device = pick_device(args.device)
    check_attention(args, module)
    paths = find_images(inputs)
    module.to(device)
    attention = None
    if args.attention is not None:
        common = Path(os.path.commonpath([str(path.resolve().parent) for path in paths]))
        attention = AttentionWriter(module, facts, Path(args.attention), common, args.gradcam)
    rows: list[list[str]] = []
    skipped = 0
    for start in range(0, len(paths), args.batch_size):
        batch = read_batch(paths[start : start + args.batch_size], facts, device)
        for _, line in batch.failures:
            print_error(f"{line} (skipped)")
        skipped += len(batch.failures)
        if batch.inputs is None:
            continue
        with torch.no_grad():
            probabilities = module.evaluation_logits(batch.inputs, flip=args.tta).float().softmax(1)
        top = probabilities.topk(args.top_k, dim=1)
        values, indices = top.values.cpu(), top.indices.cpu()
        for path, row_values, row_indices in zip(batch.paths, values.tolist(), indices.tolist()):
            cells = [str(path)]
            for value, index in zip(row_values, row_indices):
                cells += [facts.classes[index], f"{value:.6f}"]
            rows.append(cells)
        if attention is not None:
            attention.write(batch.inputs, batch.paths, indices[:, 0], values[:, 0])
    out = Path(args.out)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(csv_header(args.top_k))
    writer.writerows(rows)
    write_atomically(out, lambda file: file.write(text.getvalue().encode()), prefix=f".{out.name}.")
    if rows:
        print(table(rows, min(args.top_k, TABLE_CLASSES)))
    flip = module.hparams.test_time_flip if args.tta is None else args.tta
    print(
        f"wrote {out}: {len(rows)} images, top {args.top_k} of {classes} classes ({facts.dataset}; "
        f"{'flip average' if flip else 'no flip average'}; {device})"
    )
    if attention is not None:
        print(f"wrote {attention.written} attention maps into {args.attention}")
    return IMAGES_SKIPPED_EXIT_STATUS if skipped else 0


def parser() -> OneLineArgumentParser:
    description = __doc__.split("\n\n")[0].rstrip(":")
    parser = OneLineArgumentParser(prog="python -m cbam.predict", description=description)
    parser.add_argument("checkpoint", type=Path, metavar="CKPT", help="a checkpoint of train.py (.ckpt)")
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE|FOLDER|GLOB",
        help="images, folders (recursive), glob patterns; and data=... data.root=... as at training for a "
        "checkpoint that does not record its data",
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--out", default="predictions.csv", help="the CSV (default predictions.csv)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average the probabilities of each image and its mirror image (default: as the run's test did)",
    )
    parser.add_argument("--attention", metavar="DIR", help="write each image's CBAM spatial attention here")
    parser.add_argument("--gradcam", action="store_true", help="with --attention: add the Grad-CAM map")
    add_fact_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return predict(args)
    except ProjectError as error:
        return print_error(error)

