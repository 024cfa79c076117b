"""The reliability guarantees of the README's "Reliability" section, one or more tests each: exact resumption
after SIGKILL, step checkpoints, atomic checkpoint files, SIGTERM preemption (and Lightning's SLURM requeue),
divergence, data integrity (bad images, concurrent and damaged caches) and the cluster launchers.

Training runs are train.py subprocesses on a tiny image folder with the device loader (whose data order and
augmentation come from the seed and the epoch), one CPU thread each.
"""

from __future__ import annotations

import fractions
import multiprocessing
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NO_FIGURES, TINY_RUN, load_checkpoint, run_train, subprocess_env, write_random_pngs
from PIL import Image

import cbam.data.sources as data
from cbam.callbacks.last_checkpoint import SIGINT_EXIT_STATUS
from cbam.errors import STALLED_EXIT_STATUS, ConfigError
from cbam.runtime.atomic import _UMASK
from cbam.runtime.checkpoints import PARTIAL_PREFIX, PARTIAL_SUFFIX, AtomicCheckpointIO, check_checkpoint
from cbam.training.lightning_module import CBAMResNetModule

#: 10 classes x 10 train images - 20 for validation = 80 images = 10 batches of 8 per epoch; 2 epochs
STEPS_PER_EPOCH, EPOCHS = 10, 2
EVERY_N_STEPS = 4
TINY = [
    *TINY_RUN,
    *NO_FIGURES,
    f"trainer.max_epochs={EPOCHS}",
    f"callbacks.last_checkpoint.every_n_train_steps={EVERY_N_STEPS}",
]
SIGNALS = "+callbacks.signals._target_=reliability_signals.SignalAtSteps"


def write_images(root: Path, train_per_class: int = 10, test_per_class: int = 2, seed: int = 0) -> Path:
    """train/<class>/*.png and test/<class>/*.png: random 32x32 RGB images, 10 classes."""
    return write_random_pngs(
        root, train_per_class, test_per_class, [f"class{label}" for label in range(10)], seed
    )


def train(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python train.py <overrides>`` from the repository root, one CPU thread, output captured."""
    return run_train(list(overrides), env=env)


def show(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-4000:]}"


def max_weight_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two checkpoints' state_dict tensors (same keys)."""
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differences = [0.0]
    for key, tensor in a["state_dict"].items():
        if tensor.numel():
            differences.append((tensor.double() - b["state_dict"][key].double()).abs().max().item())
    return max(differences)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The run's last stderr line, after checking that it failed without a traceback."""
    assert result.returncode not in (0, None), show(result)
    assert "Traceback" not in result.stderr, show(result)
    return result.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ the train.py runs, two at a time


def bad_last_checkpoint_dir(base: Path) -> Path:
    """A run dir whose checkpoints/last.ckpt is a truncated checkpoint."""
    last = base / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(5000)}, "global_step": 5}, last)
    last.write_bytes(last.read_bytes()[:3000])
    return base


def bad_image_data(base: Path) -> tuple[Path, Path]:
    """A tiny image folder with one undecodable .jpg."""
    root = write_images(base, train_per_class=3, test_per_class=1)
    bad = root / "train" / "class3" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" + os.urandom(64))
    return root, bad


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every train.py subprocess of this module, run in two lanes side by side (each is single-threaded),
    finished before the tests look at them (and before any test forks).

    Lane 1, the interrupted run B, four processes sharing one run dir: B1 is SIGKILLed at step 6 (last.ckpt:
    the step-4 checkpoint, mid-epoch); B2 resumes with ckpt_path=last and is SIGKILLed at step 11 (last.ckpt:
    the end of epoch 0, step 10); B3 resumes under a fake SLURM environment, gets SIGUSR1 (Lightning's
    requeue signal) at step 12 and SIGTERM at step 13; B4 resumes from the SIGTERM checkpoint and finishes.
    Lane 2: run A, the same 2 epochs uninterrupted; a two-job sweep with hydra/launcher=submitit_local
    (cluster=local). (Runs that need no process of their own run in the test's process: train_in_process.)
    """
    base = tmp_path_factory.mktemp("reliability")
    data_root = write_images(base / "data")
    common = [f"data.root={data_root}", *TINY]
    record = base / "started_at.txt"
    out: dict = {"base": base, "a_dir": base / "A", "b_dir": base / "B", "sweep": base / "sweep"}
    last = out["b_dir"] / "checkpoints" / "last.ckpt"

    def b_run(signals: dict[int, str], *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        steps, names = ",".join(map(str, signals)), ",".join(signals.values())
        overrides = [*common, f"hydra.run.dir={out['b_dir']}", SIGNALS, f"+callbacks.signals.record={record}"]
        overrides += [f"+callbacks.signals.steps=[{steps}]", f"+callbacks.signals.signals=[{names}]", *extra]
        return train(*overrides, env=env)

    def last_step() -> int | None:
        return load_checkpoint(last)["global_step"] if last.is_file() else None

    def lane_1() -> None:
        out["b"], out["b_steps"] = [b_run({6: "SIGKILL"})], [last_step()]
        out["b"].append(b_run({11: "SIGKILL"}, "ckpt_path=last"))
        out["b_steps"].append(last_step())
        slurm = subprocess_env(
            SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
            SLURM_JOB_ID="4242", SLURM_JOB_NAME="train",
        )  # fmt: skip
        out["b"].append(b_run({12: "SIGUSR1", 13: "SIGTERM"}, "ckpt_path=last", env=slurm))
        out["b_steps"].append(last_step())
        out["b"].append(b_run({}, "ckpt_path=last"))
        out["b_started"] = [int(line) for line in record.read_text().split()] if record.is_file() else []

    def lane_2() -> None:
        out["a"] = train(*common, f"hydra.run.dir={out['a_dir']}")
        sweep = [*common, "trainer.max_epochs=1", f"hydra.sweep.dir={out['sweep']}"]
        out["sweep_run"] = train("-m", "cluster=local", "seed=0,1", *sweep)

    with ThreadPoolExecutor(2) as pool:
        for lane in [pool.submit(lane_1), pool.submit(lane_2)]:
            lane.result()
    return out


# ----------------------------------------------------------------------------- resumption, SIGTERM


@pytest.fixture(scope="module")
def workers_runs(tmp_path_factory) -> dict:
    """Runs A and B again with the workers loader and one worker process, side by side: B1 is SIGKILLed at
    step 6 (last.ckpt: step 4, mid-epoch, with the worker ahead of the training loop), B2 resumes with
    ckpt_path=last and finishes."""
    base = tmp_path_factory.mktemp("reliability_workers")
    tiny = [o for o in TINY if not o.startswith(("data.loader=", "data.num_workers="))]
    common = [f"data.root={write_images(base / 'data')}", *tiny, "data.loader=workers", "data.num_workers=1"]
    record, out = base / "started_at.txt", {"a_dir": base / "A", "b_dir": base / "B"}
    b_run = [*common, f"hydra.run.dir={out['b_dir']}", SIGNALS, f"+callbacks.signals.record={record}"]

    def lane_b() -> None:
        out["b"] = [train(*b_run, "+callbacks.signals.steps=[6]", "+callbacks.signals.signals=[SIGKILL]")]
        no_signals = ["+callbacks.signals.steps=[]", "+callbacks.signals.signals=[]"]
        out["b"].append(train(*b_run, *no_signals, "ckpt_path=last"))
        out["b_started"] = [int(line) for line in record.read_text().split()] if record.is_file() else []

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(train, *common, f"hydra.run.dir={out['a_dir']}"), pool.submit(lane_b)
        out["a"] = a.result()
        b.result()
    return out


@pytest.mark.parametrize(
    "loader_runs, killed, started", [("runs", 2, [0, 4, 10, 13]), ("workers_runs", 1, [0, 4])]
)  # fmt: skip
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(request, loader_runs, killed, started):
    runs = request.getfixturevalue(loader_runs)
    a, b = runs["a"], runs["b"]
    assert a.returncode == 0, show(a)
    assert [r.returncode for r in b[:killed]] == [-signal.SIGKILL] * killed, [show(r) for r in b[:killed]]
    assert all(run.returncode == 0 for run in b[killed:]), [show(run) for run in b[killed:]]
    # each restart resumed from the checkpoint (a restart from scratch would end the same way too)
    assert runs["b_started"] == started
    uninterrupted = load_checkpoint(runs["a_dir"] / "checkpoints" / "last.ckpt")
    resumed = load_checkpoint(runs["b_dir"] / "checkpoints" / "last.ckpt")
    assert uninterrupted["global_step"] == resumed["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert uninterrupted["epoch"] == resumed["epoch"] == EPOCHS - 1
    assert max_weight_difference(uninterrupted, resumed) <= 1e-6


def test_step_checkpoints_lose_at_most_n_steps(runs):
    # SIGKILL at step 6 with a checkpoint every 4 steps: last.ckpt holds step 4, mid-epoch
    b1_step, b2_step, _ = runs["b_steps"]
    assert b1_step == 4 and 6 - b1_step <= EVERY_N_STEPS
    # SIGKILL at step 11: last.ckpt is the end of epoch 0 (step 10, written after its validation)
    assert b2_step == STEPS_PER_EPOCH


def test_sigterm_saves_last_checkpoint_and_exits_cleanly(runs):
    b3 = runs["b"][2]
    assert b3.returncode == 0, show(b3)
    assert "Traceback" not in b3.stderr
    last = runs["b_dir"] / "checkpoints" / "last.ckpt"
    assert f"SIGTERM: saved {last} at step 13" in b3.stderr, show(b3)
    assert runs["b_steps"][2] == 13
    # its resumption is exact: B4 resumed from it (test_killed_and_resumed_run_ends_like_an_uninterrupted_one)


def test_slurm_requeue_signal_saves_hpc_checkpoint(runs):
    # Lightning's SLURM auto-requeue: SIGUSR1 saves hpc_ckpt_1.ckpt in the run dir and calls scontrol requeue
    # (absent here: the attempt is logged), without disturbing the run
    b3 = runs["b"][2]
    output = b3.stdout + b3.stderr
    assert "SLURM auto-requeueing enabled" in output and "requeing job 4242" in output, show(b3)
    hpc = runs["b_dir"] / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() and load_checkpoint(hpc)["global_step"] == 12


def failed_in_process(train_in_process, run_dir: Path, data_root: Path, *overrides: str) -> tuple[int, str]:
    """train.py's run on ``data_root`` with ``TINY`` settings and ``overrides``, in this process (the
    ``train_in_process`` fixture), expected to fail without a traceback: (exit status, last stderr line)."""
    status, stderr, _ = train_in_process(run_dir, f"data.root={data_root}", *TINY, *overrides)
    assert status not in (0, None) and "Traceback" not in stderr, (status, stderr[-3000:])
    return status, stderr.strip().splitlines()[-1]


def test_corrupt_last_checkpoint_with_ckpt_path_last_is_one_error_line(runs, train_in_process, tmp_path):
    run_dir = bad_last_checkpoint_dir(tmp_path / "bad_last")
    last = run_dir / "checkpoints" / "last.ckpt"
    status, line = failed_in_process(train_in_process, run_dir, runs["base"] / "data", "ckpt_path=last")
    assert status == 2, line
    assert line.startswith("error: ckpt_path=") and str(last) in line and "ckpt_path=last" in line, line


def test_divergence_stops_with_one_line_naming_step_and_last_good_checkpoint(
    runs, train_in_process, tmp_path
):
    run_dir = tmp_path / "diverged"
    status, line = failed_in_process(
        train_in_process, run_dir, runs["base"] / "data", "optim.lr=1e12",
        "callbacks.last_checkpoint.every_n_train_steps=1",
    )  # fmt: skip
    assert status == 3, line
    pattern = r"error: training diverged: non-finite (loss|weights) at step (\d+); last good checkpoint: (.+)"
    match = re.fullmatch(pattern, line)
    assert match, line
    step, named = int(match[2]), match[3]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert named == str(last)
    # last.ckpt is the last good state: saved before the divergence, every tensor finite
    good = load_checkpoint(last)
    assert 1 <= good["global_step"] <= step
    assert all(torch.isfinite(t).all() for t in good["state_dict"].values() if t.is_floating_point())


def test_a_step_that_never_ends_stops_the_run_with_one_line_naming_it(runs, train_in_process, tmp_path, monkeypatch):
    import fault_callbacks

    import cbam.callbacks.stall_watchdog as watchdog

    ended = []  # in this process the watchdog's os._exit is replaced by a recorder that lets the step go on

    def record(status: int) -> None:
        ended.append(status)
        fault_callbacks.hang_released.set()

    monkeypatch.setattr(watchdog, "end_process", record)
    fault_callbacks.hang_released.clear()
    run_dir = tmp_path / "stuck"
    status, stderr, _ = train_in_process(
        run_dir, f"data.root={runs['base'] / 'data'}", *TINY, "trainer.max_epochs=1", "test=false",
        "+callbacks.hang._target_=fault_callbacks.HangAtStep", "+callbacks.hang.step=5",
        "callbacks.stall_watchdog.timeout_s=1",
    )  # fmt: skip
    assert ended == [STALLED_EXIT_STATUS], stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    pattern = (
        r"error: the run is stuck: training step 6 \(epoch 0\) has not ended after \d+ s "
        rf"\(callbacks.stall_watchdog.timeout_s=1\); last good checkpoint: {re.escape(str(last))} \(step 4\)"
    )
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.fullmatch(pattern, errors[0][errors[0].index("error:") :]), errors


def test_undecodable_image_is_one_error_line_naming_it(train_in_process, tmp_path):
    data_root, bad = bad_image_data(tmp_path / "bad_image_data")
    status, line = failed_in_process(train_in_process, tmp_path / "bad_image", data_root)
    assert status == 2, line
    assert line.startswith("error: cannot decode image") and str(bad) in line, line


def test_submitit_local_two_job_sweep(runs):
    result, sweep = runs["sweep_run"], runs["sweep"]
    assert result.returncode == 0, show(result)
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr, show(result)
    for job in ("0", "1"):
        assert load_checkpoint(sweep / job / "checkpoints" / "last.ckpt")["global_step"] == STEPS_PER_EPOCH
        assert f"seed={job}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2


# ------------------------------------------------------------------- Ctrl-C; SIGTERM to one DDP rank

#: ddp_sim: each of the 2 ranks takes 40 of the 80 training images: 5 steps of 8 per epoch
DDP_STEPS_PER_EPOCH = STEPS_PER_EPOCH // 2


@pytest.fixture(scope="module")
def stop_runs(tmp_path_factory) -> dict:
    """Lane 1: a 2-process ddp_sim run whose rank 1 alone gets SIGTERM after step 3, then its resumption
    (ckpt_path=last). Lane 2: the same ddp_sim run uninterrupted (and tested), then a single process that
    gets SIGINT (Ctrl-C) after step 3. trainer.log_every_n_steps=1: the ranks agree on a stop after every
    step."""
    base = tmp_path_factory.mktemp("stops")
    common = [f"data.root={write_images(base / 'data')}", *TINY, "trainer.log_every_n_steps=1"]
    ddp = [*common, "trainer=ddp_sim", "test=false"]
    out: dict = {"ddp_a": base / "ddp_a", "ddp_b": base / "ddp_b", "sigint": base / "sigint"}

    def lane_1() -> None:
        stop = [
            SIGNALS,
            "+callbacks.signals.steps=[3]",
            "+callbacks.signals.signals=[SIGTERM]",
            "+callbacks.signals.rank=1",
        ]
        out["ddp_stopped"] = train(*ddp, f"hydra.run.dir={out['ddp_b']}", *stop)
        out["ddp_stopped_step"] = load_checkpoint(out["ddp_b"] / "checkpoints" / "last.ckpt")["global_step"]
        out["ddp_stopped_files"] = sorted(path.name for path in (out["ddp_b"] / "checkpoints").iterdir())
        out["ddp_resumed"] = train(*ddp, f"hydra.run.dir={out['ddp_b']}", "ckpt_path=last")

    def lane_2() -> None:
        out["ddp_uninterrupted"] = train(*common, "trainer=ddp_sim", f"hydra.run.dir={out['ddp_a']}")
        stop = [SIGNALS, "+callbacks.signals.steps=[3]", "+callbacks.signals.signals=[SIGINT]"]
        out["sigint_run"] = train(*common, "test=false", f"hydra.run.dir={out['sigint']}", *stop)

    with ThreadPoolExecutor(2) as pool:
        for lane in [pool.submit(lane_1), pool.submit(lane_2)]:
            lane.result()
    return out


def test_sigterm_to_one_ddp_rank_stops_both_after_the_same_batch_and_resumes_exactly(stop_runs):
    stopped, resumed, whole = (
        stop_runs["ddp_stopped"],
        stop_runs["ddp_resumed"],
        stop_runs["ddp_uninterrupted"],
    )
    for result in (stopped, resumed, whole):
        assert result.returncode == 0, show(result)
    last = stop_runs["ddp_b"] / "checkpoints" / "last.ckpt"
    # one message (rank 0 speaks for both), one checkpoint, of the batch after which rank 1 got the signal
    assert stopped.stderr.count("SIGTERM: saved") == 1, show(stopped)
    assert f"SIGTERM: saved {last} at step 3" in stopped.stderr, show(stopped)
    assert stop_runs["ddp_stopped_step"] == 3
    assert stop_runs["ddp_stopped_files"] == ["last.ckpt"]
    assert f"Restoring states from the checkpoint path at {last}" in resumed.stdout + resumed.stderr
    uninterrupted = load_checkpoint(stop_runs["ddp_a"] / "checkpoints" / "last.ckpt")
    final = load_checkpoint(last)
    # each rank trained on its own half of the images, and both tested at the end
    assert uninterrupted["global_step"] == final["global_step"] == EPOCHS * DDP_STEPS_PER_EPOCH
    assert "test/acc" in whole.stdout
    assert max_weight_difference(uninterrupted, final) <= 1e-6


def test_ctrl_c_saves_last_checkpoint_and_exits_with_status_130(stop_runs):
    result = stop_runs["sigint_run"]
    assert result.returncode == SIGINT_EXIT_STATUS == 130, show(result)
    assert "Traceback" not in result.stderr, show(result)
    last = stop_runs["sigint"] / "checkpoints" / "last.ckpt"
    assert f"SIGINT: saved {last} at step 3" in result.stderr, show(result)
    assert load_checkpoint(last)["global_step"] == 3


# ------------------------------------------------------------------------------- atomic checkpoints


def _killed_mid_save(path: Path) -> None:
    """In a child process: start saving a new checkpoint and die by SIGKILL halfway through the write."""

    def half_then_kill(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04" + b"\0" * 5000)
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = half_then_kill
    AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)


def test_kill_during_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(1000)}}, last)
    before = last.read_bytes()

    child = multiprocessing.get_context("fork").Process(target=_killed_mid_save, args=(last,))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert last.read_bytes() == before
    check_checkpoint(last)
    assert load_checkpoint(last)["global_step"] == 1
    # the killed save's temporary file is left, named so that ckpt_path=last (newest last*.ckpt) skips it
    leftovers = list(last.parent.glob(f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}"))
    assert len(leftovers) == 1 and "last" not in leftovers[0].name

    # an exception in the middle of a save: the same, and its temporary file is removed
    real_save = torch.save

    def half_then_raise(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_then_raise)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 3}, last)
    assert last.read_bytes() == before
    monkeypatch.setattr(torch, "save", real_save)

    # the next save replaces the file and sweeps the leftover away
    io.save_checkpoint({"global_step": 4, "w": torch.ones(3)}, last)
    assert load_checkpoint(last)["global_step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert oct(last.stat().st_mode & 0o777) == oct(0o666 & ~_UMASK)


def test_unreadable_checkpoints_are_reported_naming_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2000)}, "global_step": 5}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(3000))
    unsafe = tmp_path / "unsafe.ckpt"  # intact, but unpickling it would run code (Fraction's constructor)
    torch.save({"state_dict": {"w": torch.ones(3)}, "extra": fractions.Fraction(1, 3)}, unsafe)
    missing = tmp_path / "missing.ckpt"
    problems = {
        missing: "no such file",
        truncated: "is truncated or corrupt",
        garbage: "is not a PyTorch checkpoint",
        unsafe: "holds objects that need arbitrary code to unpickle (fractions.Fraction): refused for safety",
    }
    for bad, problem in problems.items():
        with pytest.raises(
            ConfigError, match=re.escape(f"ckpt_path={bad} {problem}".replace(" no such", ": no such"))
        ):
            check_checkpoint(bad)
        with pytest.raises(ConfigError, match=re.escape(f"{bad}")):
            AtomicCheckpointIO().load_checkpoint(bad)
        # the Python loader of the model says the same, naming its own argument
        with pytest.raises(ConfigError, match=re.escape(f"checkpoint_path={bad}")):
            CBAMResNetModule.load_from_checkpoint(bad)
    assert AtomicCheckpointIO().load_checkpoint(good)["global_step"] == 5


def _load_concurrently(root: str, barrier, results) -> None:
    torch.set_num_threads(1)
    barrier.wait()
    arrays = data.load_cifar10(root, download=False)
    results.put(data._checksum(arrays))


def test_concurrent_jobs_build_one_valid_cache(tmp_path, monkeypatch):
    root = write_images(tmp_path / "data", train_per_class=4, test_per_class=1)
    context = multiprocessing.get_context("fork")
    decodes = context.Value("i", 0)
    read = data.CIFARSource.read

    def slow_counting_read(source, folder):
        with decodes.get_lock():
            decodes.value += 1
        time.sleep(0.3)  # a wide window for the other jobs to find no cache
        return read(source, folder)

    monkeypatch.setattr(data.CIFARSource, "read", slow_counting_read)
    barrier, results = context.Barrier(4), context.Queue()
    jobs = [context.Process(target=_load_concurrently, args=(str(root), barrier, results)) for _ in range(4)]
    for job in jobs:
        job.start()
    checksums = [results.get(timeout=120) for _ in jobs]
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0] * 4
    assert len(set(checksums)) == 1
    assert decodes.value == 1  # one job decoded the images; the others waited on the lock and read its cache
    cache = root / data.CIFAR10.cache_name
    files = sorted(p.name for p in root.iterdir() if p.is_file())
    assert files == [cache.name, cache.name + ".lock"]  # no temporary file left
    fresh = read(data.CIFAR10, root)
    assert data._read_cache(cache, data.CIFAR10.fingerprint(root)) is not None
    assert data._checksum(fresh) == checksums[0]


def test_stale_or_damaged_cache_is_rebuilt(tmp_path):
    root = write_images(tmp_path / "data", train_per_class=2, test_per_class=1)
    cache = root / data.CIFAR10.cache_name
    first = data.load_cifar10(root, download=False)
    assert cache.is_file()

    # stale: a source image changed after the cache was built
    changed = root / "train" / "class0" / "000.png"
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt = data.load_cifar10(root, download=False)
    assert (rebuilt.train_images == 7).flatten(1).all(1).sum() == 1  # the changed image, wherever it is
    assert not torch.equal(rebuilt.train_images, first.train_images)
    expected = data._checksum(rebuilt)

    # damaged: garbage bytes, truncated, arrays altered behind the checksum's back
    good_bytes = cache.read_bytes()
    payload = torch.load(cache, weights_only=True)
    payload["arrays"]["train_labels"] = payload["arrays"]["train_labels"].flip(0)
    damages = {
        "garbage": lambda: cache.write_bytes(os.urandom(len(good_bytes))),
        "truncated": lambda: cache.write_bytes(good_bytes[: len(good_bytes) // 2]),
        "tampered": lambda: torch.save(payload, cache),
    }
    for name, damage in damages.items():
        damage()
        arrays = data.load_cifar10(root, download=False)
        assert data._checksum(arrays) == expected, name
        assert data._read_cache(cache, data.CIFAR10.fingerprint(root)) is not None, name


# ------------------------------------------------------------------------------------------ clusters


def test_slurm_cluster_config_wires_trainer_to_the_allocation(compose_config):
    overrides = ["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.partition=gpu"]
    cfg = compose_config(*overrides, hydra=True)
    launcher, trainer = cfg.hydra.launcher, cfg.trainer
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min == cfg.cluster.timeout_min
    assert launcher.max_num_timeout == cfg.cluster.max_requeues > 0
    assert (trainer.num_nodes, trainer.devices) == (2, 4)
    assert trainer.strategy._target_ == "cbam.runtime.distributed.WatchedDDPStrategy"
    assert cfg.ckpt_path == "last"  # a requeued job resumes from its own last.ckpt
