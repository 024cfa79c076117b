"""Writes that fail because the disk is full or the folder is read-only or not ours, as one error line.

Such a failure surfaces in many shapes: an ``OSError`` from ``open``, ``write``, ``fsync`` or ``rename``
(with or without a file name), a ``RuntimeError`` of torch's zip writer ("unexpected pos") whose context
is that ``OSError``, an error re-raised by TensorBoard's writer thread, or a later error of the clean-up
(a logger's final flush) whose context is the first one. :func:`write_failure` finds the first failed
write in such a chain of exceptions; :func:`writing` names the file a block writes, so that the line says
which one.

A full disk or quota (``ENOSPC``, ``EDQUOT``) and a read-only file system (``EROFS``) only ever come from
a write, so they are recognised anywhere; ``EACCES``/``EPERM`` also come from reads (a data folder we may
not read is another problem, reported by the data code), so they are recognised only inside
:func:`writing`.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator
from pathlib import Path

from cbam.errors import WRITE_REASONS, WriteFailed

#: the errnos that only a write can cause: recognised outside :func:`writing` too
WRITE_ONLY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or during (as its traceback shows them: not a
    context dropped with ``raise ... from None``), the first one last."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def write_failure(error: BaseException, where: str | Path | None = None) -> WriteFailed | None:
    """The first failed write in ``error``'s chain as a :class:`WriteFailed` (None if there is none): one
    raised by :func:`writing`, else an ``OSError`` with an errno of :data:`WRITE_ONLY_ERRNOS`, named by its
    file name, else by ``where`` (the folder the run writes into: TensorBoard's writer thread, for one,
    gives no file name)."""
    chain = list(reversed(_chain(error)))
    named = [e for e in chain if isinstance(e, WriteFailed)]
    if named:
        return named[0]
    for cause in chain:
        if isinstance(cause, OSError) and cause.errno in WRITE_ONLY_ERRNOS:
            target = cause.filename or (f"a file in {where}" if where is not None else "a file")
            return WriteFailed(target, cause.errno)
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Raise a :class:`WriteFailed` naming ``path`` when the block fails for one of the :data:`~cbam.errors.WRITE_REASONS`
    (whatever exception the failed write was wrapped in); other errors pass unchanged."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as error:
        for cause in reversed(_chain(error)):
            if isinstance(cause, OSError) and cause.errno in WRITE_REASONS:
                raise WriteFailed(path, cause.errno) from error
        raise


def silence_failed_writes_in_threads() -> None:
    """Print nothing when a thread dies of a failed write. TensorBoard's writer thread does, with a
    traceback; it keeps the error and raises it again in the training thread at the next log call, where
    :func:`write_failure` turns it into the error line. Other errors of threads are printed as before."""
    previous = threading.excepthook
    if getattr(previous, "silences_failed_writes", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or write_failure(args.exc_value) is None:
            previous(args)

    hook.silences_failed_writes = True
    threading.excepthook = hook
