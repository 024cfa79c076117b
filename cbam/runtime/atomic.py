"""Atomic file writes: a temporary file in the target's folder, fsynced, renamed over the target."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from cbam.runtime.write_failures import writing

# Read once: os.umask can only be read by setting it, which would race with threads started later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def write_atomically(
    path: Path, write: Callable[[BinaryIO], None], prefix: str, suffix: str = ".tmp"
) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    A process killed at any moment leaves the previous file or the new one, never a partial one; the
    temporary file (``<prefix>*<suffix>``) is removed when writing fails. The new file gets the
    permissions ``open()`` would have given it, not mkstemp's 0600, so other users can read a shared one.
    A full disk, a read-only folder or one without permission raises
    :class:`~cbam.errors.WriteFailed` naming ``path``, whatever ``write`` wrapped the error in.
    """
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        try:
            os.fchmod(handle, 0o666 & ~_UMASK)
            with os.fdopen(handle, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
    fsync_directory(path.parent)
