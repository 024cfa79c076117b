"""Wall time of training until the test accuracy first reaches given targets (94% and 95% by default).

Trains ``experiment=fast`` (or any config given as Hydra overrides) through this project's own training
path, evaluates the whole test split after every epoch, and reports the training time (from the first
step, torch.compile and cuDNN autotuning included; the evaluations themselves excluded) at which each
target was first reached. A NaN or infinite training loss stops the run (the project's
``DivergenceGuard``): the report then says at which step, and the script exits with status 3. Examples::

    python benchmarks/time_to_accuracy.py data.root=/path/to/cifar10-jpeg data.download=false --out tta.json
    python benchmarks/time_to_accuracy.py --quick data.root=... data.download=false   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_device, software_versions

from cbam.callbacks.divergence import DivergenceGuard
from cbam.errors import TrainingDiverged
from cbam.training.run import build_model, instantiate_trainer

QUICK_OVERRIDES = [
    "trainer=cpu",
    "model.compile=false",
    "model.compile_attention=false",  # trainer=cpu compiles the attention layers; a smoke run skips that
    "model.width=16",
    "data.batch_size=64",
    "data.loader=device",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=10",
    "optim.fused=null",
]


class TestEveryEpoch(pl.Callback):
    """Times the training epochs and measures test accuracy after each one, off the clock."""

    def __init__(self, targets: list[float]) -> None:
        self.targets = sorted(targets)
        self.train_seconds = 0.0
        self.epochs: list[dict] = []
        self.reached: dict[str, float | None] = {f"{t:.2f}": None for t in self.targets}

    def _sync(self, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_fit_start(self, trainer, module) -> None:
        # The data module is set up by now, on the training device.
        self.test_loader = trainer.datamodule.test_dataloader()

    def on_train_epoch_start(self, trainer, module) -> None:
        self._loss_sum = torch.zeros((), device=module.device)
        self._batches = 0
        self._sync(module)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # Summed on the device (no synchronisation): a diverged run shows up in the epoch records.
        self._loss_sum += outputs["loss"].detach().float()
        self._batches += 1

    @torch.no_grad()
    def _test_accuracy(self, trainer, module) -> float:
        was_training = module.training
        module.eval()
        correct = total = 0
        with trainer.precision_plugin.forward_context():
            for images, labels in self.test_loader:
                correct += (module(images).argmax(1) == labels).sum()
                total += len(labels)
        module.train(was_training)
        return float(correct) / total

    def on_train_epoch_end(self, trainer, module) -> None:
        self._sync(module)
        self.train_seconds += time.perf_counter() - self._started
        accuracy = self._test_accuracy(trainer, module)
        train_loss = float(self._loss_sum) / max(self._batches, 1)
        self.epochs.append(
            {
                "epoch": trainer.current_epoch,
                "train_seconds": round(self.train_seconds, 2),
                "train_loss": train_loss,
                "test_acc": accuracy,
            }
        )
        print(json.dumps(self.epochs[-1]), flush=True)
        for target in self.targets:
            key = f"{target:.2f}"
            if accuracy >= target and self.reached[key] is None:
                self.reached[key] = round(self.train_seconds, 2)
        if all(value is not None for value in self.reached.values()):
            trainer.should_stop = True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. data.root=... model.compile=false"
    )
    parser.add_argument("--experiment", default="fast")
    parser.add_argument("--targets", default="0.94,0.95")
    parser.add_argument("--quick", action="store_true", help="a tiny CPU run, for a smoke test")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    overrides = [f"experiment={args.experiment}", *(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    with tempfile.TemporaryDirectory() as scratch:
        OmegaConf.update(cfg, "trainer.default_root_dir", scratch)
        clock = TestEveryEpoch([float(t) for t in args.targets.split(",")])
        trainer = instantiate_trainer(  # as train.py's: fp32 where the CPU only emulates bf16
            cfg,
            callbacks=[clock, DivergenceGuard()],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        started = time.perf_counter()
        diverged = None
        try:
            trainer.fit(model, datamodule=datamodule)
        except TrainingDiverged as error:
            diverged = str(error)
        wall = time.perf_counter() - started
    device = trainer.strategy.root_device
    report = {
        "device": describe_device(device),
        "precision": str(trainer.precision),
        "software": software_versions(),
        "overrides": overrides,
        "seconds_to_accuracy": clock.reached,
        "diverged": diverged,
        "train_seconds": round(clock.train_seconds, 2),
        "wall_seconds_with_evaluation": round(wall, 2),
        "epochs": clock.epochs,
    }
    print(
        json.dumps(
            {
                "seconds_to_accuracy": clock.reached,
                "train_seconds": report["train_seconds"],
                "diverged": diverged,
            }
        )
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if diverged:
        print(f"error: {diverged}", file=sys.stderr)
        sys.exit(3)  # as train.py does
    return report


if __name__ == "__main__":
    main()
