"""Tabulate a Hydra multirun: ``python -m cbam.report <sweep dir> [--out results/<study>]``.

Every job folder of the sweep (any folder holding ``.hydra/config.yaml``) is read: its overrides
(``.hydra/overrides.yaml``), its resolved config and the ``metrics.json`` that
:class:`cbam.callbacks.RunMetrics` writes when the run ends. Jobs are grouped by configuration, i.e. by all
their overrides except ``seed`` and ``hydra*`` (and any ``--ignore`` key), and by data set (from the
resolved config: the data module, its folder and image size; a ``data set`` column when the jobs used
several), and the sweep dir (or ``--out``) receives:

* ``results.csv``: one row per configuration: the overrides that vary, the number of finished seeds,
  best val acc and final test acc (mean and sample standard deviation over seeds), each one's difference
  from the configuration's baseline with a 95% Welch t interval over seeds, parameters, FLOPs per image,
  mean time per optimizer step and of the whole fit, the unfinished jobs;
* ``results.md``: the same as a Markdown table (accuracies in %), each comparison in words, provenance;
* ``results.png``: best val acc and test acc per configuration, mean with std error bars;
* ``differences.png``: a forest plot of each configuration's difference of mean test acc from its
  baseline, with its 95% interval and a line at zero;
* ``provenance.json``: the sweep's command and what its runs recorded (see :mod:`cbam.runtime.provenance`).

A configuration's baseline is the configuration without attention (resolved ``model.use_cbam_block`` and
``model.use_cbam_class`` both false) of the same network and data set whose other overrides are the same,
attention keys (:data:`ATTENTION_KEYS`) aside. A configuration without attention names no attention kind:
its attention keys (:data:`KIND_KEYS`) read ``none``, and its label leaves them out.

A run's cost is the median wall-clock time of its training steps (what :class:`cbam.callbacks.RunMetrics`
measured), averaged over seeds; a run whose step times spread widely (p90 over median above
:data:`SPREAD_LIMIT`) or whose machine's load average exceeded its cores while it trained is flagged beside
that number and named, not averaged in unremarked. Runs recorded before those measurements show none.

The files travel: the report writes no absolute path of the machine that ran the sweep (each one is cut to
``.../<its last part>``: :func:`cbam.analysis.report_files.portable`), also in the runs it keeps. The runs'
revision is checked against this checkout: one that is not an ancestor of HEAD (a rebased branch, code
never committed) or a tree with uncommitted changes is warned of; ``--landed`` names the landed commit that
carries the code such runs ran, recorded in the provenance.

A job without ``metrics.json`` is unfinished: it is counted, not averaged. A missing folder, a folder with
no job and a sweep with no finished job end with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from cbam.analysis.report_files import ACCURACIES, Table, portable, short_value, write_all
from cbam.analysis.statistics import Difference, in_words, welch_difference
from cbam.errors import ProjectError, ReportError, print_error, say
from cbam.models.network_config import OPTION_KEYS, PLACEMENT_KEYS
from cbam.runtime.atomic import write_atomically
from cbam.runtime.provenance import full_commit, in_history, recorded_revision, sweep_provenance
from cbam.training import run_files

#: overrides that choose the attention only: a configuration and its baseline may differ in these
ATTENTION_KEYS = frozenset(
    ["cbam", "attention", "model.attention_kind"]
    + [f"model.{key}" for key in (*PLACEMENT_KEYS, *sorted(OPTION_KEYS))]
)
#: of those, the ones that choose what kind of attention and its options, not where it goes: a configuration
#: without attention shows none of them (:data:`NO_ATTENTION`)
KIND_KEYS = ATTENTION_KEYS - {"cbam", *(f"model.{key}" for key in PLACEMENT_KEYS)}
NO_ATTENTION = "none"
#: overrides that choose the network: a configuration's baseline has the same network (:func:`network`)
NETWORK_OVERRIDES = frozenset({"model", "model.arch", "model.depth", "model.widen_factor", "model.name"})
#: a run's step times spread widely when their 90th percentile exceeds the median by this factor
SPREAD_LIMIT = 1.5

#: the files of each job that ``--out`` keeps under ``<out>/runs/<job>/``: its config, numbers and small figures
KEPT_FILES = (
    *run_files.HYDRA_FILES, run_files.METRICS_FILE, run_files.CLASS_TABLE, run_files.CURVES_TABLE,
    run_files.CURVES_FIGURE, run_files.CONFUSION_FIGURE,
)  # fmt: skip
#: the kept files that are text, whose absolute paths are cut (:func:`portable`)
TEXT_SUFFIXES = (".yaml", ".json", ".csv")

#: the column of the data set, when the jobs of a sweep used more than one
DATA_SET = "data set"


@dataclass
class Job:
    name: str
    overrides: dict[str, str]
    seed: object = None
    metrics: dict | None = None
    #: the network without its attention (``network_name`` of its config: resnet18, wrn28-10, ...)
    network: object = None
    has_attention: bool = True
    data: str = ""
    #: the config group options the job ran with (hydra.runtime.choices) and its config: what a key the job
    #: did not override stood at
    choices: dict = field(default_factory=dict)
    config: object = None
    #: its curves.csv (cbam.callbacks.TrainingCurves): {"val/acc": {epoch: value}, ...}
    curves: dict = field(default_factory=dict)
    #: its number in the sweep that ran it (hydra.job.num), None where not recorded
    number: int | None = None

    def setting(self, key: str) -> str | None:
        """The job's value of override key ``key``: its override, else its config group's option or config
        value (the default it ran with), else None."""
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return str(self.choices[key])
        value = OmegaConf.select(self.config, key, default=None, throw_on_resolution_failure=False)
        if value is None or OmegaConf.is_config(value):
            return None
        return str(value).lower() if isinstance(value, bool) else str(value)


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

    def baseline_key(self) -> tuple:
        """What a configuration shares with its baseline: the network and the overrides that are not about
        attention (nor those that pick the network, which is compared instead)."""
        skipped = ATTENTION_KEYS | NETWORK_OVERRIDES
        others = tuple(sorted((k, v) for k, v in self.overrides if k not in skipped))
        return self.jobs[0].network, others


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


def data_set(config) -> str:
    """The data set a job used, from its resolved config: ``"<data module> at <root>"`` (and the size its
    images were resized to), e.g. ``"CIFAR100 at data"``; empty for a config without a data module."""
    data = config.get("data") or {}
    if "_target_" not in data:
        return ""
    kind = str(data["_target_"]).rsplit(".", 1)[-1].removesuffix("DataModule")
    resized = f" ({data['image_size']}px)" if data.get("image_size") else ""
    return f"{kind} at {data.get('root')}{resized}"


def network(config) -> str:
    """The job's network: its config's ``network_name``, or (a config from before that key) its ResNet."""
    name = OmegaConf.select(config, "network_name", default=None, throw_on_resolution_failure=False)
    return str(name) if name is not None else f"resnet{OmegaConf.select(config, 'model.depth')}"


def read_job(path: Path, sweep: Path) -> Job:
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
    config = OmegaConf.load(path / ".hydra" / "config.yaml")
    metrics = run_files.read_metrics(path)  # None: not written yet, half-written or damaged (unfinished)
    name = str(path.relative_to(sweep)) if path != sweep else path.name
    model = config.get("model") or {}
    has_attention = bool(model.get("use_cbam_block", True) or model.get("use_cbam_class", True))
    overrides = dict(parse_override(item) for item in overrides)
    hydra_file = path / ".hydra" / "hydra.yaml"
    hydra = OmegaConf.load(hydra_file) if hydra_file.is_file() else OmegaConf.create()
    return Job(
        name, overrides, config.get("seed"), metrics, network(config), has_attention, data_set(config),
        choices=dict(OmegaConf.select(hydra, "hydra.runtime.choices") or {}), config=config,
        curves=read_curves(path / run_files.CURVES_TABLE), number=OmegaConf.select(hydra, "hydra.job.num"),
    )  # fmt: skip


def read_curves(path: Path) -> dict[str, dict[int, float]]:
    """A run's ``curves.csv``: {column: {epoch: value}} (empty without the file)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {
        key: {int(row["epoch"]): float(row[key]) for row in rows if row[key]}
        for key in (rows[0].keys() if rows else ())
        if key != "epoch"
    }


def curve_means(group: Group) -> dict[str, list[tuple[int, float, float]]]:
    """Per curve of the group's finished jobs: (epoch, mean, std over the seeds that reached it)."""
    keys = sorted({key for job in group.finished for key in job.curves})
    means = {}
    for key in keys:
        epochs = sorted({epoch for job in group.finished for epoch in job.curves.get(key, {})})
        points = []
        for epoch in epochs:
            mean, std = mean_std(
                [job.curves[key][epoch] for job in group.finished if epoch in job.curves.get(key, {})]
            )
            points.append((epoch, mean, std or 0.0))
        means[key] = points
    return means


def fill_settings(jobs: list[Job], ignore: set[str]) -> None:
    """Where some jobs override a key and others do not (``attention=se`` in the SE jobs only), give the
    others the value they ran with (``attention=cbam``): jobs are then grouped and labelled by what they
    ran, not by what their command line said. A job without attention is given no attention kind or option
    (:data:`KIND_KEYS`): it ran none."""
    keys = {key for job in jobs for key in job.overrides if not excluded(key, ignore)}
    for job in jobs:
        for key in sorted(keys - job.overrides.keys()):
            if key in KIND_KEYS and not job.has_attention:
                continue
            value = job.setting(key)
            if value is not None:
                job.overrides[key] = value


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


def find_baselines(groups: list[Group]) -> list[Group | None]:
    """Each group's baseline group (None for a baseline itself, or when the sweep has none for it); of
    several candidates, the first."""
    baselines: dict[tuple, Group] = {}
    for group in groups:
        if not group.jobs[0].has_attention:
            baselines.setdefault(group.baseline_key(), group)
    return [None if not g.jobs[0].has_attention else baselines.get(g.baseline_key()) for g in groups]


def accuracies(group: Group, column: str) -> list[float]:
    return [job.metrics[column] for job in group.finished if job.metrics.get(column) is not None]


def compare(group: Group, baseline: Group | None, column: str) -> Difference | None:
    values, reference = accuracies(group, column), accuracies(baseline, column) if baseline else []
    return welch_difference(values, reference) if values and reference else None


def shown_settings(group: Group, keys: list[str]) -> dict[str, str]:
    """The group's overrides as its row shows them: a configuration without attention has
    :data:`NO_ATTENTION` for each attention kind or option key (:data:`KIND_KEYS`) it has or that varies."""
    settings = dict(group.overrides)
    if not group.jobs[0].has_attention:
        settings.update({key: NO_ATTENTION for key in [*settings, *keys] if key in KIND_KEYS})
    return settings


def label(group: Group, keys: list[str]) -> str:
    """The configuration in a few words: its varied overrides (all of them when none varies). A
    configuration without attention is labelled without its attention kind and options (``cbam=none``),
    unless they are all that varies (``attention=none``)."""
    settings = shown_settings(group, keys)
    if keys:
        shown = [key for key in keys if key in settings]
        if not group.jobs[0].has_attention and any(key not in KIND_KEYS for key in shown):
            shown = [key for key in shown if key not in KIND_KEYS]
        return ", ".join(f"{key}={short_value(settings[key])}" for key in shown)
    return " ".join(f"{k}={v}" for k, v in group.overrides) or "(defaults)"


def epoch_time(group: Group) -> float | None:
    """The mean over the finished seeds of the fit's wall-clock time per epoch (validation included)."""
    time, epochs = run_files.TRAIN_TIME, run_files.EPOCHS
    return mean_std(
        [job.metrics[time] / job.metrics[epochs] for job in group.finished
         if job.metrics.get(time) and job.metrics.get(epochs)]
    )[0]  # fmt: skip


def cost_flags(metrics: dict) -> list[str]:
    """Why a run's step times are not a clean measurement of its cost: steps that spread widely, or a
    machine loaded beyond its cores while it trained (nothing for a run that measured neither)."""
    flags = []
    steps = metrics.get(run_files.TRAIN_STEP) or {}
    if steps.get("median") and steps.get("p90") and steps["p90"] / steps["median"] > SPREAD_LIMIT:
        flags.append(f"step times spread (p90/median {steps['p90'] / steps['median']:.2f})")
    load, cpus = metrics.get(run_files.LOAD_AVERAGE) or {}, metrics.get(run_files.CPUS)
    if load.get("mean") is not None and cpus and load["mean"] > cpus:
        flags.append(f"load average {load['mean']:.1f} on {cpus} cores")
    return flags


def summarise(group: Group, keys: list[str], baseline: Group | None, baseline_label: str) -> dict:
    finished = group.finished
    settings = shown_settings(group, keys)
    row: dict = {key: settings.get(key, "") for key in keys}
    row["n"] = len(finished)
    row["seeds"] = " ".join(str(job.seed) for job in finished)
    for column, _ in ACCURACIES:
        mean, std = mean_std([job.metrics.get(column) for job in finished])
        row[f"{column}_mean"], row[f"{column}_std"] = mean, std
    row["baseline"] = baseline_label if baseline else ""
    for column, _ in ACCURACIES:
        result = compare(group, baseline, column)
        row[f"{column}_diff"] = result.difference if result else None
        row[f"{column}_diff_ci_low"] = result.low if result else None
        row[f"{column}_diff_ci_high"] = result.high if result else None
    for column in ("params", "flops_per_image"):
        values = [job.metrics.get(column) for job in finished if job.metrics.get(column) is not None]
        row[column] = round(statistics.fmean(values)) if values else None
    row["step_time_s_mean"] = mean_std([job.metrics.get(run_files.STEP_TIME) for job in finished])[0]
    row["train_step_s_median"] = mean_std(
        [(job.metrics.get(run_files.TRAIN_STEP) or {}).get("median") for job in finished]
    )[0]
    row["cost_flags"] = "; ".join(
        f"{job.name}: {', '.join(flags)}" for job in finished if (flags := cost_flags(job.metrics))
    )
    row["train_time_s_mean"] = mean_std([job.metrics.get(run_files.TRAIN_TIME) for job in finished])[0]
    row["epoch_time_s_mean"] = epoch_time(group)
    reference = epoch_time(baseline) if baseline else None
    row["epoch_time_vs_baseline"] = (
        row["epoch_time_s_mean"] / reference if row["epoch_time_s_mean"] and reference else None
    )
    row["unfinished"] = " ".join(job.name for job in group.unfinished)
    row["jobs"] = " ".join(job.name for job in group.jobs)
    return row


def check_revisions(provenance: dict, metrics: list[dict], landed: str | None, how: str | None) -> list[str]:
    """The warnings about the code the runs recorded (a revision that is not an ancestor of this
    checkout's HEAD, a tree with uncommitted changes); with ``landed`` (a commit of this history that
    carries that code, found as ``how`` says), that commit is recorded in ``provenance`` instead of the
    first warning. Raises :class:`ReportError` for a ``landed`` that is not in this history."""
    warnings = []
    revisions = {recorded_revision(record) for record in metrics}
    outside = sorted({commit for commit, _ in revisions if commit and in_history(commit) is False})
    if landed is not None:
        commit = full_commit(landed)
        if commit is None or not in_history(commit):
            raise ReportError(f"--landed {landed}: not a commit of this checkout's history (git log HEAD)")
        provenance["landed_revision"] = commit
        provenance["landed_revision_check"] = how or "not said"
    elif outside:
        warnings.append(
            f"the runs recorded git revision {', '.join(outside)}, which is not an ancestor of this "
            f"checkout's HEAD: no checkout of this history holds that code; run studies from committed code "
            f"that lands, or name the landed commit that carries it with --landed"
        )
    if any(clean is False for _, clean in revisions):
        warnings.append(
            "some runs ran on a tree with uncommitted changes: their recorded revision does not hold all of "
            "their code"
        )
    return warnings


def tabulate(
    sweep: Path,
    ignore: set[str],
    data: str | None,
    study: str | None = None,
    landed: str | None = None,
    landed_check: str | None = None,
) -> Table:
    """Read the sweep and compute every row, comparison and the provenance; ``study`` names it in the
    title (default: the sweep's folder), ``landed`` and ``landed_check`` as :func:`check_revisions`."""
    if not sweep.is_dir():
        raise ReportError(f"{sweep}: no such directory")
    job_dirs = find_job_dirs(sweep)
    if not job_dirs:
        raise ReportError(
            f"{sweep} holds no Hydra job (no <job>/.hydra/config.yaml): an empty or not-yet-started sweep?"
        )
    # in the order the sweep ran them (job folders named by their overrides sort otherwise), which is the
    # order of the configurations in the tables
    jobs = sorted(
        (read_job(path, sweep) for path in job_dirs), key=lambda job: (job.number is None, job.number or 0)
    )
    fill_settings(jobs, ignore)
    if len({job.data for job in jobs}) > 1:  # one more setting that tells configurations apart
        for job in jobs:
            job.overrides = {DATA_SET: job.data, **job.overrides}
    finished = [job.metrics for job in jobs if job.metrics is not None]
    if not finished:
        raise ReportError(
            f"none of the {len(jobs)} jobs in {sweep} has finished (no {run_files.METRICS_FILE} yet): rerun "
            f"the report when a job has ended"
        )
    groups = [group for group in group_jobs(jobs, ignore) if group.finished]
    keys = varied_keys(groups)
    labels = [label(group, keys) for group in groups]
    baselines = find_baselines(groups)
    label_of = {id(group): text for group, text in zip(groups, labels)}
    rows = [
        summarise(group, keys, baseline, label_of[id(baseline)] if baseline else "")
        for group, baseline in zip(groups, baselines)
    ]
    sentences = []
    for row, text, group, baseline in zip(rows, labels, groups, baselines):
        result = compare(group, baseline, "test_acc")
        if result is not None:
            baseline_n = len(accuracies(baseline, "test_acc"))
            sentences.append(in_words(text, label_of[id(baseline)], result, row["n"], baseline_n))
    dropped = ", ".join(["seed", "hydra*", *sorted(ignore)])
    compared_with = {id(baseline) for baseline in baselines if baseline is not None}
    provenance = sweep_provenance(sweep, job_dirs, finished, data)
    warnings = check_revisions(provenance, finished, landed, landed_check)
    return Table(
        title=f"Results of {study or sweep.resolve().name}",
        rows=rows,
        labels=labels,
        keys=keys,
        is_baseline=[id(group) in compared_with for group in groups],
        common=[f"{k}={v}" for k, v in groups[0].overrides if k not in keys] if keys else [],
        counts=f"{len(jobs)} jobs, {len(finished)} finished, in {len(groups)} configurations (jobs grouped "
        f"by all their overrides except {dropped})",
        unfinished=[job.name for job in jobs if job.metrics is None],
        sentences=sentences,
        provenance=provenance,
        curves={text: curve_means(group) for text, group in zip(labels, groups)},
        warnings=warnings,
    )


def keep_runs(sweep: Path, folder: Path) -> None:
    """Copy the sweep's small files (:data:`KEPT_FILES` of every job, ``multirun.yaml``) into ``folder``,
    each job under its own name: what the report rebuilds the same tables from, without checkpoints. The
    text files' absolute paths are cut (:func:`portable`); a ``folder`` that is the sweep itself (a report
    rebuilt from the runs it kept) has its files' paths cut in place."""
    in_place = folder.resolve() == sweep.resolve()
    for path in [
        sweep / "multirun.yaml",
        *(job / name for job in find_job_dirs(sweep) for name in KEPT_FILES),
    ]:
        if not path.is_file():
            continue
        content = path.read_bytes()
        if path.suffix in TEXT_SUFFIXES:
            content = portable(content.decode()).encode()
        if in_place and content == path.read_bytes():
            continue
        target = folder / path.relative_to(sweep)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda file: file.write(content), prefix=f".{target.name}.")


def report(
    sweep: str | Path,
    ignore: set[str] = frozenset(),
    out: str | Path | None = None,
    data: str | None = None,
    landed: str | None = None,
    landed_check: str | None = None,
) -> dict[str, Path]:
    """Write results.csv, results.md, results.png, differences.png and provenance.json into ``out``
    (default: the sweep dir), titled by its folder's name (the study's); returns their paths. ``data``
    describes the data when the runs' record is not enough; ``landed``: :func:`check_revisions`. Its
    warnings are said on stderr."""
    sweep = Path(sweep)
    folder = Path(out) if out is not None else sweep
    table = tabulate(sweep, set(ignore), data, folder.resolve().name, landed, landed_check)
    for warning in table.warnings:
        say(f"warning: {warning}")
    if out is not None:
        keep_runs(sweep, folder / "runs")
    return write_all(folder, table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbam.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a Hydra multirun folder, e.g. multirun/ablation/<date>")
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="KEY",
        help="an override key not to group by, besides seed and hydra* (repeatable)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="write the results here, not into the sweep dir: e.g. results/<study>"
    )
    parser.add_argument(
        "--data",
        metavar="TEXT",
        help='describe the data in the provenance, e.g. "CIFAR-10 JPEG copy, quality 75" (default: what the '
        "runs recorded: the kind of data and its folder)",
    )
    parser.add_argument(
        "--landed",
        metavar="REV",
        help="the commit of this history that carries the code the runs ran, when the revision they recorded "
        "is not in it (a rebased branch): recorded in the provenance",
    )
    parser.add_argument(
        "--landed-check",
        metavar="TEXT",
        help="how --landed was found to carry that code, recorded with it",
    )
    args = parser.parse_args(argv)
    try:
        paths = report(
            args.sweep_dir, set(args.ignore), args.out, args.data, args.landed, args.landed_check
        )
    except (
        ProjectError
    ) as error:  # a sweep that cannot be reported; a failed write (the files there are intact)
        return print_error(error)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0
