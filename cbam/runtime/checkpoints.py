"""Checkpoint files: written atomically, read safely (``weights_only=True``, every problem named), and found
(the newest one a run wrote, the one ``ckpt_path=last`` resumes from).

What each piece guarantees, and the test that checks it: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from cbam.errors import ConfigError
from cbam.runtime.atomic import write_atomically
from cbam.runtime.lightning_internals import last_checkpoint_candidates, last_saved_path

#: prefix and suffix of a checkpoint being written; the name never contains "last", so Lightning's
#: ``ckpt_path="last"`` (which takes the newest ``last*.ckpt``) can never pick a partial file
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".ckpt-", ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the target's folder, fsynced, then renamed over the
    target: a process killed at any moment leaves either the previous file or the new one, never a
    truncated one. Leftover temporary files of killed saves (``.ckpt-*.partial``) are removed by the
    next save into the same folder. Remote paths (``s3://...``) fall back to Lightning's own writer.

    Checkpoints are read with ``weights_only=True`` (whatever Lightning asks for); one that cannot be
    read is reported as a :class:`ConfigError` naming the file and the problem (see
    :func:`cbam.runtime.checkpoints.read_checkpoint`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        text = os.fspath(path)
        if storage_options is not None or ("://" in text and not text.startswith("file://")):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(text.removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        write_atomically(target, lambda file: torch.save(checkpoint, file), PARTIAL_PREFIX, PARTIAL_SUFFIX)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        text = os.fspath(path)
        if "://" in text and not text.startswith("file://"):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        # Onto the CPU unless asked otherwise: Lightning moves the states to the training device itself.
        return read_checkpoint(text.removeprefix("file://"), map_location=map_location or "cpu")


# ---------------------------------------------------------------------------------------------- reading


def _zip_problem(path: Path) -> str | None:
    """Why ``path`` is not an intact torch.save archive, or None (CRCs are tested, nothing unpickled)."""
    with open(path, "rb") as file:
        looks_like_zip = file.read(4) == b"PK\x03\x04"
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            if damaged is not None:
                return f"is corrupt (member {damaged} fails its checksum)"
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "is not a PyTorch checkpoint (a zip archive without data.pkl)"
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        if looks_like_zip:
            return f"is truncated or corrupt ({error})"
        return "is not a PyTorch checkpoint (not a torch.save zip archive)"
    return None


def read_checkpoint(
    path: str | Path, key: str = "ckpt_path", mmap: bool = False, map_location: Any = "cpu"
) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded with ``weights_only=True`` (onto ``map_location``).

    Raises :class:`ConfigError` ``"<key>=<path> ..."`` saying which problem it has: no such file;
    truncated or corrupt; not a checkpoint; or holding objects that need arbitrary code to unpickle
    (refused for safety: ``weights_only=False`` would run that code). With ``mmap`` the tensors are mapped
    from the file rather than loaded into memory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file")
    problem = _zip_problem(path)
    if problem is not None:
        raise ConfigError(f"{key}={path} {problem}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch names the first refused object: "Unsupported global: GLOBAL fractions.Fraction was not ..."
        found = re.search(r"Unsupported (?:global|class|operand)[:\s]+(?:GLOBAL\s+)?([\w.]+)", str(error))
        what = f" ({found[1]})" if found else ""
        raise ConfigError(
            f"{key}={path} holds objects that need arbitrary code to unpickle{what}: refused for safety "
            f"(this project's checkpoints never do)"
        ) from None
    except Exception as error:  # a damaged member that still passes the CRC, an unknown storage type ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{key}={path} cannot be loaded ({reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{key}={path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def check_checkpoint(path: str | Path, key: str = "ckpt_path") -> None:
    """Raise :class:`ConfigError` if :func:`read_checkpoint` would (the tensors memory-mapped, not loaded)."""
    read_checkpoint(path, key, mmap=True)


def describe_checkpoint(path: str | Path | None) -> str:
    """``"<path> (step N)"`` for a checkpoint file (its step read from the file), ``"none"`` for None."""
    if path is None:
        return "none"
    try:
        step = read_checkpoint(path, mmap=True).get("global_step")
    except ConfigError:
        return str(path)
    return f"{path} (step {step})"


def weights_mismatch(error: RuntimeError) -> str | None:
    """The first mismatch that ``load_state_dict`` reports in ``error`` (one line: a size mismatch, or the
    first three missing or unexpected keys), or None for another error."""
    lines = str(error).strip().splitlines()
    if len(lines) < 2 or not lines[0].startswith("Error(s) in loading state_dict"):
        return None
    first = lines[1].strip().rstrip(". ")
    what, _, keys = first.partition(": ")
    names = keys.split(", ")
    if what.endswith("key(s) in state_dict") and len(names) > 3:
        first = f"{what}: {', '.join(names[:3])} and {len(names) - 3} more"
    return first


# ------------------------------------------------------------------------------------------- finding


def newest_checkpoint(trainer: pl.Trainer) -> str | None:
    """The most recently written checkpoint file this run knows of (written by its checkpoint callbacks,
    or resumed from), or None."""
    candidates = {trainer.ckpt_path} if trainer.ckpt_path else set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            candidates |= {
                callback.last_model_path,
                callback.best_model_path,
                last_saved_path(callback),
            }
    files = [Path(path) for path in candidates if path and Path(path).is_file()]
    return str(max(files, key=lambda path: path.stat().st_mtime_ns)) if files else None


def last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The file Lightning resumes from for ``ckpt_path="last"``: the newest ``last*.ckpt`` in the
    folders of the trainer's checkpoint callbacks (None when there is none yet)."""
    candidates: set[Path] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            candidates |= last_checkpoint_candidates(callback, trainer)
    files = [path for path in candidates if path.is_file()]
    return max(files, key=lambda path: path.stat().st_mtime_ns) if files else None


def check_last_checkpoint(trainer: pl.Trainer) -> None:
    """For ``ckpt_path=last``: raise :class:`ConfigError` naming the file if the checkpoint it resumes from
    is truncated or corrupt (no checkpoint yet is fine: training starts from scratch)."""
    path = last_checkpoint(trainer)
    if path is None:
        return
    try:
        check_checkpoint(path)
    except ConfigError as error:
        hint = "picked by ckpt_path=last; delete it or pass another ckpt_path"
        raise ConfigError(f"{error} [{hint}]") from None
