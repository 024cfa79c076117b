"""What several test files need: running the repository's scripts in a subprocess, tiny image folders."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import torch
import warm_interpreter
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
#: a train.py run small enough for a test: batches of 8 cut by the device loader, a width-4 network, 20
#: validation images, deterministic
TINY_RUN = [
    "data.download=false",
    "data.loader=device",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.val_size=20",
    "model.width=4",
    "trainer.deterministic=true",
]
#: for runs whose figures no test looks at: drawing them took about half a second of each tiny run
#: (test_reliability: 144.5 against 135.5 CPU seconds, measured with other runs beside it)
NO_FIGURES = [
    "callbacks.training_curves=null",
    "callbacks.class_report=null",
    "callbacks.attention_maps=null",
]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: one CPU thread (tiny models gain nothing from more, and
    OpenMP's spinning threads slow down a busy 2-core machine), no GPU, no SLURM variables, Hydra's short
    errors, and tests/ on the path (for test-only callbacks); ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "HYDRA_FULL_ERROR"}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def run_python(
    args: list[str], env: dict | None = None, timeout: float = 240, fresh: bool = False
) -> subprocess.CompletedProcess:
    """``python <args>`` from the repository root, output captured: a child of a warm interpreter
    (tests/warm_interpreter.py), which has paid for importing torch and Lightning once, unless ``fresh``."""
    args = list(map(str, args))
    return warm_interpreter.run(args, cwd=REPO, env=env or subprocess_env(), timeout=timeout, fresh=fresh)


def run_train(
    args: list[str], env: dict | None = None, timeout: float = 240, fresh: bool = False
) -> subprocess.CompletedProcess:
    """``python train.py <args>`` from the repository root, output captured."""
    return run_python(["train.py", *args], env=env, timeout=timeout, fresh=fresh)


def write_random_pngs(
    root: Path, train_per_class: int, test_per_class: int, classes: list[str], seed: int = 0
) -> Path:
    """``train/<class>/NNN.png`` and ``test/<class>/NNN.png``: random 32x32 RGB images."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name in classes:
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    folder / f"{index:03d}.png"
                )
    return Path(root)


def write_colour_classes(
    root: Path, train_per_class: int, test_per_class: int, test_suffix: str = ".png", seed: int = 0
) -> Path:
    """A CIFAR-10-shaped image folder that a network learns in a few steps: every image of a class is the
    class's colour plus noise (10 colours far apart in RGB), ``train/class<N>/NNN.png`` and
    ``test/class<N>/NNN<test_suffix>`` (a .jpg at quality 95)."""
    rng = np.random.default_rng(seed)
    corners = np.array([[r, g, b] for r in (40, 215) for g in (40, 215) for b in (40, 215)])
    colours = np.concatenate([corners, [[128, 40, 128], [128, 215, 128]]])
    for split, count, suffix in (("train", train_per_class, ".png"), ("test", test_per_class, test_suffix)):
        for label, colour in enumerate(colours):
            folder = Path(root) / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                image = np.clip(colour + rng.integers(-35, 36, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{index:03d}{suffix}", quality=95)
    return Path(root)


def conf_file(name: str) -> dict:
    """``conf/<name>``, e.g. ``conf_file("optim/sgd.yaml")``: the defaults as train.py gets them, for tests
    that build the module in Python."""
    return yaml.safe_load((REPO / "conf" / name).read_text())


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # our checkpoints never need more
