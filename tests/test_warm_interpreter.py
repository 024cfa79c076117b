"""The warm interpreter's children behave as ``python <args>`` would, as the other tests' processes need."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import warm_interpreter
from helpers import REPO, run_python, subprocess_env

pytestmark = pytest.mark.skipif(
    os.environ.get("CBAM_TEST_FRESH_PROCESSES") == "1", reason="CBAM_TEST_FRESH_PROCESSES=1: no warm server"
)

SCRIPT = """
import os, signal, sys
print(sys.argv, os.getcwd(), sys.path[0], os.environ.get("SLURM_JOB_ID"), __name__, flush=True)
print(f"parent {os.getppid()}", file=sys.stderr)
print("progress 1\\rprogress 2\\r\\ndone", file=sys.stderr)
print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGTERM))
print(sys.stdout.seekable(), sys.stdin.read(), flush=True)
ending = sys.argv[1]
if ending == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
if ending == "exception":
    raise ValueError("no such thing")
sys.exit(ending if ending == "message" else int(ending))
"""


@pytest.mark.parametrize("ending", ["0", "3", "message", "exception", "killed"])
def test_a_child_ends_and_reports_as_a_fresh_interpreter_does(tmp_path, ending):
    (tmp_path / "script.py").write_text(SCRIPT)
    env = subprocess_env(SLURM_JOB_ID="4242")  # a variable read at run time: the shared server takes it
    # from a working directory of its own, the script named relative to it
    args = ["script.py", ending]
    warm, fresh = (warm_interpreter.run(args, tmp_path, env, 60, fresh=fresh) for fresh in (False, True))
    assert warm.returncode == fresh.returncode == {"0": 0, "3": 3, "killed": -9}.get(ending, 1)
    assert warm.stdout == fresh.stdout
    folder = os.path.realpath(tmp_path)
    assert f"['script.py', '{ending}'] {tmp_path} {folder} 4242 __main__\nTrue 0\nFalse \n" == warm.stdout
    assert "progress 1\nprogress 2\ndone\n" in warm.stderr
    assert f"parent {warm_interpreter.server_for(env).process.pid}\n" in warm.stderr  # forked, not run afresh
    # the traceback of a warm child has the server's frames above the script's: the end is equal
    assert warm.stderr.splitlines()[-2:] == fresh.stderr.splitlines()[-2:]


def test_two_children_draw_different_unseeded_numbers(tmp_path):
    script = tmp_path / "draws.py"
    script.write_text("import random, numpy\nprint(random.random(), numpy.random.randint(1 << 30))\n")
    first, second = (run_python([script]) for _ in range(2))
    assert first.returncode == second.returncode == 0, first.stderr
    (python_1, numpy_1), (python_2, numpy_2) = first.stdout.split(), second.stdout.split()
    assert python_1 != python_2 and numpy_1 != numpy_2


def test_a_module_runs_as_python_m_runs_it(tmp_path):
    source = tmp_path / "source.py"
    source.write_text("x = 1\n")
    # tokenize is in the server's sys.modules (inspect imports it): run from its file all the same
    warm, fresh = (run_python(["-m", "tokenize", source], fresh=fresh) for fresh in (False, True))
    assert warm.returncode == fresh.returncode == 0
    assert warm.stdout == fresh.stdout and "NAME" in warm.stdout and "'x'" in warm.stdout
    assert warm.stderr == fresh.stderr == ""  # no runpy warning of a module imported before it ran


def test_a_child_past_its_timeout_is_killed_and_raises_with_its_output(tmp_path):
    script, pid_file = tmp_path / "sleeps.py", tmp_path / "pid"
    script.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                      "print('started', flush=True)\ntime.sleep(60)\n")  # fmt: skip
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        warm_interpreter.run([str(script)], cwd=REPO, env=subprocess_env(), timeout=3)
    assert raised.value.stdout == b"started\n" and raised.value.cmd == [sys.executable, str(script)]
    pid, deadline = int(pid_file.read_text()), time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):  # until the server has reaped it
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the child outlived its timeout"
