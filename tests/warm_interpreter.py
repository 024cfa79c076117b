"""Subprocesses that skip the imports: a Python interpreter that has imported torch, Lightning and the
package once, and forks a child for each ``python <args>`` the tests ask for.

A fresh interpreter that imports what train.py imports (torch, torchvision, torchmetrics, which imports
scipy.signal and torchvision's ops and with them torch._dynamo, Lightning) takes 6.6 CPU seconds to start and
end on the 2-core test machine, most of a tiny test run's 7-9; a forked child starts in 20 ms and ends in
0.5 s (2026-12-07). The suite starts about fifty such processes. A forked child is still a process of its
own, as the tests need: its own pid, exit status, signals, file descriptors, working directory and
environment, and what it starts (DDP ranks, DataLoader workers, torchrun's workers) are fresh interpreters as
before. What differs from ``python <args>``: the modules the server imported are already in
``sys.modules``, so environment variables that take effect when a library is imported must be the same as the
server's; :func:`run` starts one server per such environment (``RUNTIME_ONLY`` lists the variables read
later, which may differ between runs of one server). Every child of a server has its string hash seed (a
fresh interpreter draws one), and what the imports printed went to the server's log.
``CBAM_TEST_FRESH_PROCESSES=1`` runs every process afresh instead.

Run as a script, this file is the server: ``python warm_interpreter.py <socket> <module>...``.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import io
import json
import locale
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

#: what a train.py run imports before it trains, its figures and TensorBoard writer included; a -m target
#: (cbam.report, torch.distributed.run, ...) is run from its file all the same, as python -m runs it
WARM_MODULES = [
    "cbam.training.run",
    "cbam.callbacks",
    "torch.utils.tensorboard",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
]
#: read when a run starts, not when the server's modules are imported (MLflow, which reads PYTEST_CURRENT_TEST
#: on import, is not among them): may differ between the runs of one server
RUNTIME_ONLY = ("SLURM_", "HYDRA_FULL_ERROR", "PYTEST_CURRENT_TEST")
START_TIMEOUT_S = 300
#: what a child gets from its client, as file descriptors 0, 1 and 2
STREAMS = ("stdin", "stdout", "stderr")


# ----------------------------------------------------------------------------- the server (and its child)


def serve(path: str) -> dict:
    """Forks a child for each request on the socket ``path``; returns only in a child, with its request.
    Sends each client the child's pid, then its wait status once it has ended. Ends with the process that
    started it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    parent, clients = os.getppid(), {}
    while os.getppid() == parent:
        if select.select([listener], [], [], 0.05)[0]:
            connection, _ = listener.accept()
            try:
                message, fds, _, _ = socket.recv_fds(connection, 1 << 20, len(STREAMS))
                request = {**json.loads(message), "fds": fds}
            except (OSError, ValueError):  # a client that went away before it asked
                connection.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in [connection, *clients.values()]:
                    other.close()
                return request
            for fd in fds:
                os.close(fd)
            clients[pid] = connection
            send_number(connection, pid)
        while clients:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = clients.pop(pid)
            send_number(connection, status)
            connection.close()
    sys.exit(0)


def send_number(connection: socket.socket, number: int) -> None:
    try:
        connection.send(f"{number}".encode())
    except OSError:
        pass  # the client gave up on the run (its timeout): nobody is waiting for the number


#: the server's own streams, which a child replaces: kept, since freeing them would close the child's fds 0-2
_server_streams: list = []


def new_streams() -> None:
    """sys.stdin, stdout and stderr made anew on fds 0-2, as a fresh interpreter makes them: the server's were
    made for its log file (seekable, for one)."""
    _server_streams.extend([sys.stdin, sys.stdout, sys.stderr])
    for fd, name in enumerate(STREAMS):
        old = getattr(sys, name)
        unbuffered = fd > 0 and old.write_through  # (PYTHONUNBUFFERED)
        binary = open(fd, "wb" if fd else "rb", buffering=0 if unbuffered else -1, closefd=False)
        line_buffering = name == "stderr" or os.isatty(fd)
        stream = io.TextIOWrapper(binary, old.encoding, old.errors, "\n", line_buffering, unbuffered)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def become(request: dict) -> None:
    """This (forked) process turns into ``python <args>`` run with the request's streams, working directory
    and environment. What ends the script ends the process, as it would end a fresh interpreter."""
    for fd, target in zip(request["fds"], range(len(STREAMS))):
        os.dup2(fd, target)
        os.close(fd)
    new_streams()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a fresh interpreter's seed (Python's random reseeds at a fork)
    args = request["args"]
    if args[0] == "-m":
        import runpy

        module = args[1]
        sys.modules.pop(module, None)  # imported by the server or not: run from its file, as python -m does
        sys.argv, sys.path[0] = ["-m", *args[2:]], os.getcwd()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:  # what python <script> does (runpy.run_path would make sys.argv[0] absolute)
        script = os.path.abspath(args[0])
        sys.argv, sys.path[0] = list(args), os.path.dirname(os.path.realpath(script))
        main = types.ModuleType("__main__")
        main.__file__, main.__builtins__ = script, builtins
        sys.modules["__main__"] = main
        with open(script, "rb") as source:
            code = compile(source.read(), script, "exec")
        exec(code, main.__dict__)


# ----------------------------------------------------------------------------- the tests' side


class Server:
    """A warm interpreter for one import-time environment, in a process of its own: its socket and log live in
    a temporary folder, removed by :meth:`close`."""

    def __init__(self, env: dict[str, str]) -> None:
        self.folder = tempfile.mkdtemp(prefix="warm-python-")
        self.path = os.path.join(self.folder, "socket")
        self.log = open(os.path.join(self.folder, "server.log"), "w+b")
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.path, *WARM_MODULES],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                log = self.log.read().decode(errors="replace")
                self.close()
                raise RuntimeError(f"the warm interpreter did not start:\n{log[-3000:]}")
            time.sleep(0.05)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()
        for name in os.listdir(self.folder):
            os.remove(os.path.join(self.folder, name))
        os.rmdir(self.folder)


_servers: dict[str, Server] = {}
_servers_lock = threading.Lock()
_owner = os.getpid()


@atexit.register
def _close_servers() -> None:
    if os.getpid() != _owner:
        return  # a process forked from the tests' (a DataLoader worker, say): the servers are not its own
    for server in _servers.values():
        server.close()
    _servers.clear()


def server_for(env: dict[str, str]) -> Server:
    """The running server for ``env``'s import-time variables, started if there is none (or it has died)."""
    imported_with = {k: v for k, v in env.items() if not k.startswith(RUNTIME_ONLY)}
    key = json.dumps(imported_with, sort_keys=True)
    with _servers_lock:
        if key in _servers and _servers[key].process.poll() is not None:
            _servers.pop(key).close()
        if key not in _servers:
            _servers[key] = Server(imported_with)
        return _servers[key]


def _text(data: bytes) -> str:
    # what subprocess.run(text=True) returns: the locale's encoding, universal newlines
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


def run(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float, fresh: bool = False
) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout)``, as a child of the warm interpreter for ``env`` unless ``fresh``."""
    command = [sys.executable, *args]
    runs_a_file = args[0] == "-m" or args[0].endswith(".py")  # (-c and the like are not needed here)
    if fresh or os.environ.get("CBAM_TEST_FRESH_PROCESSES") == "1" or not runs_a_file:
        no_input = subprocess.DEVNULL  # as a warm child's
        return subprocess.run(
            command, cwd=cwd, env=env, stdin=no_input, capture_output=True, text=True, timeout=timeout
        )
    server = server_for(env)
    out, err, pid = bytearray(), bytearray(), None
    deadline = time.monotonic() + timeout
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with contextlib.ExitStack() as cleanup, connection:
        (out_read, out_write), (err_read, err_write) = os.pipe(), os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        for fd in (out_read, err_read):
            cleanup.callback(os.close, fd)
        try:
            connection.settimeout(timeout)
            connection.connect(server.path)
            request = json.dumps({"args": args, "cwd": str(cwd), "env": env}).encode()
            socket.send_fds(connection, [request], [stdin, out_write, err_write])
        finally:
            for fd in (stdin, out_write, err_write):
                os.close(fd)
        try:
            pid = int(connection.recv(64))
            sinks = {out_read: out, err_read: err}
            while sinks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                for fd in select.select(list(sinks), [], [], left)[0]:
                    chunk = os.read(fd, 1 << 16)
                    if chunk:
                        sinks[fd] += chunk
                    else:
                        del sinks[fd]
            connection.settimeout(max(deadline - time.monotonic(), 0.1))
            status = connection.recv(64)  # it has closed its output: it is ending
        except BaseException as error:  # as subprocess.run does: whatever stops the wait kills the child
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if isinstance(error, TimeoutError):
                raise subprocess.TimeoutExpired(command, timeout, bytes(out), bytes(err)) from None
            raise
    if not status:
        raise RuntimeError(f"the warm interpreter ended before reporting pid {pid}'s exit status")
    returncode = os.waitstatus_to_exitcode(int(status))
    return subprocess.CompletedProcess(command, returncode, _text(out), _text(err))


if __name__ == "__main__":
    import gc
    import importlib

    for name in sys.argv[2:]:
        importlib.import_module(name)
    # what the imports made is never collected: a child's collections skip it, and so do not copy its memory
    # pages (a child's end took 1.9 s, 0.5 s with this; measured 2026-12-07)
    gc.freeze()
    become(serve(sys.argv[1]))
