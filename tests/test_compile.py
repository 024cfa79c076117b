"""torch.compile trains the same network as eager mode: one training step's loss and every parameter
gradient agree, in fp32 and under bf16 autocast, with the Inductor and aot_eager backends.

A compiled gradient that is NaN, zero or wrong under bf16 is the failure these tests catch on the CPU
(:mod:`cbam.analysis.compile_check` compares the steps). Inductor compiles a CIFAR ResNet18 in minutes on a
CPU, so it gets one CBAM residual block; aot_eager, cheap to compile, gets the whole CBAM-ResNet18.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from cbam import CBAM, build_resnet
from cbam.analysis.compile_check import compare_steps, compiled_copy, training_step
from cbam.models.compiled_attention import VARIANTS_PER_LAYER, compile_attention_layers
from cbam.models.resnet import BasicBlock
from cbam.runtime.lightning_internals import is_compiled
from cbam.training.lightning_module import COMPILE_MODES
from cbam.training.run import build_model

#: dtype -> (largest global relative gradient error, largest per-parameter one, largest loss relative
#: error) against eager mode in the same dtype. fp32: reordered sums only. bf16: compiled kernels round
#: intermediate values differently (observed on CPU: 0.003 global, 0.014 worst parameter); a NaN, a lost
#: or a wrong gradient is off by 1 or more.
TOLERANCES = {torch.float32: (1e-4, 1e-3, 1e-5), torch.bfloat16: (0.03, 0.15, 0.01)}


def cbam_block_net() -> nn.Module:
    """Stem, one CBAM basic block, classifier: every CBAM operator, seconds to compile with Inductor."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BasicBlock(8, 8, 1, lambda channels: CBAM(channels, reduction_ratio=2, kernel_size=3)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def cbam_resnet18() -> nn.Module:
    return build_resnet(
        18, use_cbam_block=True, use_cbam_class=True, width=4, reduction_ratio=2, kernel_size=3
    )


NETWORKS = {"inductor": cbam_block_net, "aot_eager": cbam_resnet18}
TINY_MODEL = ("model.width=4", "model.reduction_ratio=4")


@pytest.fixture(scope="module")
def networks():
    """backend -> (eager network, its compiled copy, images, labels); built once, shared by both dtypes."""
    built = {}

    def get(backend: str):
        if backend not in built:
            torch.manual_seed(0)
            eager = NETWORKS[backend]()
            generator = torch.Generator().manual_seed(1)
            images = torch.randn(8, 3, 16, 16, generator=generator)
            labels = torch.randint(0, 10, (8,), generator=generator)
            built[backend] = (eager, compiled_copy(eager, backend), images, labels)
        return built[backend]

    yield get
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_step_matches_eager(networks, backend, dtype):
    eager, compiled, images, labels = networks(backend)
    autocast = dtype if dtype != torch.float32 else None
    expected = training_step(eager, images, labels, autocast)
    got = training_step(compiled, images, labels, autocast)
    report = compare_steps(expected, got)
    global_tolerance, parameter_tolerance, loss_tolerance = TOLERANCES[dtype]
    assert report["non_finite"] == [], f"non-finite compiled gradients: {report['non_finite']}"
    assert report["zeroed"] == [], f"gradients zero only when compiled: {report['zeroed']}"
    assert report["loss_relative_error"] <= loss_tolerance, report
    assert report["global_relative_error"] <= global_tolerance, report
    assert report["max_relative_error"] <= parameter_tolerance, (report["worst_parameter"], report)
    # Every parameter took part: a comparison of two all-zero gradients would prove nothing.
    assert all(gradient.any() for gradient in expected.gradients.values())


def test_compiled_attention_layers_train_as_eager(networks):
    """model.compile_attention: only the CBAM is compiled, its step agrees with eager, and torch.compile
    may keep enough variants for every stage's shape in training and evaluation."""
    eager, _, images, labels = networks("inductor")
    partly = copy.deepcopy(eager)
    assert compile_attention_layers(partly) == VARIANTS_PER_LAYER * 1
    assert [type(m) for m in partly.modules() if is_compiled(m)] == [CBAM]
    report = compare_steps(training_step(eager, images, labels, None), training_step(partly, images, labels, None))
    global_tolerance, parameter_tolerance, loss_tolerance = TOLERANCES[torch.float32]
    assert report["non_finite"] == [] and report["zeroed"] == [], report
    assert report["loss_relative_error"] <= loss_tolerance, report
    assert report["max_relative_error"] <= parameter_tolerance, (report["worst_parameter"], report)


def test_comparison_catches_broken_gradients():
    """The checks above can fail: a NaN, a lost and a wrong gradient are each reported."""
    torch.manual_seed(0)
    net = cbam_block_net()
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    expected = training_step(net, images, labels, None)
    broken = training_step(net, images, labels, None)
    names = list(broken.gradients)
    broken.gradients[names[0]] = torch.full_like(broken.gradients[names[0]], float("nan"))
    broken.gradients[names[1]] = torch.zeros_like(broken.gradients[names[1]])
    broken.gradients[names[2]] = -broken.gradients[names[2]]
    report = compare_steps(expected, broken)
    assert report["non_finite"] == [names[0]] and report["zeroed"] == [names[1]]
    assert report["relative_error"][names[2]] == pytest.approx(2.0)
    assert report["global_relative_error"] > TOLERANCES[torch.bfloat16][0]


def test_compile_mode_reaches_torch_compile(compose_config):
    """model.compile_mode is the mode torch.compile builds the network with: CUDA graphs with
    reduce-overhead and max-autotune, autotuning with both max-autotune modes (read from the compiled
    call's Inductor settings, without compiling anything)."""

    def model(*overrides: str):
        cfg = compose_config(*TINY_MODEL, *overrides)
        return build_model(cfg, instantiate(cfg.data))  # CIFAR-10's 10 classes (data/ need not exist)

    for mode in COMPILE_MODES:
        settings = model(
            "model.compile=true", f"model.compile_mode={mode}"
        ).net._compiled_call_impl.get_compiler_config()
        assert settings["triton.cudagraphs"] == (mode in ("reduce-overhead", "max-autotune")), mode
        assert settings["max_autotune"] == mode.startswith("max-autotune"), mode
    # the default config stays eager, and the mode alone does not compile
    assert not is_compiled(model().net)
    assert not is_compiled(model("model.compile_mode=max-autotune").net)
