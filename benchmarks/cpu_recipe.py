"""The CPU recipe (``trainer=cpu``) measured: which options make the study's network train fastest on a CPU.

Part 1, a bare PyTorch loop (SGD, cross-entropy, random images): one training step of each arm under each
option, side by side in one process and timed round-robin, so that a busy neighbour slows every variant
alike; the median over rounds is reported. Options: precision (fp32, bf16 autocast), memory format
(contiguous, channels_last), torch.compile (of the attention layers only, or of the whole network), intra-op
threads.

Part 2, ``train.py`` itself: ``--train-steps`` timed steps (after ``--warmup``) of each configuration of
``--train-configs`` (keys of ``TRAIN_CONFIGS``) for each of ``--train-arms`` on the real data, against the
bare fp32 eager loop's steps of part 1 and against the plain arm's train.py steps; the runs alternate over
arms and configurations ``--train-repeats`` times (the median of the repeats is reported), so that drift
slows every arm alike.

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
#: part 2: key -> (name, train.py overrides on top of trainer=cpu and the study's network)
TRAIN_CONFIGS = {
    "recipe": ("trainer=cpu (the recipe)", []),
    "eager": ("trainer=cpu, attention eager", ["model.compile_attention=false"]),
    "channels_last": ("trainer=cpu, channels_last network", ["model.channels_last=true"]),
    "workers": ("trainer=cpu, workers loader", ["data.loader=workers", "data.num_workers=2"]),
    "compiled": ("trainer=cpu, compiled", ["model.compile=true"]),
}
#: part 1's torch.compile options: none, the attention layers (model.compile_attention), the whole network
COMPILE_OPTIONS = ("eager", "attention", "network")


def bare_step(arm: str, width: int, batch: int, bf16: bool, channels_last: bool, compiled: str):
    """One training step of the arm's ResNet18 on a fixed random batch, as a function; ``compiled``: one of
    :data:`COMPILE_OPTIONS`. The images are channels_last, as the device loader gives them."""
    from cbam import build_resnet
    from cbam.models.compiled_attention import compile_attention_layers

    net = build_resnet(18, width=width, **ARMS[arm])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    if compiled == "attention":
        compile_attention_layers(net)
    run = torch.compile(net) if compiled == "network" else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
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
        args.arms, args.threads, args.precisions, (False, True), args.compile
    ):
        variants.append(
            {"arm": arm, "threads": threads, "precision": "bf16" if bf16 else "fp32",
             "channels_last": channels_last, "compile": compiled}
        )  # fmt: skip
        if compiled == "attention" and arm == "none":
            variants.pop()  # no attention to compile
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
        f"+callbacks.step_clock.out={out}", f"+callbacks.step_clock.warmup={args.warmup}",
        *(["data.val_size=20"] if args.quick else []), *overrides,
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


def measure_all_train_py(args, bare_rows: list[dict]) -> list[dict]:
    """Part 2: every (arm, configuration) ``--train-repeats`` times, alternating; the median of the repeats,
    its ratio to the plain arm's train.py step in the same configuration and the bare loop's speed-up."""
    threads = torch.get_num_threads()
    pairs = [
        (arm, name, overrides)
        for name, overrides in (TRAIN_CONFIGS[key] for key in args.train_configs.split(","))
        for arm in args.train_arms.split(",")
        if not ("model.compile=true" in overrides and "network" not in args.compile)
    ]
    measured: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.train_repeats):
            for arm, name, overrides in pairs:
                row = measure_train_py(args, name, overrides, Path(scratch), arm)
                measured.setdefault((arm, name), []).append(row)
                print(json.dumps({"repeat": repeat, **row}), flush=True)
    rows = []
    for (arm, name), repeats in measured.items():
        row = dict(repeats[0])
        row["step_ms_repeats"] = [r["step_ms"] for r in repeats]
        row["step_ms"] = round(statistics.median(row["step_ms_repeats"]), 1)
        row["process_s_repeats"] = [r["process_s"] for r in repeats]
        rows.append(row)
    for row in rows:
        plain = next((r["step_ms"] for r in rows if r["arm"] == "none" and r["config"] == row["config"]), None)
        row["ratio_vs_plain"] = round(row["step_ms"] / plain, 3) if plain else None
        bare = next(
            (r["step_ms"] for r in bare_rows if r["arm"] == row["arm"] and r["threads"] == threads
             and r["precision"] == "fp32" and not r["channels_last"] and r["compile"] == "eager"),
            None,
        )  # fmt: skip
        row["speedup_vs_bare_fp32_eager"] = round(bare / row["step_ms"], 3) if bare else None
    return rows


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
    parser.add_argument("--train-arms", default="none,block,classifier,se", help="the arms part 2 runs train.py for")
    parser.add_argument(
        "--train-configs", default=",".join(TRAIN_CONFIGS), help="comma list of " + ",".join(TRAIN_CONFIGS)
    )
    parser.add_argument("--train-repeats", type=int, default=2, help="part 2's runs of each arm and configuration")
    parser.add_argument("--precisions", help="comma list of fp32, bf16 (part 1; default: bf16 only on a bf16 CPU)")
    parser.add_argument("--threads", default=str(torch.get_num_threads()), help="comma list (part 1)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each variant")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=80, help="timed train.py steps (part 2)")
    parser.add_argument("--compile", default=",".join(COMPILE_OPTIONS), help="comma list of " + ",".join(COMPILE_OPTIONS))
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="skip part 1")
    parser.add_argument("--no-train-py", dest="train_py", action="store_false", help="skip part 2")
    parser.add_argument("--learn-epochs", type=int, default=0, help="part 3's epochs (0: skip part 3)")
    parser.add_argument("--learn-arm", default="block")
    parser.add_argument("--learn-seeds", default="0,1")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    unknown = set(args.train_configs.split(",")) - set(TRAIN_CONFIGS)
    if unknown:
        known = ", ".join(TRAIN_CONFIGS)
        parser.error(f"--train-configs: unknown {', '.join(sorted(unknown))}; known: {known}")
    if args.quick:
        args.batch_size, args.warmup, args.rounds, args.steps_per_round = 8, 1, 1, 1
        args.train_steps, args.arms, args.compile, args.train_repeats = 3, "none,block", "eager,attention", 1
        args.train_arms = "none,block"
        args.learn_epochs = min(args.learn_epochs, 1)
    args.arms = args.arms.split(",")
    args.threads = [int(n) for n in args.threads.split(",")]
    args.compile = args.compile.split(",")
    from cbam.runtime.lightning_internals import cpu_has_native_bf16

    precisions = (args.precisions or ("fp32,bf16" if cpu_has_native_bf16() else "fp32")).split(",")
    args.precisions = [precision == "bf16" for precision in precisions]
    from cbam.runtime.provenance import describe_device, git_state

    revision, clean = git_state()
    report = {
        "device": describe_device(torch.device("cpu")),
        "cpu": platform.processor() or platform.machine(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "git_revision": revision,
        "git_clean": clean,
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
        report["train_py"] = measure_all_train_py(args, report["bare"])
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
