"""A study as one command (``experiment=cpu_study``): the arms sweeper, a study that outlives its sitting
(re-run: finished jobs skipped, the interrupted one resumed, nothing trained twice), and its results kept
under ``results/<study>/runs`` and rebuilt from there alone. Tiny data, a width-4 network."""

from __future__ import annotations

import importlib
import json
import signal
from types import SimpleNamespace

import pytest
from helpers import REPO, load_checkpoint, run_train, write_random_pngs
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.errors import HydraException

#: 10 classes x 10 train images - 20 for validation = 80 images = 10 batches of 8 per epoch
STEPS_PER_EPOCH, EPOCHS = 10, 2
TINY = {
    "data.download": "false",
    "data.batch_size": "8",
    "data.val_size": "20",
    "model.width": "4",
    "model.reduction_ratio": "2",
    "trainer.max_epochs": str(EPOCHS),
    "callbacks.last_checkpoint.every_n_train_steps": "4",
    "callbacks.attention_maps": "null",
    "callbacks.progress_bar": "null",
}


def arms_sweeper_class() -> type:
    """The sweeper class as Hydra's plugin scan leaves it: the scan re-executes Hydra's core plugin modules
    in place, so a class imported before a scan no longer derives from the BasicSweeper they now name."""
    Plugins.instance()
    return importlib.reload(
        importlib.import_module("hydra_plugins.cbam_arms_sweeper.arms_sweeper")
    ).ArmsSweeper


def jobs(arms: list[list[str]], arguments: list[str]) -> list[list[str]]:
    sweeper = arms_sweeper_class()(arms=arms)
    sweeper.hydra_context = SimpleNamespace(config_loader=None)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in sweeper.split_arguments(overrides, None) for job in batch]


def test_arms_are_crossed_with_the_params_seed_by_seed():
    arms = [["cbam=none"], ["cbam=block"], ["cbam=block", "attention=se"]]
    assert jobs(arms, ["seed=0,1", "model.width=16"]) == [
        ["cbam=none", "seed=0", "model.width=16"],
        ["cbam=block", "seed=0", "model.width=16"],
        ["cbam=block", "attention=se", "seed=0", "model.width=16"],
        ["cbam=none", "seed=1", "model.width=16"],
        ["cbam=block", "seed=1", "model.width=16"],
        ["cbam=block", "attention=se", "seed=1", "model.width=16"],
    ]
    # an arm may sweep a key of its own
    assert jobs([["cbam=none"], ["cbam=block", "model.kernel_size=3,7"]], ["seed=0"]) == [
        ["cbam=none", "seed=0"],
        ["cbam=block", "model.kernel_size=3", "seed=0"],
        ["cbam=block", "model.kernel_size=7", "seed=0"],
    ]
    assert jobs([], ["seed=0,1"]) == [["seed=0"], ["seed=1"]]  # no arms: the basic sweeper


def test_a_key_set_by_an_arm_and_again_elsewhere_is_refused():
    with pytest.raises(HydraException, match=r"the arm \['cbam=none'\] sets cbam, which 'cbam=none,block'"):
        jobs([["cbam=none"], ["cbam=block"]], ["cbam=none,block", "seed=0"])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study with two arms and one seed, SIGKILLed at step 13 of its second job, then run again with
    the same command; the report of it into results/ and the report rebuilt from results/runs."""
    scratch = tmp_path_factory.mktemp("study")
    data = write_random_pngs(scratch / "data", 10, 2, [f"class{label}" for label in range(10)])
    record, marker = scratch / "first_steps.txt", scratch / "killed"
    overrides = {**TINY, "data.root": str(data), "data.cache_dir": str(scratch / "cache")}
    kill = {
        "callbacks.kill._target_": "reliability_signals.SignalOnce",
        "callbacks.kill.step": str(STEPS_PER_EPOCH + 3),
        "callbacks.kill.signal_name": "SIGKILL",
        "callbacks.kill.marker": str(marker),
        "callbacks.kill.record": str(record),
        "callbacks.kill.only_in": "attention",
    }
    command = [
        "-m",
        "experiment=cpu_study",
        *(f"{key}={value}" for key, value in overrides.items()),
        *(f"+{key}={value}" for key, value in kill.items()),
        "seed=0",
        f"hydra.sweep.dir={scratch / 'sweep'}",
        'hydra.sweeper.arms=[["cbam=none"],["cbam=block","attention=se"]]',
        # the folder names stay short: only the arm and the seed
        f"hydra.job.config.override_dirname.exclude_keys=[experiment,{','.join([*overrides, *kill])}]",
    ]
    sweep = scratch / "sweep"
    first = run_train(command)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    plain, se = sweep / "cbam=none,seed=0", sweep / "attention=se,cbam=block,seed=0"
    between = {
        path: path.read_bytes() for path in (plain / "metrics.json", plain / "checkpoints" / "last.ckpt")
    }
    se_step = load_checkpoint(se / "checkpoints" / "last.ckpt")["global_step"]
    second = run_train(command)
    assert second.returncode == 0, second.stderr[-3000:]
    from cbam.analysis.report import main

    assert main([str(sweep), "--out", str(scratch / "results")]) == 0
    assert main([str(scratch / "results" / "runs"), "--out", str(scratch / "rebuilt")]) == 0
    return SimpleNamespace(**locals())


def test_an_interrupted_study_rerun_skips_finished_jobs_and_resumes_the_rest(study):
    # the plain job had finished before the kill: the re-run left it as it was
    assert f"skipped: {study.plain} holds this run, finished" in study.second.stderr
    after = {path: path.read_bytes() for path in study.between}
    assert after == study.between
    # the SE job was killed at step 13 and resumed from its last.ckpt of step 12
    assert study.se_step == 12
    assert study.record.read_text().split("\n")[:3] == [
        f"{study.plain.name} 0",
        f"{study.se.name} 0",
        f"{study.se.name} 12",
    ]
    final = load_checkpoint(study.se / "checkpoints" / "last.ckpt")
    assert final["global_step"] == EPOCHS * STEPS_PER_EPOCH
    for job in (study.plain, study.se):
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["finished"]["config_digest"] and metrics["test_acc"] is not None
        assert metrics["epochs"] == EPOCHS


def test_a_finished_job_with_other_settings_is_refused(study):
    changed = [item.replace(f"trainer.max_epochs={EPOCHS}", "trainer.max_epochs=3") for item in study.command]
    # the folder names exclude trainer.max_epochs here, so the longer study would land in the same folders
    result = run_train(changed)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line == (
        f"error: skip_finished=true: {study.plain} holds a finished run with other settings than this command's "
        f"(model, data, optim, scheduler, trainer, seed or callbacks.ema differ); give this study its own hydra.sweep.dir"
    )


def test_the_study_is_kept_as_small_files_and_rebuilt_from_them(study):
    results, runs = study.scratch / "results", study.scratch / "results" / "runs"
    kept = sorted(str(path.relative_to(runs)) for path in runs.rglob("*") if path.is_file())
    for job in (study.plain.name, study.se.name):
        for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "metrics.json",
                     "per_class_accuracy.csv", "curves.csv", "curves.png", "confusion_matrix.png"):  # fmt: skip
            assert f"{job}/{name}" in kept
    assert "multirun.yaml" in kept and not [name for name in kept if name.endswith(".ckpt")]
    assert (results / "results.csv").read_text() == (study.scratch / "rebuilt" / "results.csv").read_text()
    assert (results / "curves.png").is_file() and (study.scratch / "rebuilt" / "curves.png").is_file()
    command = json.loads((study.scratch / "rebuilt" / "provenance.json").read_text())["command"][0]
    assert command.startswith("python train.py -m ") and "experiment=cpu_study" in command


def test_each_arm_is_labelled_by_what_it_ran(study):
    """attention=se is overridden in the SE job only, and the plain job ran no attention: it shows none, not
    the attention=cbam it was composed with."""
    import csv

    with open(study.scratch / "results" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["cbam"], row["attention"]) for row in rows] == [("none", "none"), ("block", "se")]
    assert rows[1]["baseline"] == "cbam=none"
    markdown = (study.scratch / "results" / "results.md").read_text()
    assert "attention= " not in markdown and "| none | none |" in markdown
    assert "cbam=block, attention=se vs cbam=none:" in markdown
    epoch_times = [float(row["epoch_time_vs_baseline"] or 0) for row in rows]
    assert epoch_times[0] == 0 and epoch_times[1] > 0  # the baseline has no ratio; the SE arm has one


def test_the_study_config_is_the_issue_design(compose_config):
    cfg = compose_config("experiment=cpu_study", hydra=True)
    assert cfg.model.depth == 18 and cfg.model.width == 16
    assert cfg.ckpt_path == "last" and cfg.skip_finished is True
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.loader == "device"
    assert cfg.hydra.sweep.dir == "multirun/cpu_study"
    arms = [list(arm) for arm in cfg.hydra.sweeper.arms]
    assert arms == [["cbam=none"], ["cbam=block"], ["cbam=classifier"], ["cbam=block", "attention=se"]]
    assert cfg.hydra.sweeper.params.seed == "0,1,2"


def test_the_kept_studys_jobs_still_count_as_finished_with_this_code(compose_config):
    """results/cpu_study's jobs were recorded before the package's regrouping moved the targets and before
    model.arch and model.attention_kind existed: their recorded digests still match their commands, so that
    re-running the study (skip_finished) finds them finished instead of refusing them."""
    from omegaconf import OmegaConf, open_dict

    from cbam.training.finished_jobs import config_digest

    runs = sorted(path.parent for path in (REPO / "results" / "cpu_study" / "runs").glob("*/.hydra"))
    assert len(runs) == 12
    for job in runs:
        cfg = compose_config(*OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        with open_dict(cfg):
            cfg.trainer.default_root_dir = str(job)  # (not digested: where the run is)
        recorded = json.loads((job / "metrics.json").read_text())["finished"]["config_digest"]
        assert recorded == config_digest(cfg, former_targets=True), job.name
        assert recorded != config_digest(cfg)  # (the check is not vacuous: today's paths differ)
