"""Beyond CIFAR-10: CIFAR-100 and image folders of any size, the network's outputs following the data, the
ImageNet stem, and every output at the data's size with its class names (all in-process, tiny data)."""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import conf_file
from hydra.utils import instantiate
from PIL import Image

from cbam.callbacks import AttentionMaps, ClassReport, ModelStats
from cbam.callbacks.attention_maps import attention_gates, find_cbam_sites, to_display
from cbam.callbacks.class_report import format_table, per_class_rows
from cbam.callbacks.model_stats import count_flops
from cbam.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataError,
    DeviceLoader,
    FolderSource,
    ImageFolderDataModule,
    LoaderSpec,
    WorkersLoader,
    load_arrays,
    load_cifar10,
    normalize,
)
from cbam.data.sources import channel_statistics
from cbam.errors import ConfigError
from cbam.training.config_checks import num_classes
from cbam.training.lightning_module import CBAMResNetModule
from cbam.training.run import build_model, main

#: CIFAR-100's fine classes in meta's order, deliberately not sorted: the names must come from meta
CIFAR100_NAMES = [f"fine{(37 * index) % 100:02d}" for index in range(100)]
TINY_MODEL = ("model.width=4", "model.reduction_ratio=2", "data.num_workers=0")


def write_cifar100(root: Path, train_per_class: int = 1, test_per_class: int = 1, seed: int = 0) -> dict:
    """``cifar-100-python/{train,test,meta}`` in torchvision's pickle layout (bytes keys, fine and coarse
    labels); returns the labels written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), count)).tolist()
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        batch = {b"data": data, b"fine_labels": labels, b"coarse_labels": [label // 5 for label in labels]}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
        written[split] = (data, labels)
    meta = {
        b"fine_label_names": [name.encode() for name in CIFAR100_NAMES],
        b"coarse_label_names": [f"coarse{index}".encode() for index in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def write_folder(root: Path, classes: list[str], train: int, test: int, size=(64, 64), seed: int = 0) -> Path:
    """``train/<class>/NNN.png`` and ``test/<class>/NNN.png`` of random RGB images of ``size`` (h, w)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index:03d}.png")
    return root


def fit_and_test(cfg, tmp_path: Path, callbacks: list, steps: int = 2):
    """``cfg``'s data and model (outputs from the data), fitted for ``steps`` steps and tested on CPU."""
    import pytorch_lightning as pl

    data = instantiate(cfg.data)
    model = build_model(cfg, data)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, max_epochs=1,
        limit_train_batches=steps, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    return data, model, trainer


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -------------------------------------------------------------------------------------------- CIFAR-100


def test_cifar100_pickles_give_100_outputs_and_the_names_of_meta(tmp_path, compose_config, capsys):
    written = write_cifar100(tmp_path / "data", train_per_class=1, test_per_class=1)
    cfg = compose_config(
        "data=cifar100", f"data.root={tmp_path / 'data'}", "data.download=false", "data.val_size=20",
        "data.batch_size=40", "data.loader=workers", "data.cache_dir=" + str(tmp_path / "cache"), *TINY_MODEL,
    )  # fmt: skip
    assert cfg.model.num_classes is None  # no key: the outputs follow the data
    report = ClassReport()
    data, model, _ = fit_and_test(cfg, tmp_path, [report])
    assert model.num_classes == 100 and model.net.classifier.out_features == 100
    assert data.classes == CIFAR100_NAMES  # meta's order, fine labels
    arrays = data.load(download=False)
    assert (
        arrays.train_labels.tolist() == written["train"][1]
        and arrays.test_labels.tolist() == written["test"][1]
    )
    expected = torch.from_numpy(written["train"][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy())
    assert torch.equal(arrays.train_images, expected)
    # mean and std computed from the training images (CIFAR-100 has no published constants here)
    assert arrays.mean == pytest.approx((expected.double().mean((0, 1, 2)) / 255).tolist(), abs=1e-12)
    rows = read_rows(tmp_path / "per_class_accuracy.csv")
    assert [row["class"] for row in rows] == CIFAR100_NAMES
    assert sum(int(row["total"]) for row in rows) == 100
    out = capsys.readouterr().out
    assert "data: CIFAR-100 python batches at" in out and "100 classes (fine00, fine37," in out
    # stdout stays readable: 10 lowest and 10 highest, then where the rest are
    table = out.split("Per-class test accuracy:")[1].strip().split("\n\n")[0].splitlines()
    assert len(table) == 1 + 20 + 1 + 1 and "per_class_accuracy.csv" in table[11]


def test_cifar100_offline_names_what_data_root_must_hold(tmp_path):
    from cbam.data import CIFAR100, CIFAR100DataModule
    from cbam.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as raised:
        CIFAR100DataModule(root=str(tmp_path), download=False)
    assert "cifar-100-python/' (train, test, meta)" in raised.value.accepted
    with pytest.raises(DataError, match=r"holds no CIFAR-100 and data.download=false: offline it must hold "):
        load_arrays(CIFAR100, tmp_path)
    # before the download, the class count is known: 100 outputs without touching the network
    assert CIFAR100DataModule(root=str(tmp_path / "new")).class_count() == 100


# ------------------------------------------------------------------------------------ image folders


@pytest.mark.parametrize("stem, loader", [("cifar", "workers"), ("imagenet", "device")])
def test_a_64px_three_class_folder_trains_end_to_end(stem, loader, tmp_path, compose_config, capsys):
    root = write_folder(tmp_path / "data", ["zebra", "ant", "moth"], train=8, test=2)
    cfg = compose_config(
        "data=folder", f"data.root={root}", "data.val_size=8", "data.batch_size=8", f"data.loader={loader}",
        f"model.stem={stem}", "model.use_cbam_block=true", *TINY_MODEL,
    )  # fmt: skip
    stats = ModelStats()  # input_size null: the data's
    maps = AttentionMaps(every_n_epochs=1, num_images=4)
    data, model, _ = fit_and_test(cfg, tmp_path, [stats, maps, ClassReport()])
    assert model.net.classifier.out_features == 3 and data.classes == ["ant", "moth", "zebra"]
    assert data.image_size == (64, 64) and data.padding == 8  # 1/8 of the size
    assert stats.flops_per_image == count_flops(model.net, (3, 64, 64))
    out = capsys.readouterr().out
    assert "MFLOPs per 3x64x64 image" in out
    assert (
        "data: image folder (train/, test/) at" in out and "3 classes (ant, moth, zebra); 64x64 images" in out
    )
    assert "16 train / 8 val / 6 test; crop padding 8" in out
    assert [row["class"] for row in read_rows(tmp_path / "per_class_accuracy.csv")] == [
        "ant",
        "moth",
        "zebra",
    ]
    assert (tmp_path / "attention" / "spatial_epoch000.png").is_file()
    # the maps are drawn over the 64x64 images, with the data's own mean and std undone
    images, _ = next(iter(data.val_dataloader()))
    gates = attention_gates(model.net, images[:2], find_cbam_sites(model.net))
    assert gates["stage1"]["spatial"].shape[-2:] == ((64, 64) if stem == "cifar" else (16, 16))
    assert maps.mosaic(to_display(images[:2], data.mean, data.std), gates).shape == (
        2 * 66 - 2,
        5 * 66 - 2,
        3,
    )
    if stem == "cifar":
        ratio = count_flops(model.net, (3, 64, 64)) / count_flops(model.net, (3, 32, 32))
        assert 3.95 < ratio <= 4.0  # the convolutions scale with the pixels, the classifier does not


def test_imagenet_stem_has_torchvisions_parameter_counts():
    from cbam import build_resnet

    with torch.device("meta"):
        for depth, expected in ((18, 11_689_512), (50, 25_557_032)):
            net = build_resnet(depth, stem="imagenet", num_classes=1000)
            assert sum(p.numel() for p in net.parameters()) == expected
    net = build_resnet(18, stem="imagenet", width=4).eval()
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    assert net.stages(net.stem(torch.zeros(1, 3, 64, 64))).shape[-2:] == (2, 2)  # /4 by the stem, /8 after


def test_a_folder_reads_the_arrays_and_labels_of_data_cifar10_from_the_same_root(tmp_path, make_image_folder):
    make_image_folder(tmp_path, classes=["cat", "ship", "dog"], train_per_class=4, test_per_class=3)
    as_cifar = load_cifar10(tmp_path, download=False)
    as_folder = load_arrays(FolderSource(), tmp_path)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(as_cifar, name), getattr(as_folder, name)), name
    assert as_cifar.classes == as_folder.classes == ["cat", "dog", "ship"]
    # CIFAR-10 keeps its published statistics; the folder computes its own, from the training images
    assert (as_cifar.mean, as_cifar.std) == (CIFAR10_MEAN, CIFAR10_STD)
    pixels = as_folder.train_images.double().reshape(-1, 3) / 255
    assert as_folder.mean == pytest.approx(pixels.mean(0).tolist(), abs=1e-12)
    assert as_folder.std == pytest.approx(pixels.std(0, correction=0).tolist(), abs=1e-12)
    # both caches live side by side, each with the facts it was built with
    payload = torch.load(tmp_path / "folder-uint8.pt", weights_only=True)
    assert tuple(payload["arrays"]["mean"]) == as_folder.mean and (tmp_path / "cifar10-uint8.pt").is_file()


def test_channel_statistics_are_exact_and_never_zero():
    images = torch.tensor([[[[0, 10, 255]], [[255, 10, 255]]]], dtype=torch.uint8)  # 2 pixels
    mean, std = channel_statistics(images)
    assert mean == pytest.approx((127.5 / 255, 10 / 255, 1.0)) and std[0] == pytest.approx(127.5 / 255)
    assert std[1] == std[2] == pytest.approx(1 / 255)  # a constant channel: one grey level, not zero


def test_mixed_sizes_are_one_error_naming_a_file_unless_image_size_resizes_them(tmp_path):
    root = write_folder(tmp_path, ["a", "b"], train=2, test=1, size=(40, 40))
    odd = root / "train" / "b" / "wide.png"
    original = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(original).save(odd)
    with pytest.raises(DataError) as raised:
        load_arrays(FolderSource(), root)
    message = str(raised.value)
    assert f"image {odd} is 50x30, not 40x40, like {root / 'train' / 'a' / '000.png'}" in message
    assert "data.image_size=S" in message and "\n" not in message
    arrays = load_arrays(FolderSource(image_size=24), root)
    assert arrays.train_images.shape[1:] == (24, 24, 3) and arrays.test_images.shape[1:] == (24, 24, 3)
    # shorter side to 24, then the centre square, by torchvision's resize (antialiased) and centre crop
    from torchvision.transforms.v2 import functional as transforms

    expected = transforms.center_crop(transforms.resize(Image.fromarray(original), 24, antialias=True), 24)
    assert any(torch.equal(image, torch.from_numpy(np.asarray(expected))) for image in arrays.train_images)
    assert (root / "folder-24px-uint8.pt").is_file()


def test_grayscale_and_rgba_images_become_rgb_and_it_is_said_once(tmp_path, caplog):
    root = write_folder(tmp_path, ["a", "b"], train=2, test=1, size=(8, 8))
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey, "L").save(root / "train" / "a" / "grey.png")
    Image.fromarray(np.full((8, 8, 4), 200, np.uint8), "RGBA").save(root / "test" / "b" / "alpha.png")
    with caplog.at_level(logging.WARNING, logger="cbam.data.sources"):
        arrays = load_arrays(FolderSource(), root)
        load_arrays(FolderSource(), root)  # from the cache: nothing said again
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1 and "converted images to RGB (1 L, 1 RGBA; e.g." in said[0]
    assert any(
        torch.equal(image, torch.from_numpy(np.stack([grey] * 3, -1))) for image in arrays.train_images
    )


def test_loaders_cut_the_same_crops_of_any_size_and_resume_exactly():
    images = torch.randint(
        1, 256, (30, 24, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    ids = torch.arange(30)
    pipeline = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "padding": 3}
    device = DeviceLoader(images, ids, LoaderSpec(8, train=True, seed=4, **pipeline))
    workers = WorkersLoader(images, ids, LoaderSpec(8, train=True, seed=4, **pipeline))
    mean, std = torch.tensor(pipeline["mean"]), torch.tensor(pipeline["std"])
    padded = torch.nn.functional.pad(images, (0, 0, 3, 3, 3, 3))
    for (x_device, y_device), (x_workers, y_workers) in zip(device, workers, strict=True):
        assert x_device.shape == (8, 3, 24, 40) and torch.equal(y_device, y_workers)
        torch.testing.assert_close(x_workers, x_device, atol=1e-6, rtol=0)
        for crop, index in zip(x_device, y_device):  # a shifted (by up to 3 px), maybe mirrored copy
            candidates = [
                normalize(padded[index, r : r + 24, c : c + 40][None].flip(2) if flip else padded[index, r : r + 24, c : c + 40][None], mean, std)[0]
                for r in range(7) for c in range(7) for flip in (False, True)
            ]  # fmt: skip
            assert min(float((crop - candidate).abs().max()) for candidate in candidates) < 1e-5
    evaluation = torch.cat([x for x, _ in DeviceLoader(images, ids, LoaderSpec(8, train=False, **pipeline))])
    torch.testing.assert_close(evaluation, normalize(images, mean, std))  # centred, unflipped
    for loader in (device, workers):
        loader.sampler.set_epoch(2)
        expected = [labels.tolist() for _, labels in loader]
        loader.load_state_dict({"epoch": 2, "batches_done": 1})
        assert [labels.tolist() for _, labels in loader] == expected[1:]


# ---------------------------------------------------------------------------- the outputs follow the data


def test_num_classes_follows_the_data_and_an_explicit_disagreeing_value_is_refused(tmp_path, compose_config):
    root = write_folder(tmp_path, ["a", "b", "c"], train=3, test=1, size=(8, 8))
    folder = ("data=folder", f"data.root={root}", "data.val_size=2")
    cfg = compose_config(*folder)
    assert num_classes(cfg, instantiate(cfg.data)) == 3
    assert num_classes(compose_config(*folder, "model.num_classes=3"), instantiate(cfg.data)) == 3
    cfg = compose_config("data=cifar100", f"data.root={tmp_path / 'absent'}")  # before its download
    assert num_classes(cfg, instantiate(cfg.data)) == 100
    cfg = compose_config(*folder, "model.num_classes=10")
    with pytest.raises(
        ConfigError, match=r"^model.num_classes=10: the data \(image folder .* have 3 classes"
    ):
        num_classes(cfg, instantiate(cfg.data))


def folder_case(root: Path, name: str) -> tuple[list[str], str]:
    """A bad image folder (and overrides) of each kind, and the start of its error line."""
    write_folder(root, ["a", "b"], train=3, test=1, size=(8, 8))
    overrides = ["data=folder", f"data.root={root}", "data.val_size=2"]
    if name == "test_class_missing_from_train":
        (root / "test" / "b").rename(root / "test" / "c")
        return overrides, f"{root / 'test' / 'c'} is a test class with no training folder (train/c/)"
    if name == "empty_class_folder":
        (root / "train" / "d").mkdir()
        return overrides, f"{root / 'train' / 'd'} is an empty class folder"
    if name == "val_size":
        return [*overrides, "data.val_size=6"], "data.val_size=6: must be less than the 6 training images of"
    if name == "num_classes":
        return [*overrides, "model.num_classes=10"], "model.num_classes=10: the data (image folder"
    if name == "no_root":
        return ["data=folder"], "data.root=None: must be a folder holding train/<class>/ and test/<class>/"
    raise AssertionError(name)


@pytest.mark.parametrize(
    "case", ["test_class_missing_from_train", "empty_class_folder", "val_size", "num_classes", "no_root"]
)
def test_bad_folder_input_is_one_line_before_any_work(case, tmp_path, compose_config, capsys):
    overrides, start = folder_case(tmp_path / "data", case)
    with pytest.raises(SystemExit) as stop:
        main(compose_config(*overrides))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), lines
    assert not list((tmp_path / "data").glob("*.pt"))  # nothing decoded


def counts(out: str, name: str) -> list[int]:
    """The train, val and test counts of class ``name`` in the output of python -m cbam.data."""
    line = next(line for line in out.splitlines() if line.startswith(f"{name} "))
    return [int(value) for value in line.split()[1:]]


def test_data_check_command_shows_what_was_found(tmp_path, capsys):
    from cbam.data.__main__ import main as check

    root = write_folder(tmp_path, ["b", "a"], train=3, test=1, size=(16, 12))
    assert check(["data=folder", f"data.root={root}", "data.val_size=2", "data.batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "2 classes (a, b); 16x12 images, 4 train / 2 val / 2 test; crop padding 1; mean (" in out
    # the fixed split took the validation images of one class here
    assert "class    train     val    test\n" in out and sum(counts(out, "a")) + sum(counts(out, "b")) == 8
    assert "classifier outputs (model.num_classes): 2" in out
    assert check(["data=folder", f"data.root={root}", "data.val_size=2"]) == 2  # batch 128 > 4 images
    assert capsys.readouterr().err.startswith("error: data.batch_size=128: larger than the 4 training images")
    assert check(["data=folder", f"data.root={root}", "data.val_size=9"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: data.val_size=9: must be less than the 6 training images"
    )


def test_data_check_command_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from fault_callbacks import FillsUp

    from cbam.data.__main__ import main as check

    root = write_folder(tmp_path, ["b", "a"], train=3, test=1, size=(16, 12))
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: FillsUp(real_fdopen(*args, **kwargs), 100))
    assert check(["data=folder", f"data.root={root}", "data.val_size=2", "data.batch_size=4"]) == 4
    monkeypatch.undo()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device while writing "), lines
    assert "checkpoint" not in lines[0]  # the tool writes none: nothing to point at


# ----------------------------------------------------------------------- figures and tables at any size


def test_class_table_and_confusion_matrix_stay_legible_at_100_classes():
    names = [f"class{index:03d}" for index in range(100)]
    matrix = torch.diag(torch.arange(100) % 7 + 1) + 1  # accuracies differ by class
    rows = per_class_rows(matrix, names)
    text = format_table(rows, print_up_to=20, csv_path="run/per_class_accuracy.csv").splitlines()
    accuracy = {row["class"]: row["accuracy"] for row in rows}
    shown = [line.split()[0] for line in text[1:-1] if not line.startswith("...")]
    assert (
        len(shown) == 20
        and text[11] == "... 80 classes between the lowest and highest (all in run/per_class_accuracy.csv)"
    )
    ranked = sorted(names, key=lambda name: (accuracy[name], names.index(name)))
    assert shown == ranked[:10] + ranked[-10:] and text[-1].startswith("all")
    assert len(format_table(rows[:20], print_up_to=20).splitlines()) == 22  # up to 20 classes: all of them
    figure = ClassReport()._figure(matrix, names)
    assert not figure.axes[0].texts  # no per-cell numbers past 20 classes
    assert figure.get_size_inches()[1] <= 0.2 * 100 + 2
    assert len(ClassReport()._figure(matrix[:5, :5], names[:5]).axes[0].texts) == 25


def test_attention_images_are_shown_with_the_datas_statistics():
    images = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    mean, std = (0.3, 0.5, 0.7), (0.1, 0.2, 0.3)
    shown = to_display(normalize(images, torch.tensor(mean), torch.tensor(std)), mean, std)
    torch.testing.assert_close(shown, images.float() / 255, atol=1e-6, rtol=0)


def test_report_groups_jobs_by_data_set(tmp_path):
    from cbam.analysis.report import report

    sweep = tmp_path / "sweep"
    settings = [("CIFAR10DataModule", False, 0.90), ("CIFAR10DataModule", True, 0.92),
                ("CIFAR100DataModule", False, 0.60), ("CIFAR100DataModule", True, 0.65)]  # fmt: skip
    for number, (target, block, accuracy) in enumerate(settings):
        job = sweep / str(number)
        (job / ".hydra").mkdir(parents=True)
        config = {"seed": 0, "data": {"_target_": f"cbam.data.{target}", "root": "/data"},
                  "model": {"depth": 18, "use_cbam_block": block, "use_cbam_class": False}}  # fmt: skip
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (job / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"cbam={'block' if block else 'none'}"])
        )
        (job / "metrics.json").write_text(json.dumps({"test_acc": accuracy, "best_val_acc": accuracy}))
    report(sweep)
    rows = read_rows(sweep / "results.csv")
    assert [(row["data set"], row["cbam"]) for row in rows] == [  # the data's folder cut to its name
        ("CIFAR10 at .../data", "none"), ("CIFAR10 at .../data", "block"),
        ("CIFAR100 at .../data", "none"), ("CIFAR100 at .../data", "block"),
    ]  # fmt: skip
    # each configuration is compared with the baseline of its own data set
    assert float(rows[1]["test_acc_diff"]) == pytest.approx(0.02) and float(
        rows[3]["test_acc_diff"]
    ) == pytest.approx(0.05)


def test_gradcam_draws_a_folder_run_at_its_size_with_its_class_names(tmp_path):
    import pytorch_lightning as pl

    from cbam.analysis.gradcam import gradcam_figure, load_test_data
    from cbam.errors import GradCamError

    root = write_folder(tmp_path / "data", ["b", "a", "c"], train=2, test=1, size=(30, 30))
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    data = {
        "_target_": "cbam.data.ImageFolderDataModule",
        "root": str(root),
        "image_size": 48,
        "seed": "${seed}",
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "data": data}))
    checkpoints = []
    for classes in (3, 4):
        trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False)
        trainer.strategy.connect(CBAMResNetModule(width=4, num_classes=classes))
        checkpoints.append(run / "checkpoints" / f"{classes}.ckpt")
        trainer.save_checkpoint(checkpoints[-1])
    arrays = load_test_data(checkpoints[0], None, None)
    assert arrays.classes == ["a", "b", "c"] and arrays.image_size == (48, 48)
    assert gradcam_figure(checkpoints[:1], None, None, 3).ndim == 3
    with pytest.raises(GradCamError, match="4.ckpt has 4 outputs, the data have 3 classes"):
        gradcam_figure(checkpoints, None, None, 3)


def test_checkpoints_from_before_the_stem_load_with_the_cifar_stem(tmp_path, quiet_trainer):
    module = CBAMResNetModule(width=4, optimizer=conf_file("optim/sgd.yaml"))
    trainer = quiet_trainer(max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]["net"]["stem"]  # as written before model.stem existed
    torch.save(checkpoint, path)
    loaded = CBAMResNetModule.load_from_checkpoint(path)
    assert loaded.hparams.net["stem"] == "cifar" and loaded.net.stem[0].kernel_size == (3, 3)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.state_dict().values()))


def test_folder_data_module_rejects_a_bad_image_size():
    from cbam.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as raised:
        ImageFolderDataModule(root="anything", image_size=0)
    assert (raised.value.argument, raised.value.value) == ("image_size", 0)
