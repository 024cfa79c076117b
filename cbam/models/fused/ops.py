"""Launching the fused CBAM kernels (:mod:`cbam.models.fused.kernels`): tile sizes and grids, worked out once per
input shape; the forward (three launches) and the backward (three launches); an ``autograd.Function`` for
eager mode and ``torch.library`` ops (``triton_op`` + ``register_autograd``) for torch.compile, both
running the same code.

Host work is the point of this module: a CBAM block costs as many kernel launches as it has, and nothing
else (no PyTorch operator runs between them; allocations aside). The only difference between the two
paths is the BatchNorm's running statistics: eager mode moves them inside the last forward kernel, while a
``torch.library`` op must not mutate its inputs to have an autograd formula, so under torch.compile the
op returns the batch statistics and the layer moves the running statistics itself (which Inductor fuses).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor
from torch.library import register_autograd, triton_op, wrap_triton

from cbam.models.fused import kernels

#: elements of a tile of x: large enough to stream memory, small enough for registers at any tile shape
_TILE = 2048
#: the most channels (channels_last) or pixels (NCHW) a tile spans along the contiguous axis
_MAX_CONTIGUOUS = 128
_MAX_PIXELS = 256
#: elements of a (kernel taps x pixels) gather of the spatial convolution
_GATHER_TILE = 4096
#: elements of a (channels x hidden units) tile of an MLP weight
_WEIGHT_TILE = 8192
#: elements of a (samples x channels x hidden units) product in the MLP's weight gradient
_WEIGHT_GRAD_TILE = 8192
#: samples per step of the weight gradients' walk over the batch
_BLOCK_N = 8
#: partial results summed per step (the BatchNorm's: one per sample, or one per program of a grid)
_BLOCK_R = 256
#: programs of a persistent grid per GPU multiprocessor; on the CPU (Triton's interpreter) a small odd
#: count, so that the tests run programs that loop over several tiles
_PROGRAMS_PER_SM = 4
_INTERPRETER_PROGRAMS = 3
#: tile sizes x this on the CPU: Triton's interpreter runs every tile operation as a numpy call with a fixed
#: cost, so larger tiles make the tests ~4x faster (a 32x32 map is still 4 tiles of the loops over pixels);
#: the weight gradients' tiles x 16 (C = 2048 channels still make 4 channel blocks of 4 hidden blocks)
_INTERPRETER_TILE_SCALE = 4
_INTERPRETER_WEIGHT_TILE_SCALE = 16

#: channel_pooling -> (uses the average descriptor, uses the max descriptor)
DESCRIPTORS = {"avg_max": (True, True), "avg": (True, False), "max": (False, True)}


def _pow2(n: int) -> int:
    # plain Python: triton.next_power_of_2 and triton.cdiv cost ~2 us a call (measured)
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ncp(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """``t`` (N, C, H, W) and its strides as (N, C, P = H*W); copied to contiguous only when H and W
    cannot be flattened into one stride (e.g. a crop), never for NCHW, channels_last or expanded grads."""
    _, _, height, width = t.shape
    if width == 1:
        return t, (t.stride(0), t.stride(1), t.stride(2))
    if height == 1 or t.stride(2) == width * t.stride(3):
        return t, (t.stride(0), t.stride(1), t.stride(3))
    t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(3))


def _tile(
    channels_last: bool, channels: int, pixels: int, scale: int, max_channels: int = _TILE
) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of an x tile: the wide side along the tensor's contiguous axis, at most
    ``max_channels`` (a power of 2) channels."""
    if channels_last:  # channels are contiguous
        block_c = min(_pow2(channels), _MAX_CONTIGUOUS * scale, max_channels)
        return min(_pow2(pixels), _TILE * scale // block_c), block_c
    block_p = min(_pow2(pixels), _MAX_PIXELS * scale)
    return block_p, max(1, min(_pow2(channels), _TILE * scale // block_p, max_channels))


@functools.cache
def multiprocessors(device: torch.device) -> int | None:
    """The GPU's multiprocessor count; None on the CPU (Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


@dataclass(frozen=True)
class Plan:
    """Tile sizes and tile counts of every kernel for one sample shape and layout (the batch size is not
    part of it: under torch.compile it may be symbolic, and the grids follow it at each call)."""

    out: tuple[int, int]  # channel_pool, gated_output and output_backward (BLOCK_P, BLOCK_C)
    out_blocks: tuple[int, int]  # (pixel blocks, channel blocks)
    gate: tuple[int, int]  # gate_conv's and input_backward's x tiles, whose channels also meet the MLP
    gate_blocks: tuple[int, int]
    block_h: int
    block_cm: int
    block_k: int
    conv_p: int  # gate_conv's convolution tiles (BLOCK_CP)
    spatial: tuple[int, int]  # spatial_backward (BLOCK_P, BLOCK_C)
    weight: tuple[int, int]  # input_backward's weight tiles (BLOCK_WC, BLOCK_WH)
    weight_blocks: tuple[int, int]
    block_t: int
    programs: int


@functools.lru_cache(maxsize=512)
def plan(c: int, p: int, channels_last: bool, hidden: int, kernel_size: int, gpu: int | None) -> Plan:
    """Worked out once per (channels, pixels, layout, hidden size, kernel size, GPU multiprocessors or None
    for Triton's interpreter): eager mode then pays one dictionary lookup per layer call for all its launch
    arguments."""
    on_gpu = gpu is not None
    scale = 1 if on_gpu else _INTERPRETER_TILE_SCALE
    block_h = _pow2(hidden)
    mlp_channels = max(1, _WEIGHT_TILE * scale // block_h)
    block_k = _pow2(kernel_size * kernel_size)
    conv_p = max(1, min(_pow2(p), _GATHER_TILE * scale // block_k))
    out = _tile(channels_last, c, p, scale)
    gate = _tile(channels_last, c, p, scale, mlp_channels)
    weight_h = min(32, block_h)
    weight_budget = _WEIGHT_GRAD_TILE * (1 if on_gpu else _INTERPRETER_WEIGHT_TILE_SCALE)
    weight_c = max(1, min(_pow2(c), weight_budget // (_BLOCK_N * weight_h)))
    return Plan(
        out=out,
        out_blocks=(_cdiv(p, out[0]), _cdiv(c, out[1])),
        gate=gate,
        gate_blocks=(_cdiv(p, gate[0]), _cdiv(c, gate[1])),
        block_h=block_h,
        block_cm=max(1, min(_pow2(c), mlp_channels)),
        block_k=block_k,
        conv_p=conv_p,
        spatial=(max(1, min(gate[0], _GATHER_TILE * scale // block_k)), gate[1]),
        weight=(weight_c, weight_h),
        weight_blocks=(_cdiv(c, weight_c), _cdiv(hidden, weight_h)),
        block_t=_pow2(2 * kernel_size * kernel_size),
        programs=_PROGRAMS_PER_SM * gpu if on_gpu else _INTERPRETER_PROGRAMS,
    )


def _accumulator(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _persistent(tiles: int, programs: int) -> tuple[int]:
    return (max(1, min(tiles, programs)),)


def _layout(x: Tensor, strides: tuple[int, int, int], hidden: int, kernel_size: int) -> Plan:
    """The :func:`plan` of ``x``. Under torch.compile with dynamic shapes the sizes may be symbolic: the
    ones the tile sizes depend on are made concrete (a new image size compiles anew), the batch size stays
    symbolic."""
    _, c, height, width = x.shape
    channels_last = bool(strides[1] == 1) and int(c) > 1
    sizes = (int(c), int(height * width), channels_last, int(hidden), int(kernel_size))
    return plan(*sizes, multiprocessors(x.device))


#: the layer's parameters, in the order every function here takes them: the channel MLP's
#: ``Linear(C, hidden)`` and ``Linear(hidden, C)``, the spatial convolution's (1, 2, k, k) weight, the
#: one-channel BatchNorm's weight and bias
PARAMETERS = ("w1", "b1", "w2", "b2", "conv_w", "bn_w", "bn_b")
#: what the forward keeps for the backward, in order: the channel descriptors and the max's pixel, the
#: MLP's hidden pre-activations, the gate, the spatial maps and the max's channel, the convolution's output
#: z, the spatial gate s and the BatchNorm's statistics (mean, 1/std, biased variance)
SAVED = ("avg", "maximum", "pixel_argmax", "hidden", "gate", "maps", "channel_argmax", "z", "s", "stats")


def forward(
    x: Tensor,
    parameters: Sequence[Tensor],
    running: tuple[Tensor, Tensor, Tensor],
    channel_pooling: str,
    training: bool,
    update_running: bool,
    momentum: float,
    eps: float,
    launch=lambda kernel: kernel,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """y = CBAM(x) and what the backward needs (:data:`SAVED`). ``parameters`` as :data:`PARAMETERS`;
    ``running``: the BatchNorm's running mean, variance and batch count, which ``update_running`` moves
    (in place) as BatchNorm does; ``launch`` wraps each kernel (``wrap_triton`` when traced by
    torch.compile)."""
    w1, b1, w2, b2, conv_w, bn_w, bn_b = parameters
    running_mean, running_var, batches_tracked = running
    n, c, height, width = x.shape
    pixels = height * width
    hidden_size = w1.shape[0]
    kernel_size = conv_w.shape[-1]
    x, strides = _ncp(x)
    use_avg, use_max = DESCRIPTORS[channel_pooling]
    accumulator = tl.float64 if x.dtype == torch.float64 else tl.float32
    layout = _layout(x, strides, hidden_size, kernel_size)
    small = {"dtype": _accumulator(x), "device": x.device}

    avg, mx = torch.empty((n, c), **small), torch.empty((n, c), **small)
    pixel_argmax = torch.empty((n, c), dtype=torch.int32, device=x.device)
    block_p, block_c = layout.out
    launch(kernels.channel_pool_kernel)[(n, _cdiv(c, block_c))](
        x, avg, mx, pixel_argmax, c, pixels, *strides, BLOCK_P=block_p, BLOCK_C=block_c, ACC=accumulator
    )

    gate, hidden = torch.empty((n, c), **small), torch.empty((n, 2, hidden_size), **small)
    maps = torch.empty((n, 2, pixels), **small)
    channel_argmax = torch.empty((n, pixels), dtype=torch.int32, device=x.device)
    z, partials = torch.empty((n, pixels), **small), torch.empty((n, 3), **small)
    block_p, block_c = layout.gate
    launch(kernels.gate_conv_kernel)[(n,)](
        x, avg, mx, w1, b1, w2, b2, conv_w, gate, hidden, maps, channel_argmax, z, partials,
        c, pixels, height, width, hidden_size, *strides, *conv_w.stride()[1:],
        USE_AVG=use_avg, USE_MAX=use_max, BRANCHES=use_avg + use_max, KS=kernel_size, TRAINING=training,
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_H=layout.block_h, BLOCK_CM=layout.block_cm,
        BLOCK_CP=layout.conv_p, BLOCK_K=layout.block_k, ACC=accumulator,
    )  # fmt: skip

    y, y_strides = _ncp(torch.empty_like(x))
    s, stats = torch.empty((n, pixels), **small), torch.empty(3, **small)
    (block_p, block_c), (pixel_blocks, channel_blocks) = layout.out, layout.out_blocks
    launch(kernels.gated_output_kernel)[_persistent(n * pixel_blocks * channel_blocks, layout.programs)](
        x, gate, z, bn_w, bn_b, running_mean, running_var, batches_tracked, partials, y, s, stats,
        n, c, pixels, eps, momentum, *strides, *y_strides, pixel_blocks, channel_blocks,
        TRAINING=training, UPDATE_RUNNING=training and update_running, BLOCK_P=block_p, BLOCK_C=block_c,
        BLOCK_R=_BLOCK_R, ACC=accumulator,
    )  # fmt: skip
    return y, (avg, mx, pixel_argmax, hidden, gate, maps, channel_argmax, z, s, stats)


def backward(
    grad_y: Tensor,
    x: Tensor,
    parameters: Sequence[Tensor],
    saved: Sequence[Tensor],
    channel_pooling: str,
    training: bool,
    launch=lambda kernel: kernel,
) -> tuple[Tensor, ...]:
    """(dx, and the gradient of each of :data:`PARAMETERS`) from the forward's ``saved`` tensors."""
    w1, b1, w2, b2, conv_w, bn_w, bn_b = parameters
    avg, mx, pixel_argmax, hidden, gate, maps, channel_argmax, z, s, stats = saved
    n, c, height, width = x.shape
    pixels = height * width
    hidden_size = w1.shape[0]
    kernel_size = conv_w.shape[-1]
    x, strides = _ncp(x)
    grad_y, grad_strides = _ncp(grad_y)
    use_avg, use_max = DESCRIPTORS[channel_pooling]
    accumulator = tl.float64 if x.dtype == torch.float64 else tl.float32
    layout = _layout(x, strides, hidden_size, kernel_size)
    small = {"dtype": _accumulator(x), "device": x.device}

    (block_p, block_c), pixel_blocks = layout.out, layout.out_blocks[0]
    grad_z = torch.empty((n, pixels), **small)
    gate_partials = torch.empty((n * pixel_blocks, c), **small)
    sums_grid = _persistent(n * pixel_blocks, layout.programs)
    sums = torch.empty((sums_grid[0], 2), **small)
    launch(kernels.output_backward_kernel)[sums_grid](
        grad_y, x, gate, s, z, stats, grad_z, gate_partials, sums, n, c, pixels, *grad_strides, *strides,
        pixel_blocks, BLOCK_P=block_p, BLOCK_C=block_c, ACC=accumulator,
    )  # fmt: skip

    grad_bn_w, grad_bn_b = torch.empty_like(bn_w), torch.empty_like(bn_b)
    grad_maps = torch.empty((n, 2, pixels), **small)
    conv_partials = torch.empty((n, 2 * kernel_size * kernel_size), **small)
    grad_logits = torch.empty((n, c), **small)
    hidden_grad = torch.empty((n, hidden_size), **small)
    block_p, block_c = layout.spatial
    launch(kernels.spatial_backward_kernel)[_persistent(n, layout.programs)](
        x, gate, maps, channel_argmax, grad_z, z, stats, sums, bn_w, conv_w, w2, gate_partials, grad_bn_w,
        grad_bn_b, grad_maps, conv_partials, grad_logits, hidden_grad, n, c, pixels, height, width,
        hidden_size, sums_grid[0], *strides, pixel_blocks, *conv_w.stride()[1:],
        KS=kernel_size, TRAINING=training, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=layout.block_k,
        BLOCK_H=layout.block_h, BLOCK_R=_BLOCK_R, ACC=accumulator,
    )  # fmt: skip

    grad_x, grad_x_strides = _ncp(torch.empty_like(x))
    grad_w1, grad_b1, grad_w2, grad_b2 = (torch.empty_like(t) for t in (w1, b1, w2, b2))
    grad_conv_w = torch.empty_like(conv_w)
    (block_p, block_c), (pixel_blocks, grad_channel_blocks) = layout.gate, layout.gate_blocks
    (block_wc, block_wh), (weight_c_blocks, weight_h_blocks) = layout.weight, layout.weight_blocks
    tiles = weight_c_blocks * weight_h_blocks + 1 + n * pixel_blocks * grad_channel_blocks
    launch(kernels.input_backward_kernel)[_persistent(tiles, layout.programs)](
        grad_y, x, gate, s, grad_maps, channel_argmax, pixel_argmax, avg, mx, hidden, hidden_grad,
        grad_logits, conv_partials, w1, grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_conv_w,
        n, c, pixels, hidden_size, *grad_strides, *strides, *grad_x_strides, pixel_blocks, grad_channel_blocks,
        weight_c_blocks, weight_h_blocks, *conv_w.stride()[1:], KS=kernel_size,
        USE_AVG=use_avg, USE_MAX=use_max, BRANCHES=use_avg + use_max, BLOCK_P=block_p, BLOCK_C=block_c,
        BLOCK_H=layout.block_h, BLOCK_N=_BLOCK_N, BLOCK_WC=block_wc, BLOCK_WH=block_wh,
        BLOCK_T=layout.block_t, ACC=accumulator,
    )  # fmt: skip
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_conv_w, grad_bn_w, grad_bn_b


class EagerCBAM(torch.autograd.Function):
    """The fused layer in eager mode: the forward's and backward's kernels with nothing around them (the
    torch.library dispatch costs more host time than the launches it wraps)."""

    @staticmethod
    def forward(ctx, x, options, running, *parameters):
        channel_pooling, training, momentum, eps = options
        y, saved = forward(x, parameters, running, channel_pooling, training, True, momentum, eps)
        ctx.save_for_backward(x, *parameters, *saved)
        ctx.options = channel_pooling, training
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *rest = ctx.saved_tensors
        grad_x, *grad_parameters = backward(
            grad_y, x, rest[: len(PARAMETERS)], rest[len(PARAMETERS) :], *ctx.options
        )
        return grad_x, None, None, *grad_parameters


# ------------------------------------------------------------------------------- torch.library (compile)


def _schema(tensors: Sequence[str], options: Sequence[str], returns: int) -> str:
    arguments = [f"Tensor {name}" for name in tensors] + list(options)
    return f"({', '.join(arguments)}) -> ({', '.join(['Tensor'] * returns)})"


_FORWARD_TENSORS = ("x", *PARAMETERS, "running_mean", "running_var")


@triton_op(
    "cbam::fused_cbam",
    mutates_args=(),
    schema=_schema(_FORWARD_TENSORS, ["str channel_pooling", "bool training", "float eps"], 1 + len(SAVED)),
)
def _library_forward(x: Tensor, *arguments) -> tuple[Tensor, ...]:
    *tensors, channel_pooling, training, eps = arguments
    parameters, (running_mean, running_var) = tensors[: len(PARAMETERS)], tensors[len(PARAMETERS) :]
    # The running statistics are read, never written (the layer moves them from the returned statistics):
    # the batch count is not needed, running_mean stands in for the kernel's unused pointer.
    running = (running_mean, running_var, running_mean)
    y, saved = forward(x, parameters, running, channel_pooling, training, False, 0.0, eps, wrap_triton)
    return (y, *saved)


@triton_op(
    "cbam::fused_cbam_backward",
    mutates_args=(),
    schema=_schema(
        ("grad_y", "x", *PARAMETERS, *SAVED), ["str channel_pooling", "bool training"], 1 + len(PARAMETERS)
    ),
)
def _library_backward(grad_y: Tensor, x: Tensor, *arguments) -> tuple[Tensor, ...]:
    *tensors, channel_pooling, training = arguments
    parameters, saved = tensors[: len(PARAMETERS)], tensors[len(PARAMETERS) :]
    return backward(grad_y, x, parameters, saved, channel_pooling, training, wrap_triton)


def _setup_context(ctx, inputs, output) -> None:
    x, *rest = inputs
    ctx.save_for_backward(x, *rest[: len(PARAMETERS)], *output[1:])
    ctx.options = rest[-3], rest[-2]  # channel_pooling, training


def _library_gradient(ctx, grad_y, *_unused_output_grads):
    grads = torch.ops.cbam.fused_cbam_backward(grad_y, *ctx.saved_tensors, *ctx.options)
    return *grads, None, None, None, None, None


register_autograd("cbam::fused_cbam", _library_gradient, setup_context=_setup_context)
