"""What ``python -m cbam.report`` writes: results.csv, results.md, results.png, differences.png and
provenance.json, from the :class:`Table` that :mod:`cbam.analysis.report` computes (this module formats, it
computes no statistics), with no absolute path of the machine that ran the study (:func:`portable`)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cbam.analysis.statistics import CONFIDENCE
from cbam.runtime.atomic import write_atomically
from cbam.training.run_files import BEST_VAL_ACC, METRICS_FILE, TEST_ACC

#: (key in metrics.json and column of results.csv, heading in results.md)
ACCURACIES = ((BEST_VAL_ACC, "best val acc (%)"), (TEST_ACC, "test acc (%)"))
DASH = "–"
#: beside a train step measured by a loaded or uneven run (cbam.analysis.report.cost_flags)
FLAGGED = "⚠"
#: what stands for the machine's part of a path that :func:`portable` cuts (ASCII: a kept override, e.g.
#: ``data.root=.../cifar10-jpeg``, stays one that Hydra parses)
ELIDED = "..."
#: an absolute path: a ``/`` at the start of a word (or after ``=``, a quote, a bracket or a comma), then
#: folders, and a last part that is kept
_ABSOLUTE_PATH = re.compile(
    r"""(?:(?<=^)|(?<=[\s=\"'(\[,]))/(?:[^\s\"'()\[\],]+/)*([^\s\"'()\[\],/]+)/?""", re.M
)


def portable(text: str) -> str:
    """``text`` with each absolute path cut to its last part (``/tmp/data/cifar10-jpeg`` ->
    ``.../cifar10-jpeg``): the folders of the machine that ran a study say nothing to a reader of its results
    (the command's ``data.root=.../cifar10-jpeg`` still names the data's folder). Relative paths, URLs and
    metric names (``val/acc``) are left as they are; a cut text is cut no further."""
    return _ABSOLUTE_PATH.sub(lambda match: f"{ELIDED}/{match.group(1)}", text)


def _portable(value):
    if isinstance(value, str):
        return portable(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_portable(item) for item in value)
    if isinstance(value, dict):
        return {_portable(key): _portable(item) for key, item in value.items()}
    return value


@dataclass
class Table:
    """One study: a row per configuration and everything said around the rows."""

    title: str
    rows: list[dict]  # results.csv's rows
    labels: list[str]  # one per row: its varied overrides, for the figure and the sentences
    keys: list[str]  # the overrides that vary between configurations: the first columns
    is_baseline: list[bool]  # per row: some configuration is compared with it
    common: list[str]  # overrides shared by every configuration
    counts: str  # "N jobs, M finished, in K configurations (...)"
    unfinished: list[str]  # names of jobs without metrics.json
    sentences: list[str]  # each comparison with a baseline, in words
    provenance: dict
    #: per configuration label: {curve: [(epoch, mean, std), ...]} over its finished seeds (may be empty)
    curves: dict = field(default_factory=dict)
    #: what the report warns of (said on stderr, not written): e.g. a revision outside this history
    warnings: list[str] = field(default_factory=list)

    def portable(self) -> Table:
        """This table with every absolute path cut (:func:`portable`)."""
        return dataclasses.replace(
            self, **{item.name: _portable(getattr(self, item.name)) for item in dataclasses.fields(self)}
        )


# -------------------------------------------------------------------------------------------- formatting


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return DASH
    return f"{100 * mean:.2f} ± {DASH if std is None else f'{100 * std:.2f}'}"


def _difference(row: dict, column: str) -> str:
    difference, low, high = (row[f"{column}_diff{part}"] for part in ("", "_ci_low", "_ci_high"))
    if difference is None:
        return DASH
    interval = f" [{100 * low:+.2f}, {100 * high:+.2f}]" if low is not None else ""
    return f"{100 * difference:+.2f}{interval}"


def _si(value: float | None) -> str:
    if value is None:
        return DASH
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:.0f}"


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}x"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 1:
        return f"{1000 * seconds:.1f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def short_value(value: object) -> str:
    """An override value for display: long floats (an Optuna trial's) to 4 significant digits."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.4g}" if "." in text and len(text) > 8 else text


# ---------------------------------------------------------------------------------------------- writing


def _write(path: Path, content: str | bytes) -> None:
    """``path`` replaced whole or not at all (a report run again on a full disk keeps the previous files)."""
    data = content.encode() if isinstance(content, str) else content
    write_atomically(path, lambda file: file.write(data), prefix=f".{path.name}.")


def _save_figure(figure, path: Path) -> None:
    image = io.BytesIO()
    figure.savefig(image, dpi=120, format="png")
    _write(path, image.getvalue())


def write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    _write(path, text.getvalue())


def markdown(table: Table) -> str:
    first = table.keys or ["configuration"]
    headings = [
        *first,
        "n",
        *(heading for _, heading in ACCURACIES),
        f"Δ test acc vs baseline [{CONFIDENCE:.0%} CI]",
        "params",
        "FLOPs/image",
        "train step",
        "epoch time",
        "epoch time vs baseline",
        "train time",
    ]
    lines = [f"# {table.title}", ""]
    lines.append(
        f"{table.counts}. Accuracies in %: mean ± sample standard deviation (n − 1) over the finished seeds, "
        f"{DASH} when n = 1. Best val acc is the highest validation accuracy of a run; test acc is the test "
        f"accuracy at its end (best checkpoint). Δ is the difference of mean test accuracy from the "
        f"configuration's baseline (no attention, same network, same other settings), in points, with a "
        f"{CONFIDENCE:.0%} Welch t interval over seeds. FLOPs are counted by torch.utils.flop_counter for "
        f"one image; train step is the median wall-clock time of a run's training steps (its batch's loading "
        f"included; {DASH} for runs that did not record it), epoch time that of fit (validation included) per epoch, as a ratio to the baseline's "
        f"beside it, and train time that of the whole fit, all means over seeds. A train step marked "
        f"{FLAGGED} comes from a run whose step times are no clean measurement, named below the table."
    )
    if table.common:
        lines += ["", "Common to every configuration: " + " ".join(f"`{item}`" for item in table.common)]
    rule = "|" + "|".join(["---"] * len(first) + ["---:"] * (len(headings) - len(first))) + "|"
    lines += ["", "| " + " | ".join(headings) + " |", rule]
    for row, label, is_baseline in zip(table.rows, table.labels, table.is_baseline):
        cells = [
            *([short_value(row[key]) for key in table.keys] if table.keys else [label]),
            str(row["n"]),
            *(_percent(row[f"{column}_mean"], row[f"{column}_std"]) for column, _ in ACCURACIES),
            "baseline" if is_baseline else _difference(row, "test_acc"),
            _si(row["params"]),
            _si(row["flops_per_image"]),
            _duration(row["train_step_s_median"]) + (f" {FLAGGED}" if row["cost_flags"] else ""),
            _duration(row["epoch_time_s_mean"]),
            _ratio(row["epoch_time_vs_baseline"]),
            _duration(row["train_time_s_mean"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    flagged = [row["cost_flags"] for row in table.rows if row["cost_flags"]]
    if flagged:
        lines += [
            "",
            f"{FLAGGED} Train step of a loaded or uneven run (its time per step is not the configuration's cost "
            f"alone): {'; '.join(flagged)}",
        ]
    if table.unfinished:
        lines += ["", f"Unfinished jobs (no {METRICS_FILE}, not counted): {', '.join(table.unfinished)}"]
    lines += ["", "## Against the baseline (test accuracy)", ""]
    lines += [f"- {sentence}" for sentence in table.sentences] or [
        "No configuration has a baseline row (no attention, same network) in this sweep."
    ]
    lines += ["", "## Provenance", ""]
    for key, value in table.provenance.items():
        lines.append(f"- {key}: {'; '.join(map(str, value)) if isinstance(value, list) else value}")
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
    _save_figure(figure, path)


def plot_differences(path: Path, table: Table, column: str = "test_acc"):
    """A forest plot: per configuration compared with a baseline, the difference of its mean ``column``
    from the baseline's (a dot) with the 95% Welch interval of results.csv (a line), and a line at zero.

    An interval that excludes zero is drawn in colour, one that contains it in grey; a configuration with
    one seed on either side has a hollow dot and no interval. Returns the figure (drawn and saved).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heading = dict(ACCURACIES)[column].replace(" (%)", "")
    by_label = dict(zip(table.labels, table.rows))
    compared = [
        (text, row) for text, row in zip(table.labels, table.rows) if row[f"{column}_diff"] is not None
    ]
    several_baselines = len({row["baseline"] for _, row in compared}) > 1
    figure = Figure(figsize=(8, 1.5 + 0.4 * max(len(compared), 1)), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    axis.set_title(f"{path.parent.name}: each configuration against its baseline")
    if not compared:
        axis.set_axis_off()
        axis.text(0.5, 0.5, "no configuration has a baseline in this sweep", ha="center", va="center")
        _save_figure(figure, path)
        return figure
    axis.axvline(0, color="black", linewidth=1)
    has_interval = [row[f"{column}_diff_ci_low"] is not None for _, row in compared]
    colours = [
        "tab:blue" if interval and not _contains_zero(row, column) else "grey"
        for interval, (_, row) in zip(has_interval, compared)
    ]
    ranged = [y for y, interval in enumerate(has_interval) if interval]
    axis.hlines(
        ranged,
        [100 * compared[y][1][f"{column}_diff_ci_low"] for y in ranged],
        [100 * compared[y][1][f"{column}_diff_ci_high"] for y in ranged],
        colors=[colours[y] for y in ranged],
        linewidth=2.5,
    )
    axis.scatter(
        [100 * row[f"{column}_diff"] for _, row in compared],
        range(len(compared)),
        facecolors=[colour if interval else "white" for colour, interval in zip(colours, has_interval)],
        edgecolors=colours,
        zorder=3,
    )
    for y, (interval, (_, row)) in enumerate(zip(has_interval, compared)):
        seeds = f"n = {row['n']} vs {by_label[row['baseline']]['n']}" + ("" if interval else ", no interval")
        axis.annotate(
            f"{_difference(row, column)}  ({seeds})",
            (1.02, y),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=8,
        )
    axis.set_yticks(
        range(len(compared)),
        [f"{text}\nvs {row['baseline']}" if several_baselines else text for text, row in compared],
        fontsize=8,
    )
    axis.set_ylim(len(compared) - 0.5, -0.5)  # the first configuration on top
    baseline = "" if several_baselines else f" vs {compared[0][1]['baseline']}"
    axis.set_xlabel(
        f"Δ {heading}{baseline} (points): difference of means over seeds, {CONFIDENCE:.0%} Welch t interval"
    )
    axis.grid(axis="x", alpha=0.3)
    _save_figure(figure, path)
    return figure


#: the curves of the study figure: (curve in curves.csv, panel title, in percent)
STUDY_CURVES = (("val/acc", "validation accuracy (%)", True), ("train/loss", "training loss", False))


def plot_curves(path: Path, table: Table):
    """``curves.png``: per configuration, the mean over its seeds of each :data:`STUDY_CURVES` curve per
    epoch, with a band of one standard deviation. Returns the figure (drawn and saved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(STUDY_CURVES))
    for axis, (key, title, percent) in zip(axes, STUDY_CURVES):
        scale = 100 if percent else 1
        for text, curves in table.curves.items():
            points = curves.get(key)
            if not points:
                continue
            epochs, means, stds = zip(*points)
            means, stds = [scale * m for m in means], [scale * s for s in stds]
            line = axis.plot(
                epochs, means, marker="o" if len(epochs) < 30 else None, markersize=3, label=text
            )
            low, high = [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)]
            axis.fill_between(epochs, low, high, color=line[0].get_color(), alpha=0.15, linewidth=0)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize=7)
    figure.suptitle(f"{path.parent.name}: mean over seeds, band ± 1 std")
    _save_figure(figure, path)
    return figure


def _contains_zero(row: dict, column: str) -> bool:
    return row[f"{column}_diff_ci_low"] <= 0 <= row[f"{column}_diff_ci_high"]


def write_all(folder: Path, table: Table) -> dict[str, Path]:
    """results.csv, results.md, results.png, differences.png, provenance.json and (where the runs wrote
    curves) curves.png into ``folder`` (created); their paths."""
    table = table.portable()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"results.{name}" for name in ("csv", "md", "png")}
    paths["differences"] = folder / "differences.png"
    paths["provenance"] = folder / "provenance.json"
    write_csv(paths["csv"], table.rows)
    _write(paths["md"], markdown(table))
    plot(paths["png"], table.rows, table.labels)
    plot_differences(paths["differences"], table)
    _write(paths["provenance"], json.dumps(table.provenance, indent=2) + "\n")
    if any(table.curves.values()):
        paths["curves"] = folder / "curves.png"
        plot_curves(paths["curves"], table)
    return paths
