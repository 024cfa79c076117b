"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018), with the paper's ablations as switches.

By default the layer equals the authors' released code (github.com/Jongchan/attention-module,
``MODELS/cbam.py``): a channel gate whose MLP is shared by the average- and max-pooled descriptors,
followed by a spatial gate made of a k x k convolution (no bias) and a BatchNorm over the stacked
channel-wise max and mean maps. The switches answer the paper's design questions:

* ``channel_pooling`` (Table 1): which descriptors feed the shared MLP: ``avg_max``, ``avg`` or ``max``;
* ``spatial_pooling`` (Table 2): ``max_mean`` (the channel-wise max and mean maps) or ``conv`` (a learned
  1x1 convolution across channels, the alternative Table 2 compares);
* ``gate_order`` (Table 3): ``channel_first``, ``spatial_first`` or ``parallel``;
* ``use_channel_gate`` / ``use_spatial_gate``: channel-only or spatial-only attention. SE (Hu et al.) is
  ``channel_pooling="avg", use_spatial_gate=False``: ``x * sigmoid(MLP(avgpool(x)))``.

``impl`` picks how the default CBAM runs: ``reference`` (plain PyTorch), ``fused`` (Triton kernels of
``cbam.models.fused``: the whole layer, gate math included, in three launches forward and three backward; same
parameters and state_dict keys) or ``auto``: fused on CUDA under ``torch.compile`` (where Triton is
installed), the reference code elsewhere, eager CUDA included (docs/benchmarks.md has the measurements that
decide where ``auto`` fuses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cbam.arguments import check_choice, check_flag, check_integer
from cbam.errors import InvalidArgument
from cbam.models.running_statistics import move_running_statistics

log = logging.getLogger(__name__)

CHANNEL_POOLINGS = ("avg_max", "avg", "max")
SPATIAL_POOLINGS = ("max_mean", "conv")
GATE_ORDERS = ("channel_first", "spatial_first", "parallel")
IMPLS = ("reference", "fused", "auto")


def _check_reduction_ratio(reduction_ratio: int, channels: int | None = None) -> None:
    if channels is not None:
        check_integer("channels", channels, 1)
    check_integer(
        "reduction_ratio",
        reduction_ratio,
        1,
        channels,
        maximum_is=None if channels is None else "the channels of this CBAM",
    )


def _check_kernel_size(kernel_size: int) -> None:
    check_integer("kernel_size", kernel_size, 1, odd=True)


@dataclass(frozen=True)
class CBAMOptions:
    """Everything a :class:`CBAM` is made of besides its channel count, checked on construction (an
    :class:`~cbam.errors.InvalidArgument` names the option); the channel count bounds ``reduction_ratio``
    further, which the layer checks.

    Args:
        reduction_ratio: channel-MLP reduction r (hidden size ``C // r``), ``1 <= r <= C``.
        kernel_size: odd spatial-attention kernel size k >= 1.
        channel_pooling: ``avg_max``, ``avg`` or ``max`` (see :class:`ChannelAttention`).
        spatial_pooling: ``max_mean`` or ``conv`` (see :class:`SpatialAttention`).
        gate_order: ``channel_first``, ``spatial_first`` or ``parallel``.
        use_channel_gate: include the channel gate.
        use_spatial_gate: include the spatial gate (at least one of the two).
        impl: ``reference``, ``fused`` or ``auto`` (fused on CUDA under torch.compile); the fused kernels
            cover the sequential channel-first layer with ``max_mean`` spatial pooling (any
            ``channel_pooling``); other variants run the reference code, which is logged once. On the
            meta device (shapes only: FLOP counting, config checks) every implementation runs the
            reference code, which computes the same function.
    """

    kind: ClassVar[str] = "cbam"
    #: in every residual block, not between stages
    between_stages: ClassVar[bool] = False

    reduction_ratio: int = 16
    kernel_size: int = 7
    channel_pooling: str = "avg_max"
    spatial_pooling: str = "max_mean"
    gate_order: str = "channel_first"
    use_channel_gate: bool = True
    use_spatial_gate: bool = True
    impl: str = "auto"

    def __post_init__(self) -> None:
        _check_reduction_ratio(self.reduction_ratio)
        _check_kernel_size(self.kernel_size)
        check_flag("use_channel_gate", self.use_channel_gate)
        check_flag("use_spatial_gate", self.use_spatial_gate)
        check_choice("channel_pooling", self.channel_pooling, CHANNEL_POOLINGS)
        check_choice("spatial_pooling", self.spatial_pooling, SPATIAL_POOLINGS)
        check_choice("gate_order", self.gate_order, GATE_ORDERS)
        check_choice("impl", self.impl, IMPLS)
        if not (self.use_channel_gate or self.use_spatial_gate):
            raise InvalidArgument(
                "use_spatial_gate",
                self.use_spatial_gate,
                "use_channel_gate and use_spatial_gate cannot both be false",
            )

    def build(self, channels: int) -> CBAM:
        """The layer for ``channels`` input channels."""
        return CBAM(channels, options=self)


def spatial_max(x: torch.Tensor) -> torch.Tensor:
    """(N, C): each channel's maximum over the map, its gradient sent to the index of the maximum, as the
    authors' max pooling does (``amax``'s backward instead divides it among ties; compiled for a GPU in bf16,
    that count was seen to be 0, see docs/benchmarks.md)."""
    if x.device.type == "cpu":
        # Max pooling: 4-5x faster on a CPU than a reduction of the flattened map, and its gradient keeps
        # x's memory format.
        return F.adaptive_max_pool2d(x, 1).flatten(1)
    # Under torch.compile on a GPU a reduction fuses with its neighbours; max pooling does not (Run B of
    # docs/benchmarks.md).
    return x.flatten(2).max(dim=2).values


def channel_max(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W): the maximum over the channels, its gradient sent to the index of the maximum.

    On a CPU, a channels_last ``x`` is reduced over the dimension innermost in its memory: the gradient
    then comes back in ``x``'s memory format, and adding it to the other gradients of ``x`` stays fast (one
    in the other format made that addition 15x slower).
    """
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if x.device.type == "cpu" and channels_last:
        return x.permute(0, 2, 3, 1).max(dim=-1).values.unsqueeze(1)
    return x.max(dim=1, keepdim=True).values


class ChannelAttention(nn.Module):
    """Channel gate: ``x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one shared MLP.

    Args:
        channels: number of input channels C.
        reduction_ratio: the MLP's hidden size is ``C // reduction_ratio``, ``1 <= reduction_ratio <= C``.
        pooling: ``avg_max`` (both descriptors, summed after the MLP), ``avg`` or ``max`` (one of them).
    """

    def __init__(self, channels: int, reduction_ratio: int = 16, pooling: str = "avg_max") -> None:
        super().__init__()
        _check_reduction_ratio(reduction_ratio, channels)
        check_choice("channel_pooling", pooling, CHANNEL_POOLINGS)
        self.pooling = pooling
        hidden = channels // reduction_ratio
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def descriptors(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The average- and max-pooled descriptors, each (N, C), or None where ``pooling`` leaves it out."""
        avg = x.mean(dim=(2, 3)) if self.pooling != "max" else None
        mx = spatial_max(x) if self.pooling != "avg" else None
        return avg, mx

    def gate_from_descriptors(self, avg: torch.Tensor | None, mx: torch.Tensor | None) -> torch.Tensor:
        """The attention weights, (N, C, 1, 1) in (0, 1), from the pooled descriptors."""
        present = [d for d in (avg, mx) if d is not None]
        # The descriptors in use go through the shared MLP as one batch (2N rows for avg_max), then their
        # logits are summed. (unflatten, not chunk: torch.export cannot prove chunk's count for any batch size.)
        logits = self.mlp(torch.cat(present, dim=0)).unflatten(0, (len(present), -1))
        return torch.sigmoid(logits.sum(0))[:, :, None, None]

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights of ``x``, shape (N, C, 1, 1), values in (0, 1)."""
        return self.gate_from_descriptors(*self.descriptors(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class MapBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d(1)`` computed with whole-tensor reductions: the same numbers, parameters, buffers
    and state_dict keys.

    Batch-norm kernels spread their work over channels; with a single channel a training step runs each
    of them on a handful of GPU blocks, which made the spatial gate the slowest part of a CBAM block.
    The statistics are computed in float32 for half-precision inputs, in float64 for float64 inputs.
    """

    def __init__(self, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(1, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        values = x.to(torch.promote_types(x.dtype, torch.float32))
        var, mean = torch.var_mean(values, correction=0)
        move_running_statistics(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            mean,
            var,
            values.numel(),
            self.momentum,
        )
        scale = self.weight * torch.rsqrt(var + self.eps)
        return ((values - mean) * scale + self.bias).to(x.dtype)


class SpatialAttention(nn.Module):
    """Spatial gate: ``x * sigmoid(BN(conv_k([max_c(x), mean_c(x)])))``.

    The max map comes first, as in the authors' ``ChannelPool``; the BatchNorm (:class:`MapBatchNorm`)
    uses their ``momentum=0.01``.

    Args:
        kernel_size: odd size k of the k x k convolution.
        pooling: ``max_mean`` (the two maps above) or ``conv``: one map from a learned 1x1 convolution
            across the channels (no bias), the alternative of the paper's Table 2; needs ``channels``.
        channels: number of input channels C (only used by ``pooling="conv"``).
    """

    def __init__(self, kernel_size: int = 7, pooling: str = "max_mean", channels: int | None = None) -> None:
        super().__init__()
        _check_kernel_size(kernel_size)
        check_choice("spatial_pooling", pooling, SPATIAL_POOLINGS)
        self.pooling = pooling
        if pooling == "conv":
            if channels is None or channels < 1:
                raise InvalidArgument("channels", channels, "spatial_pooling=conv needs the channel count")
            self.pool = nn.Conv2d(channels, 1, 1, bias=False)
        self.conv = nn.Conv2d(
            1 if pooling == "conv" else 2, 1, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn = MapBatchNorm(eps=1e-5, momentum=0.01)

    def pooled_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2, H, W): the channel-wise max and mean maps; (N, 1, H, W) with ``pooling="conv"``."""
        if self.pooling == "conv":
            return self.pool(x)
        return torch.cat((channel_max(x), x.mean(dim=1, keepdim=True)), dim=1)

    def gate_from_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """The attention map, (N, 1, H, W) in (0, 1), from the pooled maps."""
        if maps.device.type == "cpu":
            # oneDNN's backward of this few-channel convolution is 3-4x faster on channels_last input
            # (docs/benchmarks.md, "CPU recipe")
            maps = maps.contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.bn(self.conv(maps)))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map of ``x``, shape (N, 1, H, W), values in (0, 1)."""
        return self.gate_from_maps(self.pooled_maps(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Channel and spatial attention; the output has the input's shape.

    With the defaults: channel attention, then spatial attention on its output, as in the authors' code.
    ``gate_order="parallel"`` computes both gates from the same input and multiplies the input by both,
    ``x * M_c(x) * M_s(x)``. The paper compares this arrangement in Section 4.1 ("Arrangement of the
    channel and spatial attention", Table 3) without giving its formula; the product of the two gates is
    the reading that keeps each gate as in the sequential arrangements. (BAM, by the same authors, adds
    the two gates' logits before one sigmoid instead.)

    Args:
        channels: number of input channels C.
        options: a :class:`CBAMOptions`; or its fields, as positional (``CBAM(256, 16, 7)``: reduction ratio,
            kernel size) or keyword arguments.
    """

    def __init__(self, channels: int, *fields: Any, options: CBAMOptions | None = None, **named: Any) -> None:
        super().__init__()
        if options is not None and (fields or named):
            raise TypeError("CBAM takes options or its fields, not both")
        options = options if options is not None else CBAMOptions(*fields, **named)
        self.options = options
        self.gate_order, self.impl = options.gate_order, options.impl
        self.channel = (
            ChannelAttention(channels, options.reduction_ratio, options.channel_pooling)
            if options.use_channel_gate
            else None
        )
        self.spatial = (
            SpatialAttention(options.kernel_size, options.spatial_pooling, channels)
            if options.use_spatial_gate
            else None
        )
        # What the fused kernels compute: a channel gate, then a max/mean spatial gate on its output.
        self.fusable = (
            self.channel is not None
            and self.spatial is not None
            and (options.gate_order == "channel_first" and options.spatial_pooling == "max_mean")
        )
        # Said here, not in forward (no graph break when compiled); auto only where it could pick the kernels.
        impl = options.impl
        if not self.fusable and (impl == "fused" or (impl == "auto" and torch.cuda.is_available())):
            _log_once(f"CBAM impl={impl}: this variant has no fused kernels; it runs the reference code")

    def _sequence(self) -> list[nn.Module]:
        """The gates that are switched on, in the order a sequential arrangement applies them."""
        parts = (
            [self.channel, self.spatial]
            if self.gate_order != "spatial_first"
            else [self.spatial, self.channel]
        )
        return [part for part in parts if part is not None]

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The channel gate (N, C, 1, 1) and spatial gate (N, 1, H, W) that :meth:`forward` multiplies ``x``
        by (None for a gate that is switched off), each computed from the input it is applied to."""
        found = {}
        for part in self._sequence():
            found[part] = part.gate(x)
            if self.gate_order != "parallel":
                x = x * found[part]
        return found.get(self.channel), found.get(self.spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_fused(x):
            from cbam.models.fused import cbam_fused

            first, _, second = self.channel.mlp
            bn = self.spatial.bn
            return cbam_fused(
                x, first.weight, first.bias, second.weight, second.bias, self.spatial.conv.weight,
                bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                channel_pooling=self.channel.pooling, training=bn.training, momentum=bn.momentum, eps=bn.eps,
            )  # fmt: skip
        if self.gate_order == "parallel":
            gates = [part.gate(x) for part in self._sequence()]
            for gate in gates:
                x = x * gate
            return x
        for part in self._sequence():
            x = part(x)
        return x

    def _runs_fused(self, x: torch.Tensor) -> bool:
        compiled_on_cuda = x.is_cuda and torch.compiler.is_compiling()
        if self.impl == "reference" or not self.fusable or (self.impl == "auto" and not compiled_on_cuda):
            return False
        if x.device.type == "meta":  # shapes only (FLOP counting, config checks): the same function
            return False
        from cbam.models.fused import fused_available

        if fused_available(x.device):
            return True
        if self.impl == "fused":
            raise RuntimeError(
                "CBAM impl=fused needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                f"got {x.device}"
            )
        return False  # impl=auto without Triton: the reference code


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)
