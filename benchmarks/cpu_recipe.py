"""The CPU recipe (``trainer=cpu``) measured: which options make the study's network train fastest on a CPU.

Part 1, a bare PyTorch loop (SGD, cross-entropy, random images): one training step of each arm under each
option, side by side in one process and timed round-robin, so that a busy neighbour slows every variant
alike; the median over rounds is reported. Options: precision (fp32, bf16 autocast), memory format
(contiguous, channels_last), torch.compile, intra-op threads.

Part 2, ``train.py`` itself: ``--train-steps`` timed steps (after ``--warmup``) of each configuration in
``TRAIN_CONFIGS`` on the real data, against the bare fp32 eager loop's steps of part 1.

Part 3 (``--learn-epochs N``): does the recipe learn as fp32 does? ``train.py experiment=cpu_study`` (a
single run of the study's recipe, shortened to N epochs) of the ``--learn-arm`` in the recipe's precision and
in fp32, for each of ``--learn-seeds``: training loss and validation accuracy per epoch, test accuracy.
Example::

    python benchmarks/cpu_recipe.py --data /tmp/data/cifar10-jpeg --out cpu_recipe.json
    python benchmarks/cpu_recipe.py --data /tmp/data/cifar10-jpeg --no-bare --no-train-py --learn-epochs 2
    python benchmarks/cpu_recipe.py --quick --data <folder>        # smoke run: tiny sizes, one round
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent

#: the study's arms as build_resnet arguments
ARMS = {
    "none": {},
    "block": {"use_cbam_block": True},
    "classifier": {"use_cbam_class": True},
    "se": {"use_cbam_block": True, "channel_pooling": "avg", "use_spatial_gate": False},
}
#: the arms' train.py overrides
ARM_OVERRIDES = {
    "none": ["cbam=none"],
    "block": ["cbam=block"],
    "classifier": ["cbam=classifier"],
    "se": ["cbam=block", "attention=se"],
}
#: part 2: name -> train.py overrides on top of trainer=cpu and the study's network
TRAIN_CONFIGS = {
    "trainer=cpu (the recipe)": [],
    "trainer=cpu, fp32 contiguous": ["trainer.precision=32-true", "model.channels_last=false"],
    "trainer=cpu, contiguous": ["model.channels_last=false"],
    "trainer=cpu, workers loader": ["data.loader=workers", "data.num_workers=2"],
    "trainer=cpu, compiled": ["model.compile=true"],
}


def bare_step(arm: str, width: int, batch: int, bf16: bool, channels_last: bool, compiled: bool):
    """One training step of the arm's ResNet18 on a fixed random batch, as a function."""
    from cbam import build_resnet

    net = build_resnet(18, width=width, **ARMS[arm])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    run = torch.compile(net) if compiled else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator).contiguous(memory_format=fmt)
    labels = torch.randint(0, 10, (batch,), generator=generator)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(run(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_bare(args) -> list[dict]:
    """Part 1: every (arm, option) variant, timed round-robin; medians in ms per step."""
    # Every variant's network shares ResNet.forward's code: without room for a compiled graph per variant,
    # Dynamo would fall back to eager for the later ones.
    torch._dynamo.config.recompile_limit = 64
    variants = []
    for arm, threads, bf16, channels_last, compiled in itertools.product(
        args.arms, args.threads, (False, True), (False, True), (False, True) if args.compile else (False,)
    ):
        variants.append(
            {"arm": arm, "threads": threads, "precision": "bf16" if bf16 else "fp32",
             "channels_last": channels_last, "compile": compiled}
        )  # fmt: skip
    steps = []
    for variant in variants:
        torch.set_num_threads(variant["threads"])
        step = bare_step(
            variant["arm"], args.width, args.batch_size, variant["precision"] == "bf16",
            variant["channels_last"], variant["compile"],
        )  # fmt: skip
        started = time.perf_counter()
        for _ in range(args.warmup):  # compiles, and warms oneDNN's kernel caches
            step()
        variant["warmup_s"] = round(time.perf_counter() - started, 1)
        steps.append(step)
        print(f"warmed up {variant}", file=sys.stderr, flush=True)
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(args.rounds):
        for index, (variant, step) in enumerate(zip(variants, steps)):
            torch.set_num_threads(variant["threads"])
            started = time.perf_counter()
            for _ in range(args.steps_per_round):
                step()
            times[index].append(1000 * (time.perf_counter() - started) / args.steps_per_round)
    for variant, measured in zip(variants, times):
        variant["step_ms"] = round(statistics.median(measured), 1)
        variant["step_ms_min"] = round(min(measured), 1)
    return variants


def measure_train_py(args, name: str, overrides: list[str], scratch: Path, arm: str) -> dict:
    """Part 2: ``train.py`` with ``overrides``: the median and total of the timed steps (StepClock)."""
    out = scratch / f"clock-{len(list(scratch.iterdir()))}.json"
    command = [
        sys.executable, "train.py", "trainer=cpu", *ARM_OVERRIDES[arm], f"model.width={args.width}",
        f"data.batch_size={args.batch_size}", f"data.root={args.data}", "data.download=false",
        *([f"data.cache_dir={args.cache_dir}"] if args.cache_dir else []),
        f"+trainer.max_steps={args.warmup + args.train_steps}", "trainer.max_epochs=-1", "test=false",
        "+trainer.limit_val_batches=0", f"hydra.run.dir={scratch / 'run'}", "callbacks.progress_bar=null",
        "++trainer.enable_progress_bar=false", "+callbacks.step_clock._target_=step_overhead.StepClock",
        f"+callbacks.step_clock.out={out}", f"+callbacks.step_clock.warmup={args.warmup}", *overrides,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{name}: train.py failed:\n{result.stderr[-3000:]}")
    clock = json.loads(out.read_text())
    return {
        "config": name,
        "arm": arm,
        "overrides": overrides,
        "timed_steps": clock["steps"],
        "step_ms": clock["median_ms"],
        "mean_step_ms": clock["mean_ms"],
        "process_s": round(time.perf_counter() - started, 1),
    }


def learn(args, arm: str, precision: str, seed: int, scratch: Path) -> dict:
    """Part 3: one shortened study run; its curves (curves.csv) and final numbers (metrics.json)."""
    folder = scratch / f"learn-{arm}-{precision}-{seed}"
    command = [
        sys.executable, "train.py", "experiment=cpu_study", *ARM_OVERRIDES[arm], f"seed={seed}",
        f"trainer.precision={precision}", f"trainer.max_epochs={args.learn_epochs}", f"data.root={args.data}",
        "data.download=false", *([f"data.cache_dir={args.cache_dir}"] if args.cache_dir else []),
        f"hydra.run.dir={folder}", "callbacks.progress_bar=null", "++trainer.enable_progress_bar=false",
        *(["model.width=4", "model.reduction_ratio=2", "+trainer.limit_train_batches=3",
           "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"] if args.quick else []),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"learn {arm} {precision} seed {seed}: train.py failed:\n{result.stderr[-3000:]}")
    from cbam.training.run_files import CURVES_TABLE, read_metrics

    with open(folder / CURVES_TABLE, newline="") as handle:
        curves = list(csv.DictReader(handle))
    metrics = read_metrics(folder)
    return {
        "arm": arm,
        "precision": precision,
        "seed": seed,
        "epochs": [
            {
                "epoch": int(row["epoch"]),
                "train_loss": float(row["train/loss"]),
                "val_acc": float(row["val/acc"]),
            }
            for row in curves
        ],
        "test_acc": metrics["test_acc"],
        "train_time_s": metrics["train_time_s"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="CIFAR-10 folder for part 2 (train.py); part 2 is skipped without it")
    parser.add_argument("--cache-dir", help="where train.py's decoded cache goes (default beside the data)")
    parser.add_argument("--arms", default="none,block,classifier,se", help="comma list of " + ",".join(ARMS))
    parser.add_argument("--train-arms", default="block", help="the arms part 2 runs train.py for")
    parser.add_argument("--threads", default=str(torch.get_num_threads()), help="comma list (part 1)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each variant")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=80, help="timed train.py steps (part 2)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="part 1 without compile")
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="skip part 1")
    parser.add_argument("--no-train-py", dest="train_py", action="store_false", help="skip part 2")
    parser.add_argument("--learn-epochs", type=int, default=0, help="part 3's epochs (0: skip part 3)")
    parser.add_argument("--learn-arm", default="block")
    parser.add_argument("--learn-seeds", default="0,1")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.warmup, args.rounds, args.steps_per_round = 8, 1, 1, 1
        args.train_steps, args.arms, args.compile = 3, "none,block", False
        args.learn_epochs = min(args.learn_epochs, 1)
    args.arms = args.arms.split(",")
    args.threads = [int(n) for n in args.threads.split(",")]
    from cbam.runtime.lightning_internals import cpu_has_native_bf16
    from cbam.runtime.provenance import describe_device, git_state

    report = {
        "device": describe_device(torch.device("cpu")),
        "cpu": platform.processor() or platform.machine(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "git_revision": git_state()[0],
        "git_clean": git_state()[1],
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    report["bare"] = measure_bare(args) if args.bare else []
    for row in report["bare"]:
        print(json.dumps(row), flush=True)
    save()
    if args.data and args.train_py:
        report["train_py"] = []
        threads = torch.get_num_threads()
        with tempfile.TemporaryDirectory() as scratch:
            for arm, (name, overrides) in itertools.product(
                args.train_arms.split(","), TRAIN_CONFIGS.items()
            ):
                if "model.compile=true" in overrides and not args.compile:
                    continue
                row = measure_train_py(args, name, overrides, Path(scratch), arm)
                bare = next(
                    (r["step_ms"] for r in report["bare"] if r["arm"] == arm and r["threads"] == threads
                     and r["precision"] == "fp32" and not r["channels_last"] and not r["compile"]),
                    None,
                )  # fmt: skip
                row["speedup_vs_bare_fp32_eager"] = round(bare / row["step_ms"], 3) if bare else None
                report["train_py"].append(row)
                print(json.dumps(row), flush=True)
                save()
    if args.data and args.learn_epochs:
        report["learning"] = []
        with tempfile.TemporaryDirectory() as scratch:
            for seed, precision in itertools.product(
                map(int, args.learn_seeds.split(",")), ("bf16-mixed", "32-true")
            ):
                row = learn(args, args.learn_arm, precision, seed, Path(scratch))
                report["learning"].append(row)
                print(json.dumps(row), flush=True)
                save()
    return report


if __name__ == "__main__":
    main()
