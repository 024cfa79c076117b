"""One process per run dir: a run holds an exclusive lock on ``<run dir>/.run.lock`` for as long as it lives.

The lock is ``flock`` on that file, so the kernel (or, on a shared file system, the file server) drops it
when the process ends, however it ends: a lock never outlives its process, and there is nothing to clean
up after a crash. The file's content names the holder (pid, host, start time), so that a second process,
refused with :class:`RunDirInUse`, can say which process to wait for, even one on another host. A holder
that ends normally empties the file; one that was killed leaves its name there, and the next process to
take the lock says once that it took it over from that process.

Under DDP only the process of global rank 0 takes the lock (the others share its run dir); in a multirun
each job takes the lock of its own dir. :class:`RunDirGuard`, a Hydra callback (``hydra.callbacks`` in
conf/train.yaml), takes it at the earliest moment Hydra offers: for a single run before Hydra writes
anything into the dir (``.hydra/``, the log file), so a refused process changes nothing there; for a
multirun job when the job starts, after Hydra's writes for that job and before any of the run's own. Taking
the lock is also the run's first write into its dir: a full disk, a read-only dir or one without
permission stops the run there with one line (:mod:`cbam.runtime.write_failures`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cbam.errors import BAD_INPUT_EXIT_STATUS, RunDirInUse, WriteFailed, stop
from cbam.runtime.checkpoints import describe_checkpoint
from cbam.runtime.write_failures import writing

LOCK_FILE = ".run.lock"
#: the environment variables by which the launchers tell a process its rank or node: torchrun (RANK,
#: GROUP_RANK), Lightning's own launcher (LOCAL_RANK, NODE_RANK), SLURM (SLURM_PROCID)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
#: flock's errors on a file system that does not support it (some network and FUSE mounts)
FLOCK_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


def is_first_process() -> bool:
    """False in every process of a multi-process (DDP) run but the one of global rank 0 (known from the
    environment before any process group exists), True in a single process."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def _holder(text: str) -> str | None:
    """The holder a lock file's content names, in words (None for an empty or foreign content)."""
    try:
        record = json.loads(text)
        return f"process {record['pid']} on host {record['host']} (started {record['started']})"
    except (ValueError, KeyError, TypeError):
        return None


def _content(handle: int) -> str:
    return os.pread(handle, 4096, 0).decode(errors="replace")


#: the locks this process holds
_held: set[RunDirLock] = set()


def _forget_held_locks() -> None:
    """In a child forked from the holder (a DataLoader worker): close its copy of each lock's file, so that
    the lock ends with the holder (flock belongs to the open file, which fork shares) and the child never
    touches the file."""
    for lock in _held:
        os.close(lock._handle)
        lock._handle = None
        atexit.unregister(lock.release)
    _held.clear()


os.register_at_fork(after_in_child=_forget_held_locks)


class RunDirLock:
    """The lock of ``run_dir`` (see the module's doc)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._handle: int | None = None

    def acquire(self) -> str | None:
        """Take the lock, held until :meth:`release` or the end of the process.

        Raises :class:`RunDirInUse` when a live process holds it, and
        :class:`~cbam.errors.WriteFailed` when the lock file cannot be created or written (a full
        disk, a read-only dir, no permission). Returns a warning to print once, or None: the lock was
        taken over from a process that ended without releasing it, or this file system cannot lock.
        """
        with writing(self.path):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        warning = None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                previous = _holder(_content(handle))
                if previous:
                    warning = (
                        f"took over run dir {self.run_dir} from {previous}, which ended without releasing it"
                    )
            except BlockingIOError:
                raise RunDirInUse(self.run_dir, _holder(_content(handle))) from None
            except OSError as error:
                if error.errno not in FLOCK_UNSUPPORTED:
                    raise
                warning = (
                    f"cannot lock run dir {self.run_dir} on this file system ({error.strerror}): another process "
                    f"started on it will not be stopped"
                )
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            with writing(self.path):
                os.ftruncate(handle, 0)
                os.pwrite(handle, (json.dumps(me) + "\n").encode(), 0)
                os.fsync(handle)
        except BaseException:
            os.close(handle)
            raise
        self._handle = handle
        _held.add(self)
        atexit.register(self.release)
        return warning

    def release(self) -> None:
        """Empty the lock file (the holder ended normally) and release the lock."""
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        _held.discard(self)
        atexit.unregister(self.release)
        with contextlib.suppress(OSError):
            os.ftruncate(handle, 0)
        os.close(handle)


def _newest_checkpoint(run_dir: Path) -> Path | None:
    with contextlib.suppress(OSError):
        files = [path for path in run_dir.rglob("*.ckpt") if path.is_file()]
        return max(files, key=lambda path: path.stat().st_mtime_ns, default=None)
    return None


class RunDirGuard(Callback):
    """Hydra callback: the run holds its run dir's :class:`RunDirLock` while it lives (rank 0 of a DDP run;
    each job of a multirun). A dir in use stops the run with one line naming the holder, exit status
    2; a dir the lock cannot be written into (disk full, read-only, no permission) with one line naming the
    lock file, exit status 4 (:mod:`cbam.errors`). (Exits, not exceptions: Hydra reports an exception of a
    callback only as a warning, and goes on.)"""

    def __init__(self) -> None:
        self.lock: RunDirLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Before Hydra's run_job creates the dir and writes into it. The dir is resolved as run_job will
        # resolve it, with the Hydra config set (hydra.run.dir may hold ${hydra:...}).
        HydraConfig.instance().set_config(config)
        self._take(Path(OmegaConf.select(config, "hydra.run.dir")).absolute())

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._take(Path(config.hydra.runtime.output_dir))

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:  # the launcher may run the next job in this process
            self._release()

    def _take(self, run_dir: Path) -> None:
        if not is_first_process():
            return
        lock = RunDirLock(run_dir)
        try:
            warning = lock.acquire()
        except RunDirInUse as error:
            stop(error)
        except WriteFailed as error:
            error.last_good = describe_checkpoint(_newest_checkpoint(run_dir))
            stop(error)
        except OSError as error:  # any other failure (an I/O error, a name too long): never go on unlocked
            stop(
                f"cannot lock run dir {run_dir} ({lock.path}: {error.strerror or error})",
                BAD_INPUT_EXIT_STATUS,
            )
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        self.lock = lock

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
