"""train.py end to end, as subprocesses on a tiny image folder: fit + test, composition, multirun, resume,
two-process DDP on CPU, and bad input reported as one line naming the key."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from cbam import CBAM
from cbam.module import CBAMResNetModule
from helpers import REPO, load_checkpoint, run_train


#: settings every run here shares: a narrow network, small batches, one epoch, no download, no workers
TINY = {
    "model.width": 4,
    "model.reduction_ratio": 4,  # width 4: a block CBAM sees 4 channels, too few for the default 16
    "data.batch_size": 16,
    "data.num_workers": 0,
    "data.val_size": 40,
    "data.download": "false",
    "trainer.max_epochs": 1,
}
#: 10 classes x 20 train images - 40 for validation = 160 images = 10 batches of 16 per epoch
STEPS_PER_EPOCH = 10


def train_py(*args: str, root: Path | None = None, tiny: bool = True, timeout: float = 240, **overrides):
    """Run ``python train.py`` from the repository root and return the completed process.

    ``args`` are passed as they are (``-m``, ``--cfg job``, ``trainer=ddp_sim``, ...); ``overrides`` are
    ``key=value`` pairs written with ``__`` for ``.`` (``model__depth=20``) and win over ``TINY``.
    """
    settings = {**TINY, "data.root": root} if tiny else {}
    settings.update({key.replace("__", "."): value for key, value in overrides.items()})
    return run_train([*args, *(f"{key}={value}" for key, value in settings.items())], timeout=timeout)


def succeeded(result: subprocess.CompletedProcess) -> bool:
    """True for exit status 0; prints the output (shown by pytest on failure) otherwise."""
    if result.returncode != 0:
        print("STDOUT:\n", result.stdout[-5000:], "\nSTDERR:\n", result.stderr[-5000:])
    return result.returncode == 0


def job_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def run(tiny_cifar_folder):
    """``run(*args, **overrides)``: :func:`train_py` on the tiny CIFAR-10 folder."""

    def run(*args, **overrides):
        return train_py(*args, root=tiny_cifar_folder, **overrides)

    return run


@pytest.fixture(scope="module")
def first_run(run, tmp_path_factory) -> Path:
    """One epoch of fit + test; its run dir (used by several tests, which copy what they change)."""
    run_dir = tmp_path_factory.mktemp("first_run")
    result = run(hydra__run__dir=run_dir)
    assert succeeded(result)
    assert "test/acc" in result.stdout  # Lightning's table of test metrics
    return run_dir


# --------------------------------------------------------------------------------------- fit and test


def test_fit_and_test_write_config_logs_checkpoints_and_report(first_run):
    config = job_config(first_run)
    assert config["model"]["width"] == 4 and config["data"]["val_size"] == 40
    tensorboard = first_run / "tensorboard"
    assert list(tensorboard.rglob("events.out.tfevents.*"))
    assert list(tensorboard.rglob("hparams.yaml"))
    checkpoints = first_run / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert len(list(checkpoints.glob("best-*.ckpt"))) == 1
    last = load_checkpoint(checkpoints / "last.ckpt")
    assert last["global_step"] == STEPS_PER_EPOCH and last["epoch"] == 0
    assert last["hyper_parameters"]["width"] == 4


def test_design_card_command_composes():
    outputs = REPO / "outputs" / "cbam-resnet50"
    before = sorted(outputs.iterdir()) if outputs.is_dir() else []
    result = train_py("--cfg", "job", "--resolve", "model.depth=50", "model.use_cbam_block=true", tiny=False)
    assert succeeded(result)
    config = yaml.safe_load(result.stdout)
    assert config["model"]["depth"] == 50
    assert config["model"]["use_cbam_block"] is True and config["model"]["use_cbam_class"] is False
    assert config["model"]["_target_"] == "cbam.module.CBAMResNetModule"
    assert config["name"] == "cbam-resnet50"
    # --cfg job only prints the composed config: no run dir, nothing trained
    assert (sorted(outputs.iterdir()) if outputs.is_dir() else []) == before


def test_multirun_sweeps_two_by_two(run, tmp_path):
    result = run(
        "-m", model__use_cbam_block="false,true", seed="0,1", hydra__sweep__dir=tmp_path, test="false"
    )
    assert succeeded(result)
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    combinations = set()
    for job in jobs:
        config = job_config(job)
        checkpoint = load_checkpoint(job / "checkpoints" / "last.ckpt")
        assert checkpoint["hyper_parameters"]["use_cbam_block"] == config["model"]["use_cbam_block"]
        model = CBAMResNetModule.load_from_checkpoint(job / "checkpoints" / "last.ckpt", map_location="cpu")
        expected = 8 if config["model"]["use_cbam_block"] else 0
        assert sum(isinstance(m, CBAM) for m in model.modules()) == expected
        combinations.add((config["model"]["use_cbam_block"], config["seed"]))
    assert combinations == {(False, 0), (False, 1), (True, 0), (True, 1)}


# ------------------------------------------------------------------------------------------------ resume


def test_resume_from_last_in_the_same_run_dir(run, first_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(first_run, run_dir)
    first = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    result = run(hydra__run__dir=run_dir, ckpt_path="last", trainer__max_epochs=2, test="false")
    assert succeeded(result)
    # A run from scratch would also end at step 20: the resumed one must have started from the checkpoint.
    assert f"Restoring states from the checkpoint path at {run_dir / 'checkpoints' / 'last.ckpt'}" in result.stdout + result.stderr
    final = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 2 * first["global_step"] == 2 * STEPS_PER_EPOCH
    assert final["epoch"] == 1


def test_resume_from_a_checkpoint_file(run, first_run, tmp_path):
    source = first_run / "checkpoints" / "last.ckpt"
    before = source.read_bytes()
    run_dir = tmp_path / "resumed"
    result = run(hydra__run__dir=run_dir, ckpt_path=source, trainer__max_epochs=2, test="false")
    assert succeeded(result)
    assert f"Restoring states from the checkpoint path at {source}" in result.stdout + result.stderr
    final = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 2 * STEPS_PER_EPOCH and final["epoch"] == 1
    assert source.read_bytes() == before


# ---------------------------------------------------------------------------------------------------- DDP


def test_ddp_sim_with_two_cpu_processes(run, tmp_path):
    result = run("trainer=ddp_sim", hydra__run__dir=tmp_path)
    assert succeeded(result)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    # each of the two ranks trains on its own half of the 160 images: 5 steps of 16 images
    assert checkpoint["global_step"] == STEPS_PER_EPOCH // 2
    assert "test/acc" in result.stdout


# ---------------------------------------------------------------------------------------------- bad input


def write_random_bytes(folder: Path) -> Path:
    path = folder / "random.ckpt"
    path.write_bytes(os.urandom(4096))
    return path


def write_truncated_checkpoint(folder: Path, first_run: Path) -> Path:
    path = folder / "truncated.ckpt"
    content = (first_run / "checkpoints" / "last.ckpt").read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


#: id -> (overrides, the key the error line must name); callables build files in a scratch folder
BAD_INPUT = {
    "depth": ({"model.depth": 20}, "model.depth"),
    "even_kernel": ({"model.kernel_size": 4, "model.use_cbam_block": "true"}, "model.kernel_size"),
    "zero_kernel": ({"model.kernel_size": 0, "model.use_cbam_block": "true"}, "model.kernel_size"),
    "zero_ratio": ({"model.reduction_ratio": 0, "model.use_cbam_block": "true"}, "model.reduction_ratio"),
    # width 4: the first stage's blocks have 4 channels, so a reduction ratio of 5 leaves no hidden unit
    "large_ratio": ({"model.reduction_ratio": 5, "model.use_cbam_block": "true"}, "model.reduction_ratio"),
    "batch_size": ({"data.batch_size": 0}, "data.batch_size"),
    "batch_size_text": ({"data.batch_size": "abc"}, "data.batch_size"),
    "cbam_flag_text": ({"model.use_cbam_block": "maybe"}, "model.use_cbam_block"),
    "even_kernel_without_cbam": ({"model.kernel_size": 2}, "model.kernel_size"),
    "missing_root": ({"data.root": lambda folder, _: folder / "no" / "such" / "dir"}, "data.root"),
    "missing_ckpt": ({"ckpt_path": lambda folder, _: folder / "missing.ckpt"}, "ckpt_path"),
    "random_ckpt": ({"ckpt_path": lambda folder, _: write_random_bytes(folder)}, "ckpt_path"),
    "truncated_ckpt": ({"ckpt_path": write_truncated_checkpoint}, "ckpt_path"),
}


@pytest.fixture(scope="module")
def bad_runs(tiny_cifar_folder, first_run, tmp_path_factory):
    """All bad-input runs, two at a time (each is mostly Python start-up): name -> (result, run dir,
    {checkpoint file given: its bytes before the run})."""
    cases = {}
    for name, (overrides, _) in BAD_INPUT.items():
        folder = tmp_path_factory.mktemp(f"bad_{name}")
        built = {
            key: value(folder, first_run) if callable(value) else value for key, value in overrides.items()
        }
        given = [path for path in built.values() if isinstance(path, Path) and path.is_file()]
        files = {path: path.read_bytes() for path in given}
        run_dir = folder / "run"
        args = {key.replace(".", "__"): value for key, value in built.items()}
        cases[name] = (run_dir, files, args)
    # and a key the model config does not have, which Hydra itself rejects
    cases["unknown_key"] = (tmp_path_factory.mktemp("bad_unknown_key") / "run", {}, {"model__nonsense": 1})
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(train_py, root=tiny_cifar_folder, hydra__run__dir=run_dir, **args)
            for name, (run_dir, _, args) in cases.items()
        }
        return {name: (futures[name].result(), *cases[name][:2]) for name in cases}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_clear_line(bad_runs, case):
    result, run_dir, files = bad_runs[case]
    key = BAD_INPUT[case][1]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert key + "=" in lines[0], lines[0]
    assert not (run_dir / "checkpoints").exists()  # nothing trained
    for path, content in files.items():
        assert path.read_bytes() == content, f"{path} was modified"


def test_unknown_key_keeps_hydras_error(bad_runs):
    result, run_dir, _ = bad_runs["unknown_key"]
    assert result.returncode != 0
    assert "Could not override 'model.nonsense'" in result.stderr
    assert "error: " not in result.stderr  # Hydra's message, not one of train.py's
    assert not (run_dir / "checkpoints").exists()
