"""A process of a DDP run that dies ends the whole run promptly, and the run resumes exactly from its last
good checkpoint (README, "Reliability").

2-process ``trainer=ddp_sim`` runs of train.py, each process killed with SIGKILL at a named moment by the
test-only callback ``reliability_signals.KillAt``: under Lightning's launcher and under torchrun; rank 0,
rank 1 or a DataLoader worker of rank 1; at start-up, during the rendezvous, in the validation after an
epoch's last step and inside a checkpoint save. Every other process must exit within 60 s with one line
naming what died and the last good checkpoint, exit status 5, and ``ckpt_path=last`` must end where an
uninterrupted run ends.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import load_checkpoint, run_python, run_train, write_random_pngs
from test_reliability import max_weight_difference, show

from cbam.distributed import PROCESS_DIED_EXIT_STATUS

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
    """Lane 1: one run dir, killed four times and resumed with ckpt_path=last each time (Lightning's
    launcher unless said):

    - a DataLoader worker of rank 1 dies in the validation after epoch 0's last step (last.ckpt: step 2);
    - rank 0 dies as soon as it has started rank 1, which is starting up;
    - under torchrun, rank 0 dies inside the save of step 10 (last.ckpt: the end of epoch 1, step 8);
    - rank 0 kills rank 1 as soon as it has started it: rank 0 waits for it in the rendezvous;
    - the run finishes.

    Lane 2: the same run uninterrupted.
    """
    base = tmp_path_factory.mktemp("dead_process")
    classes = [f"class{label}" for label in range(10)]
    common = [f"data.root={write_random_pngs(base / 'data', 10, 1, classes)}", *RUN]
    out: dict = {"chain": base / "chain", "a": base / "a"}
    chain = [*common, f"hydra.run.dir={out['chain']}"]
    deaths = {
        "worker": (run_train, [*kill("validation_start:0", 1, target="child")]),
        "launcher": (run_train, ["ckpt_path=last", *kill("launched", 0)]),
        "torchrun": (torchrun, ["ckpt_path=last", *kill("save_checkpoint:10", 0)]),
        "rendezvous": (run_train, ["ckpt_path=last", *kill("launched", 0, target="child")]),
    }

    def lane_1() -> None:
        for name, (launch, overrides) in deaths.items():
            record = base / f"{name}.kill"
            out[name] = launch([*chain, *overrides, f"+callbacks.kill.record={record}"])
            out[f"{name}_ended"] = time.time()  # every process holding its output has ended
            out[f"{name}_killed"] = float(record.read_text()) if record.is_file() else None
            out[f"{name}_last"] = load_checkpoint(out["chain"] / "checkpoints" / "last.ckpt")["global_step"]
        out["resumed"] = run_train([*chain, "ckpt_path=last"])

    with ThreadPoolExecutor(2) as pool:
        uninterrupted = pool.submit(run_train, [*common, f"hydra.run.dir={out['a']}"])
        lane_1()
        out["uninterrupted"] = uninterrupted.result()
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
        ("torchrun", 1, ["rank 0 of the run died"], 8),
        # rank 0 says it, from the rendezvous
        ("rendezvous", PROCESS_DIED_EXIT_STATUS, ["rank 1 of the run died (during start-up, exit status -9)"], 8),
    ],
)  # fmt: skip
def test_a_dead_process_ends_every_other_process_of_the_run_with_one_line(runs, name, status, said, step):
    result, killed = runs[name], runs[f"{name}_killed"]
    assert killed is not None, show(result)
    assert result.returncode == status, show(result)
    assert runs[f"{name}_ended"] - killed < DEADLINE_S, show(result)
    assert runs[f"{name}_last"] == step
    last = runs["chain"] / "checkpoints" / "last.ckpt"
    expected = [f"error: {what}; last good checkpoint: {last} (step {step})" for what in said]
    assert error_lines(result.stderr) == expected, show(result)
    if name != "torchrun":  # torchrun's own summary of the failure is a traceback
        assert "Traceback" not in result.stderr, show(result)


def test_resumption_after_deaths_is_exact(runs):
    # The worker died in the validation after epoch 0's last step (4): last.ckpt is step 2, not a
    # checkpoint of that last step, which Lightning resumes into a state that skips epoch 2 once the
    # resumed run's end of epoch 1 is resumed in turn (see LastCheckpoint).
    assert runs["worker_last"] == 2
    resumed, uninterrupted = runs["resumed"], runs["uninterrupted"]
    assert uninterrupted.returncode == 0, show(uninterrupted)
    assert resumed.returncode == 0, show(resumed)
    whole = load_checkpoint(runs["a"] / "checkpoints" / "last.ckpt")
    final = load_checkpoint(runs["chain"] / "checkpoints" / "last.ckpt")
    assert whole["global_step"] == final["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert max_weight_difference(whole, final) <= 1e-6
