"""``python -m cbam.gradcam``: Grad-CAM maps checked against a hand-written Grad-CAM, the figure and its
TensorBoard image, data taken from the checkpoint's run, bad input as one line with exit status 2.

Tiny width-4 ResNet18 checkpoints (untrained: the maps' maths does not need a trained model) on a tiny
image folder. captum comes with the dev extra, which includes the interpret one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import run_python
from PIL import Image

from cbam.analysis.gradcam import grad_cam, load_model, main
from cbam.data import load_cifar10, normalize
from cbam.training.lightning_module import CBAMResNetModule


def save_checkpoint(module: CBAMResNetModule, path: Path) -> Path:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run dirs as train.py leaves them (.hydra/config.yaml naming the data, checkpoints/), one plain
    ResNet18 and one with CBAM in every block, both width 4, on an image folder of 2 test images per class."""
    from conftest import _write_image_folder

    root = tmp_path_factory.mktemp("gradcam")
    _write_image_folder(root / "data", train_per_class=2, test_per_class=2, test_suffix=".png")
    checkpoints = []
    for name, block in (("plain", False), ("cbam", True)):
        torch.manual_seed(0)
        run = root / name
        (run / ".hydra").mkdir(parents=True)
        config = {"data": {"root": str(root / "data"), "cache_dir": str(root / "cache")}}
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        module = CBAMResNetModule(width=4, use_cbam_block=block, reduction_ratio=2)
        checkpoints.append(save_checkpoint(module, run / "checkpoints" / "last.ckpt"))
    return root, checkpoints


def reference_grad_cam(
    module: CBAMResNetModule, inputs: torch.Tensor, labels: torch.Tensor, layer: torch.nn.Module | None = None
) -> torch.Tensor:
    """Grad-CAM written out (Selvaraju et al.): the channels of ``layer``'s output (default: the last stage)
    weighted by the spatial mean of their gradients, summed, ReLU, upsampled bilinearly, divided by the
    maximum."""
    kept = {}
    layer = layer if layer is not None else module.net.stages[-1]
    handle = layer.register_forward_hook(lambda _, __, output: kept.update(features=output))
    logits = module(inputs)
    handle.remove()
    features = kept["features"]
    score = logits.gather(1, labels[:, None]).sum()
    (gradients,) = torch.autograd.grad(score, features)
    maps = torch.relu((gradients.mean((2, 3), keepdim=True) * features).sum(1, keepdim=True)).detach()
    maps = torch.nn.functional.interpolate(
        maps, size=inputs.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0]
    return maps / maps.flatten(1).amax(1).clamp(min=1e-30)[:, None, None]


def test_maps_and_probabilities_match_a_hand_written_grad_cam(runs):
    root, checkpoints = runs
    arrays = load_cifar10(root / "data", download=False, cache_dir=root / "cache")
    mean, std = torch.tensor(arrays.mean), torch.tensor(arrays.std)
    inputs, labels = normalize(arrays.test_images[:6], mean, std).contiguous(), arrays.test_labels[:6]
    for checkpoint in checkpoints:
        module = load_model(checkpoint)
        maps, probabilities = grad_cam(module, inputs, labels)
        assert maps.shape == (6, 32, 32)
        assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
        torch.testing.assert_close(maps, reference_grad_cam(module, inputs, labels), atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            expected = module(inputs).softmax(1)[torch.arange(6), labels]
        torch.testing.assert_close(probabilities, expected)


@pytest.mark.parametrize(
    ("model", "label", "final_map"),
    [
        (
            {"arch": "torchvision", "name": "resnet18", "use_cbam_block": True, "use_cbam_class": True},
            "torchvision resnet18 (cifar stem) + CBAM (blocks, classifier)",
            lambda net: net.layer4,
        ),
        (
            {"arch": "torchvision", "name": "mobilenet_v2", "use_cbam_class": True, "attention_kind": "eca"},
            "torchvision mobilenet_v2 (cifar stem) + ECA (classifier)",
            lambda net: net.features[-2],
        ),
        (
            {
                "arch": "wide_resnet",
                "depth": 10,
                "widen_factor": 1,
                "use_cbam_class": True,
                "reduction_ratio": 4,
            },
            "WRN-10-1 + CBAM (classifier, reduction_ratio=4)",
            lambda net: net.final,
        ),
    ],
    ids=["torchvision_resnet18", "mobilenet_v2_eca", "wide_resnet"],
)
def test_other_backbones_map_their_final_feature_map_before_the_classifier_attention(model, label, final_map):
    from cbam.analysis.gradcam import describe

    torch.manual_seed(0)
    module = CBAMResNetModule(net=model).eval()
    inputs, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 7])
    maps, _ = grad_cam(module, inputs, labels)
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    expected = reference_grad_cam(module, inputs, labels, final_map(module.net))
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=1e-4)
    assert describe(module) == label


def test_a_network_without_a_final_feature_map_module_is_one_line():
    import torchvision

    from cbam.analysis.gradcam import feature_layer
    from cbam.errors import GradCamError

    with torch.device("meta"):
        vit = torchvision.models.vit_b_16()
    with pytest.raises(
        GradCamError, match="^Grad-CAM needs the network's final feature map, and VisionTransformer"
    ):
        feature_layer(vit)


def test_figure_and_tensorboard_image_with_the_runs_own_data(runs, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, checkpoints = runs
    run = tmp_path / "run"
    run.mkdir()
    assert main([*map(str, checkpoints), "--num-images", "3", "--run", str(run)]) == 0  # no --data-root
    with Image.open(run / "gradcam.png") as image:
        two_rows = image.size
    assert main([str(checkpoints[0]), "--num-images", "3", "--out", str(tmp_path / "one.png")]) == 0
    with Image.open(tmp_path / "one.png") as image:
        assert image.width == two_rows[0] and image.height < two_rows[1]  # a row per checkpoint
    events = next((run / "tensorboard").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events), size_guidance={"images": 1})
    accumulator.Reload()
    assert "gradcam" in accumulator.Tags()["images"]
    assert "wrote" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_status_2(runs, tmp_path, capsys):
    root, checkpoints = runs
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save(
        {"state_dict": {"weights": torch.zeros(2)}}, foreign
    )  # a Lightning checkpoint of another model
    outside = tmp_path / "outside.ckpt"  # a valid checkpoint outside any run dir: no data config
    outside.write_bytes(checkpoints[0].read_bytes())
    cases = [
        ([str(tmp_path / "missing.ckpt")], "no such file"),
        ([str(text)], "is not a PyTorch checkpoint"),
        ([str(foreign)], "not a CBAM-ResNet checkpoint"),
        ([str(outside)], "pass --data-root"),
        ([str(checkpoints[0]), "--data-root", str(tmp_path / "nothing")], "holds no CIFAR-10"),
        ([str(checkpoints[0]), "--num-images", "0"], "--num-images=0"),
        ([str(checkpoints[0]), "--run", str(tmp_path / "no-run")], "no such run dir"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        error = capsys.readouterr().err.strip()
        assert error.startswith("error:") and message in error and len(error.splitlines()) == 1, (args, error)
    result = run_python(["-m", "cbam.gradcam", str(text)], timeout=120)  # as a command: no traceback either
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_missing_captum_is_one_line_naming_the_extra(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "captum", None)  # import captum now raises ImportError
    assert main([str(runs[1][0])]) == 2
    assert (
        capsys.readouterr().err.strip()
        == 'error: Grad-CAM needs captum, which is not installed: pip install -e ".[interpret]"'
    )
