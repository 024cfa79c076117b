"""Faults of the run's surroundings: a full disk, a read-only run dir, a run dir in use by another process,
and attention settings that change nothing (README, "Reliability").

The full disk is a real one where this machine lets a test mount a small tmpfs (as root, as in CI); elsewhere
every checkpoint written after step 1 fails as on a full disk (tests/fault_callbacks.py). The mechanisms are
tested in-process; three train.py subprocesses check the exit statuses and the stderr lines.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import yaml
from fault_callbacks import FillsUp
from helpers import REPO, load_checkpoint, run_train, write_random_pngs

from cbam.callbacks.curves import TrainingCurves
from cbam.data import CACHE_NAME
from cbam.data.sources import load_cifar10
from cbam.errors import WRITE_FAILED_EXIT_STATUS, RunDirInUse, WriteFailed
from cbam.models.network_config import ATTENTION_DEFAULTS, PLACEMENT_KEYS
from cbam.runtime.checkpoints import AtomicCheckpointIO
from cbam.runtime.run_dir_lock import LOCK_FILE, RunDirLock, is_first_process
from cbam.runtime.write_failures import silence_failed_writes_in_threads, write_failure
from cbam.training.config_checks import unplaced_attention_warning

#: 10 classes x 10 train images - 20 for validation = 80 images = 10 batches of 8 per epoch
TINY = [
    "data.download=false", "data.loader=device", "data.batch_size=8", "data.num_workers=0", "data.val_size=20",
    "model.width=4", "trainer.max_epochs=1", "test=false",
]  # fmt: skip
#: room for the run's small files and one checkpoint of the width-4 ResNet18 (about 420 KB), not two: the
#: second save of last.ckpt (written beside the first, then renamed over it) finds the disk full
DISK_SIZE = "600k"


def show(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-3000:]}"


def stderr_lines(result: subprocess.CompletedProcess, start: str) -> list[str]:
    """The stderr lines that start with ``start`` (a progress bar may precede one on its line)."""
    return [line[line.index(start) :] for line in result.stderr.splitlines() if start in line]


def mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path`` (``mount -o <options>``); False where this machine refuses (not root)."""
    path.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    return os.geteuid() == 0 and subprocess.run(command, check=False, capture_output=True).returncode == 0


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def lock_and_die(run_dir: Path, pipe: tuple[int, int] | None = None) -> int:
    """Fork a process that takes the lock of ``run_dir`` and dies by SIGKILL; given a pipe, it first forks
    a child (as a DataLoader worker is forked) that lives on until the pipe's write end is closed. Returns
    the pid of the process that died."""
    pid = os.fork()
    if pid == 0:
        try:
            RunDirLock(run_dir).acquire()
            if pipe is not None and os.fork() == 0:
                os.close(pipe[1])
                os.read(pipe[0], 1)
                os._exit(0)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL  # killed, not exited
    return pid


# ------------------------------------------------------------------------------ the train.py runs


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory) -> dict:
    """Run 1: a run dir on a 600 KB file system (or with checkpoints failing from step 2 on), a checkpoint
    every step, a lock left behind by a killed process, and ``attention=se`` with no CBAM placed. Run 2 (on
    the file system only): the same run dir, remounted read-only, resumed with ckpt_path=last."""
    base = tmp_path_factory.mktemp("faults")
    data = write_random_pngs(base / "data", 10, 1, [f"class{label}" for label in range(10)])
    disk = base / "disk"
    out: dict = {"mounted": mount_tmpfs(disk, f"size={DISK_SIZE}"), "run_dir": disk / "run"}
    try:
        out["run_dir"].mkdir(parents=True)
        lock_and_die(out["run_dir"])
        out["dead_holder"] = json.loads((out["run_dir"] / LOCK_FILE).read_text())
        simulated = [] if out["mounted"] else [
            "+callbacks.full_disk._target_=fault_callbacks.FullDiskFrom", "+callbacks.full_disk.step=2",
        ]  # fmt: skip
        common = [f"data.root={data}", *TINY, f"hydra.run.dir={out['run_dir']}"]
        out["first"] = run_train(
            [*common, "attention=se", "callbacks.last_checkpoint.every_n_train_steps=1", *simulated]
        )
        if out["mounted"]:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            out["before"] = tree(out["run_dir"])
            out["second"] = run_train([*common, "ckpt_path=last"])
            out["after"] = tree(out["run_dir"])
        yield out
    finally:
        if out["mounted"]:
            subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_stops_with_one_line_naming_the_file_and_the_last_good_checkpoint(full_disk):
    result, run_dir = full_disk["first"], full_disk["run_dir"]
    assert result.returncode == WRITE_FAILED_EXIT_STATUS == 4, show(result)
    assert "Traceback" not in result.stderr, show(result)
    last = run_dir / "checkpoints" / "last.ckpt"
    line = stderr_lines(result, "error:")
    assert line == [
        f"error: no space left on device while writing {last}; last good checkpoint: {last} (step 1)"
    ], show(result)
    # nothing written before is damaged, no partial file is left
    assert load_checkpoint(last)["global_step"] == 1
    assert (
        yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["model"]["channel_pooling"] == "avg"
    )
    # (the temporary files of atomic writes are hidden ones: .ckpt-*.partial, .curves.png.*.tmp, ...)
    assert [p.name for p in run_dir.rglob(".*") if p.is_file()] == [LOCK_FILE]
    # the run released its lock: the next run takes it silently
    assert (run_dir / LOCK_FILE).read_text() == ""


def test_read_only_run_dir_stops_before_any_work_with_one_line(full_disk):
    if not full_disk["mounted"]:  # the in-process tests below cover an unwritable dir
        pytest.skip("this machine does not let the test mount a file system")
    result, run_dir = full_disk["second"], full_disk["run_dir"]
    assert result.returncode == WRITE_FAILED_EXIT_STATUS, show(result)
    assert "Traceback" not in result.stderr, show(result)
    last = run_dir / "checkpoints" / "last.ckpt"
    expected = f"error: read-only file system while writing {run_dir / LOCK_FILE}; last good checkpoint: {last} (step 1)"
    assert result.stderr.strip().splitlines() == [expected], show(result)
    assert full_disk["after"] == full_disk["before"]


def test_lock_left_by_a_killed_run_is_taken_over_and_said_once(full_disk):
    result, holder = full_disk["first"], full_disk["dead_holder"]
    said = stderr_lines(result, "warning: took over")
    expected = (
        f"warning: took over run dir {full_disk['run_dir']} from process {holder['pid']} on host {holder['host']} "
        f"(started {holder['started']}), which ended without releasing it"
    )
    assert said == [expected], show(result)


def test_attention_without_placement_is_a_warning_and_the_run_goes_on(full_disk):
    result = full_disk["first"]
    warnings = stderr_lines(result, "warning: model.")
    expected = (
        "warning: model.channel_pooling=avg, model.use_spatial_gate=false configure a CBAM that no placement uses "
        "(cbam=none): this run trains ResNet18 without attention. Place it with cbam=block|classifier|both"
    )
    assert warnings == [expected], show(result)
    trained = load_checkpoint(full_disk["run_dir"] / "checkpoints" / "last.ckpt")
    assert trained["global_step"] >= 1


@pytest.fixture(scope="module")
def refused_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A train.py on a run dir whose lock this test process holds. (Under DDP: tests/test_ddp_eval.py.)"""
    base = tmp_path_factory.mktemp("locks")
    busy = RunDirLock(base / "busy")
    busy.acquire()
    try:
        result = run_train([f"data.root={base / 'no_data'}", *TINY, f"hydra.run.dir={busy.run_dir}"])
    finally:
        busy.release()
    return result, busy.run_dir


def test_a_second_run_on_a_dir_in_use_stops_with_one_line_naming_the_holder(refused_run):
    result, run_dir = refused_run
    assert result.returncode == 2, show(result)
    assert "Traceback" not in result.stderr, show(result)
    holder = rf"process {os.getpid()} on host {re.escape(socket.gethostname())} \(started [\d: -]+\)"
    expected = rf"error: run dir {re.escape(str(run_dir))} is in use by {holder}: "
    expected += r"wait for it to end, or give this run another hydra\.run\.dir"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(expected, lines[0]), show(result)
    # stopped before Hydra wrote anything into the dir
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]


# ------------------------------------------------------------------------------- in-process mechanisms


def test_failed_checkpoint_cache_and_figure_writes_name_their_file_and_keep_the_previous_one(
    tmp_path, monkeypatch, make_image_folder
):
    data = tmp_path / "data"
    make_image_folder(data, classes=["a", "b"], train_per_class=2, test_per_class=1)
    io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(1000)}}, last)
    curves = TrainingCurves()
    curves.history = {"train/loss": {0: 1.0}}
    figure = curves.draw(tmp_path / "curves.png")
    before = {path: path.read_bytes() for path in (last, figure)}

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: FillsUp(real_fdopen(*args, **kwargs), 2000))
    with pytest.raises(WriteFailed) as failed:
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(1000)}}, last)
    # torch's zip writer wraps the OSError in "RuntimeError: ... unexpected pos": the line names the file anyway
    assert isinstance(failed.value.__cause__, RuntimeError) and "unexpected pos" in str(
        failed.value.__cause__
    )
    # the run adds the newest intact checkpoint; a tool that writes none says the failure alone
    assert str(failed.value) == f"no space left on device while writing {last}"
    failed.value.last_good = "none"
    assert str(failed.value).endswith(f"{last}; last good checkpoint: none")
    with pytest.raises(WriteFailed, match=re.escape(f"no space left on device while writing {figure}")):
        curves.draw(figure)
    cache = data / CACHE_NAME
    with pytest.raises(WriteFailed, match=re.escape(f"no space left on device while writing {cache}")):
        load_cifar10(data, download=False)
    monkeypatch.undo()
    assert {path: path.read_bytes() for path in before} == before
    written = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".png", ".jpg"))
    assert written == [f"{CACHE_NAME}.lock", "last.ckpt"]  # and curves.png: no temporary file, no cache


def test_write_errors_are_recognised_in_any_wrapper_and_only_for_writes(tmp_path):
    where = tmp_path / "run"
    full = OSError(errno.ENOSPC, "No space left on device")  # TensorBoard's writer thread: no file name
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("flush failed") from None  # the context dropped: not this chain's cause
    except RuntimeError as error:
        assert write_failure(error, where) is None
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("the logger's final flush")
    except RuntimeError as error:
        assert str(write_failure(error, where)).startswith(
            f"no space left on device while writing a file in {where}"
        )
    named = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "hparams.yaml"))
    assert write_failure(named).path == str(tmp_path / "hparams.yaml")
    # permission errors come from reads too: only a write the code marks as such is called one
    assert write_failure(PermissionError(errno.EACCES, "Permission denied", "data/train")) is None


def test_a_run_dir_without_permission_is_one_line_naming_the_lock_file(tmp_path, monkeypatch):
    def forbidden(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "open", forbidden)  # as for a dir of another user (root may write anywhere)
    with pytest.raises(WriteFailed) as failed:
        RunDirLock(tmp_path).acquire()
    assert str(failed.value) == f"permission denied while writing {tmp_path / LOCK_FILE}"


def test_a_lock_that_fails_otherwise_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    import fcntl

    from cbam.runtime.run_dir_lock import RunDirGuard

    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)  # e.g. a network file system that fails
    with pytest.raises(SystemExit) as stop:
        RunDirGuard()._take(tmp_path)  # as Hydra's callback takes it, before the run starts
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"error: cannot lock run dir {tmp_path} ({tmp_path / LOCK_FILE}: Input/output error)\n"
    )


def test_a_thread_that_dies_of_a_full_disk_prints_nothing(monkeypatch):
    reported = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    silence_failed_writes_in_threads()  # over the hook in place, which gets every other error
    errors = [OSError(errno.ENOSPC, "No space left on device"), ValueError("a bug")]
    for error in errors:

        def fail(error=error):
            raise error

        thread = threading.Thread(target=fail)
        thread.start()
        thread.join()
    assert reported == errors[1:]


def test_lock_is_exclusive_and_one_left_by_a_killed_holder_is_taken_over_once(tmp_path, monkeypatch):
    first, second = RunDirLock(tmp_path), RunDirLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(
        RunDirInUse, match=rf"in use by process {os.getpid()} on host {re.escape(socket.gethostname())} "
    ):
        second.acquire()  # even within one process: flock locks belong to the open file
    first.release()
    assert (tmp_path / LOCK_FILE).read_text() == "" and second.acquire() is None
    second.release()

    # a holder killed while a child it forked (a DataLoader worker) lives on: the lock ends with the holder
    pipe = os.pipe()
    try:
        dead = lock_and_die(tmp_path, pipe)
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == dead
        taker = RunDirLock(tmp_path)
        warning = taker.acquire()
    finally:
        os.close(pipe[1])  # the forked child ends
        os.close(pipe[0])
    assert warning and f"from process {dead} on host {holder['host']}" in warning
    taker.release()
    assert RunDirLock(tmp_path).acquire() is None  # said once

    for name, value, first_process in [
        ("LOCAL_RANK", "1", False),
        ("RANK", "0", True),
        ("SLURM_PROCID", "3", False),
    ]:
        monkeypatch.setenv(name, value)
        assert is_first_process() is first_process, name
        monkeypatch.delenv(name)


def test_attention_settings_without_a_placement_are_warned_about(compose_config):
    # one definition of each kind's option keys and their defaults: the options class's, which the
    # attention= group of that kind repeats
    for kind, defaults in ATTENTION_DEFAULTS.items():
        group = yaml.safe_load((REPO / "conf" / "attention" / f"{kind}.yaml").read_text())
        assert group == {"attention_kind": kind, **defaults}, kind
    for arch in ("resnet", "wide_resnet", "torchvision"):
        network = yaml.safe_load((REPO / "conf" / "model" / f"{arch}.yaml").read_text())["model"]
        assert network["arch"] == arch and all(network[key] is False for key in PLACEMENT_KEYS), arch
    quiet = [(), ("attention=none",), ("attention=se", "cbam=block"), ("model.kernel_size=3", "cbam=both")]
    quiet += [("attention=se", "train=false", "ckpt_path=x.ckpt")]  # the checkpoint decides the model
    for overrides in quiet:
        assert unplaced_attention_warning(compose_config(*overrides)) is None, overrides
    warning = unplaced_attention_warning(
        compose_config("model.reduction_ratio=8", "model.cbam_impl=reference")
    )
    assert warning.startswith("model.reduction_ratio=8, model.cbam_impl=reference configure a CBAM that no ")
    assert "cbam=block|classifier|both" in warning
