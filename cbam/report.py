"""Tabulate a Hydra multirun: ``python -m cbam.report <sweep dir>``.

Every job folder of the sweep (any folder holding ``.hydra/config.yaml``) is read: its overrides
(``.hydra/overrides.yaml``), its resolved config and the ``metrics.json`` that
:class:`cbam.callbacks.RunMetrics` writes when the run ends. Jobs are grouped by configuration, i.e. by all
their overrides except ``seed`` and ``hydra*`` (and any ``--ignore`` key), and the sweep dir receives:

* ``results.csv``: one row per configuration: the overrides that vary, the number of finished seeds,
  best val acc and final test acc (mean and sample standard deviation over seeds), parameters, FLOPs per
  image, mean training time, the unfinished jobs;
* ``results.md``: the same as a Markdown table (accuracies in %);
* ``results.png``: best val acc and test acc per configuration, mean with std error bars.

A job without ``metrics.json`` is unfinished: it is counted, not averaged. A missing folder, a folder with
no job and a sweep with no finished job end with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

METRICS_FILE = "metrics.json"
#: (key in metrics.json and column of results.csv, heading in results.md)
ACCURACIES = (("best_val_acc", "best val acc (%)"), ("test_acc", "test acc (%)"))
DASH = "–"


class ReportError(RuntimeError):
    """A sweep that cannot be reported; the message is one line."""


@dataclass
class Job:
    name: str
    overrides: dict[str, str]
    seed: object = None
    metrics: dict | None = None


@dataclass
class Group:
    overrides: tuple[tuple[str, str], ...]
    jobs: list[Job] = field(default_factory=list)

    @property
    def finished(self) -> list[Job]:
        return [job for job in self.jobs if job.metrics is not None]

    @property
    def unfinished(self) -> list[Job]:
        return [job for job in self.jobs if job.metrics is None]


# ---------------------------------------------------------------------------------------------- reading


def _natural(path: Path) -> tuple:
    parts = path.parts
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts)


def parse_override(text: str) -> tuple[str, str]:
    """``"+model.depth=50"`` -> ``("model.depth", "50")``."""
    key, _, value = str(text).partition("=")
    return key.lstrip("+~"), value


def excluded(key: str, ignore: set[str]) -> bool:
    return key == "seed" or key.startswith("hydra") or key in ignore


def find_job_dirs(sweep: Path) -> list[Path]:
    dirs = {config.parent.parent for config in sweep.rglob(".hydra/config.yaml")}
    return sorted(dirs, key=lambda path: _natural(path.relative_to(sweep)))


def read_job(path: Path, sweep: Path) -> Job:
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
    config = OmegaConf.load(path / ".hydra" / "config.yaml")
    metrics = None
    metrics_file = path / METRICS_FILE
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError):
            metrics = None  # half-written or damaged: the job counts as unfinished
    name = str(path.relative_to(sweep)) if path != sweep else path.name
    return Job(name, dict(parse_override(item) for item in overrides), config.get("seed"), metrics)


def group_jobs(jobs: list[Job], ignore: set[str]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for job in jobs:
        settings = tuple((k, v) for k, v in job.overrides.items() if not excluded(k, ignore))
        # the same overrides in any order are the same configuration; the first job's order is shown
        groups.setdefault(tuple(sorted(settings)), Group(settings)).jobs.append(job)
    return list(groups.values())


def varied_keys(groups: list[Group]) -> list[str]:
    """The override keys whose value differs between configurations, in order of first appearance."""
    keys: list[str] = []
    for group in groups:
        keys += [key for key, _ in group.overrides if key not in keys]
    return [key for key in keys if len({dict(g.overrides).get(key) for g in groups}) > 1]


# ---------------------------------------------------------------------------------------------- numbers


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(group: Group, keys: list[str]) -> dict:
    finished = group.finished
    settings = dict(group.overrides)
    row: dict = {key: settings.get(key, "") for key in keys}
    row["n"] = len(finished)
    row["seeds"] = " ".join(str(job.seed) for job in finished)
    for column, _ in ACCURACIES:
        mean, std = mean_std([job.metrics.get(column) for job in finished])
        row[f"{column}_mean"], row[f"{column}_std"] = mean, std
    for column in ("params", "flops_per_image"):
        values = [job.metrics.get(column) for job in finished if job.metrics.get(column) is not None]
        row[column] = round(statistics.fmean(values)) if values else None
    row["train_time_s_mean"] = mean_std([job.metrics.get("train_time_s") for job in finished])[0]
    row["unfinished"] = " ".join(job.name for job in group.unfinished)
    row["jobs"] = " ".join(job.name for job in group.jobs)
    return row


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return DASH
    return f"{100 * mean:.2f} ± {DASH if std is None else f'{100 * std:.2f}'}"


def _si(value: float | None) -> str:
    if value is None:
        return DASH
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _short(value: object) -> str:
    """An override value for display: long floats (an Optuna trial's) to 4 significant digits."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.4g}" if "." in text and len(text) > 8 else text


def _label(row: dict, keys: list[str], group: Group) -> str:
    if keys:
        return ", ".join(f"{key}={_short(row[key])}" for key in keys)
    return " ".join(f"{k}={v}" for k, v in group.overrides) or "(defaults)"


# ---------------------------------------------------------------------------------------------- writing


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def markdown(
    sweep: Path, rows: list[dict], keys: list[str], groups: list[Group], jobs: list[Job], ignore: set[str]
) -> str:
    first = keys or ["configuration"]
    accuracies = [heading for _, heading in ACCURACIES]
    headings = [*first, "n", *accuracies, "params", "FLOPs/image", "train time"]
    lines = [f"# Results of {sweep}", ""]
    finished = sum(job.metrics is not None for job in jobs)
    dropped = ", ".join(["seed", "hydra*", *sorted(ignore)])
    lines.append(
        f"{len(jobs)} jobs, {finished} finished, in {len(groups)} configurations (jobs grouped by all their "
        f"overrides except {dropped}). Accuracies in %: mean ± sample standard deviation (n − 1) over the "
        f"finished seeds, {DASH} when n = 1. Best val acc is the highest validation accuracy of a run; "
        f"test acc is the test accuracy at its end (best checkpoint). FLOPs are counted by "
        f"torch.utils.flop_counter for one image; train time is the mean wall-clock time of fit."
    )
    common = [f"`{k}={v}`" for k, v in groups[0].overrides if k not in keys] if keys else []
    if common:
        lines += ["", "Common to every configuration: " + " ".join(common)]
    rule = "|" + "|".join(["---"] * len(first) + ["---:"] * (len(headings) - len(first))) + "|"
    lines += ["", "| " + " | ".join(headings) + " |", rule]
    for row, group in zip(rows, groups):
        names = [_short(row[key]) for key in keys] if keys else [_label(row, keys, group)]
        cells = [
            *names,
            str(row["n"]),
            *(_percent(row[f"{column}_mean"], row[f"{column}_std"]) for column, _ in ACCURACIES),
            _si(row["params"]),
            _si(row["flops_per_image"]),
            _duration(row["train_time_s_mean"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    unfinished = [job.name for job in jobs if job.metrics is None]
    if unfinished:
        lines += ["", f"Unfinished jobs (no {METRICS_FILE}, not counted): {', '.join(unfinished)}"]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], labels: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = [
        (heading.replace(" (%)", ""), column)
        for column, heading in ACCURACIES
        if any(row[f"{column}_mean"] is not None for row in rows)
    ]
    figure = Figure(figsize=(8, 1.2 + 0.45 * len(rows) * max(len(series), 1)), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    height = 0.8 / max(len(series), 1)
    positions = range(len(rows))
    lows = []
    for index, (name, column) in enumerate(series):
        means = [100 * (row[f"{column}_mean"] or 0) for row in rows]
        stds = [100 * (row[f"{column}_std"] or 0) for row in rows]
        offsets = [p - 0.4 + height * (index + 0.5) for p in positions]
        axis.barh(offsets, means, height, xerr=stds, capsize=3, label=name)
        lows += [m - s for m, s, row in zip(means, stds, rows) if row[f"{column}_mean"] is not None]
    axis.set_yticks(list(positions), labels, fontsize=8)
    axis.invert_yaxis()
    if lows:
        axis.set_xlim(left=max(0.0, min(lows) - 5))
    axis.set_xlabel("accuracy (%): mean ± std over seeds")
    axis.grid(axis="x", alpha=0.3)
    if series:
        axis.legend(fontsize=8)
    axis.set_title(f"{path.parent.name}: {len(rows)} configurations")
    figure.savefig(path, dpi=120)


def report(sweep: str | Path, ignore: set[str] = frozenset()) -> dict[str, Path]:
    """Write results.csv, results.md and results.png into ``sweep``; returns their paths."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise ReportError(f"{sweep}: no such directory")
    job_dirs = find_job_dirs(sweep)
    if not job_dirs:
        raise ReportError(
            f"{sweep} holds no Hydra job (no <job>/.hydra/config.yaml): an empty or not-yet-started sweep?"
        )
    jobs = [read_job(path, sweep) for path in job_dirs]
    if not any(job.metrics is not None for job in jobs):
        raise ReportError(
            f"none of the {len(jobs)} jobs in {sweep} has finished (no {METRICS_FILE} yet): rerun the report "
            f"when a job has ended"
        )
    groups = [group for group in group_jobs(jobs, set(ignore)) if group.finished]
    keys = varied_keys(groups)
    rows = [summarise(group, keys) for group in groups]
    paths = {name: sweep / f"results.{name}" for name in ("csv", "md", "png")}
    write_csv(paths["csv"], rows)
    paths["md"].write_text(markdown(sweep, rows, keys, groups, jobs, set(ignore)))
    plot(paths["png"], rows, [_label(row, keys, group) for row, group in zip(rows, groups)])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbam.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a Hydra multirun folder, e.g. multirun/ablation/<date>")
    parser.add_argument(
        "--ignore", action="append", default=[], metavar="KEY",
        help="an override key not to group by, besides seed and hydra* (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        paths = report(args.sweep_dir, set(args.ignore))
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
