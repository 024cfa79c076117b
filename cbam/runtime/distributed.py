"""A DDP run ends promptly when one of its processes dies.

Left to itself, a DDP process whose peer died waits for it until the process-group timeout (30 minutes by
default in Lightning) wherever no collective notices the death: during the rendezvous, or, with NCCL,
anywhere. :class:`WatchedDDPStrategy` (``trainer=ddp``, ``trainer=ddp_sim``) ends every other process of
the run within seconds instead, each with one line ``error: rank N of the run died; last good checkpoint:
<path> (step K)`` and exit status :data:`PROCESS_DIED_EXIT_STATUS`, so that a scheduler's requeue or a
retry loop resumes it with ``ckpt_path=last``:

- From the process group on, :class:`PeerWatch` links rank 0 with every other rank through a gloo group
  of its own, on which each end always has a receive posted. A process that dies (SIGKILL, the OOM
  killer, a crash) has its sockets closed by the kernel, which fails its peer's receive at once, on any
  node. A process that leaves on purpose says so first: finished, stopped by an error of its own, or by
  the death of one of its DataLoader workers. Rank 0 passes what it hears on to the other ranks. A
  survivor still inside a stage (fit, test) :data:`GRACE_S` later ends itself; one that is stopping on
  its own by then (every rank raising the same error, an agreed SIGTERM stop) is left to do so.
- Before the process group exists, under Lightning's launcher, :class:`StartupWatch` has rank 0 watch
  the processes it started and each of them watch rank 0. Under torchrun the agent does this (it stops
  every worker within a second of one failing); on several nodes without either, the process-group
  timeout (``timeout_s``) bounds the rendezvous.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import LightningEnvironment
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerStatus

from cbam.arguments import check_number
from cbam.errors import PROCESS_DIED_EXIT_STATUS, ProcessDied, say
from cbam.runtime.checkpoints import describe_checkpoint, last_checkpoint, newest_checkpoint
from cbam.runtime.lightning_internals import attached_trainer, launched_processes, stop_child_process_observer

#: seconds a process that heard of a peer's departure gives itself to stop on its own (all ranks raising
#: the same error, an agreed stop) before it ends the run; the departure itself is heard at once
GRACE_S = 5.0
#: seconds a process whose collective failed waits for the news of the death that failed it
NEWS_WAIT_S = 2.0
#: seconds a process that ends waits, at most, for the processes linked to it to leave or end too
EXIT_WAIT_S = 30.0
#: the pid of the process whose Lightning launcher starts the other local ranks, inherited by them
LAUNCHER_PID = "CBAM_DDP_LAUNCHER_PID"

# What a process says on a link; every kind but ALIVE (which keeps the link's receive from timing out)
# is a departure. DIED and SILENT are never said: a broken link means them.
ALIVE, FINISHED, FAILED, DIED, SILENT, WORKER_DIED = range(6)
DEATHS = (DIED, SILENT, WORKER_DIED)


def process_died(rank: int, kind: int, last_good: str, detail: str = "") -> ProcessDied:
    """The :class:`~cbam.errors.ProcessDied` of ``rank``'s departure of ``kind``."""
    what = {
        DIED: f"rank {rank} of the run died",
        FAILED: f"rank {rank} of the run stopped on an error (see its message)",
        SILENT: f"rank {rank} of the run stopped responding",
        WORKER_DIED: f"a DataLoader worker of rank {rank} died",
    }[kind]
    return ProcessDied(rank, kind, what, last_good, detail)


def last_good(trainer: pl.Trainer | None) -> str:
    """The newest checkpoint ``trainer``'s run wrote or resumed from, else the one ``ckpt_path=last``
    would resume from (a run starting up has neither written nor read one yet), with its step."""
    path = None if trainer is None else newest_checkpoint(trainer) or last_checkpoint(trainer)
    return describe_checkpoint(path)


def _end_process(line: str) -> None:
    """Print ``error: <line>`` and end this process now, whatever its main thread is doing (waiting in a
    collective for the dead peer, most likely). A checkpoint being written is left as its temporary file:
    the last good one stays intact."""
    say(f"error: {line}")
    os._exit(PROCESS_DIED_EXIT_STATUS)


class PeerWatch:
    """Links between rank 0 and every other rank on which each end hears at once when the other one
    leaves or dies (see the module's docstring). Rank 0 runs one listening thread per rank, the others
    one; a keep-alive every quarter of the process-group ``timeout`` holds the links open, so a process
    not heard from for the whole timeout (stopped, or cut off) counts as gone too.

    Every rank must create it at the same point (it forms a process group). ``trainer`` gives the Trainer
    of the run (None before one is attached): while it runs a stage this process needs its peers.
    """

    #: the links' message tag (any number: the group carries nothing else)
    TAG = 16

    def __init__(self, timeout: timedelta, trainer: Callable[[], pl.Trainer | None]) -> None:
        self.rank, self.timeout, self.trainer = dist.get_rank(), timeout, trainer
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        self.links = set(range(1, dist.get_world_size())) if self.rank == 0 else {0}
        self.gone: dict[int, tuple[int, str]] = {}  # rank -> (kind, detail), in the order heard
        self.left = False
        self.heard = threading.Condition()
        self.listeners = [
            threading.Thread(target=self._listen, args=(peer,), name=f"peer-watch-{peer}", daemon=True)
            for peer in self.links
        ]
        for listener in self.listeners:
            listener.start()
        threading.Thread(target=self._keep_alive, name="peer-watch-keep-alive", daemon=True).start()
        atexit.register(self._at_exit)

    def _send(self, peer: int, about: int, kind: int) -> None:
        try:
            dist.isend(torch.tensor([about, kind]), dst=peer, group=self.group, tag=self.TAG).wait()
        except RuntimeError:
            pass  # the peer is gone: the listener of its link says so

    def _listen(self, peer: int) -> None:
        while True:
            message, posted = torch.zeros(2, dtype=torch.int64), time.monotonic()
            try:
                dist.irecv(message, src=peer, group=self.group, tag=self.TAG).wait()
                about, kind = message.tolist()
            except RuntimeError:  # the link broke: closed by a dead peer, or silent for the whole timeout
                silent = time.monotonic() - posted >= 0.9 * self.timeout.total_seconds()
                about, kind = peer, SILENT if silent else DIED
            if kind != ALIVE:
                detail = f"not heard from for {self.timeout.total_seconds():g} s" if kind == SILENT else ""
                self._hear(about, kind, detail)
                if about == peer:
                    return

    def _keep_alive(self) -> None:
        while True:
            time.sleep(self.timeout.total_seconds() / 4)
            with self.heard:
                if self.left:
                    return
                peers = self.links - self.gone.keys()
            for peer in peers:
                self._send(peer, self.rank, ALIVE)

    def _hear(self, about: int, kind: int, detail: str = "") -> None:
        with self.heard:
            if self.left or about in self.gone:
                return
            self.gone[about] = (kind, detail)
            self.heard.notify_all()
            peers = self.links - self.gone.keys()
        if kind == FINISHED:
            return
        if self.rank == 0:  # the other ranks hear only from rank 0
            for peer in peers:
                self._send(peer, about, kind)
        timer = threading.Timer(GRACE_S, self._end_run_if_running, args=(about,))
        timer.daemon = True  # never holds up an exit
        timer.start()

    def running(self) -> bool:
        """Whether this process is inside a stage (fit, test) that needs its peers."""
        trainer = self.trainer()
        return trainer is not None and trainer.state.status == TrainerStatus.RUNNING

    def _end_run_if_running(self, about: int) -> None:
        with self.heard:
            if self.left or not self.running():
                return  # stopping on its own, or between stages: the next stage's start reports it
            self.left = True
        _end_process(str(self._departure(about)))

    def _departure(self, about: int) -> ProcessDied:
        kind, detail = self.gone[about]
        return process_died(about, kind, last_good(self.trainer()), detail)

    def departure(
        self, wait_s: float = 0.0, kinds: tuple[int, ...] = (FAILED, *DEATHS)
    ) -> ProcessDied | None:
        """The first departure of one of ``kinds`` heard of (a finished peer is none by default), waiting
        up to ``wait_s`` for one."""

        def first() -> int | None:
            return next((rank for rank, (kind, _) in self.gone.items() if kind in kinds), None)

        with self.heard:
            self.heard.wait_for(lambda: first() is not None, timeout=wait_s)
            about = first()
        return None if about is None else self._departure(about)

    def _at_exit(self) -> None:
        # A process that ends normally leaves now (else leave() came first). Then it waits for the
        # linked processes to leave or end too: a listener woken while the interpreter shuts down would
        # abort the process (a thread in C++ code cannot be unwound then), turning any exit status into
        # SIGABRT's. Each of them leaves or ends within GRACE_S of hearing that this one left.
        self.leave(FINISHED)
        deadline = time.monotonic() + EXIT_WAIT_S
        for listener in self.listeners:
            listener.join(timeout=max(0.0, deadline - time.monotonic()))

    def leave(self, kind: int, about: int | None = None) -> None:
        """Tell the linked processes, once, that this one leaves the run (``kind``: FINISHED, FAILED, or
        the news of a death it stops for, about rank ``about``), and stop listening."""
        with self.heard:
            if self.left:
                return
            self.left = True
            peers = self.links - self.gone.keys()
        about = self.rank if about is None else about
        sender = threading.Thread(
            target=lambda: [self._send(peer, about, kind) for peer in peers], daemon=True
        )
        sender.start()
        sender.join(timeout=NEWS_WAIT_S)  # a peer that is gone can hold a send up: never hold up the exit


class StartupWatch(threading.Thread):
    """Until the process group is formed, under Lightning's launcher: rank 0 watches the processes it
    started (``children``: global rank -> process), each of those watches rank 0 (``launcher``: its global
    rank and pid, the parent's). A death ends the run: rank 0 stops the processes it started and reports
    the rank; a child reports rank 0."""

    def __init__(
        self,
        children: dict[int, subprocess.Popen],
        launcher: tuple[int, int] | None,
        trainer: Callable[[], pl.Trainer | None],
    ) -> None:
        super().__init__(name="startup-watch", daemon=True)
        self.children, self.launcher, self.trainer = children, launcher, trainer
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for rank, child in self.children.items():
                if child.poll() is not None:
                    self._report(rank, f"during start-up, exit status {child.returncode}")
            if self.launcher is not None and os.getppid() != self.launcher[1]:
                self._report(self.launcher[0], "during start-up")

    def _report(self, rank: int, detail: str) -> None:
        if self.done.is_set():
            return  # the process group has just been formed: its watch takes over
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)  # a second line from them would name this process
        _end_process(str(process_died(rank, DIED, last_good(self.trainer()), detail)))


class WatchedDDPStrategy(DDPStrategy):
    """Lightning's DDP strategy, with the process-group timeout in seconds (``timeout_s``) and the
    watches of this module: when a process of the run dies, the others stop within seconds with one line
    naming it and the last good checkpoint, exit status :data:`PROCESS_DIED_EXIT_STATUS`.

    Other keyword arguments go to :class:`~pytorch_lightning.strategies.DDPStrategy` (and from there to
    ``DistributedDataParallel``: ``find_unused_parameters``, ``static_graph`` ...).
    """

    def __init__(self, timeout_s: float = 600.0, **kwargs: Any) -> None:
        check_number("timeout_s", timeout_s, above=0, unit="seconds")
        self.timeout = timedelta(seconds=timeout_s)
        super().__init__(timeout=self.timeout, **kwargs)
        if "LOCAL_RANK" not in os.environ:  # the process Lightning's launcher may start the others from
            os.environ[LAUNCHER_PID] = str(os.getpid())
        self.peers: PeerWatch | None = None

    def trainer(self) -> pl.Trainer | None:
        """The Trainer running this strategy, or None before one is attached."""
        return attached_trainer(self.lightning_module) if self.lightning_module is not None else None

    def _watch_startup(self) -> StartupWatch | None:
        first_rank = self.node_rank * self.num_processes
        children = {first_rank + 1 + index: child for index, child in enumerate(launched_processes(self))}
        launcher = None
        started_by_lightning = (
            isinstance(self.cluster_environment, LightningEnvironment) and self.local_rank > 0
        )
        if started_by_lightning and os.environ.get(LAUNCHER_PID, str(os.getpid())) != str(os.getpid()):
            launcher = (first_rank, int(os.environ[LAUNCHER_PID]))
        if not children and launcher is None:
            return None
        if children:
            stop_child_process_observer()  # it would SIGKILL the run, unannounced, when a child dies
        watch = StartupWatch(children, launcher, self.trainer)
        watch.start()
        return watch

    def setup_environment(self) -> None:
        startup = None if dist.is_initialized() else self._watch_startup()
        try:
            super().setup_environment()  # the rendezvous: forms the process group
            if self.peers is None and self.world_size > 1:
                self.peers = PeerWatch(self.timeout, self.trainer)
        finally:
            if startup is not None:
                startup.done.set()
        departure = self.peers.departure() if self.peers is not None else None
        if departure is not None:  # a peer left between the stages (after fit, before test)
            raise departure


#: the module of torch's DataLoader, whose frames a lost connection to a worker is raised from
DATALOADER_MODULE = os.path.join("torch", "utils", "data", "dataloader.py")


def _worker_death(error: BaseException | None) -> bool:
    """True if ``error``, or an error it was raised from or during, says that a DataLoader worker of this
    process died: PyTorch's report ("DataLoader worker (pid ...) is killed by signal: ..." / "... exited
    unexpectedly"), or a connection to a worker lost while the DataLoader took a batch from it (a worker
    killed while it hands a batch over)."""
    seen: list[BaseException] = []
    while error is not None and all(error is not other for other in seen):
        if isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker (pid"):
            return True
        if isinstance(error, (ConnectionError, EOFError)) and any(
            frame.filename.endswith(DATALOADER_MODULE) for frame in traceback.extract_tb(error.__traceback__)
        ):
            return True
        seen.append(error)
        error = error.__cause__ or error.__context__
    return False


def leave_on_error(error: BaseException, trainer: pl.Trainer) -> ProcessDied | None:
    """This process stops on ``error``: the death of a process of its run behind it (``error`` itself, a
    peer's death heard of, one of this process's DataLoader workers), or None; the linked processes are
    told, with that news or as a failure of this process's own."""
    peers = trainer.strategy.peers if isinstance(trainer.strategy, WatchedDDPStrategy) else None
    death = error if isinstance(error, ProcessDied) else None
    # A peer's death comes first: it also fails this process's collectives and (torchrun stopping the
    # survivors) its DataLoader workers.
    if death is None and peers is not None:
        death = peers.departure(kinds=DEATHS)
    if death is None and _worker_death(error):
        death = process_died(trainer.global_rank, WORKER_DIED, last_good(trainer))
    if (
        death is None
        and peers is not None
        and (type(error) is RuntimeError or isinstance(error, dist.DistError))
    ):
        death = peers.departure(NEWS_WAIT_S, kinds=DEATHS)  # a collective that a death failed (gloo, NCCL)
    if peers is not None:
        peers.leave(*(FAILED, None) if death is None else (death.kind, death.rank))
    return death
