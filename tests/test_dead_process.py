"""A process of a DDP run that dies ends the whole run promptly; resumption after a kill is exact at the
moment that broke it (README, "Reliability").

2-process ``trainer=ddp_sim`` runs of train.py, each with one process SIGKILLed at a named moment by the
test-only callback ``reliability_signals.KillAt``: under Lightning's launcher and under torchrun; rank 0,
rank 1 or a DataLoader worker of rank 1; at start-up, in the rendezvous, in the validation after an epoch's
last step and inside a checkpoint save. Every other process must exit within 60 s with one line naming what
died and the last good checkpoint, and a non-zero exit status. The resumption checks run in this process
(the checkpoints on disk are what a kill leaves): a kill in the validation after an epoch's last step, and
SIGTERM in that step. ``tests/stress/kill_stress.py`` kills at random moments instead.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
from helpers import NO_FIGURES, conf_file, load_checkpoint, run_python, run_train, write_random_pngs
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException
from reliability_signals import SignalAtSteps
from test_reliability import max_weight_difference, show

from cbam.callbacks.last_checkpoint import LastCheckpoint
from cbam.data import CIFAR10DataModule
from cbam.errors import PROCESS_DIED_EXIT_STATUS, ConfigError
from cbam.runtime.checkpoints import AtomicCheckpointIO
from cbam.runtime.distributed import LAUNCHER_PID, WatchedDDPStrategy, leave_on_error
from cbam.training.config_checks import check_config
from cbam.training.lightning_module import CBAMResNetModule

#: 10 classes x 10 images - 36 for validation = 64 training images: 4 steps of 8 per epoch on each of the
#: 2 ranks; every other step is saved, so an epoch's last step is a step to save
STEPS_PER_EPOCH, EPOCHS = 4, 3
RUN = [
    "trainer=ddp_sim",
    "data.download=false",
    "data.loader=workers",
    "data.num_workers=1",
    "data.batch_size=8",
    "data.val_size=36",
    "model.width=4",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.deterministic=true",
    "callbacks.last_checkpoint.every_n_train_steps=2",
    "test=false",
    *NO_FIGURES,
]
KILL = "+callbacks.kill._target_=reliability_signals.KillAt"
#: the most a surviving process may take to stop after a death
DEADLINE_S = 60


def kill(moment: str, rank: int, target: str = "self") -> list[str]:
    return [
        KILL,
        f"+callbacks.kill.moment={moment}",
        f"+callbacks.kill.rank={rank}",
        f"+callbacks.kill.target={target}",
    ]


def torchrun(overrides: list[str]):
    return run_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train.py", *overrides]
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two run dirs, each killed twice and resumed with ckpt_path=last each time (Lightning's launcher
    unless said), the two chains side by side (most of a run is start-up and waiting for news):

    - chain 1: a DataLoader worker of rank 1 dies in the validation after epoch 0's last step (last.ckpt:
      step 2); then rank 0 dies as soon as it has started rank 1, which is starting up;
    - chain 2: under torchrun, rank 0 dies inside the save of step 6 (last.ckpt: the end of epoch 0, step
      4); then rank 0 kills rank 1 as soon as it has started it, and waits for it in the rendezvous.
    """
    base = tmp_path_factory.mktemp("dead_process")
    classes = [f"class{label}" for label in range(10)]
    data = f"data.root={write_random_pngs(base / 'data', 10, 1, classes)}"
    out: dict = {}
    chains = {
        "chain1": {
            "worker": (run_train, [*kill("validation_start:0", 1, target="child")]),
            "launcher": (run_train, ["ckpt_path=last", *kill("launched", 0)]),
        },
        "chain2": {
            "torchrun": (torchrun, [*kill("save_checkpoint:6", 0)]),
            "rendezvous": (run_train, ["ckpt_path=last", *kill("launched", 0, target="child")]),
        },
    }

    def run_chain(chain: str) -> None:
        run_dir = base / chain
        for name, (launch, overrides) in chains[chain].items():
            record = base / f"{name}.kill"
            out[name] = launch(
                [data, *RUN, f"hydra.run.dir={run_dir}", *overrides, f"+callbacks.kill.record={record}"]
            )
            out[f"{name}_ended"] = time.time()  # every process holding its output has ended
            out[f"{name}_killed"] = float(record.read_text()) if record.is_file() else None
            out[f"{name}_last"] = run_dir / "checkpoints" / "last.ckpt"
            out[f"{name}_step"] = load_checkpoint(out[f"{name}_last"])["global_step"]

    with ThreadPoolExecutor(2) as pool:
        for chain in [pool.submit(run_chain, name) for name in chains]:
            chain.result()
    return out


def error_lines(stderr: str) -> list[str]:
    """Every ``error: ...`` line (a progress bar may precede one on its line)."""
    return [line[line.index("error: ") :] for line in stderr.splitlines() if "error: " in line]


@pytest.mark.parametrize(
    "name, status, said, step",
    [
        # rank 1 and rank 0 each say it (rank 1 stops on its worker's death; rank 0 hears of it from rank 1)
        ("worker", PROCESS_DIED_EXIT_STATUS, ["a DataLoader worker of rank 1 died"] * 2, 2),
        # rank 1 says it, before the rendezvous; rank 0 itself was killed
        ("launcher", -9, ["rank 0 of the run died (during start-up)"], 2),
        # rank 1 says it; torchrun fails too, naming the rank in its own summary
        ("torchrun", 1, ["rank 0 of the run died"], 4),
        # rank 0 says it, from the rendezvous
        ("rendezvous", PROCESS_DIED_EXIT_STATUS, ["rank 1 of the run died (during start-up, exit status -9)"], 4),
    ],
)  # fmt: skip
def test_a_dead_process_ends_every_other_process_of_the_run_with_one_line(runs, name, status, said, step):
    result, killed = runs[name], runs[f"{name}_killed"]
    assert killed is not None, show(result)
    assert result.returncode == status, show(result)
    assert runs[f"{name}_ended"] - killed < DEADLINE_S, show(result)
    assert runs[f"{name}_step"] == step
    expected = [f"error: {what}; last good checkpoint: {runs[f'{name}_last']} (step {step})" for what in said]
    assert error_lines(result.stderr) == expected, show(result)
    if name != "torchrun":  # torchrun's own summary of the failure is a traceback
        assert "Traceback" not in result.stderr, show(result)


class Interrupted(Exception):
    """Stands in for a SIGKILL in-process: the files on disk are what a kill leaves."""


class InterruptAt(Callback):
    """Raise :class:`Interrupted` when ``hook`` runs in ``epoch`` (outside the sanity check)."""

    def __init__(self, hook: str, epoch: int) -> None:
        self.hook, self.epoch = hook, epoch

    def _at(self, trainer: pl.Trainer, hook: str) -> None:
        if hook == self.hook and trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            raise Interrupted

    def on_validation_start(self, trainer, pl_module) -> None:
        self._at(trainer, "on_validation_start")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._at(trainer, "on_train_epoch_start")


@pytest.fixture(scope="module")
def fit(tiny_cifar_folder, tmp_path_factory):
    """``fit(run_dir, *callbacks, ckpt_path=None)``: train.py's fit in this process, with the run above's
    shape (3 epochs of 4 steps, last.ckpt every 2 steps and at each epoch's end); its Trainer, or None when
    a callback raised :class:`Interrupted`."""
    cache = tmp_path_factory.mktemp("cache")

    def fit(run_dir: Path, *callbacks: Callback, ckpt_path: str | None = None) -> pl.Trainer | None:
        pl.seed_everything(0)
        data = CIFAR10DataModule(
            str(tiny_cifar_folder), download=False, batch_size=40, num_workers=0, val_size=40, loader="workers",
            cache_dir=str(cache),
        )  # fmt: skip
        training = {"optimizer": conf_file("optim/sgd.yaml"), "scheduler": conf_file("scheduler/cosine.yaml")}
        trainer = pl.Trainer(
            accelerator="cpu", max_epochs=EPOCHS, deterministic=True, logger=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=run_dir,
            callbacks=[LastCheckpoint(run_dir / "checkpoints", every_n_train_steps=2), *callbacks],
            plugins=[AtomicCheckpointIO()],
        )  # fmt: skip
        try:
            trainer.fit(CBAMResNetModule(width=4, **training), datamodule=data, ckpt_path=ckpt_path)
        except Interrupted:
            return None
        return trainer

    return fit


@pytest.fixture(scope="module")
def uninterrupted(fit, tmp_path_factory) -> dict:
    return load_checkpoint(fit(tmp_path_factory.mktemp("whole")).checkpoint_callback.last_model_path)


def test_resuming_twice_after_a_kill_in_the_validation_of_an_epochs_last_step_is_exact(
    fit, uninterrupted, tmp_path
):
    """The moment of the issue's non-exact resumption: with a checkpoint every 2 steps and 4 steps per
    epoch, a kill in the validation after epoch 0's last step, a resumption killed after the end of epoch
    1, and a second resumption, must end where an uninterrupted run ends. Lightning 2.6 resumes a
    checkpoint of an epoch's last step into a loop state whose next epoch-end checkpoint resumes past
    epoch 2: the chain ended at step 8 of 12 while last.ckpt was written at an epoch's last step."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    fit(tmp_path, InterruptAt("on_validation_start", 0))
    steps = [load_checkpoint(last)["global_step"]]
    fit(tmp_path, InterruptAt("on_train_epoch_start", 2), ckpt_path="last")
    steps.append(load_checkpoint(last)["global_step"])
    fit(tmp_path, ckpt_path="last")
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == uninterrupted["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert max_weight_difference(uninterrupted, resumed) <= 1e-6
    # the resumptions started from step 2 (not from a checkpoint of epoch 0's last step, 4) and from the
    # end of epoch 1
    assert steps == [2, 8]


class Validations(Callback):
    """Counts the validation runs (the sanity check aside)."""

    def __init__(self) -> None:
        self.count = 0

    def on_validation_end(self, trainer, pl_module) -> None:
        self.count += not trainer.sanity_checking


def test_sigterm_in_an_epochs_last_step_stops_after_its_validation_and_epoch_end_checkpoint(
    fit, uninterrupted, tmp_path, capsys
):
    last, validations = tmp_path / "checkpoints" / "last.ckpt", Validations()
    with pytest.raises(SIGTERMException):
        fit(tmp_path, SignalAtSteps(steps=[STEPS_PER_EPOCH], signals=["SIGTERM"]), validations)
    assert f"SIGTERM: saved {last} at step {STEPS_PER_EPOCH}" in capsys.readouterr().err
    assert load_checkpoint(last)["global_step"] == STEPS_PER_EPOCH and validations.count == 1
    fit(tmp_path, ckpt_path="last")
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert max_weight_difference(uninterrupted, resumed) <= 1e-6


def test_the_process_group_timeout_is_a_key(compose_config, monkeypatch):
    monkeypatch.delenv(LAUNCHER_PID, raising=False)  # set by the strategy in a process that may launch others
    for trainer in ("ddp", "ddp_sim"):
        assert compose_config(f"trainer={trainer}").trainer.strategy.timeout_s == 600
    strategy = instantiate(
        compose_config("trainer=ddp_sim", "trainer.strategy.timeout_s=30").trainer.strategy
    )
    assert isinstance(strategy, WatchedDDPStrategy) and strategy.timeout == timedelta(seconds=30)
    refused = "trainer.strategy.timeout_s=0: must be a number of seconds > 0"
    with pytest.raises(ConfigError, match=f"^{refused}$"):
        check_config(compose_config("trainer=ddp_sim", "trainer.strategy.timeout_s=0"))


def test_a_dead_dataloader_worker_is_recognised_in_either_of_its_reports(quiet_trainer):
    """PyTorch reports a dead worker as such, unless the worker died while handing a batch over: then the
    DataLoader's connection to it breaks first."""

    def fetch() -> None:  # as if in torch's DataLoader
        raise ConnectionResetError(104, "Connection reset by peer")

    fetch.__code__ = fetch.__code__.replace(
        co_filename=str(Path("torch/utils/data/dataloader.py").absolute())
    )
    try:
        fetch()
    except ConnectionResetError as error:
        lost = error
    reported = RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed. ")
    trainer = quiet_trainer()
    for error in (reported, lost):
        death = leave_on_error(error, trainer)
        assert str(death) == "a DataLoader worker of rank 0 died; last good checkpoint: none"
    assert leave_on_error(ConnectionResetError(104, "Connection reset by peer"), trainer) is None  # elsewhere
