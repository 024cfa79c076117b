"""What Lightning, each callback and the logger of ``train.py``'s default configuration cost per step.

Runs ``train.py`` on a network so small (width 2, batch 4, CPU) that a step is almost all Python, with
Lightning's ``SimpleProfiler``, which times every hook of every callback and of the loop in the same run
(so a busy machine slows them all alike). Reported per training step: the step time (between
consecutive training-batch ends, median, epoch boundaries excluded) and each profiled action called at
least once per step, in ms per step. A second run without any callback or logger (``bare``) gives the
step time the callbacks add up to. The data are random PNGs in a temporary folder. Example::

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --out step_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent


class StepClock(pl.Callback):
    """Records the time between consecutive training-batch ends after ``warmup`` steps (not across an
    epoch boundary) and writes their median and mean, in ms, to ``out`` when training ends."""

    def __init__(self, out: str, warmup: int = 20) -> None:
        self.out, self.warmup = out, warmup
        self.deltas: list[float] = []
        self._last = 0.0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if batch_idx > 0 and trainer.global_step > self.warmup:
            self.deltas.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer, module) -> None:
        steps = trainer.global_step
        durations = getattr(trainer.profiler, "recorded_durations", {})
        per_step = {
            action: round(1000 * sum(times) / steps, 3)
            for action, times in durations.items()
            if len(times) >= steps
        }
        callbacks = {
            a: t for a, t in per_step.items() if a.startswith("[Callback]") and type(self).__name__ not in a
        }
        Path(self.out).write_text(
            json.dumps(
                {
                    "steps": len(self.deltas),
                    "median_ms": round(1000 * statistics.median(self.deltas), 3),
                    "mean_ms": round(1000 * statistics.fmean(self.deltas), 3),
                    "callbacks_ms_per_step": round(sum(callbacks.values()), 3),
                    "profile_ms_per_step": dict(sorted(per_step.items(), key=lambda item: -item[1])),
                }
            )
        )


def write_images(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    folder / f"{index}.png"
                )


def default_callbacks() -> list[str]:
    return list(yaml.safe_load((ROOT / "conf" / "callbacks" / "default.yaml").read_text()))


def measure(data: Path, scratch: Path, name: str, overrides: list[str], args) -> dict:
    out = scratch / f"{name}.json"
    command = [
        sys.executable,
        "train.py",
        "trainer=cpu",
        "model.width=2",
        "model.reduction_ratio=1",
        "cbam=block",
        "data.batch_size=4",
        "data.val_size=40",
        "data.loader=device",
        f"data.root={data}",
        "data.download=false",
        f"data.cache_dir={scratch}",
        f"+trainer.max_steps={args.warmup + args.steps}",
        "trainer.max_epochs=-1",
        "test=false",
        f"hydra.run.dir={scratch / name}",
        "+callbacks.step_clock._target_=step_overhead.StepClock",
        f"+callbacks.step_clock.out={out}",
        f"+callbacks.step_clock.warmup={args.warmup}",
        "+trainer.profiler._target_=pytorch_lightning.profilers.SimpleProfiler",
        *overrides,
    ]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(BENCHMARKS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{name}: train.py failed:\n{result.stderr[-2000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    callbacks = default_callbacks()
    variants = {"full": [], "bare": [*(f"callbacks.{c}=null" for c in callbacks), "~logger"]}
    report = {
        "machine": f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "results": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "data"
        write_images(data, per_class=24)
        for name, overrides in variants.items():
            result = measure(data, Path(scratch), name, overrides, args)
            report["results"][name] = result
            top = dict(list(result["profile_ms_per_step"].items())[:12])
            print(json.dumps({"variant": name, **result, "profile_ms_per_step": top}, indent=1), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
