"""train.py end to end, as subprocesses on a tiny image folder: fit + test, multirun, resume, extending a
run, an Optuna search resumed from its SQLite storage, and bad input reported as
one line naming the key (in-process where no exit status through Hydra is needed)."""

from __future__ import annotations

import fractions
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_checkpoint, run_train
from hydra.utils import instantiate

from cbam.errors import ConfigError
from cbam.training.run import build_model, load_weights

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


def train_py(
    *args: str, root: Path | None = None, tiny: bool = True, timeout: float = 240, fresh: bool = False,
    **overrides,
):  # fmt: skip
    """Run ``python train.py`` from the repository root and return the completed process.

    ``args`` are passed as they are (``-m``, ``--cfg job``, ``trainer=ddp_sim``, ...); ``overrides`` are
    ``key=value`` pairs written with ``__`` for ``.`` (``model__depth=20``) and win over ``TINY``.
    ``fresh``: in an interpreter of its own (helpers.run_python).
    """
    settings = {**TINY, "data.root": root} if tiny else {}
    settings.update({key.replace("__", "."): value for key, value in overrides.items()})
    arguments = [*args, *(f"{key}={value}" for key, value in settings.items())]
    return run_train(arguments, timeout=timeout, fresh=fresh)


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

    def run(*args, fresh: bool = False, **overrides):
        return train_py(*args, root=tiny_cifar_folder, fresh=fresh, **overrides)

    return run


@pytest.fixture(scope="module")
def first_run(run, tmp_path_factory) -> Path:
    """Two epochs of fit + test, keeping checkpoints/epoch000.ckpt; its run dir (used by several tests,
    which copy what they change). In a fresh interpreter, as a user runs it: the one run that would see
    train.py's imports fail on their own (the other runs are forked from one that has imported them)."""
    run_dir = tmp_path_factory.mktemp("first_run")
    result = run(
        hydra__run__dir=run_dir,
        trainer__max_epochs=2,
        callbacks__periodic_checkpoint__every_n_epochs=1,
        fresh=True,
    )
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
    assert (checkpoints / "last.ckpt").is_file() and (checkpoints / "epoch000.ckpt").is_file()
    assert len(list(checkpoints.glob("best-*.ckpt"))) == 1
    last = load_checkpoint(checkpoints / "last.ckpt")
    assert last["global_step"] == 2 * STEPS_PER_EPOCH and last["epoch"] == 1
    assert last["hyper_parameters"]["net"]["width"] == 4


def test_design_card_command_composes(compose_config):
    config = compose_config("model.depth=50", "model.use_cbam_block=true")
    assert config.model.depth == 50
    assert config.model.use_cbam_block is True and config.model.use_cbam_class is False
    assert config.model._target_ == "cbam.training.lightning_module.CBAMResNetModule"
    assert config.name == "cbam-resnet50"
    # the defaults of the optimizer and the schedule come from conf/ alone
    assert config.optim._target_ == "torch.optim.SGD" and config.scheduler._target_.endswith("warmup_cosine")


def test_experiment_files_state_only_what_differs(compose_config):
    default = compose_config()
    paper = compose_config("experiment=paper")
    # paper is the default recipe under another name: it must not restate (and silently pin) sgd.yaml
    assert paper.optim == default.optim and paper.scheduler == default.scheduler
    assert paper.data.val_size == default.data.val_size and paper.trainer.max_epochs == 200


# ------------------------------------------------------------------------------------------------ resume


def in_process(train_in_process, run_dir: Path, **overrides) -> tuple[int, str, list[str]]:
    """:func:`train_py`'s run (on the tiny folder, ``TINY`` settings), in this process."""
    settings = {**TINY, **{key.replace("__", "."): value for key, value in overrides.items()}}
    return train_in_process(run_dir, *(f"{key}={value}" for key, value in settings.items()))


def test_resume_from_last_in_the_same_run_dir(train_in_process, tiny_cifar_folder, first_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(first_run, run_dir)
    # as if the run had been stopped after its first epoch
    shutil.copy(run_dir / "checkpoints" / "epoch000.ckpt", run_dir / "checkpoints" / "last.ckpt")
    first = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    status, stderr, messages = in_process(
        train_in_process,
        run_dir,
        data__root=tiny_cifar_folder,
        ckpt_path="last",
        trainer__max_epochs=2,
        test="false",
    )
    assert status == 0, stderr
    # A run from scratch would also end at step 20: the resumed one must have started from the checkpoint.
    assert f"Restoring states from the checkpoint path at {run_dir / 'checkpoints' / 'last.ckpt'}" in messages
    final = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 2 * first["global_step"] == 2 * STEPS_PER_EPOCH
    assert final["epoch"] == 1


def test_resume_from_a_checkpoint_file(train_in_process, tiny_cifar_folder, first_run, tmp_path):
    source = first_run / "checkpoints" / "epoch000.ckpt"
    before = source.read_bytes()
    run_dir = tmp_path / "resumed"
    status, stderr, messages = in_process(
        train_in_process,
        run_dir,
        data__root=tiny_cifar_folder,
        ckpt_path=source,
        trainer__max_epochs=2,
        test="false",
    )
    assert status == 0, stderr
    assert f"Restoring states from the checkpoint path at {source}" in messages
    final = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 2 * STEPS_PER_EPOCH and final["epoch"] == 1
    assert source.read_bytes() == before


def refused_resume(train_in_process, run_dir: Path, source: Path, **overrides) -> str:
    """Resume from checkpoint ``source`` into ``run_dir`` with ``overrides``, a run that must be refused
    before any step: returns its one error line, once checked that it exits with status 2 without a
    traceback, leaves ``source`` as it was and trains nothing."""
    before = source.read_bytes()
    status, stderr, _ = in_process(train_in_process, run_dir, ckpt_path=source, test="false", **overrides)
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert source.read_bytes() == before
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()  # not one step trained
    return stderr.strip().splitlines()[-1]


def test_resuming_with_a_longer_schedule_is_refused_before_training(
    train_in_process, tiny_cifar_folder, first_run, tmp_path
):
    source = first_run / "checkpoints" / "epoch000.ckpt"
    line = refused_resume(
        train_in_process, tmp_path, source, data__root=tiny_cifar_folder, trainer__max_epochs=3
    )
    expected = (
        f"error: ckpt_path={source}: its learning-rate schedule spans 20 steps, this run's would span 30"
    )
    assert line.startswith(expected), line
    assert "weights_from=" in line  # the way to train longer


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        # label smoothing changes no weight: not named
        ({"model__width": 8, "model__label_smoothing": 0.1}, "model.width=8 (the checkpoint's: 4)"),
        ({"model__use_cbam_block": "true"}, "model.use_cbam_block=True (the checkpoint's: False)"),
    ],
    ids=["wider", "with_cbam"],
)
def test_resuming_into_a_model_of_other_shape_is_one_line_naming_the_changed_setting(
    train_in_process, tiny_cifar_folder, first_run, tmp_path, changed, named
):
    source = first_run / "checkpoints" / "epoch000.ckpt"
    line = refused_resume(
        train_in_process, tmp_path, source, data__root=tiny_cifar_folder, trainer__max_epochs=2, **changed
    )
    assert line.startswith(f"error: ckpt_path={source}: its weights do not fit this model.* config ("), line
    assert "loading state_dict" not in line  # the first mismatch itself, not torch's header
    assert line.endswith(f"resume with the settings the run had, not {named}"), line


def test_train_py_with_weights_from_trains_from_those_weights(
    train_in_process, tiny_cifar_folder, first_run, tmp_path
):
    source = first_run / "checkpoints" / "last.ckpt"
    # learning rate 0: the trained weights stay those it started from (BatchNorm statistics still move)
    status, stderr, _ = in_process(
        train_in_process,
        tmp_path,
        data__root=tiny_cifar_folder,
        weights_from=source,
        optim__lr=0.0,
        test="false",
    )
    assert status == 0, stderr
    started, final = load_checkpoint(source), load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert final["global_step"] == STEPS_PER_EPOCH and final["epoch"] == 0  # its own count and schedule
    weights = [key for key in final["state_dict"] if key.endswith(".weight")]
    assert weights and all(torch.equal(final["state_dict"][k], started["state_dict"][k]) for k in weights)


def build(*overrides: str, compose_config):
    cfg = compose_config(*overrides)
    return build_model(cfg, instantiate(cfg.data))  # CIFAR-10's 10 classes (data/ need not exist)


def test_weights_from_starts_a_new_run_from_a_checkpoints_weights(compose_config, first_run):
    path = first_run / "checkpoints" / "last.ckpt"
    model = build("model.width=4", "model.reduction_ratio=4", compose_config=compose_config)
    load_weights(model, str(path))
    saved = load_checkpoint(path)["state_dict"]
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in saved.items())
    wider = build("model.width=8", "model.reduction_ratio=4", compose_config=compose_config)
    with pytest.raises(ConfigError, match=re.escape(f"weights_from={path}: its weights do not fit")):
        load_weights(wider, str(path))


# ----------------------------------------------------------------------------------------------- Optuna


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


def write_unsafe_checkpoint(folder: Path, first_run: Path) -> Path:
    """An intact checkpoint that also holds an object unpickling would have to construct by running code."""
    path = folder / "unsafe.ckpt"
    checkpoint = load_checkpoint(first_run / "checkpoints" / "last.ckpt")
    torch.save(checkpoint | {"extra": fractions.Fraction(1, 3)}, path)
    return path


#: id -> (overrides, the start of the error line after "error: "); callables build files in a scratch folder
BAD_INPUT = {
    "depth": ({"model.depth": 20}, "model.depth=20"),
    "even_kernel": ({"model.kernel_size": 4, "model.use_cbam_block": "true"}, "model.kernel_size=4"),
    "zero_kernel": ({"model.kernel_size": 0, "model.use_cbam_block": "true"}, "model.kernel_size=0"),
    "zero_ratio": ({"model.reduction_ratio": 0, "model.use_cbam_block": "true"}, "model.reduction_ratio=0"),
    # width 4: the first stage's blocks have 4 channels, so a reduction ratio of 5 leaves no hidden unit
    "large_ratio": ({"model.reduction_ratio": 5, "model.use_cbam_block": "true"}, "model.reduction_ratio=5"),
    # checked even without CBAM (build_resnet checks every CBAM option), so a sweep cannot carry it unnoticed
    "even_kernel_without_cbam": ({"model.kernel_size": 6}, "model.kernel_size=6"),
    "both_gates_off": (
        {
            "model.use_channel_gate": "false",
            "model.use_spatial_gate": "false",
            "model.use_cbam_block": "true",
        },
        "model.use_spatial_gate=False: use_channel_gate and use_spatial_gate cannot both be false",
    ),
    "gate_order": ({"model.gate_order": "sideways"}, "model.gate_order=sideways: accepted values are"),
    "channel_pooling": ({"model.channel_pooling": "mean"}, "model.channel_pooling=mean"),
    "cbam_impl": (
        {"model.cbam_impl": "cuda"},
        "model.cbam_impl=cuda: accepted values are reference, fused, auto",
    ),
    "compile_mode": (
        {"model.compile": "true", "model.compile_mode": "fastest"},
        "model.compile_mode=fastest: accepted values are default, reduce-overhead, max-autotune-no-cudagraphs",
    ),
    "gate_flag_text": ({"model.use_spatial_gate": "no"}, "model.use_spatial_gate=no: must be true or false"),
    "unknown_model_key": ({"+model.dropout": 0.5}, "model: "),
    "batch_size": ({"data.batch_size": 0}, "data.batch_size=0"),
    "batch_size_text": ({"data.batch_size": "abc"}, "data.batch_size=abc"),
    # 160 training images: a batch of 1000 is never full, so no step would ever run
    "batch_larger_than_the_training_set": (
        {"data.batch_size": 1000},
        "data.batch_size=1000: larger than the 160",
    ),
    "cbam_flag_text": ({"model.use_cbam_block": "maybe"}, "model.use_cbam_block=maybe"),
    "missing_root": ({"data.root": lambda folder, _: folder / "no" / "such" / "dir"}, "data.root="),
    "missing_ckpt": ({"ckpt_path": lambda folder, _: folder / "missing.ckpt"}, "ckpt_path="),
    "random_ckpt": ({"ckpt_path": lambda folder, _: write_random_bytes(folder)}, "ckpt_path="),
    "truncated_ckpt": ({"ckpt_path": write_truncated_checkpoint}, "ckpt_path="),
    "unsafe_ckpt": ({"ckpt_path": write_unsafe_checkpoint}, "ckpt_path="),
    "unsafe_ckpt_test_only": ({"ckpt_path": write_unsafe_checkpoint, "train": "false"}, "ckpt_path="),
    "missing_weights": ({"weights_from": lambda folder, _: folder / "missing.ckpt"}, "weights_from="),
    # Lightning's own check of its arguments, passed on as one line
    "trainer_devices": ({"trainer.devices": 0}, "trainer: `Trainer(devices=0)` value is not a valid input"),
}
#: what each checkpoint case's line must say about the file
CHECKPOINT_PROBLEMS = {
    "missing_ckpt": "no such file",
    "random_ckpt": "is not a PyTorch checkpoint",
    "truncated_ckpt": "is truncated or corrupt",
    "unsafe_ckpt": "holds objects that need arbitrary code to unpickle (fractions.Fraction): refused for safety",
    "unsafe_ckpt_test_only": "holds objects that need arbitrary code to unpickle (fractions.Fraction)",
}


def build_case(name: str, folder: Path, first_run: Path) -> tuple[dict, dict[Path, bytes]]:
    """The overrides of case ``name`` with its files built in ``folder``, and {given file: its bytes}."""
    overrides = {
        key: value(folder, first_run) if callable(value) else value
        for key, value in BAD_INPUT[name][0].items()
    }
    return overrides, {
        path: path.read_bytes() for path in overrides.values() if isinstance(path, Path) and path.is_file()
    }


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_clear_line(case, train_in_process, tiny_cifar_folder, first_run, tmp_path):
    overrides, files = build_case(case, tmp_path, first_run)
    settings = {**TINY, "data.root": tiny_cifar_folder, **overrides}
    status, stderr, _ = train_in_process(
        tmp_path / "run", *(f"{key}={value}" for key, value in settings.items())
    )
    assert status == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: " + BAD_INPUT[case][1]), lines[0]
    if case in CHECKPOINT_PROBLEMS:
        assert str(overrides["ckpt_path"]) in lines[0] and CHECKPOINT_PROBLEMS[case] in lines[0], lines[0]
    for path, content in files.items():
        assert path.read_bytes() == content, f"{path} was modified"


#: what only a real train.py process shows: the exit status and stderr through Hydra, no run started (the
#: rest of BAD_INPUT's cases give the same line in-process: each process costs ~7 s of start-up)
SUBPROCESS_CASES = {
    "unsafe_ckpt_test_only": BAD_INPUT["unsafe_ckpt_test_only"][:1] + ("error: ckpt_path=",),
    "gpu_without_gpu": (
        {"trainer": "gpu"},
        "error: trainer.accelerator=gpu: this machine has no usable CUDA GPU",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tiny_cifar_folder, first_run, tmp_path_factory):
    """The subprocess cases and an unknown key, two at a time (each is mostly Python start-up):
    name -> (result, run dir)."""
    cases = {}
    for name, (overrides, _) in SUBPROCESS_CASES.items():
        folder = tmp_path_factory.mktemp(f"bad_{name}")
        built = {
            key: value(folder, first_run) if callable(value) else value for key, value in overrides.items()
        }
        cases[name] = (folder / "run", {key.replace(".", "__"): value for key, value in built.items()})
    # and a key the model config does not have, which Hydra itself rejects
    cases["unknown_key"] = (tmp_path_factory.mktemp("bad_unknown_key") / "run", {"model__nonsense": 1})
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(train_py, root=tiny_cifar_folder, hydra__run__dir=run_dir, **args)
            for name, (run_dir, args) in cases.items()
        }
        return {name: (futures[name].result(), cases[name][0]) for name in cases}


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_bad_input_exits_with_status_2_and_one_line(bad_runs, case):
    result, run_dir = bad_runs[case]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(SUBPROCESS_CASES[case][1]), lines[0]
    assert not (run_dir / "checkpoints").exists()  # nothing trained


def test_unknown_key_keeps_hydras_error(bad_runs):
    result, run_dir = bad_runs["unknown_key"]
    assert result.returncode != 0
    assert "Could not override 'model.nonsense'" in result.stderr
    assert "error: " not in result.stderr  # Hydra's message, not one of train.py's
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("native", [True, False])
def test_trainer_cpu_trains_in_bf16_where_the_cpu_has_it_and_in_fp32_with_one_line_elsewhere(
    native, compose_config, monkeypatch, capsys, tmp_path
):
    import cbam.training.run

    monkeypatch.setattr(cbam.training.run, "cpu_has_native_bf16", lambda: native)
    cfg = compose_config("trainer=cpu", "~logger", "~callbacks", f"trainer.default_root_dir={tmp_path}")
    assert (
        cfg.trainer.precision == "bf16-mixed" and cfg.data.loader == "device" and not cfg.model.channels_last
    )
    trainer = cbam.training.run.build_trainer(cfg)
    err = capsys.readouterr().err
    if native:
        assert trainer.precision == "bf16-mixed" and err == ""
    else:
        assert trainer.precision == "32-true"
        assert err == (
            "info: this CPU has no bf16 arithmetic (AVX512-BF16, AMX or Arm BF16): trainer.precision=bf16-mixed "
            "trains in fp32 (32-true) here\n"
        )


# ------------------------------------------------------------------------------------- callback settings

#: a bounded setting of each callback, given a value out of its bounds -> the start of the error line
BAD_CALLBACK_SETTINGS = {
    "divergence.check_every_n_steps=0": "callbacks.divergence.check_every_n_steps=0: must be an integer >= 1",
    "divergence.check_every_n_steps=1.5": "callbacks.divergence.check_every_n_steps=1.5: must be an integer",
    "attention_maps.every_n_epochs=0": "callbacks.attention_maps.every_n_epochs=0: must be an integer >= 1",
    "attention_maps.num_images=0": "callbacks.attention_maps.num_images=0: must be an integer >= 1",
    "attention_maps.alpha=1.5": "callbacks.attention_maps.alpha=1.5: must be a number in [0, 1]",
    "attention_maps.normalize=maybe": "callbacks.attention_maps.normalize=maybe: must be true or false",
    "attention_maps.cmap=nocolours": "callbacks.attention_maps.cmap=nocolours: must be a matplotlib colormap",
    "last_checkpoint.every_n_train_steps=-1": "callbacks.last_checkpoint.every_n_train_steps=-1: must be an "
    "integer >= 0, or null",
    "last_checkpoint.save_on_sigterm=sometimes": "callbacks.last_checkpoint.save_on_sigterm=sometimes: must "
    "be true or false",
    "stall_watchdog.timeout_s=0": "callbacks.stall_watchdog.timeout_s=0: must be a number of seconds > 0",
    "class_report.annotate_up_to=-1": "callbacks.class_report.annotate_up_to=-1: must be an integer >= 0",
    "class_report.print_up_to=1": "callbacks.class_report.print_up_to=1: must be an integer >= 2",
    "training_curves.stages=[train,test]": "callbacks.training_curves.stages=test: accepted values are train",
    "model_stats.input_size=[3,32]": "callbacks.model_stats.input_size=[3, 32]: must be [C, H, W]",
    # Lightning's own callbacks: their own check, in one line naming the entry
    "periodic_checkpoint.every_n_epochs=-2": "callbacks.periodic_checkpoint: Invalid value for every_n",
    "lr_monitor.logging_interval=sometimes": "callbacks.lr_monitor: logging_interval should be",
    # the run files' names are fixed (cbam/training/run_files.py): no callback takes one
    "+run_metrics.filename=other.json": "callbacks.run_metrics: RunMetrics.__init__() got an unexpected "
    "keyword argument 'filename'",
}


@pytest.mark.parametrize("setting", sorted(BAD_CALLBACK_SETTINGS))
def test_a_bad_callback_setting_is_one_line_naming_the_key(
    setting, train_in_process, tiny_cifar_folder, tmp_path
):
    """Checked with the rest of the config, before any work: nothing is trained, no run dir is written."""
    override = f"+callbacks.{setting[1:]}" if setting.startswith("+") else f"callbacks.{setting}"
    settings = {**TINY, "data.root": tiny_cifar_folder}
    status, stderr, _ = train_in_process(
        tmp_path / "run", *(f"{key}={value}" for key, value in settings.items()), override
    )
    assert status == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + BAD_CALLBACK_SETTINGS[setting]), lines
    assert not (tmp_path / "run").exists()


#: an optimiser or schedule setting torch or the schedule would fail on part-way -> the start of the error line
BAD_OPTIMIZATION_SETTINGS = {
    "scheduler=onecycle scheduler.final_lr_ratio=0": "scheduler.final_lr_ratio=0: must be a number > 0 <= 1",
    "scheduler=onecycle scheduler.start_lr_ratio=2": "scheduler.start_lr_ratio=2: must be a number > 0 <= 1",
    "scheduler=cosine scheduler.warmup_fraction=1.5": "scheduler.warmup_fraction=1.5: must be a number in [0, 1)",
    "optim.lr=-1": "optim: Invalid learning rate: -1",
    "optim.exempt_norms_and_biases=perhaps": "optim.exempt_norms_and_biases=perhaps: must be true or false",
    "+scheduler.peak=3": "scheduler: warmup_cosine() got an unexpected keyword argument 'peak'",
}


@pytest.mark.parametrize("setting", sorted(BAD_OPTIMIZATION_SETTINGS))
def test_a_bad_optimization_setting_is_one_line_before_any_work(
    setting, train_in_process, tiny_cifar_folder, tmp_path
):
    settings = {**TINY, "data.root": tiny_cifar_folder}
    status, stderr, _ = train_in_process(
        tmp_path / "run", *(f"{key}={value}" for key, value in settings.items()), *setting.split()
    )
    assert status == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + BAD_OPTIMIZATION_SETTINGS[setting]), lines
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ sweeps and validation


def test_a_sweep_without_validation_split_stops_before_any_job(run, tmp_path):
    """An Optuna search would maximise the test accuracy: one line, status 2, no job, no sweep dir."""
    sweep = tmp_path / "sweep"
    result = run(
        "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", data__val_size=0, hydra__sweep__dir=sweep
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        "error: data.val_size=0: a sweep (-m) compares and optimises validation accuracy, and its jobs would "
        "have no validation split; give data.val_size > 0 (e.g. 5000), or run the job as a single run"
    ]
    assert not sweep.exists()


def test_a_sweep_job_without_validation_split_is_refused(train_in_process, tiny_cifar_folder, tmp_path):
    """A sweep that chooses data.val_size per job (data.val_size=0,40): each job checks it again."""
    settings = {**TINY, "data.root": tiny_cifar_folder, "data.val_size": 0}
    status, stderr, _ = train_in_process(
        tmp_path / "run", *(f"{key}={value}" for key, value in settings.items()), "hydra.mode=MULTIRUN"
    )
    assert status == 2 and stderr.strip().startswith("error: data.val_size=0: a sweep (-m)"), stderr


def test_a_single_run_without_validation_split_trains_and_tests(
    train_in_process, tiny_cifar_folder, tmp_path
):
    from cbam.training.run import sweep_objective

    settings = {**TINY, "data.root": tiny_cifar_folder, "data.val_size": 0}
    status, stderr, _ = train_in_process(
        tmp_path / "run",
        *(f"{key}={value}" for key, value in settings.items()),
        "callbacks.best_checkpoint.monitor=null",
    )
    assert status == 0, stderr[-3000:]
    metrics = yaml.safe_load((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best_val_acc"] is None and metrics["test_acc"] is not None and metrics["finished"]
    # what a sweeper would be given: the validation accuracy, never the test accuracy
    assert sweep_objective({"test/acc": 0.5}) is None
    assert sweep_objective({"val/acc": 0.4, "test/acc": 0.5}) == 0.4
