"""Every error that ends one of the project's commands with one line, each with its exit status, and the one
handler that prints that line (:func:`stop`, :func:`one_line_errors`).

The commands (``train.py``, ``python -m cbam.report``, ``cbam.gradcam``, ``cbam.data``, ``cbam.predict``,
``cbam.export``, the run-dir lock of a Hydra run) print ``error: <message>`` on a line of its own on stderr,
with no traceback, and exit with the error's :attr:`~ProjectError.exit_status`:

====  =====================================================================================
2     bad input: a config value, data, a checkpoint, a sweep, a run dir in use
3     divergence (a non-finite loss or weight)
4     a write that failed: disk full, quota, read-only, no permission
5     another process of the run died (a DDP rank, a DataLoader worker)
6     a batch that never ended (the process was stuck, e.g. in a native kernel)
7     ``cbam.predict``: some input files were not readable images (each named in a line of its own, skipped);
      the others were predicted
8     ``cbam.export``: the network could not be exported, or the exported network's logits differ from eager
      PyTorch's beyond the tolerance
====  =====================================================================================

(130 follows Ctrl-C after ``last.ckpt`` is saved: :class:`cbam.callbacks.last_checkpoint.StoppedBySigint`.)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

BAD_INPUT_EXIT_STATUS = 2
DIVERGED_EXIT_STATUS = 3
WRITE_FAILED_EXIT_STATUS = 4
PROCESS_DIED_EXIT_STATUS = 5
STALLED_EXIT_STATUS = 6
IMAGES_SKIPPED_EXIT_STATUS = 7
EXPORT_FAILED_EXIT_STATUS = 8


class ProjectError(Exception):
    """An error that ends a command with one line ``error: <message>`` and :attr:`exit_status`."""

    exit_status = BAD_INPUT_EXIT_STATUS
    #: under DDP, every process prints the line (it may be a different one on each), not rank 0 alone
    every_rank_says_it = False


class InvalidArgument(ProjectError, ValueError):
    """``argument=value`` is not accepted by a constructor; ``accepted`` says what is.

    The constructors (the attention layers, the networks, the data module) own the rules for their
    arguments; :mod:`cbam.training.config_checks` maps an :class:`InvalidArgument` to the config key it came
    from (``model.<argument>``, ``data.<argument>``), so each rule is written once.
    """

    def __init__(self, argument: str, value: Any, accepted: str) -> None:
        self.argument, self.value, self.accepted = argument, value, accepted
        super().__init__(f"{argument}={value}: {accepted}")


class ConfigError(ProjectError, ValueError):
    """A config value or checkpoint that cannot be used; the message names the key and what is accepted."""


class DataError(ProjectError, RuntimeError):
    """A data folder, image or cache that cannot be used; the message names the path."""


class ReportError(ProjectError, RuntimeError):
    """A sweep that cannot be reported; the message is one line."""


class GradCamError(ProjectError, RuntimeError):
    """Input that Grad-CAM cannot draw; the message is one line."""


class ExportFailed(ProjectError, RuntimeError):
    """A network the exporter failed on, or whose exported outputs differ from the eager network's beyond the
    tolerance; the message says which (nothing is written)."""

    exit_status = EXPORT_FAILED_EXIT_STATUS


class RunDirInUse(ProjectError):
    """Another live process holds the run dir's lock; the message names it."""

    def __init__(self, run_dir: Path, holder: str | None) -> None:
        who = holder or "another process (which has not written its name into the lock file yet)"
        super().__init__(
            f"run dir {run_dir} is in use by {who}: wait for it to end, or give this run another hydra.run.dir"
        )


class ScheduleLengthChanged(ValueError):
    """A checkpoint's schedule was made for another number of steps than the run resuming from it (raised
    inside Lightning's restore; the run turns it into a :class:`ConfigError` naming ``ckpt_path``)."""

    def __init__(self, saved_steps: int, total_steps: int) -> None:
        self.saved_steps, self.total_steps = saved_steps, total_steps
        super().__init__(
            f"its learning-rate schedule spans {saved_steps} steps, this run's would span {total_steps} "
            f"(trainer.max_epochs, trainer.max_steps, the batch size, devices or data differ)"
        )


class TrainingDiverged(ProjectError, RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""

    exit_status = DIVERGED_EXIT_STATUS

    def __init__(self, step: int, checkpoint: str | None, what: str = "loss") -> None:
        self.step, self.checkpoint = step, checkpoint
        last_good = checkpoint or "none"
        super().__init__(
            f"training diverged: non-finite {what} at step {step}; last good checkpoint: {last_good}"
        )


#: what the error line says for each errno of a failed write
WRITE_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class WriteFailed(ProjectError):
    """Writing ``path`` failed for one of the :data:`WRITE_REASONS`; ``last_good`` describes the newest intact
    checkpoint (set by whoever knows it, :func:`cbam.runtime.checkpoints.describe_checkpoint`)."""

    exit_status = WRITE_FAILED_EXIT_STATUS
    every_rank_says_it = True  # most files are written by rank 0 alone: the rank that failed says it

    def __init__(self, path: str | Path, code: int) -> None:
        #: the newest intact checkpoint, said by a training run ("none" before its first); None in the tools
        #: that write no checkpoint
        self.path, self.errno, self.last_good = str(path), code, None
        super().__init__(path, code)

    @property
    def failure(self) -> str:
        """What failed, without the checkpoint."""
        return f"{WRITE_REASONS[self.errno]} while writing {self.path}"

    def __str__(self) -> str:
        return (
            self.failure
            if self.last_good is None
            else f"{self.failure}; last good checkpoint: {self.last_good}"
        )


class ProcessDied(ProjectError, RuntimeError):
    """A process of the run is gone while this one still needed it: ``what`` happened to which ``rank`` (its
    ``kind`` of departure, :mod:`cbam.runtime.distributed`), and the last good checkpoint (from which
    ``ckpt_path=last`` resumes)."""

    exit_status = PROCESS_DIED_EXIT_STATUS
    every_rank_says_it = True  # each surviving process says which one died (it may be rank 0)

    def __init__(self, rank: int, kind: int, what: str, last_good: str, detail: str = "") -> None:
        self.rank, self.kind = rank, kind
        super().__init__(f"{what}{f' ({detail})' if detail else ''}; last good checkpoint: {last_good}")


class RunStalled(ProjectError, RuntimeError):
    """No batch ended for ``timeout`` seconds (:class:`cbam.callbacks.stall_watchdog.StallWatchdog`): what the
    run was doing, for how long, and the last good checkpoint. Printed by the watchdog's thread, which then
    ends the process (the stuck main thread cannot raise it)."""

    exit_status = STALLED_EXIT_STATUS

    def __init__(self, doing: str, seconds: float, timeout: float, last_good: str) -> None:
        super().__init__(
            f"the run is stuck: {doing} has not ended after {seconds:.0f} s "
            f"(callbacks.stall_watchdog.timeout_s={timeout:g}); last good checkpoint: {last_good}"
        )


def end_progress_lines() -> None:
    """End the line of every live tqdm progress bar (which leaves its cursor after a carriage return), so
    that what is printed next starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:  # no progress bar was ever made: nothing to end (and tqdm is not imported for it)
        return
    streams = {id(bar.fp): bar.fp for bar in list(getattr(tqdm.tqdm, "_instances", ())) if not bar.disable}
    for stream in streams.values():
        with contextlib.suppress(Exception):  # a closed or broken stream: the line stays as it is
            stream.write("\n")
            stream.flush()


def say(line: str) -> None:
    """Print ``line`` on stderr, on a line of its own."""
    end_progress_lines()
    print(line, file=sys.stderr, flush=True)


def print_error(error: BaseException | str) -> int:
    """Print ``error: <error>`` (its first line) on a line of its own; return the error's exit status."""
    text = str(error).strip()
    say(f"error: {text.splitlines()[0] if text else type(error).__name__}")
    return getattr(error, "exit_status", BAD_INPUT_EXIT_STATUS)


def stop(error: BaseException | str, status: int | None = None) -> NoReturn:
    """:func:`print_error`, then exit with ``status`` (default: the error's exit status)."""
    printed = print_error(error)
    sys.exit(printed if status is None else status)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (an unknown flag, a bad value) are one ``error: ...`` line, exit
    status 2, like every other bad input (argparse's own print the usage first)."""

    def error(self, message: str) -> NoReturn:
        stop(f"{self.prog}: {message} (--help lists the arguments)", BAD_INPUT_EXIT_STATUS)


@contextlib.contextmanager
def one_line_errors(*kinds: type[BaseException], rank: int = 0) -> Iterator[None]:
    """Turn a :class:`ProjectError` (or one of ``kinds``, which exit with status 2) raised in the block into
    :func:`stop`'s line and exit. Under DDP (``rank`` > 0) only the errors that every rank says are printed
    there (the others by rank 0); every rank exits with the status."""
    try:
        yield
    except (ProjectError, *kinds) as error:
        if rank == 0 or getattr(error, "every_rank_says_it", False):
            stop(error)
        sys.exit(getattr(error, "exit_status", BAD_INPUT_EXIT_STATUS))
