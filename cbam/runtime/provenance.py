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

REPOSITORY = Path(__file__).resolve().parents[2]
#: the fields of a run's record that the sweep's provenance lists (every distinct value)
RECORDED = ("device", "torch_version", "precision", "data")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, timeout=10, check=False
    )


@functools.cache
def git_state() -> tuple[str | None, bool | None]:
    """The commit of this code and whether its tree was clean (no uncommitted change to a tracked file);
    (None, None) outside a git checkout (an installed wheel) or without git."""
    try:
        commit, status = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None, None
    if commit.returncode or status.returncode:
        return None, None
    return commit.stdout.strip(), not status.stdout.strip()


def recorded_revision(record: dict) -> tuple[str | None, bool | None]:
    """The (commit, tree clean) that a run's record holds; a record from before ``git_clean`` marks a tree
    with uncommitted changes by ``+dirty`` after the commit."""
    revision = record.get("git_revision")
    if not revision:
        return None, None
    if "git_clean" in record:
        return str(revision), record["git_clean"]
    commit, dirty = str(revision).removesuffix("+dirty"), str(revision).endswith("+dirty")
    return commit, not dirty


def in_history(commit: str) -> bool | None:
    """Whether ``commit`` is an ancestor of this checkout's HEAD (False also for a commit this repository
    does not hold, e.g. one of a branch rebased since); None without git."""
    try:
        result = _git("merge-base", "--is-ancestor", commit, "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    return {0: True, 1: False}.get(result.returncode, False if result.returncode == 128 else None)


def full_commit(revision: str) -> str | None:
    """The full hash of ``revision`` (a hash, branch or tag) in this repository, None where it has none."""
    try:
        result = _git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def run_record(device: torch.device, precision: str, data: str | None) -> dict:
    """What a run's ``metrics.json`` records about where it ran (its date: now, in UTC); ``data`` is the
    data module's ``description`` (``"<kind> at <root>"``)."""
    commit, clean = git_state()
    return {
        "device": describe_device(device),
        "torch_version": torch.__version__,
        "git_revision": commit,
        "git_clean": clean,
        "precision": str(precision),
        "data": data,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def sweep_command(sweep: Path, job_dirs: list[Path]) -> list[str]:
    """The ``python train.py`` command line(s) that made the sweep, from Hydra's records: the sweep's
    ``multirun.yaml`` (one command), else every job's ``.hydra/hydra.yaml`` (one command per distinct one)."""
    commands: list[str] = []
    for record in _hydra_records(sweep, job_dirs):
        overrides = OmegaConf.load(record).hydra.overrides
        multirun = "hydra.mode=MULTIRUN" in overrides.hydra
        words = [word for word in overrides.hydra if word != "hydra.mode=MULTIRUN"] + list(overrides.task)
        command = shlex.join(["python", "train.py", *(["-m"] if multirun else []), *words])
        if command not in commands:
            commands.append(command)
    return commands


def _hydra_records(sweep: Path, job_dirs: list[Path]) -> list[Path]:
    if (sweep / "multirun.yaml").is_file():
        return [sweep / "multirun.yaml"]
    return [job / ".hydra" / "hydra.yaml" for job in job_dirs if (job / ".hydra" / "hydra.yaml").is_file()]


def recorded_sweep_dir(sweep: Path, job_dirs: list[Path]) -> str:
    """The folder the sweep ran in, as Hydra recorded it (``hydra.sweep.dir``), else ``sweep``."""
    for record in _hydra_records(sweep, job_dirs):
        hydra = OmegaConf.load(record)
        folder = OmegaConf.select(hydra, "hydra.sweep.dir", throw_on_resolution_failure=False)
        if isinstance(folder, str):
            return folder
    return str(sweep)


def sweep_provenance(sweep: Path, job_dirs: list[Path], metrics: list[dict], data: str | None) -> dict:
    """The provenance of a sweep's results: its command and folder, every distinct value the finished runs
    recorded (device, torch, precision, data), their revisions and whether each tree was clean, the span of
    their dates; ``data`` replaces the recorded data description when given (e.g. "CIFAR-10 JPEG copy,
    quality 75", which the files cannot tell)."""
    provenance: dict = {
        "command": sweep_command(sweep, job_dirs),
        "sweep_dir": recorded_sweep_dir(sweep, job_dirs),
    }
    for key in RECORDED:
        values = {str(record.get(key)) for record in metrics if record.get(key) is not None}
        provenance[key] = sorted(values) or ["not recorded"]
    if data:
        provenance["data"] = [data]
    revisions = [recorded_revision(record) for record in metrics]
    provenance["git_revision"] = sorted({commit for commit, _ in revisions if commit}) or ["not recorded"]
    cleanness = sorted({clean for commit, clean in revisions if commit})
    provenance["git_tree_clean"] = cleanness or ["not recorded"]
    dates = sorted(record["date"] for record in metrics if record.get("date"))
    provenance["dates"] = [dates[0], dates[-1]] if dates else ["not recorded"]
    provenance["runs_finished"] = len(metrics)
    provenance["runs"] = len(job_dirs)
    return provenance
