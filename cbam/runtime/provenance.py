"""Where a number came from: the device, software, code revision, date and data of a run, and of a sweep.

:class:`cbam.callbacks.RunMetrics` stores :func:`run_record` in every run's ``metrics.json``;
``python -m cbam.report`` gathers those records, with the sweep's command from its Hydra files, into
``provenance.json`` beside the results (:func:`sweep_provenance`).
"""

from __future__ import annotations

import functools
import platform
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPOSITORY = Path(__file__).resolve().parents[1]
#: the fields of a run's record that the sweep's provenance lists (every distinct value)
RECORDED = ("device", "torch_version", "git_revision", "precision", "data")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@functools.cache
def git_revision() -> str | None:
    """The commit of this code, with ``+dirty`` when it has uncommitted changes; None outside a git checkout
    (an installed wheel) or without git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def run_record(device: torch.device, precision: str, data: str | None) -> dict:
    """What a run's ``metrics.json`` records about where it ran (its date: now, in UTC); ``data`` is the
    data module's ``description`` (``"<kind> at <root>"``)."""
    return {
        "device": describe_device(device),
        "torch_version": torch.__version__,
        "git_revision": git_revision(),
        "precision": str(precision),
        "data": data,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def sweep_command(sweep: Path, job_dirs: list[Path]) -> list[str]:
    """The ``python train.py`` command line(s) that made the sweep, from Hydra's records: the sweep's
    ``multirun.yaml`` (one command), else every job's ``.hydra/hydra.yaml`` (one command per distinct one)."""
    records = (
        [sweep / "multirun.yaml"]
        if (sweep / "multirun.yaml").is_file()
        else [job / ".hydra" / "hydra.yaml" for job in job_dirs if (job / ".hydra" / "hydra.yaml").is_file()]
    )
    commands: list[str] = []
    for record in records:
        overrides = OmegaConf.load(record).hydra.overrides
        multirun = "hydra.mode=MULTIRUN" in overrides.hydra
        words = [word for word in overrides.hydra if word != "hydra.mode=MULTIRUN"] + list(overrides.task)
        command = shlex.join(["python", "train.py", *(["-m"] if multirun else []), *words])
        if command not in commands:
            commands.append(command)
    return commands


def sweep_provenance(sweep: Path, job_dirs: list[Path], metrics: list[dict], data: str | None) -> dict:
    """The provenance of a sweep's results: its command, every distinct value the finished runs recorded
    (device, torch, revision, precision, data), the span of their dates; ``data`` replaces the recorded data
    description when given (e.g. "CIFAR-10 JPEG copy, quality 75", which the files cannot tell)."""
    provenance: dict = {"command": sweep_command(sweep, job_dirs), "sweep_dir": str(sweep)}
    for key in RECORDED:
        values = {str(record.get(key)) for record in metrics if record.get(key) is not None}
        provenance[key] = sorted(values) or ["not recorded"]
    if data:
        provenance["data"] = [data]
    dates = sorted(record["date"] for record in metrics if record.get("date"))
    provenance["dates"] = [dates[0], dates[-1]] if dates else ["not recorded"]
    provenance["runs_finished"] = len(metrics)
    provenance["runs"] = len(job_dirs)
    return provenance
