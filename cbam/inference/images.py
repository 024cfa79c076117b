"""The images of a prediction: found from the command line's files, folders and globs (:func:`find_images`),
read in batches as the network's test images were prepared (:func:`read_batch`).

A folder is searched recursively for PNG and JPEG files (by suffix, as the training data are); a file named
on its own is tried whatever its suffix. An image of any size is brought to the network's input size by the
project's one resize rule (:func:`cbam.data.sources.fit_image`, what ``data.image_size`` does when a cache is
built: images of the training size pass unchanged), then normalised by the training's mean and std
(:func:`cbam.data.batches.normalize`, what both loaders do).
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cbam.data.batches import normalize
from cbam.data.facts import DataFacts
from cbam.data.sources import IMAGE_SUFFIXES, decode_image
from cbam.errors import ConfigError, DataError

GLOB_CHARACTERS = frozenset("*?[")


def find_images(arguments: Sequence[str]) -> list[Path]:
    """Every image the arguments name, each once, in the order given (a folder's and a glob's sorted).
    An argument that names nothing, or no image at all, raises :class:`ConfigError`."""
    found: dict[Path, None] = {}
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not matches:
                raise ConfigError(f"{argument}: the folder holds no .png or .jpg image (searched throughout)")
        elif path.is_file():
            matches = [path]
        elif GLOB_CHARACTERS & set(argument):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise ConfigError(f"{argument}: no file matches this pattern")
        else:
            raise ConfigError(f"{argument}: no such file or folder")
        found.update(dict.fromkeys(matches))
    if not found:
        raise ConfigError("no image given: name image files, folders or glob patterns")
    return list(found)


@dataclass
class Batch:
    """Images read for the network: ``inputs`` normalised float (N, 3, H, W) on the device, their ``paths``,
    and the files that could not be read, each with its :class:`DataError` line."""

    inputs: torch.Tensor | None
    paths: list[Path]
    failures: list[tuple[Path, str]]


def read_batch(paths: Sequence[Path], facts: DataFacts, device: torch.device) -> Batch:
    """``paths`` decoded, fitted to ``facts.image_size`` and normalised with its mean and std."""
    pixels, kept, failures = [], [], []
    for path in paths:
        try:
            pixels.append(decode_image(path, facts.image_size)[0])
            kept.append(path)
        except DataError as error:
            failures.append((path, str(error)))
    if not pixels:
        return Batch(None, [], failures)
    mean = torch.tensor(facts.mean, device=device)
    std = torch.tensor(facts.std, device=device)
    return Batch(normalize(torch.stack(pixels).to(device), mean, std), kept, failures)
