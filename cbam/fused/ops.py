"""The fused CBAM passes as Triton kernels, each op registered with ``torch.library`` (``triton_op`` +
``register_autograd``) for torch.compile and wrapped as an ``autograd.Function`` for eager mode: both
launch the same kernels with the same derivative formulas.

Forward: ``channel_pool`` (x -> per-channel mean, max, argmax pixel), ``gated_pool`` (x, g -> the
(N, 2, H, W) max/mean maps of x * g, argmax channel) and ``gated_output`` (x, g, s -> x * g * s). Each
backward is one pass: ``gated_output`` reads dy and x and writes dx (with d s and d g as reductions),
``gated_pool`` reads x and writes dx, ``channel_pool`` writes dx; autograd adds the three dx. Between the
ops the small gate math stays in PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import register_autograd, triton_op, wrap_triton

from cbam.fused import kernels

#: elements per tile: large enough to stream memory, small enough for registers at any block shape
_TILE = 2048
#: the most channels (channels_last) or pixels (NCHW) a tile spans along the contiguous axis
_MAX_CONTIGUOUS = 128
_MAX_PIXELS = 256


def _next_power_of_2(n: int) -> int:
    # plain Python: triton.next_power_of_2 and triton.cdiv cost ~2 us a call (measured), a dozen per layer
    return 1 << (n - 1).bit_length()


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


def _blocks(strides: tuple[int, int, int], channels: int, pixels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): the wide side of the tile along the tensor's contiguous axis."""
    if strides[1] == 1 and channels > 1:  # channels_last: channels are contiguous
        block_c = min(_next_power_of_2(channels), _MAX_CONTIGUOUS)
        return min(_next_power_of_2(pixels), _TILE // block_c), block_c
    block_p = min(_next_power_of_2(pixels), _MAX_PIXELS)
    return block_p, min(_next_power_of_2(channels), _TILE // block_p)


def _accumulator_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(t: Tensor, n: int) -> Tensor:
    """A gate, (N, C, 1, 1) or (N, 1, H, W), as a contiguous (N, C) or (N, P) matrix."""
    return t.reshape(n, -1).contiguous()


def _channel_pool(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and max of ``x`` over H*W, shape (N, C) each in x's dtype, and the max's pixel (int32)."""
    n, c, height, width = x.shape
    x, strides = _ncp(x)
    average, maximum = x.new_empty((n, c)), x.new_empty((n, c))
    argmax = torch.empty((n, c), dtype=torch.int32, device=x.device)
    block_p, block_c = _blocks(strides, c, height * width)
    wrap_triton(kernels.channel_pool_kernel)[(n, _cdiv(c, block_c))](
        x,
        average,
        maximum,
        argmax,
        c,
        height * width,
        *strides,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        FP64=x.dtype == torch.float64,
    )
    return average, maximum, argmax


def _channel_pool_backward(grad_average: Tensor, grad_maximum: Tensor, argmax: Tensor, x: Tensor) -> Tensor:
    """dx of ``channel_pool``: the average's gradient spread over H*W, the max's to its pixel only."""
    n, c, height, width = x.shape
    dx, strides = _ncp(torch.empty_like(x))
    block_p, block_c = _blocks(strides, c, height * width)
    grid = (n, _cdiv(height * width, block_p), _cdiv(c, block_c))
    wrap_triton(kernels.channel_pool_backward_kernel)[grid](
        grad_average.contiguous(),
        grad_maximum.contiguous(),
        argmax,
        dx,
        c,
        height * width,
        *strides,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        FP64=x.dtype == torch.float64,
    )
    return dx


def _gated_pool(x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """The channel-wise max and mean of ``x * gate`` as (N, 2, H, W) maps (max first) in x's dtype and
    memory format, and the max's channel (N, H, W) int32; ``gate`` (N, C, 1, 1)."""
    n, c, height, width = x.shape
    x, strides = _ncp(x)
    # channels_last maps when x is: the spatial gate's convolution then runs in the network's layout
    layout = torch.channels_last if strides[1] == 1 and c > 1 else torch.contiguous_format
    maps, map_strides = _ncp(
        torch.empty((n, 2, height, width), dtype=x.dtype, device=x.device, memory_format=layout)
    )
    argmax = torch.empty((n, height, width), dtype=torch.int32, device=x.device)
    block_p, block_c = _blocks(strides, c, height * width)
    wrap_triton(kernels.gated_pool_kernel)[(n, _cdiv(height * width, block_p))](
        x,
        _per_sample(gate, n),
        maps,
        argmax,
        c,
        height * width,
        *strides,
        *map_strides,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        FP64=x.dtype == torch.float64,
    )
    return maps, argmax


def _gated_pool_backward(grad_maps: Tensor, x: Tensor, gate: Tensor, argmax: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, d gate) of ``gated_pool`` in one pass over x."""
    n, c, height, width = x.shape
    dx, dx_strides = _ncp(torch.empty_like(x))
    x, x_strides = _ncp(x)
    grad_maps, map_strides = _ncp(grad_maps)
    grad_gate = torch.empty((n, c), dtype=_accumulator_dtype(x), device=x.device)
    block_p, block_c = _blocks(x_strides, c, height * width)
    wrap_triton(kernels.gated_pool_backward_kernel)[(n, _cdiv(c, block_c))](
        grad_maps,
        x,
        _per_sample(gate, n),
        argmax,
        dx,
        grad_gate,
        c,
        height * width,
        *map_strides,
        *x_strides,
        *dx_strides,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        FP64=x.dtype == torch.float64,
    )
    return dx, grad_gate.to(gate.dtype).reshape(gate.shape)


def _gated_output(x: Tensor, gate: Tensor, spatial: Tensor) -> Tensor:
    """``x * gate * spatial`` with gate (N, C, 1, 1) and spatial (N, 1, H, W), in x's dtype and layout."""
    n, c, height, width = x.shape
    y, y_strides = _ncp(torch.empty_like(x))
    x, x_strides = _ncp(x)
    block_p, block_c = _blocks(x_strides, c, height * width)
    grid = (n, _cdiv(height * width, block_p), _cdiv(c, block_c))
    wrap_triton(kernels.gated_output_kernel)[grid](
        x,
        _per_sample(gate, n),
        _per_sample(spatial, n),
        y,
        c,
        height * width,
        *x_strides,
        *y_strides,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        FP64=x.dtype == torch.float64,
    )
    return y


def _gated_output_backward(
    grad_y: Tensor, x: Tensor, gate: Tensor, spatial: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, d gate, d spatial) of ``gated_output`` in one pass over grad_y and x."""
    n, c, height, width = x.shape
    pixels = height * width
    dx, dx_strides = _ncp(torch.empty_like(x))
    x, x_strides = _ncp(x)
    grad_y, grad_strides = _ncp(grad_y)
    block_p, block_c = _blocks(x_strides, c, pixels)
    pixel_blocks = _cdiv(pixels, block_p)
    gate_partials = torch.empty((n, pixel_blocks, c), dtype=_accumulator_dtype(x), device=x.device)
    grad_spatial = spatial.new_empty((n, pixels))
    wrap_triton(kernels.gated_output_backward_kernel)[(n, pixel_blocks)](
        grad_y,
        x,
        _per_sample(gate, n),
        _per_sample(spatial, n),
        dx,
        grad_spatial,
        gate_partials,
        c,
        pixels,
        *grad_strides,
        *x_strides,
        *dx_strides,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        FP64=x.dtype == torch.float64,
    )
    grad_gate = gate_partials.sum(dim=1).to(gate.dtype).reshape(gate.shape)
    return dx, grad_gate, grad_spatial.reshape(spatial.shape)


def _save_inputs_and_indices(ctx, inputs, output) -> None:
    """Every forward op saves its inputs and, where it has one, its argmax output."""
    indices = (output[-1],) if isinstance(output, tuple) else ()
    ctx.save_for_backward(*inputs, *indices)


def _channel_pool_grad(backward):
    def grad(ctx, grad_average, grad_maximum, _grad_argmax):
        x, argmax = ctx.saved_tensors
        return backward(grad_average, grad_maximum, argmax, x)

    return grad


def _gated_pool_grad(backward):
    def grad(ctx, grad_maps, _grad_argmax):
        x, gate, argmax = ctx.saved_tensors
        return backward(grad_maps, x, gate, argmax)

    return grad


def _gated_output_grad(backward):
    def grad(ctx, grad_y):
        x, gate, spatial = ctx.saved_tensors
        return backward(grad_y, x, gate, spatial)

    return grad


# (forward, backward, gradient formula) of each op: registered once as torch.library ops for
# torch.compile, and wrapped once more for eager mode (below)
_OPS = {
    "channel_pool": (_channel_pool, _channel_pool_backward, _channel_pool_grad),
    "gated_pool": (_gated_pool, _gated_pool_backward, _gated_pool_grad),
    "gated_output": (_gated_output, _gated_output_backward, _gated_output_grad),
}


def _eager(forward, backward_pass, gradient) -> type[torch.autograd.Function]:
    """The op as an autograd.Function launching the same kernels with the same formulas: in eager mode
    the torch.library dispatch around each call (schema handling, dynamo guard, autograd wrapper) cost
    about twice the launch itself, on every one of the six calls per layer."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            _save_inputs_and_indices(ctx, inputs, output)
            if isinstance(output, tuple):
                ctx.mark_non_differentiable(output[-1])
            return output

        backward = staticmethod(gradient(backward_pass))

    return Eager


_EAGER = {}
for _name, (_forward, _backward, _gradient) in _OPS.items():
    triton_op(f"cbam::{_name}_backward", mutates_args=())(_backward)
    triton_op(f"cbam::{_name}", mutates_args=())(_forward)
    register_autograd(
        f"cbam::{_name}",
        _gradient(getattr(torch.ops.cbam, f"{_name}_backward")),
        setup_context=_save_inputs_and_indices,
    )
    _EAGER[_name] = _eager(_forward, _backward, _gradient).apply


def call(name: str, *inputs: Tensor):
    """Op ``name`` on ``inputs``: the torch.library op while torch.compile traces, else its eager twin."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.cbam, name)(*inputs)
    return _EAGER[name](*inputs)
