"""The networks train.py builds besides this project's ResNets (model=wide_resnet, model=torchvision), and the
attention kinds of the config (attention=eca, attention=bam): parameter counts against the standard networks
and the layers' formulas, the CIFAR stem, the config's one-line errors, and the trackers' missing extras."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from hydra.utils import instantiate
from test_attach import (
    MOBILENET_V2_RESIDUAL_BLOCKS,
    RESNET50_BLOCKS,
    attention_modules,
    bam_params,
    cbam_params,
    count,
)
from torch import nn

from cbam.errors import ConfigError, InvalidArgument
from cbam.models.bam import BAM
from cbam.models.cbam import CBAM
from cbam.models.eca import ECA, eca_kernel_size
from cbam.models.network_config import ATTENTION_KINDS, build_network, flatten, nest, network_name
from cbam.training.config_checks import check_config

RESNET18_PARAMS = 11_173_962  # the CIFAR ResNet18 at 10 classes
RESNET18_STAGES = (64, 128, 256, 512)


def on_meta(net: dict) -> nn.Module:
    with torch.device("meta"):
        return build_network(nest(net))


def compose_model(compose_config, *overrides: str) -> nn.Module:
    """The network of train.py's config with ``overrides``, on the meta device."""
    cfg = compose_config(*overrides)
    with torch.device("meta"):
        return instantiate(cfg.model, num_classes=10, _recursive_=False, _convert_="all").net


# ------------------------------------------------------------------------------------ torchvision backbones


def test_torchvision_resnet18_with_the_cifar_stem_is_the_cifar_resnet18():
    net = on_meta({"arch": "torchvision", "name": "resnet18"})
    assert count(net) == RESNET18_PARAMS == count(on_meta({"depth": 18}))
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    # the imagenet stem leaves torchvision's network as it is: its ImageNet ResNet18 has 11,689,512 parameters
    imagenet = on_meta({"arch": "torchvision", "name": "resnet18", "stem": "imagenet", "num_classes": 1000})
    assert count(imagenet) == 11_689_512 and imagenet.conv1.stride == (2, 2)


def test_the_cifar_stem_keeps_the_resolution_of_other_families():
    mobilenet = on_meta({"arch": "torchvision", "name": "mobilenet_v2"})
    assert mobilenet.features[0][0].stride == (1, 1)
    densenet = on_meta({"arch": "torchvision", "name": "densenet121"})
    assert densenet.features.conv0.kernel_size == (3, 3) and isinstance(densenet.features.pool0, nn.Identity)
    # resnet50: 32 px in, 4x4 before the pooling (the stages' 8x), as in the CIFAR ResNets
    net = on_meta({"arch": "torchvision", "name": "resnet50"})
    shapes = []
    net.avgpool.register_forward_hook(lambda module, inputs, output: shapes.append(inputs[0].shape))
    assert net(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10)
    assert shapes == [(2, 2048, 4, 4)]


def test_googlenet_is_built_without_its_auxiliary_classifiers():
    net = on_meta({"arch": "torchvision", "name": "googlenet"})
    assert net.aux1 is None and net.aux2 is None
    logits = net.train()(torch.empty(2, 3, 32, 32, device="meta"))  # in training too: the logits alone
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)


def test_torchvision_resnet50_with_cbam_everywhere_adds_the_formula_parameters():
    plain = count(on_meta({"arch": "torchvision", "name": "resnet50"}))
    net = on_meta({"arch": "torchvision", "name": "resnet50", "use_cbam_block": True, "use_cbam_class": True})
    assert count(net) - plain == sum(map(cbam_params, RESNET50_BLOCKS)) + cbam_params(2048)
    assert isinstance(net.avgpool.attention, CBAM) and isinstance(net.avgpool.pool, nn.AdaptiveAvgPool2d)


def test_torchvision_mobilenet_v2_with_eca_has_each_blocks_kernel():
    net = build_network(
        nest({"arch": "torchvision", "name": "mobilenet_v2", "use_cbam_block": True, "attention_kind": "eca"})
    )
    kernels = [module.kernel_size for module in net.modules() if isinstance(module, ECA)]
    assert kernels == [eca_kernel_size(c) for c in MOBILENET_V2_RESIDUAL_BLOCKS]
    net.train()(torch.randn(2, 3, 32, 32)).sum().backward()  # trains
    assert all(p.grad is not None for p in net.parameters())


def test_torchvision_bam_goes_after_layer1_to_3():
    plain = count(on_meta({"arch": "torchvision", "name": "resnet18"}))
    net = on_meta(
        {"arch": "torchvision", "name": "resnet18", "use_cbam_block": True, "attention_kind": "bam"}
    )
    assert sorted(attention_modules(net)) == ["layer1.attention", "layer2.attention", "layer3.attention"]
    assert count(net) - plain == sum(map(bam_params, RESNET18_STAGES[:3]))


# ----------------------------------------------------------------- ECA and BAM in this project's networks


def test_eca_in_every_block_of_the_resnet18_has_the_adaptive_kernel():
    net = on_meta({"depth": 18, "use_cbam_block": True, "attention_kind": "eca"})
    layers = attention_modules(net)
    blocks = [c for c in RESNET18_STAGES for _ in range(2)]
    assert [layer.kernel_size for layer in layers.values()] == [eca_kernel_size(c) for c in blocks]
    assert [eca_kernel_size(c) for c in RESNET18_STAGES] == [3, 5, 5, 5]  # Eq. 12 with gamma=2, b=1
    assert count(net) - RESNET18_PARAMS == sum(eca_kernel_size(c) for c in blocks)
    fixed = on_meta({"depth": 18, "use_cbam_block": True, "attention_kind": "eca", "eca_kernel_size": 9})
    assert count(fixed) - RESNET18_PARAMS == 9 * len(blocks)


def test_bam_goes_between_the_stages_of_the_resnet_and_the_wide_resnet():
    net = on_meta({"depth": 18, "use_cbam_block": True, "attention_kind": "bam"})
    assert sorted(attention_modules(net)) == [
        "stages.0.attention",
        "stages.1.attention",
        "stages.2.attention",
    ]
    assert count(net) - RESNET18_PARAMS == sum(map(bam_params, RESNET18_STAGES[:3]))
    # the released code's layer: no BatchNorm at the branches' ends (2 * C + 2 parameters fewer per BAM)
    released = on_meta(
        {"use_cbam_block": True, "attention_kind": "bam", "bam_combine": "product", "bam_branch_norm": False}
    )
    assert count(net) - count(released) == sum(2 * c + 2 for c in RESNET18_STAGES[:3])
    plain = count(on_meta({"arch": "wide_resnet", "depth": 16, "widen_factor": 2}))
    wide = on_meta(
        {
            "arch": "wide_resnet",
            "depth": 16,
            "widen_factor": 2,
            "use_cbam_block": True,
            "attention_kind": "bam",
        }
    )
    assert sorted(attention_modules(wide)) == ["stages.0.attention", "stages.1.attention"]
    assert count(wide) - plain == bam_params(32) + bam_params(64)


def test_bam_in_the_resnet_trains_and_keeps_the_output_shape():
    net = build_network(nest({"depth": 18, "width": 16, "use_cbam_block": True, "attention_kind": "bam"}))
    logits = net.train()(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_descriptions_round_trip_and_name_the_network():
    for settings, name in [
        ({"depth": 50, "use_cbam_block": True}, "ResNet50"),
        ({"arch": "wide_resnet", "depth": 28, "widen_factor": 10, "attention_kind": "eca"}, "WRN-28-10"),
        (
            {"arch": "torchvision", "name": "resnet50", "attention_kind": "bam"},
            "torchvision resnet50 (cifar stem)",
        ),
    ]:
        net = nest(settings)
        assert nest(flatten(net)) == net and network_name(net) == name
        kind = net["attention"]["kind"]
        fields = {field.name for field in dataclasses.fields(ATTENTION_KINDS[kind])}
        assert set(net["attention"]) == {"kind", *fields}, settings
    # a description saved before arch and kind existed is a ResNet with CBAM
    assert nest({"depth": 34})["arch"] == "resnet" and nest({"depth": 34})["attention"]["kind"] == "cbam"


def test_an_option_of_another_kind_is_accepted_at_its_default_only():
    eca = nest(
        {"attention_kind": "eca", "reduction_ratio": 16, "channel_pooling": "avg_max", "cbam_impl": "fused"}
    )
    assert eca["attention"] == {"kind": "eca", "kernel_size": None, "gamma": 2, "b": 1}
    with pytest.raises(
        TypeError, match="channel_pooling=max is an option of attention_kind=cbam; this network's is eca"
    ):
        nest({"attention_kind": "eca", "channel_pooling": "max"})
    with pytest.raises(TypeError, match="arch=torchvision takes no argument 'width'"):
        nest({"arch": "torchvision", "width": 16})
    with pytest.raises(
        InvalidArgument, match="arch=densenet: accepted values are resnet, wide_resnet, torchvision"
    ):
        nest({"arch": "densenet"})


# ------------------------------------------------------------------------------------------- the config


def test_model_groups_compose_the_standard_networks(compose_config):
    wide = compose_config("model=wide_resnet", "model.depth=16", "model.widen_factor=8")
    assert wide.name == "cbam-wrn16-8"
    assert count(compose_model(compose_config, "model=wide_resnet")) == 36_479_194  # WRN-28-10
    assert count(
        compose_model(compose_config, "model=wide_resnet", "model.depth=16", "model.widen_factor=8")
    ) == (10_961_370)
    torchvision_resnet = compose_config("model=torchvision", "model.name=resnet50")
    assert torchvision_resnet.name == "cbam-torchvision-resnet50"
    assert compose_config("model=resnet50").name == "cbam-resnet50"
    eca = compose_model(compose_config, "model=wide_resnet", "model.depth=10", "attention=eca", "cbam=block")
    assert {type(m) for m in attention_modules(eca).values()} == {ECA}
    bam = compose_model(compose_config, "model=torchvision", "attention=bam_released", "cbam=block")
    assert [type(m) for m in attention_modules(bam).values()] == [BAM] * 3
    assert all(
        m.options.combine == "product" and not m.options.branch_norm for m in attention_modules(bam).values()
    )


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ("model=torchvision", "model.name=resnet_9000"),
            "model.name=resnet_9000: not a torchvision classification model",
        ),
        (
            ("model=torchvision", "model.name=vgg11", "cbam=block"),
            "model.use_cbam_block=True: vgg11: no residual block found",
        ),
        (("model=torchvision", "model.name=vit_b_16"), "model: the network fails on 32x32 images"),
        (("model=torchvision", "+model.width=4"), "model: arch=torchvision takes no argument 'width'"),
        (("model=wide_resnet", "model.depth=20"), "model.depth=20: a Wide ResNet's depth is 6n + 4"),
        (("attention=eca", "model.eca_kernel_size=4"), "model.eca_kernel_size=4: must be an odd integer"),
        (
            ("attention=bam", "model.bam_combine=mean"),
            "model.bam_combine=mean: accepted values are sum, product, max",
        ),
        (
            ("attention=eca", "+model.kernel_size=5"),
            "model: kernel_size=5 is an option of attention_kind=cbam; this network's is eca",
        ),
        (
            ("attention=bam", "cbam=block", "model.reduction_ratio=128"),
            "model.reduction_ratio=128: must be an integer between 1 and 64",
        ),
    ],
    ids=[
        "unknown_name",
        "no_residual_block",
        "vit_on_32px",
        "resnet_key",
        "wrn_depth",
        "eca_kernel",
        "bam_combine",
        "cbam_option_under_eca",
        "bam_ratio",
    ],
)
def test_bad_backbone_settings_are_one_line_naming_the_key(
    compose_config, tiny_cifar_folder, overrides, line
):
    cfg = compose_config(
        f"data.root={tiny_cifar_folder}", "data.download=false", "data.val_size=20", *overrides
    )
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    message = str(error.value)
    assert message.startswith(line), message
    assert "\n" not in message


@pytest.mark.parametrize("extra", ["mlflow", "wandb"])
def test_a_tracker_without_its_extra_is_one_line_with_the_install_command(
    compose_config, tiny_cifar_folder, monkeypatch, extra
):
    cfg = compose_config(
        f"data.root={tiny_cifar_folder}", "data.download=false", "data.val_size=20", f"logger={extra}"
    )
    check_config(cfg)  # installed here (the dev extra has both)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == extra else real(name, *a)
    )
    with pytest.raises(
        ConfigError,
        match=rf'^logger={extra}: {extra} is not installed here; install it with pip install -e "\.\[{extra}\]"$',
    ):
        check_config(cfg)


def test_torchvision_bam_before_the_classifier_passes_the_config_check(compose_config, tiny_cifar_folder):
    """(BAM's BatchNorm1d: the shape probe of the classifier's attention runs in eval mode)"""
    overrides = ("model=torchvision", "attention=bam", "cbam=both")
    check_config(
        compose_config(
            f"data.root={tiny_cifar_folder}", "data.download=false", "data.val_size=20", *overrides
        )
    )
    net = compose_model(compose_config, *overrides)
    assert sorted(attention_modules(net)) == [
        "avgpool.attention",
        "layer1.attention",
        "layer2.attention",
        "layer3.attention",
    ]
    assert net.training  # the probe left the network in its mode


def test_attention_map_sites_of_torchvision_networks_are_their_stages_and_the_classifier():
    from cbam.analysis.gradcam import describe
    from cbam.callbacks.attention_maps import find_cbam_sites
    from cbam.training.lightning_module import CBAMResNetModule

    resnet = on_meta(
        {"arch": "torchvision", "name": "resnet18", "use_cbam_block": True, "use_cbam_class": True}
    )
    sites = find_cbam_sites(resnet)
    assert [name for name, _ in sites] == ["layer1", "layer2", "layer3", "layer4", "classifier"]
    assert sites[0][1] is resnet.layer1[1].bn2.attention and sites[-1][1] is resnet.avgpool.attention
    mobilenet = on_meta(
        {"arch": "torchvision", "name": "mobilenet_v2", "use_cbam_block": True, "use_cbam_class": True}
    )
    assert [name for name, _ in find_cbam_sites(mobilenet)] == ["features", "classifier"]
    with torch.device("meta"):
        module = CBAMResNetModule(net={"use_cbam_block": True, "attention_kind": "bam"})
    assert describe(module) == "ResNet18 + BAM (stages)"
