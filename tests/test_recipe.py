"""The switches of the CPU recipe (experiment=cpu_fast): the weight average (callbacks.ema) is what
validation, test and checkpoints use; the flip average scores the mean of two passes' probabilities; no
weight decay on norms and biases reaches the optimizer; each switch off leaves a run as it was."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cbam.training.finished_jobs import config_digest
from cbam.training.lightning_module import CBAMResNetModule, parameter_groups
from tests.helpers import conf_file

NET = {"depth": 18, "width": 4, "use_cbam_block": True, "reduction_ratio": 4, "kernel_size": 3}


def module(**options) -> CBAMResNetModule:
    torch.manual_seed(0)
    optimizer = conf_file("optim/sgd.yaml") | {"lr": 0.05}
    scheduler = conf_file("scheduler/constant.yaml")
    return CBAMResNetModule(net=NET, optimizer=optimizer, scheduler=scheduler, **options)


def loader(n: int = 32, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items() if value.is_floating_point()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


class WeightsSeen(pl.Callback):
    """Records the module's weights where the stages start, and the average and the trained weights after
    the last training batch."""

    def __init__(self, ema: EMAWeightAveraging) -> None:
        self.ema, self.seen = ema, {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.seen["trained"] = weights(pl_module)
        self.seen["average"] = weights(self.ema._average_model.module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.seen["validation"] = weights(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.seen["test"] = weights(pl_module)


def test_the_weight_average_is_what_validation_test_and_checkpoints_use(quiet_trainer, tmp_path):
    ema = EMAWeightAveraging(decay=0.5)
    probe = WeightsSeen(ema)  # after the average in the list: it sees what the average swapped in
    model = module()
    trainer = quiet_trainer(max_epochs=1, callbacks=[ema, probe])
    trainer.fit(model, loader(), loader(16, seed=1))
    assert not same(probe.seen["trained"], probe.seen["average"])  # (the check is not vacuous)
    assert same(probe.seen["validation"], probe.seen["average"])
    assert same(weights(model), probe.seen["average"])  # after fitting, the module holds the average
    path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert same({k: v for k, v in saved["state_dict"].items() if v.is_floating_point()}, probe.seen["average"])
    # A test from that checkpoint, in a new process's state: the average is what is tested.
    tester = quiet_trainer(callbacks=[EMAWeightAveraging(decay=0.5), probe])
    tester.test(module(), loader(16, seed=2), ckpt_path=path, verbose=False)
    assert same(probe.seen["test"], probe.seen["average"])


def test_the_flip_average_is_the_mean_of_the_two_passes_probabilities():
    model = module(test_time_flip=True).eval()
    images, labels = next(iter(loader()))
    with torch.no_grad():
        both = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
        averaged = model.evaluation_logits(images)
        torch.testing.assert_close(averaged.softmax(1), both, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(averaged.exp().sum(1), torch.ones(len(images)))  # log-probabilities
        assert not torch.allclose(model.evaluation_logits(images, flip=False).softmax(1), both, atol=1e-4)
        # what validation scores: the loss of the averaged prediction
        model.metrics["val_loss"].reset()
        model.validation_step((images, labels), 0)
        expected = nn.functional.cross_entropy(averaged, labels)
        torch.testing.assert_close(model.metrics["val_loss"].compute(), expected)
        # what the test step hands the class report: the averaged prediction, not the mirror pass's logits
        torch.testing.assert_close(model.test_step((images, labels), 0), averaged)


def test_exempt_norms_and_biases_takes_weight_decay_off_exactly_the_one_dimensional_parameters():
    net = module().net
    decayed, exempt = parameter_groups(net, exempt_norms_and_biases=True)
    assert exempt["weight_decay"] == 0.0 and "weight_decay" not in decayed
    names = {id(p): name for name, p in net.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert exempt_names == {name for name, p in net.named_parameters() if p.ndim <= 1}
    assert any(".bn" in name for name in exempt_names) and any("mlp" in name for name in exempt_names)
    assert all(p.ndim > 1 for p in decayed["params"])
    assert len(exempt["params"]) + len(decayed["params"]) == len(list(net.parameters()))
    groups = torch.optim.SGD(parameter_groups(net, True), lr=0.1, weight_decay=5e-4).param_groups
    assert [group["weight_decay"] for group in groups] == [5e-4, 0.0]


def digest(compose_config, *overrides: str, without: tuple[str, ...] = ()) -> str:
    """The skip_finished digest of train.py's config with ``overrides``, the dotted keys ``without`` removed."""
    cfg = OmegaConf.to_container(compose_config(*overrides, "trainer.default_root_dir=run"))
    for dotted in without:
        group, _, key = dotted.partition(".")
        del cfg[group][key]
    return config_digest(OmegaConf.create(cfg))


def test_the_switches_off_give_the_digest_of_a_run_recorded_before_them(compose_config):
    """A finished run recorded before the switches existed still counts as finished with the same settings."""
    new_keys = ("model.test_time_flip", "model.compile_attention", "optim.exempt_norms_and_biases", "callbacks.ema")
    assert digest(compose_config) == digest(compose_config, without=new_keys)
    for switched_on in (
        "model.test_time_flip=true",
        "model.compile_attention=true",
        "optim.exempt_norms_and_biases=true",
        "+callbacks.ema._target_=pytorch_lightning.callbacks.EMAWeightAveraging",
    ):
        assert digest(compose_config, switched_on) != digest(compose_config), switched_on


def test_switches_off_train_bit_identically_to_a_module_without_them(quiet_trainer):
    """The switches at their defaults against a module built as before they existed (no such keys)."""
    runs = []
    for options in ({}, {"test_time_flip": False, "compile_attention": False}):
        model = module(**options)
        if options:
            model.hparams.optimizer = model.hparams.optimizer | {"exempt_norms_and_biases": False}
        else:
            model.hparams.optimizer = {k: v for k, v in model.hparams.optimizer.items() if k != "exempt_norms_and_biases"}
        trainer = quiet_trainer(max_epochs=1, deterministic=True)
        trainer.fit(model, loader(), loader(16, seed=1))
        runs.append((weights(model), trainer.callback_metrics["val/loss"]))
    assert same(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
