"""Using a trained network: checkpoints that record their data, ``python -m cbam.predict`` (its predictions
against ``train=false``'s test accuracy, unreadable images, old checkpoints, attention maps, bad input) and
``python -m cbam.export`` (ONNX Runtime against eager).

One tiny run (width 4, CBAM in every block, 3 epochs on an image folder whose classes are colours, test images
as JPEGs), trained and then tested with ``train=false ckpt_path=...`` in this process; the commands' ``main``
run in this process too."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_here
from helpers import load_checkpoint, write_colour_classes
from PIL import Image

from cbam.data.facts import CHECKPOINT_KEY, DataFacts
from cbam.data.sources import FolderSource, decode_image, load_arrays
from cbam.inference import export, predict
from cbam.inference.images import read_batch
from cbam.inference.trained import load_trained

RUN = [
    "data=folder",
    "data.loader=device",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.val_size=20",
    "model.width=4",
    "model.reduction_ratio=2",
    "cbam=block",
    "trainer.deterministic=true",
    "logger=csv",
    "callbacks.attention_maps=null",
    "callbacks.training_curves=null",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The run's checkpoint, its data folder and arguments, and the test accuracy ``train=false`` reports."""
    root = tmp_path_factory.mktemp("inference")
    data = write_colour_classes(root / "data", 8, 3, test_suffix=".jpg")
    overrides = [*RUN, f"data.root={data}", f"data.cache_dir={root / 'cache'}"]
    status, _ = train_here(root / "run", *overrides, "trainer.max_epochs=3", "test=false")
    assert status == 0
    checkpoint = root / "run" / "checkpoints" / "last.ckpt"
    status, _ = train_here(root / "eval", *overrides, "train=false", f"ckpt_path={checkpoint}")
    assert status == 0
    test_acc = json.loads((root / "eval" / "metrics.json").read_text())["test_acc"]
    return {"checkpoint": checkpoint, "data": data, "test_acc": test_acc, "root": root}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_checkpoints_record_the_facts_of_their_data(run):
    facts = load_checkpoint(run["checkpoint"])[CHECKPOINT_KEY]
    arrays = load_arrays(FolderSource(), run["data"], cache_dir=run["root"] / "cache")
    assert facts == {
        "dataset": "image folder",
        "classes": [f"class{label}" for label in range(10)],
        "image_size": [32, 32],
        "resize": None,
        "mean": list(arrays.mean),
        "std": list(arrays.std),
    }
    assert facts["mean"] != [0.4914, 0.4822, 0.4465]  # the folder's own statistics, not CIFAR-10's


def test_predictions_of_the_test_folder_score_the_test_accuracy(run, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    arguments = [str(run["checkpoint"]), str(run["data"] / "test"), "--out", str(out), "--device", "cpu"]
    assert predict.main(arguments) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "30 images, top 5 of 10 classes" in printed
    rows = read_rows(out)
    columns = [f"{kind}_{rank}" for rank in range(1, 6) for kind in ("class", "prob")]
    assert list(rows[0]) == ["file", *columns]
    assert sorted(Path(row["file"]) for row in rows) == sorted((run["data"] / "test").rglob("*.jpg"))
    for row in rows:
        probabilities = [float(row[f"prob_{rank}"]) for rank in range(1, 6)]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-5
    predicted = [row["class_1"] for row in rows]
    assert len(set(predicted)) > 2  # the network tells the images apart: a wrong preprocessing would show
    right = sum(row["class_1"] == Path(row["file"]).parent.name for row in rows)
    assert right == round(run["test_acc"] * len(rows)), (right, run["test_acc"])


def test_an_unreadable_image_is_named_skipped_and_the_others_predicted(run, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(run["data"] / "test" / "class3", images / "class3")
    truncated = images / "class3" / "001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])  # the header and a part of the scan
    out = tmp_path / "predictions.csv"
    status = predict.main([str(run["checkpoint"]), str(images), "--out", str(out), "--top-k", "2"])
    assert status == 7
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot decode image {truncated}: ") and line.endswith("(skipped)")
    assert [Path(row["file"]).name for row in read_rows(out)] == ["000.jpg", "002.jpg"]


def test_a_checkpoint_without_data_facts_asks_for_them_by_key(run, tmp_path, capsys):
    saved = load_checkpoint(run["checkpoint"])
    del saved[CHECKPOINT_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    image = str(run["data"] / "test" / "class5" / "000.jpg")
    assert predict.main([str(old), image, "--out", str(tmp_path / "no.csv")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "does not record its data" in line and "data=folder data.root=DIR" in line and "--classes" in line
    assert not (tmp_path / "no.csv").exists()

    facts = load_checkpoint(run["checkpoint"])[CHECKPOINT_KEY]
    flags = [
        "--classes", ",".join(facts["classes"]), "--image-size", "32",
        "--mean", ",".join(map(str, facts["mean"])), "--std", ",".join(map(str, facts["std"])),
    ]  # fmt: skip
    ways = {
        "recorded": [str(run["checkpoint"]), image],
        "data=": [str(old), image, "data=folder", f"data.root={run['data']}", f"data.cache_dir={tmp_path}"],
        "flags": [str(old), image, *flags],
    }
    found = {}
    for name, arguments in ways.items():
        assert predict.main([*arguments, "--out", str(tmp_path / f"{name}.csv")]) == 0, name
        found[name] = read_rows(tmp_path / f"{name}.csv")
    assert found["data="] == found["recorded"] == found["flags"]


def test_bad_input_is_one_line_and_exit_status_2(run, tmp_path, capsys):
    checkpoint, test = str(run["checkpoint"]), str(run["data"] / "test")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    cases = [
        ([checkpoint, test, "--top-k", "11"], "--top-k=11: must be between 1 and the network's 10 classes"),
        ([checkpoint, test, "--top-k", "0"], "--top-k=0"),
        ([checkpoint, str(tmp_path / "empty")], "holds no .png or .jpg image"),
        ([checkpoint, str(tmp_path / "missing.jpg")], "no such file or folder"),
        ([checkpoint, str(tmp_path / "*.png")], "no file matches this pattern"),
        ([str(text), test], "is not a PyTorch checkpoint"),
        ([checkpoint, test, "data=folder", "data.nothing=1"], "data.nothing"),
        ([checkpoint, test, "--gradcam"], "--gradcam draws into the --attention DIR"),
        ([checkpoint, test, "--classes", "a,b"], "its network has 10 outputs, but --classes names 2 classes"),
        ([checkpoint, test, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ]
    if not torch.cuda.is_available():
        cases.append(([checkpoint, test, "--device", "cuda"], "this machine has no CUDA GPU"))
    for arguments, message in cases:
        try:
            status = predict.main([*arguments, "--out", str(tmp_path / "p.csv")])
        except SystemExit as stop:  # (argparse's errors exit from the parser)
            status = stop.code
        assert status == 2, arguments
        assert message in one_error_line(capsys.readouterr().err), arguments
    assert not (tmp_path / "p.csv").exists()


def test_attention_maps_and_grad_cam_of_own_images(run, tmp_path, capsys):
    pytest.importorskip("captum")
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    shutil.copy(run["data"] / "test" / "class1" / "000.jpg", images / "a" / "one.jpg")
    with Image.open(run["data"] / "test" / "class2" / "000.jpg") as image:
        image.resize((60, 45)).save(images / "wide.png")  # another size: fitted to 32x32
    folders = {}
    for name, extra in (("gates", []), ("gradcam", ["--gradcam"])):
        folders[name] = tmp_path / name
        arguments = [str(run["checkpoint"]), str(images), "--attention", str(folders[name]), *extra]
        assert predict.main([*arguments, "--out", str(tmp_path / f"{name}.csv")]) == 0
        assert "wrote 2 attention maps" in capsys.readouterr().out
    for name in ("a/one.jpg.png", "wide.png.png"):
        with Image.open(folders["gates"] / name) as gates, Image.open(folders["gradcam"] / name) as cams:
            # one tile more: 1 image + 4 stages' spatial gates, then + Grad-CAM (tiles of 1.1 in at 100 dpi)
            assert cams.height == gates.height and cams.width - gates.width == 110


def test_images_of_another_size_are_fitted_as_data_image_size_fits_them(tmp_path):
    from torchvision.transforms.v2 import functional as transforms

    pixels = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    fitted, _ = decode_image(tmp_path / "wide.png", (32, 32))
    expected = transforms.center_crop(transforms.resize(Image.fromarray(pixels), 32, antialias=True), 32)
    assert torch.equal(fitted, torch.from_numpy(np.asarray(expected)))
    tall, _ = decode_image(tmp_path / "wide.png", (40, 20))  # a non-square input: covered, then cut
    assert tall.shape == (40, 20, 3)


def test_onnx_export_gives_eager_logits_at_batch_1_and_7(run, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "net.onnx"
    assert export.main([str(run["checkpoint"]), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "batch 1: max |ONNX Runtime - eager| =" in printed and "batch 7: max" in printed
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    facts = json.loads(session.get_modelmeta().custom_metadata_map["data_facts"])
    assert facts == load_checkpoint(run["checkpoint"])[CHECKPOINT_KEY]
    net = load_trained(run["checkpoint"]).net
    paths = sorted((run["data"] / "test").rglob("*.jpg"))[:7]
    for size in (1, 7):
        images = read_batch(paths[:size], DataFacts.from_dict(facts), torch.device("cpu")).inputs.contiguous()
        with torch.no_grad():
            eager = net(images)
        exported = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        assert exported.shape == (size, 10)
        assert (exported - eager).abs().max() <= 1e-4 * eager.abs().max()


def test_export_without_the_extra_is_one_line_naming_it(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert export.main([str(run["checkpoint"]), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    assert 'pip install -e ".[export]"' in one_error_line(capsys.readouterr().err)
