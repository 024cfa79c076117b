"""Export a trained network for an inference runtime:

    python -m cbam.export CKPT --format onnx|exported-program [--out FILE]

The network of the checkpoint, in eval mode, on the CPU in float32, its CBAMs on the reference code (the fused
kernels compute the same function; their Triton kernels are no part of the export). Input ``images``: float32
(batch, 3, H, W) NCHW, normalised as at training with the checkpoint's mean and std (printed, and kept in the
file: the ONNX model's metadata, the ExportedProgram's ``data_facts.json`` extra file, with the class names
and the input size); output ``logits`` (batch, classes). The batch dimension is dynamic.

Both formats start from one ``torch.export.export`` of the network. ``onnx`` converts it with torch's own
(dynamo) exporter, ``torch.onnx.export(..., dynamo=True)``, and checks the model with ONNX Runtime against
eager PyTorch at batches 1 and 7; ``exported-program`` saves it (``torch.export.save``, a ``.pt2`` file) and
checks the loaded program the same way. Each check prints the largest absolute difference of the logits; one
above 1e-4 times the largest eager logit stops with one line and exit status 8, nothing written. ``onnx``
needs the export extra: ``pip install -e ".[export]"``. For a checkpoint that does not record its data, give
it as ``cbam.predict`` takes it (``data=...`` or the flags, :mod:`cbam.inference.trained`).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cbam.data.facts import CHECKPOINT_KEY, DataFacts
from cbam.errors import ConfigError, ExportFailed, OneLineArgumentParser, ProjectError, print_error
from cbam.inference.trained import (
    add_fact_flags,
    data_facts,
    is_data_override,
    load_trained,
    parse_fact_flags,
)
from cbam.runtime.atomic import write_atomically

#: ``--format`` -> the default file suffix
FORMATS = {"onnx": ".onnx", "exported-program": ".pt2"}
#: the batch sizes each export is checked at
CHECK_BATCHES = (1, 7)
#: the largest accepted difference of a logit, relative to the largest eager logit (fp32)
TOLERANCE = 1e-4
MISSING_EXTRA = (
    '--format onnx needs onnx, onnxruntime and onnxscript (torch\'s ONNX exporter), which are not installed: '
    'pip install -e ".[export]"'
)
#: the name of the data facts in an ExportedProgram's extra files
FACTS_FILE = "data_facts.json"


def quietly(call: Callable):
    """``call()`` without the exporters' progress lines and warnings; an exception becomes
    :class:`ExportFailed`."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return call()
        except Exception as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ExportFailed(f"the export failed ({type(error).__name__}: {reason})") from None


def export_program(net: torch.nn.Module, facts: DataFacts) -> torch.export.ExportedProgram:
    """``net`` traced by ``torch.export`` with a dynamic batch dimension."""
    example = torch.randn(2, 3, *facts.image_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    return quietly(lambda: torch.export.export(net, (example,), dynamic_shapes=({0: batch},)))


def check(net: torch.nn.Module, run: Callable, facts: DataFacts, runtime: str) -> None:
    """``run`` (a batch -> its logits) against eager ``net`` at :data:`CHECK_BATCHES`: prints the differences,
    raises :class:`ExportFailed` beyond :data:`TOLERANCE`."""
    for size in CHECK_BATCHES:
        images = torch.randn(size, 3, *facts.image_size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            eager = net(images)
        got = torch.as_tensor(run(images))
        if got.shape != eager.shape:
            shapes = f"{tuple(got.shape)}, eager {tuple(eager.shape)}"
            raise ExportFailed(f"batch {size}: {runtime} gives logits of shape {shapes}")
        difference = (got - eager).abs().max().item()
        allowed = TOLERANCE * eager.abs().max().item()
        print(
            f"batch {size}: max |{runtime} - eager| = {difference:.3g} (tolerance {allowed:.3g}: "
            f"{TOLERANCE:g} x the largest logit)"
        )
        if not difference <= allowed:  # (NaN fails too)
            raise ExportFailed(
                f"batch {size}: the {runtime} logits differ from eager PyTorch's by up to {difference:.3g}, "
                f"more than {allowed:.3g} ({TOLERANCE:g} x the largest logit); nothing written"
            )


def described(facts: DataFacts) -> dict:
    """What a user of the file needs to prepare its input and read its output."""
    height, width = facts.image_size
    return {
        "input": f"images: float32 (batch, 3, {height}, {width}), NCHW, RGB in [0, 1] minus mean, over std",
        "output": f"logits: float32 (batch, {len(facts.classes)})",
        CHECKPOINT_KEY: facts.to_dict(),
    }


def check_onnx_installed() -> None:
    """Raise :class:`ConfigError` naming the export extra when a package of ``--format onnx`` is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None


def to_onnx(net: torch.nn.Module, program: torch.export.ExportedProgram, facts: DataFacts) -> bytes:
    """The ONNX model of ``program`` (torch's dynamo exporter), checked with ONNX Runtime."""
    import onnxruntime

    converted = quietly(
        lambda: torch.onnx.export(program, dynamo=True, input_names=["images"], output_names=["logits"])
    )
    # (ONNX metadata values are text: the facts as JSON)
    texts = {key: v if isinstance(v, str) else json.dumps(v) for key, v in described(facts).items()}
    converted.model.metadata_props.update(texts)
    model = converted.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    check(net, lambda images: session.run(None, {"images": images.numpy()})[0], facts, "ONNX Runtime")
    return model


def to_exported_program(
    net: torch.nn.Module, program: torch.export.ExportedProgram, facts: DataFacts
) -> bytes:
    """``program`` saved (with the data facts as an extra file), loaded back and checked."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={FACTS_FILE: json.dumps(described(facts))})
    loaded = torch.export.load(io.BytesIO(buffer.getvalue())).module()
    with torch.no_grad():
        check(net, loaded, facts, "the loaded ExportedProgram")
    return buffer.getvalue()


def export(args) -> Path:
    """What :func:`main` runs: the file written."""
    unknown = [word for word in args.overrides if not is_data_override(word)]
    if unknown:
        raise ConfigError(f"{unknown[0]}: not an argument of cbam.export (data=... overrides and flags only)")
    if args.format == "onnx":
        check_onnx_installed()
    module = load_trained(args.checkpoint)
    given = parse_fact_flags(args.classes, args.image_size, args.mean, args.std)
    facts = data_facts(module, args.checkpoint, args.overrides, given)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(FORMATS[args.format])
    net = module.net.float().eval()
    program = export_program(net, facts)
    convert = to_onnx if args.format == "onnx" else to_exported_program
    data = convert(net, program, facts)
    write_atomically(out, lambda file: file.write(data), prefix=f".{out.name}.")
    mean, std = (", ".join(f"{value:.4f}" for value in values) for values in (facts.mean, facts.std))
    print(
        f"wrote {out} ({args.format}): input images float32 (batch, 3, {facts.image_size[0]}, "
        f"{facts.image_size[1]}) normalised with mean ({mean}), std ({std}); output logits (batch, "
        f"{len(facts.classes)}): {', '.join(facts.classes[:10])}{', ...' if len(facts.classes) > 10 else ''}"
    )
    return out


def parser() -> OneLineArgumentParser:
    description = __doc__.split("\n\n")[0].rstrip(":")
    parser = OneLineArgumentParser(prog="python -m cbam.export", description=description)
    parser.add_argument("checkpoint", type=Path, metavar="CKPT", help="a checkpoint of train.py (.ckpt)")
    parser.add_argument("overrides", nargs="*", metavar="data=...", help="the data, as at training")
    parser.add_argument("--format", required=True, choices=tuple(FORMATS), help="onnx or exported-program")
    parser.add_argument("--out", help="the file (default: the checkpoint's path with .onnx or .pt2)")
    add_fact_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        export(args)
    except ProjectError as error:
        return print_error(error)
    return 0
