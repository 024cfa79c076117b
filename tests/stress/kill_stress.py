"""SIGKILL one process of a 2-process DDP run at a random moment, again and again, and check what survives.

The reproduction of issue 16, randomised: ``trainer=ddp_sim``, the ``workers`` loader with one worker,
``last.ckpt`` every 2 steps, 4 steps per epoch, 6 epochs. Each killed segment SIGKILLs, after a random
delay from its start (from half-way through the uninterrupted run's start-up, before all its ranks exist, to
the share of that run's time the segment has left to train: start-up, rendezvous, training, validation and
checkpoint saves all fall in that window), one
process chosen at random among those alive (rank 0, another rank or a DataLoader worker of either, each
kind equally likely).
Then it checks that every other process of the run ended within ``--deadline`` seconds, that the run
failed (non-zero status) unless the kill came after training had finished, and that each surviving
rank printed one line naming what died and the last good checkpoint; it restarts with ``ckpt_path=last``
in the same run dir. The last segment runs to the end and its ``last.ckpt`` is compared with an
uninterrupted run's (same step count, weights within 1e-6). The data are random PNGs in a temporary
folder; nothing is kept. Example (a few minutes on two cores)::

    python tests/stress/kill_stress.py --runs 5 --kills 4 --out kill_stress.json
    python tests/stress/kill_stress.py --runs 2 --kills 3 --launcher torchrun
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: its helpers
from helpers import write_random_pngs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUN = [
    "trainer=ddp_sim", "data.download=false", "data.loader=workers", "data.num_workers=1",
    "data.batch_size=8", "data.val_size=36", "model.width=4", "trainer.max_epochs=6",
    "trainer.deterministic=true", "callbacks.last_checkpoint.every_n_train_steps=2", "test=false",
]  # fmt: skip
#: a line a surviving process prints (the only error lines a run killed this way may print)
DEATH_LINE = "; last good checkpoint: "


def command(launcher: str, overrides: list[str]) -> list[str]:
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "train.py",
            *overrides,
        ]
    return [sys.executable, "train.py", *overrides]


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process (zombies left out; Linux)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(stat.parent.name)] = (int(fields[1]), cmdline)
    return table


def process_tree(root: int) -> dict[int, tuple[int, str]]:
    """``root`` and its live descendants, as :func:`processes` gives them."""
    table, tree, frontier = processes(), {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in table:
            tree[pid] = table[pid]
            frontier += [child for child, (parent, _) in table.items() if parent == pid]
    return tree


def local_rank(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((item[11:].decode() for item in environ if item.startswith(b"LOCAL_RANK=")), "?")


def victims(tree: dict[int, tuple[int, str]], root: int, launcher: str) -> dict[int, str]:
    """The processes of the run worth killing, by role: the ranks (under Lightning's launcher the first
    process and those it started; under torchrun the agent's children) and their DataLoader workers
    (processes forked from a rank: the same command line)."""
    ranks = {}
    for pid, (parent, line) in tree.items():
        try:
            if launcher == "lightning" and (pid == root or parent == root and "train_ddp_process_" in line):
                ranks[pid] = "rank 0" if pid == root else f"rank {local_rank(pid)}"
            elif launcher == "torchrun" and parent == root and "train.py" in line:
                ranks[pid] = f"rank {local_rank(pid)}"
        except OSError:
            continue
    workers = {
        pid: f"worker of {ranks[parent]}"
        for pid, (parent, line) in tree.items()
        if parent in ranks and pid not in ranks and line == tree[parent][1]
    }
    return ranks | workers


def kind_of(role: str) -> str:
    """rank 0, another rank or a worker: the kinds of process a kill is drawn among first."""
    return "worker" if role.startswith("worker") else "rank 0" if role == "rank 0" else "another rank"


def segment(launcher: str, overrides: list[str], kill_after: float | None, deadline: float) -> dict:
    """One run of train.py, killing one random process after ``kill_after`` seconds (None: no kill), then
    waiting for every other process of the run (those alive at the kill) to end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.time()
        proc = subprocess.Popen(command(launcher, overrides), cwd=ROOT, env=env, stdout=out, stderr=err)
        record: dict = {"killed": None}
        while kill_after is None and proc.poll() is None and "all_started_s" not in record:
            if (
                sum(
                    role.startswith("rank")
                    for role in victims(process_tree(proc.pid), proc.pid, launcher).values()
                )
                > 1
            ):
                record["all_started_s"] = round(time.time() - started, 2)  # every rank's process exists
            time.sleep(0.1)
        while kill_after is not None and proc.poll() is None:
            if time.time() - started >= kill_after:
                tree = process_tree(proc.pid)
                roles = victims(tree, proc.pid, launcher)
                if roles:
                    # rank 0 lives longest: draw the kind of process first (rank 0, another rank, a worker)
                    kinds = {pid: kind_of(role) for pid, role in roles.items()}
                    kind = random.choice(sorted(set(kinds.values())))
                    pid = random.choice(sorted(pid for pid in roles if kinds[pid] == kind))
                    record.update(killed=roles[pid], at=round(time.time() - started, 2))
                    os.kill(pid, signal.SIGKILL)
                    killed_at, others = time.time(), set(tree) - {pid}
                    break
            time.sleep(0.05)
        if record["killed"]:
            while (alive := others & processes().keys()) and time.time() - killed_at <= deadline:
                time.sleep(0.1)
            record.update(ended_after_s=round(time.time() - killed_at, 2), still_alive=sorted(alive))
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        err.seek(0)
        stderr = err.read()
    lines = [line[line.index("error: ") :] for line in stderr.splitlines() if "error: " in line]
    record.update(status=proc.returncode, error_lines=lines, traceback="Traceback" in stderr)
    record.update(wall_s=round(time.time() - started, 2), stderr_tail=stderr[-3000:])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kills", type=int, default=4, help="killed segments per run, then one to the end")
    parser.add_argument("--launcher", choices=("lightning", "torchrun"), default="lightning")
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    random.seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        write_random_pngs(base / "data", 10, 2, [f"class{label}" for label in range(10)])
        common = [f"data.root={base / 'data'}", *RUN]
        whole_run = segment(args.launcher, [*common, f"hydra.run.dir={base / 'whole'}"], None, args.deadline)
        timing = whole_run["all_started_s"], whole_run["wall_s"]
        whole = torch.load(base / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
        report = [run(args, base, common, whole, timing, index) for index in range(args.runs)]
    summary = {
        "launcher": args.launcher, "runs": len(report), "kills": sum(len(r["segments"]) for r in report),
        "runs_ok": sum(r["ok"] for r in report), "uninterrupted_step": whole["global_step"],
        "slowest_end_after_kill_s": max((s.get("ended_after_s", 0) for r in report for s in r["segments"]), default=0),
    }  # fmt: skip
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": report}, indent=2))
    sys.exit(0 if summary["runs_ok"] == summary["runs"] else 1)


def run(
    args: argparse.Namespace,
    base: Path,
    common: list[str],
    whole: dict,
    timing: tuple[float, float],
    index: int,
) -> dict:
    """``args.kills`` killed segments of one run dir, then one to the end, checked. ``timing``: when the
    uninterrupted run had all its ranks started, and its length (s)."""
    overrides = [*common, f"hydra.run.dir={base / f'run{index}'}", "ckpt_path=last"]
    last_path = base / f"run{index}" / "checkpoints" / "last.ckpt"
    segments, step = [], 0
    for _ in range(args.kills):
        # from half-way through the start-up of the uninterrupted run to the share of its time left to train
        left = max(1 - step / whole["global_step"], 0.1)
        started, duration = timing
        kill_after = random.uniform(started / 2, started + (duration - started) * left)
        record = segment(args.launcher, overrides, kill_after, args.deadline)
        step = torch.load(last_path, weights_only=True)["global_step"] if last_path.is_file() else 0
        record["last_step"] = step
        prompt = record["killed"] is None or (
            not record["still_alive"] and record["ended_after_s"] <= args.deadline
        )
        # one line per surviving rank, naming what died; torchrun's own summary is a traceback
        said = all(DEATH_LINE in line for line in record["error_lines"]) and (
            args.launcher == "torchrun" or not record["traceback"]
        )
        # a run that stops on a death fails, unless the death came after its training had finished
        failed = record["killed"] is None or record["status"] != 0 or step == whole["global_step"]
        record["ok"] = prompt and said and failed
        if record["ok"]:
            del record["stderr_tail"]
        segments.append(record)
    final = segment(args.launcher, overrides, None, args.deadline)
    last = torch.load(last_path, weights_only=True)
    difference = max(
        (tensor.double() - last["state_dict"][key].double()).abs().max().item()
        for key, tensor in whole["state_dict"].items() if tensor.numel()
    )  # fmt: skip
    exact = final["status"] == 0 and last["global_step"] == whole["global_step"] and difference <= 1e-6
    result = {
        "segments": segments, "final_step": last["global_step"], "max_weight_difference": difference,
        "ok": exact and all(record["ok"] for record in segments),
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
