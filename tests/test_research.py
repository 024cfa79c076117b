"""Research outputs end to end: attention maps, per-class report, curves, model summary, metrics.json,
``python -m cbam.report``, the ablation study and the Optuna search.

Every run is ``python train.py`` in a subprocess on a tiny random image folder; the runs are module-scoped
fixtures shared by several tests (about a minute in all on two CPU cores).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, conf_file, load_checkpoint, run_python, subprocess_env, write_random_pngs
from PIL import Image

from cbam.runtime.provenance import git_state

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RUN_TIMEOUT = 180


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """train/<class>/*.png (12 per class) and test/<class>/*.png (6 per class), random pixels."""
    return write_random_pngs(tmp_path_factory.mktemp("research_data"), 12, 6, CLASSES)


def common(data_root: Path) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.download=false",
        "model.width=4",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.val_size=40",
        "trainer.max_epochs=1",
        "callbacks.progress_bar=null",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
    ]


def run(args: list[str], timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return run_python(
        args, env=subprocess_env(PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1"), timeout=timeout
    )


def train(args: list[str]) -> subprocess.CompletedProcess:
    result = run(["train.py", *args])
    output = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert result.returncode == 0, f"train.py {' '.join(args)} failed:\n{output}"
    return result


def events(folder: Path) -> dict[str, set[str]]:
    """Tags of every TensorBoard event file under ``folder``: {"images": {...}, "scalars": ..., ...}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, set[str]] = {"images": set(), "scalars": set(), "histograms": set(), "tensors": set()}
    for path in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path), size_guidance={"images": 1, "histograms": 1, "tensors": 1})
        accumulator.Reload()
        for kind in tags:
            tags[kind].update(accumulator.Tags()[kind])
    return tags


def scalar(folder: Path, tag: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            return accumulator.Scalars(tag)[-1].value
    raise AssertionError(f"no scalar {tag} under {folder}")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def sweep(data_root, tmp_path_factory):
    """The ablation narrowed on the command line to a 2 x 2 multirun, cbam=none,block x seed=0,1, of one
    epoch of a width-4 ResNet18 with the TensorBoard logger."""
    folder = tmp_path_factory.mktemp("sweep")
    result = train(
        [
            "-m",
            "experiment=ablation",
            "model.depth=18",
            "cbam=none,block",
            "seed=0,1",
            "model.reduction_ratio=2",
            *common(data_root),
            f"hydra.sweep.dir={folder}",
        ]
    )
    return folder, result.stdout


@pytest.fixture(scope="module")
def block_run(sweep):
    """The sweep's job with CBAM in every block and seed 0, and the sweep's output."""
    folder, stdout = sweep
    job = jobs_by_cbam(folder)["block"][0]
    assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["seed"] == 0
    return job, stdout


@pytest.fixture(scope="module")
def eval_run(block_run, data_root, tmp_path_factory):
    """``train=false ckpt_path=<the block run's best checkpoint>``."""
    checkpoint = next((block_run[0] / "checkpoints").glob("best-*.ckpt"))
    folder = tmp_path_factory.mktemp("eval_run")
    result = train([*common(data_root), "train=false", f"ckpt_path={checkpoint}", f"hydra.run.dir={folder}"])
    return folder, result.stdout


@pytest.fixture(scope="module")
def optuna_sweep(data_root, tmp_path_factory):
    """A 2-trial Optuna search (no test: the search only needs val/acc), CBAM before the classifier only
    (use_cbam_class), its study kept in ``<folder>/optuna.db``."""
    folder = tmp_path_factory.mktemp("optuna")
    train([*optuna_search(data_root, folder), "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={folder}"])
    return folder


def optuna_search(data_root: Path, storage_folder: Path) -> list[str]:
    return [
        "-m",
        "hparams_search=optuna",
        f"hydra.sweeper.storage=sqlite:///{storage_folder / 'optuna.db'}",
        "hydra.sweeper.study_name=study",
        "cbam=classifier",
        "test=false",
        *common(data_root),
    ]


def jobs_by_cbam(sweep_dir: Path) -> dict[str, list[Path]]:
    jobs: dict[str, list[Path]] = {}
    for job in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        cbam = next(item.split("=", 1)[1] for item in overrides if item.startswith("cbam="))
        jobs.setdefault(cbam, []).append(job)
    return jobs


def test_multirun_jobs_are_the_crossed_settings_and_their_checkpoints_rebuild_them(sweep):
    """The 2 x 2 sweep: one job per (cbam, seed), each checkpoint naming its own placement and rebuilding a
    network with CBAM in its 8 blocks or in none."""
    import torch

    from cbam import CBAM
    from cbam.training.lightning_module import CBAMResNetModule

    folder, _ = sweep
    jobs = sorted(p for p in folder.iterdir() if (p / ".hydra").is_dir())
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    combinations = set()
    for job in jobs:
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        last = job / "checkpoints" / "last.ckpt"
        assert (
            load_checkpoint(last)["hyper_parameters"]["net"]["use_cbam_block"]
            == config["model"]["use_cbam_block"]
        )
        model = CBAMResNetModule.load_from_checkpoint(last, map_location=torch.device("cpu"))
        blocks = sum(isinstance(module, CBAM) for module in model.modules())
        assert blocks == (8 if config["model"]["use_cbam_block"] else 0)
        combinations.add((config["model"]["use_cbam_block"], config["seed"]))
    assert combinations == {(False, 0), (False, 1), (True, 0), (True, 1)}


# ------------------------------------------------------------------------------------------ attention


def test_attention_maps_of_every_stage_with_block_cbam(block_run):
    folder, _ = block_run
    assert (folder / "attention" / "spatial_epoch000.png").stat().st_size > 1000
    assert (folder / "attention" / "channel_epoch000.png").stat().st_size > 1000
    tags = events(folder / "tensorboard")
    assert any("attention" in tag for tag in tags["images"]), tags["images"]
    assert {f"attention/channel/stage{i}" for i in range(1, 5)} <= tags["histograms"]


def test_attention_maps_with_classifier_cbam(optuna_sweep):
    trial = optuna_sweep / "0"
    assert (trial / "attention" / "spatial_epoch000.png").is_file()
    tags = events(trial / "tensorboard")
    assert any("attention" in tag for tag in tags["images"]), tags["images"]
    assert "attention/channel/classifier" in tags["histograms"]
    assert not any("stage" in tag for tag in tags["histograms"])


def test_no_attention_maps_and_no_error_without_cbam(sweep):
    plain = jobs_by_cbam(sweep[0])["none"]
    assert len(plain) == 2
    for job in plain:
        assert (job / "metrics.json").is_file()  # the run finished
        assert not (job / "attention").exists()
        tags = events(job / "tensorboard")
        assert not any("attention" in tag for tag in tags["images"] | tags["histograms"])
        assert "test/confusion_matrix" in tags["images"]


# ------------------------------------------------------------------------------- per-class test report


def check_class_table(folder: Path, test_acc: float) -> list[dict]:
    rows = read_rows(folder / "per_class_accuracy.csv")
    assert [row["class"] for row in rows] == CLASSES
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert float(row["accuracy"]) == pytest.approx(int(row["correct"]) / int(row["total"]), abs=1e-6)
    weighted = sum(float(r["accuracy"]) * int(r["total"]) for r in rows) / sum(int(r["total"]) for r in rows)
    assert weighted == pytest.approx(test_acc, abs=1e-6)
    assert (folder / "confusion_matrix.png").stat().st_size > 1000
    assert "test/confusion_matrix" in events(folder / "tensorboard")["images"]
    return rows


def test_per_class_table_and_confusion_matrix_after_training(block_run):
    folder, stdout = block_run
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test_acc"] == pytest.approx(scalar(folder / "tensorboard", "test/acc"), abs=1e-6)
    check_class_table(folder, metrics["test_acc"])
    assert "Per-class test accuracy" in stdout and all(name in stdout for name in CLASSES)


def test_evaluate_a_checkpoint_without_training(block_run, eval_run):
    folder, stdout = eval_run
    assert "test/acc" in stdout
    assert "Per-class test accuracy" in stdout and all(name in stdout for name in CLASSES)
    assert not (folder / "checkpoints").exists()
    trained = json.loads((block_run[0] / "metrics.json").read_text())
    # the best checkpoint of the block run, on the same test images: the same accuracy
    check_class_table(folder, trained["test_acc"])


# ----------------------------------------------------------------------------- curves, summary, metrics


def test_curves_png_after_training(block_run):
    folder, _ = block_run
    with Image.open(folder / "curves.png") as image:
        assert image.width > 400 and image.height > 200
    # The epoch-end checkpoint already holds that epoch's points, so a resumed run's curves have no gap.
    checkpoint = load_checkpoint(folder / "checkpoints" / "last.ckpt")
    history = next(state for key, state in checkpoint["callbacks"].items() if "TrainingCurves" in key)[
        "history"
    ]
    assert set(history["train/loss"]) == set(history["val/loss"]) == {0}


def test_model_summary_logged_with_the_hparams(block_run):
    from cbam.models.resnet import build_resnet

    folder, stdout = block_run
    net = build_resnet(18, use_cbam_block=True, width=4, reduction_ratio=2)
    params = sum(p.numel() for p in net.parameters())
    hparams = yaml.safe_load(next((folder / "tensorboard").rglob("hparams.yaml")).read_text())
    assert hparams["model/params"] == params
    assert hparams["model/flops_per_image"] > 0
    assert scalar(folder / "tensorboard", "model/params") == params
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["params"] == params and metrics["flops_per_image"] == hparams["model/flops_per_image"]
    assert f"model: {params:,} parameters" in stdout
    assert {"best_val_acc", "test_acc", "train_time_s", "epochs"} <= set(metrics)
    assert 0 <= metrics["best_val_acc"] <= 1 and metrics["epochs"] == 1


def test_metrics_record_step_time_and_where_the_run_ran(block_run, data_root):
    from datetime import datetime, timezone

    import torch

    folder, _ = block_run
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["global_step"] == 5  # 120 training images - 40 for validation, batches of 16, one epoch
    assert metrics["step_time_s"] == pytest.approx(metrics["train_time_s"] / 5, rel=1e-3)
    assert metrics["device"].startswith("CPU") and metrics["torch_version"] == torch.__version__
    assert metrics["precision"] == "32-true"
    assert metrics["data"] == f"CIFAR-10 image folder (train/, test/) at {data_root}"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: the revision is this commit, and whether its tree was clean
        assert metrics["git_revision"] == head.stdout.strip() and isinstance(metrics["git_clean"], bool)
    steps = metrics["train_step_s"]  # each training step's wall-clock time, as the report's cost
    assert steps["steps"] == 5 and 0 < steps["p10"] <= steps["median"] <= steps["p90"]
    assert metrics["cpus"] == os.cpu_count() and metrics["load_average"]["samples"] >= 1
    age = datetime.now(timezone.utc) - datetime.fromisoformat(metrics["date"])
    assert 0 <= age.total_seconds() < 3600
    assert not list(folder.glob(".metrics.json*"))  # the atomic write left no temporary file


# ------------------------------------------------------------------------------------------------ report


def test_report_groups_seeds(sweep, capsys):
    from cbam.analysis.report import main

    sweep, _ = sweep
    assert main([str(sweep)]) == 0
    assert "| cbam |" in capsys.readouterr().out
    rows = read_rows(sweep / "results.csv")
    assert [row["cbam"] for row in rows] == ["none", "block"]
    jobs = jobs_by_cbam(sweep)
    for row in rows:
        assert row["n"] == "2" and row["seeds"] == "0 1"
        accuracies = [json.loads((job / "metrics.json").read_text())["test_acc"] for job in jobs[row["cbam"]]]
        assert float(row["test_acc_mean"]) == pytest.approx(np.mean(accuracies), abs=1e-6)
        assert float(row["test_acc_std"]) == pytest.approx(np.std(accuracies, ddof=1), abs=1e-6)
        assert int(row["params"]) > 0 and int(row["flops_per_image"]) > 0
        assert float(row["train_time_s_mean"]) > 0
    assert int(rows[1]["params"]) > int(rows[0]["params"])  # CBAM adds parameters
    # cbam=none is recognised as the baseline from the jobs' resolved configs
    assert rows[0]["baseline"] == "" and rows[1]["baseline"] == "cbam=none"
    difference = float(rows[1]["test_acc_mean"]) - float(rows[0]["test_acc_mean"])
    assert float(rows[1]["test_acc_diff"]) == pytest.approx(difference, abs=1e-6)
    assert float(rows[1]["test_acc_diff_ci_low"]) <= difference <= float(rows[1]["test_acc_diff_ci_high"])
    provenance = json.loads((sweep / "provenance.json").read_text())
    (command,) = provenance["command"]
    assert command.startswith("python train.py -m ") and "experiment=ablation" in command
    markdown = (sweep / "results.md").read_text()
    assert "| cbam | n |" in markdown and "±" in markdown
    assert (sweep / "results.png").stat().st_size > 1000


def test_report_errors_are_one_line(sweep, tmp_path, capsys):
    from cbam.analysis.report import main

    sweep, _ = sweep
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path)]) == 2  # empty
    messages = capsys.readouterr().err.strip().splitlines()
    assert messages[0].startswith("error:") and "no such directory" in messages[0]
    assert messages[1].startswith("error:") and "no Hydra job" in messages[1]

    unfinished = tmp_path / "unfinished"
    for job in ("0", "1"):
        shutil.copytree(sweep / job / ".hydra", unfinished / job / ".hydra")
    result = run(["-m", "cbam.report", str(unfinished)], timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "finished" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_report_counts_unfinished_jobs(sweep, tmp_path, capsys):
    from cbam.analysis.report import main

    sweep, _ = sweep
    partial = tmp_path / "partial"
    shutil.copytree(sweep / "0", partial / "0", ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    shutil.copytree(sweep / "1" / ".hydra", partial / "1" / ".hydra")  # started, never finished
    assert main([str(partial)]) == 0
    rows = read_rows(partial / "results.csv")
    assert len(rows) == 1 and rows[0]["n"] == "1" and rows[0]["unfinished"] == "1"
    assert rows[0]["test_acc_std"] == ""  # one seed: no standard deviation
    markdown = (partial / "results.md").read_text()
    assert "Unfinished jobs" in markdown and "± –" in markdown


# --------------------------------------------------------------------------------------- sweep configs


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


def test_ablation_sweep_definition():
    cfg = compose(["experiment=ablation"])
    params = {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}
    assert params == {
        "model.depth": ["18", "34", "50"],
        "cbam": ["none", "block", "classifier"],
        "seed": ["0", "1", "2"],
    }


def test_paper_tables_sweep_definition():
    """Every swept attention preset composes into a different network (none: no attention at all)."""
    definition = yaml.safe_load((REPO / "conf" / "experiment" / "paper_tables.yaml").read_text())
    params = {key: str(value).split(",") for key, value in definition["hydra"]["sweeper"]["params"].items()}
    variants = [
        "none",
        "cbam",
        "se",
        "channel_max",
        "channel_only",
        "spatial_only",
        "conv_pooling",
        "spatial_first",
        "parallel",
    ]
    assert params == {
        "model.depth": ["18"],
        "cbam": ["block"],
        "attention": variants,
        "seed": ["0", "1", "2"],
    }
    assert definition["hydra"]["sweep"]["dir"].startswith("multirun/paper_tables/")
    keys = (
        "use_cbam_block",
        "channel_pooling",
        "spatial_pooling",
        "gate_order",
        "use_channel_gate",
        "use_spatial_gate",
    )
    models = {}
    for variant in variants:
        model = compose(["experiment=paper_tables", "cbam=block", f"attention={variant}"]).model
        models[variant] = tuple(model[key] for key in keys)
    assert models["none"][0] is False and all(models[v][0] is True for v in variants[1:])
    assert len(set(models[v] for v in variants[1:])) == len(variants) - 1


def test_optuna_search_of_two_trials(optuna_sweep):
    cfg = compose(["hparams_search=optuna"])
    assert cfg.hydra.sweeper.direction == "maximize"
    searched = {"optim.lr", "optim.weight_decay", "model.reduction_ratio", "model.kernel_size"}
    assert set(cfg.hydra.sweeper.params) == searched
    results = yaml.safe_load((optuna_sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == set(cfg.hydra.sweeper.params)
    trials = [json.loads((optuna_sweep / str(n) / "metrics.json").read_text()) for n in range(2)]
    # train.py returns the last val/acc (not test/acc) to the sweeper
    assert results["best_value"] == pytest.approx(max(t["last_val_acc"] for t in trials), abs=1e-6)


def test_a_second_search_continues_the_study_in_its_storage(optuna_sweep, data_root, tmp_path):
    import optuna

    second = tmp_path / "second"
    limits = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]
    train(
        [
            *optuna_search(data_root, optuna_sweep),
            "hydra.sweeper.n_trials=1",
            *limits,
            f"hydra.sweep.dir={second}",
        ]
    )
    assert [job.name for job in second.iterdir() if job.name.isdigit()] == ["0"]
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{optuna_sweep / 'optuna.db'}")
    assert [(trial.number, trial.state.name) for trial in study.trials] == [
        (0, "COMPLETE"),
        (1, "COMPLETE"),
        (2, "COMPLETE"),
    ]


def test_curves_record_every_epoch_of_train_and_val(tiny_cifar_folder, tmp_path, quiet_trainer):
    """The curve of an epoch holds that epoch's logged values (the train ones are logged after the
    callbacks' epoch-end hooks: a naive callback would plot them one epoch late)."""
    import pytorch_lightning as pl

    from cbam.callbacks import TrainingCurves
    from cbam.data import CIFAR10DataModule
    from cbam.training.lightning_module import CBAMResNetModule

    class Remember(pl.Callback):  # what the module logged at the end of each epoch
        logged: dict = {}

        def on_validation_end(self, trainer, module):
            if not trainer.sanity_checking:
                self.logged[("val/loss", trainer.current_epoch)] = float(trainer.callback_metrics["val/loss"])

        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch:
                self.logged[("train/loss", trainer.current_epoch - 1)] = float(
                    trainer.callback_metrics["train/loss"]
                )

    pl.seed_everything(0)
    curves, remember = TrainingCurves(), Remember()
    data = CIFAR10DataModule(
        str(tiny_cifar_folder),
        download=False,
        batch_size=32,
        num_workers=0,
        val_size=40,
        loader="device",
        cache_dir=str(tmp_path),
    )
    trainer = quiet_trainer(max_epochs=3, callbacks=[curves, remember])
    training = {"optimizer": conf_file("optim/sgd.yaml"), "scheduler": conf_file("scheduler/cosine.yaml")}
    trainer.fit(
        CBAMResNetModule(width=4, use_cbam_block=True, reduction_ratio=2, **training), datamodule=data
    )

    assert sorted(curves.history["train/loss"]) == [0, 1, 2]
    assert sorted(curves.history["val/loss"]) == [0, 1, 2]
    assert curves.history["train/loss"][2] == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    for (key, epoch), value in remember.logged.items():
        assert curves.history[key][epoch] == pytest.approx(value), (key, epoch)
    assert len({round(v, 6) for v in curves.history["train/loss"].values()}) == 3  # three distinct epochs
    assert (tmp_path / "curves.png").is_file()


# ------------------------------------------------------------------- report on fake sweeps (no training)


def fake_job(job: Path, overrides: list[str], model: dict, seed: int, metrics: dict | None) -> None:
    """A job folder as Hydra and RunMetrics leave it: .hydra/{config,overrides,hydra}.yaml, metrics.json."""
    (job / ".hydra").mkdir(parents=True)
    model = dict(model)
    network = {"network_name": model.pop("network_name")} if "network_name" in model else {}
    config = {
        "seed": seed,
        **network,
        "model": {"depth": 18, "use_cbam_block": False, "use_cbam_class": False, **model},
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    choices = {"cbam": "none", "attention": "cbam"} | dict(
        o.split("=", 1) for o in overrides if o.split("=")[0] in ("cbam", "attention")
    )
    hydra = {
        "hydra": {
            "overrides": {"hydra": ["hydra.mode=RUN"], "task": [*overrides, f"seed={seed}"]},
            "runtime": {"choices": choices},
        }
    }
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if metrics is not None:
        record = {
            "device": "NVIDIA H100 80GB HBM3",
            "torch_version": "2.14.1",
            "git_revision": HEAD,  # a commit of this history: the report warns of no other revision
            "git_clean": True,
            "precision": "bf16-mixed",
            "data": "CIFAR-10 image folder (train/, test/) at /data/c10",
            "date": f"2026-01-0{seed + 1}T10:00:00+00:00",
            "params": 1000,
            "flops_per_image": 2_000_000,
            "train_time_s": 100.0,
            "epochs": 10,
            "global_step": 1000,
            "step_time_s": 0.1,
        }
        (job / "metrics.json").write_text(json.dumps({**record, **metrics}))


#: this checkout's commit (None outside a git checkout)
HEAD = git_state()[0]


def fake_sweep(folder: Path, configurations: list[tuple[list[str], dict, list[float]]], command: list[str]):
    """Jobs 0, 1, ... : per configuration (overrides, resolved model keys, test accuracy of each seed)."""
    number = 0
    for overrides, model, test_accuracies in configurations:
        for seed, accuracy in enumerate(test_accuracies):
            metrics = {"test_acc": accuracy, "best_val_acc": accuracy + 0.01}
            fake_job(folder / str(number), overrides, model, seed, metrics)
            number += 1
    multirun = {
        "hydra": {
            "overrides": {"hydra": ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={folder}"], "task": command}
        }
    }
    (folder / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    return folder


BLOCK, CLASSIFIER = {"use_cbam_block": True}, {"use_cbam_class": True}
PLACEMENT_BY_DEPTH = [
    (["model.depth=18", "cbam=none"], {}, [0.90, 0.91, 0.92]),
    (["model.depth=18", "cbam=block"], BLOCK, [0.95, 0.96, 0.97]),  # clearly better than its baseline
    (["model.depth=18", "cbam=classifier"], CLASSIFIER, [0.905, 0.915, 0.90]),  # no clear difference
    (["model.depth=50", "cbam=none"], {"depth": 50}, [0.80, 0.82, 0.81]),
    (["model.depth=50", "cbam=block"], {"depth": 50, **BLOCK}, [0.70, 0.71, 0.69]),  # clearly worse
]


def test_welch_difference_matches_scipy():
    from scipy import stats

    from cbam.analysis.statistics import welch_difference

    values, baseline = [0.95, 0.93, 0.97, 0.90], [0.90, 0.91, 0.93]
    result = welch_difference(values, baseline)
    expected = stats.ttest_ind(values, baseline, equal_var=False).confidence_interval(0.95)
    assert result.difference == pytest.approx(np.mean(values) - np.mean(baseline))
    assert (result.low, result.high) == pytest.approx((expected.low, expected.high))
    assert welch_difference([0.9], baseline).low is None  # one seed: no variance, no interval
    exact = welch_difference([0.9, 0.9], [0.8, 0.8])
    assert (exact.low, exact.high) == pytest.approx((0.1, 0.1)) and not exact.contains_zero


def test_report_compares_each_configuration_with_the_baseline_of_its_depth(tmp_path, capsys):
    from scipy import stats

    from cbam.analysis.report import main

    sweep = fake_sweep(tmp_path / "sweep", PLACEMENT_BY_DEPTH, ["experiment=ablation"])
    assert main([str(sweep)]) == 0
    rows = {(row["model.depth"], row["cbam"]): row for row in read_rows(sweep / "results.csv")}
    accuracy = {(o[0].split("=")[1], o[1].split("=")[1]): values for o, _, values in PLACEMENT_BY_DEPTH}
    for (depth, cbam), row in rows.items():
        if cbam == "none":
            assert row["baseline"] == "" and row["test_acc_diff"] == ""
            continue
        baseline = accuracy[(depth, "none")]
        assert row["baseline"] == f"model.depth={depth}, cbam=none"
        values = accuracy[(depth, cbam)]
        assert float(row["test_acc_diff"]) == pytest.approx(np.mean(values) - np.mean(baseline))
        interval = stats.ttest_ind(values, baseline, equal_var=False).confidence_interval(0.95)
        assert float(row["test_acc_diff_ci_low"]) == pytest.approx(interval.low)
        assert float(row["test_acc_diff_ci_high"]) == pytest.approx(interval.high)
        assert float(row["step_time_s_mean"]) == pytest.approx(0.1)
    markdown = (sweep / "results.md").read_text()
    sentences = {line.split(":")[0]: line for line in markdown.splitlines() if " vs " in line}
    assert "excludes zero; better" in sentences["- model.depth=18, cbam=block vs model.depth=18, cbam=none"]
    assert "contains zero" in sentences["- model.depth=18, cbam=classifier vs model.depth=18, cbam=none"]
    assert "excludes zero; worse" in sentences["- model.depth=50, cbam=block vs model.depth=50, cbam=none"]
    assert markdown.count("| baseline |") == 2 and "| 10.0 s | 1.00x |" in markdown  # epoch time, ratio


def test_report_compares_each_backbone_with_its_own_baseline(tmp_path):
    """model=resnet18 and model=wide_resnet jobs (both of depth 28 and 18 in no way alike): each attention row's
    baseline is the plain run of its own network, told apart by the jobs' network_name."""
    from cbam.analysis.report import report

    resnet, wide = {"network_name": "resnet18"}, {"network_name": "wrn28-10", "depth": 28}
    configurations = [
        (["model=resnet18", "cbam=none"], resnet, [0.90, 0.91]),
        (["model=resnet18", "cbam=block", "attention=eca"], {**resnet, **BLOCK}, [0.93, 0.94]),
        (["model=wide_resnet", "cbam=none"], wide, [0.80, 0.81]),
        (["model=wide_resnet", "cbam=block", "attention=eca"], {**wide, **BLOCK}, [0.85, 0.87]),
    ]
    sweep = fake_sweep(tmp_path / "sweep", configurations, ["model=resnet18,wide_resnet"])
    report(sweep)
    rows = {(row["model"], row["cbam"]): row for row in read_rows(sweep / "results.csv")}
    # a configuration without attention names no attention kind, in its row or as a baseline
    assert rows[("resnet18", "block")]["baseline"] == "model=resnet18, cbam=none"
    assert rows[("wide_resnet", "block")]["baseline"] == "model=wide_resnet, cbam=none"
    assert rows[("resnet18", "none")]["attention"] == rows[("wide_resnet", "none")]["attention"] == "none"
    assert rows[("resnet18", "block")]["attention"] == "eca"
    assert float(rows[("resnet18", "block")]["test_acc_diff"]) == pytest.approx(0.03)
    assert float(rows[("wide_resnet", "block")]["test_acc_diff"]) == pytest.approx(0.055)


def test_attention_study_baseline_is_recognised_from_the_resolved_config(tmp_path):
    """attention=none under cbam=block switches attention off: the job's resolved config says so, not its
    overrides."""
    from cbam.analysis.report import report

    configurations = [
        (["cbam=block", "attention=none"], {}, [0.90, 0.92]),
        (["cbam=block", "attention=se"], BLOCK, [0.93, 0.95]),
        (["cbam=block", "attention=spatial_only"], BLOCK, [0.91]),
    ]
    sweep = fake_sweep(tmp_path / "sweep", configurations, ["experiment=paper_tables"])
    report(sweep)
    rows = {row["attention"]: row for row in read_rows(sweep / "results.csv")}
    assert rows["se"]["baseline"] == rows["spatial_only"]["baseline"] == "attention=none"
    assert float(rows["se"]["test_acc_diff"]) == pytest.approx(0.03)
    assert rows["spatial_only"]["test_acc_diff_ci_low"] == ""  # one seed
    markdown = (sweep / "results.md").read_text()
    assert "attention=spatial_only vs attention=none: +0.00 points; no interval (n = 1 vs 2" in markdown
    assert "Common to every configuration: `cbam=block`" in markdown


def test_report_writes_results_and_provenance_into_out(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", PLACEMENT_BY_DEPTH[:2], ["experiment=ablation", "seed=0,1,2"])
    out = tmp_path / "results" / "ablation"
    from cbam.analysis.report import main

    assert main([str(sweep), "--out", str(out), "--data", "CIFAR-10 JPEG copy, quality 75"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        "differences.png",
        "provenance.json",
        "results.csv",
        "results.md",
        "results.png",
        "runs",
    ]
    assert len([path for path in (out / "runs").iterdir() if (path / "metrics.json").is_file()]) == 6
    assert not (sweep / "results.csv").exists()
    provenance = json.loads((out / "provenance.json").read_text())
    # no absolute path of this machine: the sweep's folder is cut to its name
    command = "python train.py -m hydra.sweep.dir=.../sweep experiment=ablation seed=0,1,2"
    assert provenance["command"] == [command]
    assert provenance["sweep_dir"] == ".../sweep"
    assert provenance["device"] == ["NVIDIA H100 80GB HBM3"] and provenance["torch_version"] == ["2.14.1"]
    assert provenance["git_revision"] == [HEAD] and provenance["git_tree_clean"] == [True]
    assert provenance["precision"] == ["bf16-mixed"]
    assert provenance["data"] == ["CIFAR-10 JPEG copy, quality 75"]
    assert provenance["dates"] == ["2026-01-01T10:00:00+00:00", "2026-01-03T10:00:00+00:00"]
    assert provenance["runs"] == provenance["runs_finished"] == 6
    assert "- command: python train.py -m" in (out / "results.md").read_text()


def test_report_on_a_full_disk_is_one_line_and_keeps_the_previous_files(tmp_path, monkeypatch, capsys):
    from fault_callbacks import FillsUp

    from cbam.analysis.report import main

    sweep = fake_sweep(tmp_path / "sweep", PLACEMENT_BY_DEPTH[:2], ["experiment=ablation", "seed=0,1,2"])
    out = tmp_path / "results"
    assert main([str(sweep), "--out", str(out)]) == 0
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    capsys.readouterr()
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: FillsUp(real_fdopen(*args, **kwargs), 100))
    assert main([str(sweep), "--out", str(out), "--data", "another description"]) == 4
    monkeypatch.undo()
    assert re.fullmatch(
        rf"error: no space left on device while writing {re.escape(str(out))}/\S+\n", capsys.readouterr().err
    )
    after = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert after == before  # no file cut short, none left over


def test_differences_figure_draws_each_comparison_with_the_interval_of_results_csv(tmp_path):
    """differences.png, the forest plot: one row per configuration compared with a baseline, its dot at
    the difference and its line over the 95% interval that results.csv holds, and a line at zero (read
    from the figure's drawn data, not its pixels)."""
    from cbam.analysis.report import report, tabulate
    from cbam.analysis.report_files import plot_differences

    one_seed = (["model.depth=50", "cbam=classifier"], {"depth": 50, **CLASSIFIER}, [0.83])  # no interval
    sweep = fake_sweep(tmp_path / "sweep", [*PLACEMENT_BY_DEPTH, one_seed], ["experiment=ablation"])
    paths = report(sweep)
    assert paths["differences"] == sweep / "differences.png" and paths["differences"].stat().st_size > 1000

    rows = [row for row in read_rows(sweep / "results.csv") if row["test_acc_diff"]]
    assert [(row["model.depth"], row["cbam"]) for row in rows] == [
        ("18", "block"), ("18", "classifier"), ("50", "block"), ("50", "classifier")
    ]  # fmt: skip
    axis = plot_differences(tmp_path / "differences.png", tabulate(sweep, set(), None)).axes[0]
    shown = [label.get_text() for label in axis.get_yticklabels()]
    assert shown == [f"model.depth={r['model.depth']}, cbam={r['cbam']}\nvs {r['baseline']}" for r in rows]
    dots = axis.collections[1].get_offsets()
    np.testing.assert_allclose(dots, [[100 * float(row["test_acc_diff"]), y] for y, row in enumerate(rows)])
    intervals = axis.collections[0].get_segments()
    expected = [
        [[100 * float(row["test_acc_diff_ci_low"]), y], [100 * float(row["test_acc_diff_ci_high"]), y]]
        for y, row in enumerate(rows)
        if row["test_acc_diff_ci_low"]
    ]
    assert len(intervals) == len(expected) == 3
    np.testing.assert_allclose(np.array(intervals), expected)
    assert [list(line.get_xdata()) for line in axis.lines] == [[0, 0]]  # the line at zero
    # a sweep with no comparison still gets the file, saying so
    alone = fake_sweep(tmp_path / "alone", PLACEMENT_BY_DEPTH[:1], ["experiment=ablation"])
    assert report(alone)["differences"].stat().st_size > 1000


#: the cpu_study's arms: a baseline that overrides no attention kind, CBAM in two places, SE
CPU_STUDY_ARMS = [
    (["cbam=none"], {}, [0.84, 0.85]),
    (["cbam=block"], BLOCK, [0.84, 0.83]),
    (["cbam=classifier"], CLASSIFIER, [0.84, 0.84]),
    (["attention=se", "cbam=block"], BLOCK, [0.85, 0.84]),
]


def test_a_no_attention_arm_shows_no_attention_kind(tmp_path):
    """The jobs of the other arms override attention=...: the baseline's row, label, comparisons and figure
    name none for it (it ran no attention), not the attention=cbam it was composed with."""
    from cbam.analysis.report import report, tabulate
    from cbam.analysis.report_files import plot_differences

    sweep = fake_sweep(tmp_path / "sweep", CPU_STUDY_ARMS, ["experiment=cpu_study"])
    report(sweep)
    rows = read_rows(sweep / "results.csv")
    assert [(row["cbam"], row["attention"]) for row in rows] == [
        ("none", "none"), ("block", "cbam"), ("classifier", "cbam"), ("block", "se")
    ]  # fmt: skip
    assert {row["baseline"] for row in rows[1:]} == {"cbam=none"}
    markdown = (sweep / "results.md").read_text()
    assert "attention=cbam vs cbam=none:" in markdown and "cbam=none, attention" not in markdown
    assert "| none | none | 2 |" in markdown
    table = tabulate(sweep, set(), None)
    assert table.labels[0] == "cbam=none"
    axis = plot_differences(tmp_path / "differences.png", table).axes[0]
    assert "vs cbam=none (points)" in axis.get_xlabel()


def test_the_report_writes_no_path_of_the_machine_that_ran_the_study(tmp_path, capsys):
    """Title, common settings, provenance and every kept run's files: absolute paths cut to their last
    part, here and in runs/ kept before (a report rebuilt from its own runs/ cuts them in place)."""
    from cbam.analysis.report import main

    data = ["data.root=/tmp/data/cifar10-jpeg", "data.cache_dir=/tmp/cache"]
    arms = [([*overrides, *data], model, accuracies) for overrides, model, accuracies in CPU_STUDY_ARMS]
    sweep = fake_sweep(tmp_path / "machine" / "sweep", arms, ["experiment=cpu_study", *data])
    for job in sweep.iterdir():
        if (job / "metrics.json").is_file():
            metrics = json.loads((job / "metrics.json").read_text())
            metrics["data"] = "CIFAR-10 image folder (train/, test/) at /tmp/data/cifar10-jpeg"
            (job / "metrics.json").write_text(json.dumps(metrics))
            hydra = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())
            hydra["hydra"]["runtime"]["cwd"] = "/home/someone/cbam"
            hydra["hydra"]["runtime"]["output_dir"] = str(job)
            (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    out = tmp_path / "results" / "cpu_study"

    def machine_paths() -> list[str]:
        pattern = re.compile(rf"{re.escape(str(tmp_path))}|/tmp/|/home/")
        return [str(path) for path in out.rglob("*") if path.is_file() and pattern.search(
            path.read_bytes().decode(errors="replace"))]  # fmt: skip

    assert main([str(sweep), "--out", str(out)]) == 0
    assert machine_paths() == []
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# Results of cpu_study\n")
    assert "`data.root=.../cifar10-jpeg`" in markdown and "data.cache_dir=.../cache" in markdown
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["data"] == ["CIFAR-10 image folder (train/, test/) at .../cifar10-jpeg"]
    kept = json.loads((out / "runs" / "0" / "metrics.json").read_text())
    assert kept["data"] == provenance["data"][0] and kept["test_acc"] == 0.84
    assert "cwd: .../cbam" in (out / "runs" / "0" / ".hydra" / "hydra.yaml").read_text()
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept_overrides = yaml.safe_load((out / "runs" / "0" / ".hydra" / "overrides.yaml").read_text())
    assert "data.root=.../cifar10-jpeg" in kept_overrides
    OverridesParser.create().parse_overrides(kept_overrides)  # still overrides that Hydra parses
    # runs/ kept by an earlier report, paths and all: rebuilt from them, they are cut in place
    shutil.rmtree(out)
    shutil.copytree(sweep, out / "runs")
    capsys.readouterr()
    assert main([str(out / "runs"), "--out", str(out), "--data", "CIFAR-10 JPEG copy"]) == 0
    assert machine_paths() == []
    assert json.loads((out / "provenance.json").read_text())["data"] == ["CIFAR-10 JPEG copy"]
    assert read_rows(out / "results.csv")[0]["attention"] == "none"


def test_the_report_warns_of_code_outside_this_history_and_records_the_landed_commit(tmp_path, capsys):
    from cbam.analysis.report import main

    if HEAD is None:
        pytest.skip("not a git checkout")
    sweep = fake_sweep(tmp_path / "sweep", CPU_STUDY_ARMS[:2], ["experiment=cpu_study"])
    for number, revision in enumerate(["744616328a13ebab43203ae975d763241ed58be1", f"{HEAD}+dirty"]):
        metrics = json.loads((sweep / str(number) / "metrics.json").read_text())
        del metrics["git_clean"]  # as runs recorded before git_clean: +dirty marks changes
        (sweep / str(number) / "metrics.json").write_text(json.dumps({**metrics, "git_revision": revision}))
    assert main([str(sweep)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2
    assert "git revision 744616328a13ebab43203ae975d763241ed58be1, which is not an ancestor" in warnings[0]
    assert "uncommitted changes" in warnings[1]
    provenance = json.loads((sweep / "provenance.json").read_text())
    assert provenance["git_revision"] == sorted([HEAD, "744616328a13ebab43203ae975d763241ed58be1"])
    assert provenance["git_tree_clean"] == [False, True]
    # the landed commit that carries the code: recorded, and the first warning no longer said
    assert main([str(sweep), "--landed", HEAD[:10], "--landed-check", "its tree is the runs' tree"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "uncommitted changes" in warnings[0]
    provenance = json.loads((sweep / "provenance.json").read_text())
    assert provenance["landed_revision"] == HEAD
    assert provenance["landed_revision_check"] == "its tree is the runs' tree"
    assert main([str(sweep), "--landed", "0123456789abcdef"]) == 2
    assert capsys.readouterr().err == (
        "error: --landed 0123456789abcdef: not a commit of this checkout's history (git log HEAD)\n"
    )


def test_the_cost_of_a_loaded_or_uneven_run_is_flagged_not_averaged_unremarked(tmp_path):
    from cbam.analysis.report import report

    steps = {"median": 0.2, "p10": 0.19, "p90": 0.22, "steps": 100}
    quiet = {"train_step_s": steps, "load_average": {"mean": 1.5, "max": 2.0, "samples": 5}, "cpus": 2}
    runs = {
        0: ([], {}, quiet),
        1: ([], {}, {**quiet, "train_step_s": {**steps, "p90": 0.4}}),  # spread: p90/median 2.0
        2: (["cbam=block"], BLOCK, quiet),
        3: (["cbam=block"], BLOCK, {**quiet, "load_average": {"mean": 3.1, "max": 4.0, "samples": 5}}),
        4: (["cbam=classifier"], CLASSIFIER, {}),  # a run recorded before these measurements
    }
    for number, (overrides, model, cost) in runs.items():
        fake_job(tmp_path / "sweep" / str(number), ["cbam=none", *overrides][-1:], model, number % 2,
                 {"test_acc": 0.9, "best_val_acc": 0.9, **cost})  # fmt: skip
    report(tmp_path / "sweep")
    rows = {row["cbam"]: row for row in read_rows(tmp_path / "sweep" / "results.csv")}
    assert float(rows["none"]["train_step_s_median"]) == pytest.approx(0.2)
    assert rows["none"]["cost_flags"] == "1: step times spread (p90/median 2.00)"
    assert rows["block"]["cost_flags"] == "3: load average 3.1 on 2 cores"
    assert rows["classifier"]["train_step_s_median"] == rows["classifier"]["cost_flags"] == ""
    markdown = (tmp_path / "sweep" / "results.md").read_text()
    assert markdown.count("| 200.0 ms ⚠ |") == 2 and "| – | 10.0 s |" in markdown
    assert "⚠ Train step of a loaded or uneven run" in markdown
    assert "3: load average 3.1 on 2 cores" in markdown


def test_step_summary_and_old_run_records():
    from cbam.callbacks.run_metrics import step_summary
    from cbam.runtime.provenance import recorded_revision

    summary = step_summary([0.1] * 8 + [0.5, 1.0])
    assert summary["median"] == pytest.approx(0.1) and summary["steps"] == 10
    assert summary["p10"] == pytest.approx(0.1) and summary["p90"] == pytest.approx(0.55)
    assert step_summary([]) is None and step_summary([0.3])["p90"] == 0.3
    assert recorded_revision({"git_revision": "abc+dirty"}) == ("abc", False)
    assert recorded_revision({"git_revision": "abc"}) == ("abc", True)
    assert recorded_revision({"git_revision": "abc", "git_clean": False}) == ("abc", False)
    assert recorded_revision({}) == (None, None)
