"""Subprocesses that skip the imports: a Python interpreter that has imported torch, Lightning and the
package once, and forks a child for each ``python <args>`` the tests ask for.

A fresh interpreter that imports what train.py imports (torch, torchvision, torchmetrics, which imports
scipy.signal and torchvision's ops and with them torch._dynamo, Lightning) takes 6.6 CPU seconds to start and
end on the 2-core test machine, most of a tiny test run's 7-9; a forked child starts in 20 ms and ends in
0.5 s (2026-12-07). The suite starts about fifty such processes. A forked child is still a process of its
own, as the tests need: its own pid, exit status, signals, file descriptors, working directory and
environment, and what it starts (DDP ranks, DataLoader workers, torchrun's workers) are fresh interpreters as
before. What differs from ``python <args>``: the modules the server imported are already in ``sys.modules``,
so environment variables that take effect when a library is imported must be the same as the server's;
:func:`run` starts one server per such environment (``RUNTIME_ONLY`` lists the variables read later, which
may differ between runs of one server). ``CBAM_TEST_FRESH_PROCESSES=1`` runs every process afresh instead.

Run as a script, this file is the server: ``python warm_interpreter.py <socket> <module>...``.
"""

from __future__ import annotations

import atexit
import contextlib
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
#: read when a run starts, not when its libraries are imported: may differ between the runs of one server
RUNTIME_ONLY = ("SLURM_", "HYDRA_FULL_ERROR", "PYTEST_CURRENT_TEST")
START_TIMEOUT_S = 300


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
        ready, _, _ = select.select([listener], [], [], 0.05)
        if ready:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in [connection, *clients.values()]:
                    other.close()
                return {**json.loads(message), "fds": fds}
            for fd in fds:
                os.close(fd)
            clients[pid] = connection
            tell(connection, pid)
        while clients:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = clients.pop(pid)
            tell(connection, status)
            connection.close()
    sys.exit(0)


def tell(connection: socket.socket, number: int) -> None:
    try:
        connection.send(f"{number}".encode())
    except OSError:
        pass  # the client gave up on the run (its timeout): nobody is waiting for the number


def become(request: dict) -> None:
    """This (forked) process turns into ``python <args>`` run with the request's streams, working directory
    and environment. What ends the script ends the process, as it would end a fresh interpreter."""
    for fd, target in zip(request["fds"], (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    args = request["args"]
    import runpy

    if args[0] == "-m":
        module = args[1]
        sys.modules.pop(module, None)  # imported by the server or not: run from its file, as python -m does
        sys.argv, sys.path[0] = ["-m", *args[2:]], os.getcwd()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(args[0])
        sys.argv, sys.path[0] = [args[0], *args[1:]], os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


# ----------------------------------------------------------------------------- the tests' side


class Server:
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
                raise RuntimeError(f"the warm interpreter did not start:\n{self.log.read().decode()[-3000:]}")
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


@atexit.register
def _close_servers() -> None:
    for server in _servers.values():
        server.close()
    _servers.clear()


def server_for(env: dict[str, str]) -> Server:
    imported_with = {k: v for k, v in env.items() if not k.startswith(RUNTIME_ONLY)}
    key = json.dumps(imported_with, sort_keys=True)
    with _servers_lock:
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
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    server = server_for(env)
    (out_read, out_write), (err_read, err_write) = os.pipe(), os.pipe()
    stdin = os.open(os.devnull, os.O_RDONLY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
        connection.connect(server.path)
        request = json.dumps({"args": args, "cwd": str(cwd), "env": env}).encode()
        socket.send_fds(connection, [request], [stdin, out_write, err_write])
        for fd in (stdin, out_write, err_write):
            os.close(fd)
        pid = int(connection.recv(64))
        out, err = bytearray(), bytearray()
        sinks, deadline = {out_read: out, err_read: err}, time.monotonic() + timeout
        try:
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
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # as subprocess.run does: the child, not what it started
            raise subprocess.TimeoutExpired(command, timeout, bytes(out), bytes(err)) from None
        finally:
            os.close(out_read)
            os.close(err_read)
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
