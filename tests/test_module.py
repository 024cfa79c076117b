"""The LightningModule (training step, checkpoint round trip, full-size evaluation batches) and the
learning-rate schedules."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from cbam import CBAM
from cbam.callbacks import AttentionMaps, ClassReport
from cbam.data import IGNORED_LABEL, CIFAR10DataModule
from cbam.errors import ConfigError
from cbam.models.network_config import flatten
from cbam.training.lightning_module import CBAMResNetModule
from cbam.training.schedules import constant, one_cycle, warmup_cosine


def fixed_batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_training_steps_overfit_a_fixed_batch():
    torch.manual_seed(0)
    module = CBAMResNetModule(depth=18, width=8, use_cbam_block=True, reduction_ratio=4, kernel_size=3)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    batch = fixed_batch()
    losses = []
    for step in range(12):
        optimizer.zero_grad()
        loss = module.training_step(batch, step)
        assert loss.ndim == 0 and loss.requires_grad
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=0.7)  # about chance at first
    assert losses[-1] < 0.5 * losses[0], losses  # observed: 2.35 -> 0.63
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_checkpoint_alone_rebuilds_architecture_and_weights(tmp_path, quiet_trainer):
    torch.manual_seed(0)
    options = dict(
        depth=18,
        use_cbam_block=True,
        use_cbam_class=True,
        reduction_ratio=2,
        kernel_size=3,
        width=4,
        num_classes=7,
        label_smoothing=0.1,
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9},
        scheduler={
            "_target_": "cbam.training.schedules.one_cycle",
            "_partial_": True,
            "warmup_fraction": 0.5,
        },
    )
    module = CBAMResNetModule(**options)
    images, labels = fixed_batch(16)
    loader = DataLoader(TensorDataset(images, labels % 7), batch_size=8)
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(module, loader)
    assert trainer.global_step == 4
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    restored = CBAMResNetModule.load_from_checkpoint(path, map_location="cpu")
    saved = {**flatten(restored.hparams.net), **restored.hparams}
    for key, value in options.items():
        assert saved[key] == value, key
    assert str(restored.net) == str(module.net)
    assert sum(isinstance(m, CBAM) for m in restored.modules()) == 8 + 1
    assert restored.state_dict().keys() == module.state_dict().keys()
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    module.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(images), module(images), rtol=0, atol=0)
        assert restored(images).shape == (16, 7)


def test_training_without_optimizer_or_schedule_is_a_clear_error(quiet_trainer):
    # the defaults live in conf/optim and conf/scheduler only; a Python user passes them explicitly
    module = CBAMResNetModule(depth=18, width=4, reduction_ratio=2)
    images, labels = fixed_batch(8)
    with pytest.raises(ConfigError, match="needs optimizer and scheduler to train"):
        quiet_trainer(max_steps=1).fit(module, DataLoader(TensorDataset(images, labels), batch_size=8))


# ------------------------------------------------------------------------------------------- schedules


def learning_rates(make_scheduler, steps: int, lr: float = 0.2) -> list[float]:
    """The learning rate used at each of ``steps`` training steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    rates.append(optimizer.param_groups[0]["lr"])  # after the last step
    assert optimizer.param_groups[0]["momentum"] == 0.9  # the schedules leave momentum alone
    return rates


def test_warmup_cosine_warms_up_linearly_then_decays_to_the_final_ratio():
    rates = learning_rates(lambda o: warmup_cosine(o, 100, warmup_fraction=0.1, final_lr_ratio=0.05), 100)
    warmup = rates[:10]
    assert warmup == pytest.approx([0.2 * (i + 1) / 10 for i in range(10)])  # linear, reaching the peak
    assert rates[10] == pytest.approx(0.2)
    decay = rates[10:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert rates[55] == pytest.approx(0.2 * (0.05 + 0.95 * 0.5))  # the cosine's midpoint
    assert rates[-1] == pytest.approx(0.2 * 0.05)
    assert min(rates) == pytest.approx(0.2 * 0.05)


def test_warmup_cosine_without_warmup_starts_at_the_base_rate():
    rates = learning_rates(lambda o: warmup_cosine(o, 50), 50)
    assert rates[0] == pytest.approx(0.2)
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)


def test_one_cycle_peaks_at_the_optimizer_lr_after_warmup_fraction():
    total = 200
    rates = learning_rates(
        lambda o: one_cycle(o, total, warmup_fraction=0.3, start_lr_ratio=0.04, final_lr_ratio=1e-4),
        total - 1,
    )
    peak = max(range(len(rates)), key=rates.__getitem__)
    assert abs(peak - 0.3 * total) <= 1
    assert rates[peak] == pytest.approx(0.2)
    assert rates[0] == pytest.approx(0.2 * 0.04)
    assert rates[-1] == pytest.approx(0.2 * 1e-4)
    rising, falling = rates[: peak + 1], rates[peak:]
    assert all(a < b for a, b in zip(rising, rising[1:]))
    assert all(a > b for a, b in zip(falling, falling[1:]))
    steps = [b - a for a, b in zip(rising, rising[1:])]
    assert max(steps) == pytest.approx(min(steps), rel=1e-6)  # linear ramp


def test_constant_schedule():
    assert set(learning_rates(lambda o: constant(o, 10), 10)) == {0.2}


# ------------------------------------------------------------------------------ static evaluation batches


class EvaluationBatches(pl.Callback):
    """Keeps every validation and test batch as the module received it."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen["val"].append(tuple(t.clone() for t in batch))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen["test"].append(tuple(t.clone() for t in batch))


def unpadded_evaluation(model: CBAMResNetModule, loader) -> dict:
    """Loss, accuracy and per-class counts over the loader's batches as they come (the last one short)."""
    model.eval()
    with torch.no_grad():
        logits, labels = map(torch.cat, zip(*((model(images), labels) for images, labels in loader)))
    hits = logits.argmax(1) == labels
    return {
        "loss": model.criterion(logits, labels).item(),
        "acc": hits.float().mean().item(),
        "total": torch.bincount(labels, minlength=10).tolist(),
        "correct": torch.bincount(labels[hits], minlength=10).tolist(),
    }


def test_evaluation_batches_are_full_size_and_change_no_metric(tmp_path, make_batches, quiet_trainer):
    """Every validation and test batch reaches the module with data.batch_size rows (a compiled network
    sees one shape), the same with either loader, and the loss, accuracy, per-class table and attention
    images equal those of an evaluation of the short batches."""
    make_batches(tmp_path / "data", per_batch=6, num_test=13)  # 30 training images, 13 test images
    batch_size, val_size = 8, 5  # validation: one batch of 5 images; test: 8 + 5
    torch.manual_seed(0)
    model = CBAMResNetModule(depth=18, width=4, use_cbam_block=True, reduction_ratio=4, label_smoothing=0.1)
    runs = {}
    for loader in ("workers", "device"):
        data = CIFAR10DataModule(
            root=str(tmp_path / "data"), download=False, batch_size=batch_size, num_workers=0,
            val_size=val_size, loader=loader,
        )  # fmt: skip
        batches, maps = EvaluationBatches(), AttentionMaps(every_n_epochs=1000)  # collects, draws nothing
        trainer = quiet_trainer(callbacks=[batches, maps, ClassReport()])
        logged = trainer.validate(model, datamodule=data, verbose=False)[0]
        logged |= trainer.test(model, datamodule=data, verbose=False)[0]
        runs[loader] = batches.seen
        for split, seen in batches.seen.items():
            assert [tuple(images.shape) for images, _ in seen] == [(batch_size, 3, 32, 32)] * len(seen), split
            assert [len(labels) for _, labels in seen] == [batch_size] * len(seen), split
        # filled up: the validation batch and the second test batch
        assert [int((labels != IGNORED_LABEL).sum()) for _, labels in batches.seen["test"]] == [8, 5]
        assert int((batches.seen["val"][0][1] != IGNORED_LABEL).sum()) == val_size

        expected = {
            split: unpadded_evaluation(model, getattr(data, f"{split}_dataloader")())
            for split in ("val", "test")
        }
        for split, metrics in expected.items():
            assert logged[f"{split}/acc"] == pytest.approx(metrics["acc"], abs=1e-6), split
            assert logged[f"{split}/loss"] == pytest.approx(metrics["loss"], rel=1e-5), split
        with open(tmp_path / "per_class_accuracy.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(row["total"]) for row in rows] == expected["test"]["total"]  # 13 images in all
        assert [int(row["correct"]) for row in rows] == expected["test"]["correct"]
        # the attention figure's images: the validation set's 5, none of the filling
        assert torch.equal(
            torch.cat(maps._labels), torch.cat([labels for _, labels in data.val_dataloader()])
        )
    for split in ("val", "test"):  # both loaders hand the module the same filled-up batches
        for (images, labels), (other_images, other_labels) in zip(
            runs["workers"][split], runs["device"][split]
        ):
            assert torch.equal(labels, other_labels) and torch.equal(images, other_images)
