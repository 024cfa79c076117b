"""Triton kernels of the fused CBAM layer: the passes over the full (N, C, H*W) tensors.

Every full tensor is addressed as (N, C, P) with P = H*W flattened and one stride per axis, so contiguous
NCHW (pixels contiguous) and channels_last (channels contiguous) inputs use the same kernels; the block
shapes (chosen by the caller) put the contiguous axis along the wide side of each tile. Reductions run in
fp32 (fp64 for fp64 inputs) whatever the storage dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _accumulator(values, FP64: tl.constexpr):
    if FP64:
        return values.to(tl.float64)
    else:
        return values.to(tl.float32)


@triton.jit
def channel_pool_kernel(
    x,
    avg_out,
    max_out,
    argmax_out,
    C,
    P,
    sxn,
    sxc,
    sxp,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FP64: tl.constexpr,
):
    """Per (n, c): mean and max over the P pixels, and the first pixel holding the max.

    Grid: (N, cdiv(C, BLOCK_C)); each program walks all pixels of its channel block. The running sums
    and maxima are tiles, reduced across pixels once at the end rather than in every step.
    """
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = x + n.to(tl.int64) * sxn + c[None, :].to(tl.int64) * sxc
    total = _accumulator(tl.zeros([BLOCK_P, BLOCK_C], tl.float32), FP64)
    best = _accumulator(tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32), FP64)
    best_pixel = tl.zeros([BLOCK_P, BLOCK_C], tl.int32)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        values = _accumulator(tl.load(base + p[:, None].to(tl.int64) * sxp, mask=ok, other=0.0), FP64)
        total += values
        better = tl.where(ok, values, float("-inf")) > best  # strict: each row keeps its earliest pixel
        best = tl.where(better, values, best)
        best_pixel = tl.where(better, p[:, None], best_pixel)
    maximum = tl.max(best, axis=0)
    # ties between rows: the smallest pixel index among the rows holding the maximum, as max pooling
    first = tl.min(tl.where(best == maximum[None, :], best_pixel, P), axis=0)
    out = n * C + c
    tl.store(avg_out + out, (tl.sum(total, axis=0) / P).to(avg_out.dtype.element_ty), mask=c_ok)
    tl.store(max_out + out, maximum.to(max_out.dtype.element_ty), mask=c_ok)
    tl.store(argmax_out + out, tl.where(first < P, first, 0), mask=c_ok)


@triton.jit
def channel_pool_backward_kernel(
    grad_avg,
    grad_max,
    argmax,
    dx,
    C,
    P,
    sdn,
    sdc,
    sdp,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FP64: tl.constexpr,
):
    """dx[n, c, p] = grad_avg[n, c] / P + (p == argmax[n, c]) * grad_max[n, c].

    Grid: (N, cdiv(P, BLOCK_P), cdiv(C, BLOCK_C)).
    """
    n = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    small = n * C + c
    share = _accumulator(tl.load(grad_avg + small, mask=c_ok, other=0.0), FP64) / P
    winner = _accumulator(tl.load(grad_max + small, mask=c_ok, other=0.0), FP64)
    pixel = tl.load(argmax + small, mask=c_ok, other=-1)
    grad = share[None, :] + tl.where(p[:, None] == pixel[None, :], winner[None, :], 0.0)
    ok = (p < P)[:, None] & c_ok[None, :]
    offsets = n.to(tl.int64) * sdn + c[None, :].to(tl.int64) * sdc + p[:, None].to(tl.int64) * sdp
    tl.store(dx + offsets, grad.to(dx.dtype.element_ty), mask=ok)


@triton.jit
def gated_pool_kernel(
    x,
    gate,
    maps_out,
    argmax_out,
    C,
    P,
    sxn,
    sxc,
    sxp,
    smn,
    smc,
    smp,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FP64: tl.constexpr,
):
    """Per (n, p): max and mean over channels of x * gate (gate: contiguous (N, C)), without storing
    x * gate; maps_out (N, 2, P) with strides (smn, smc, smp), max first; argmax_out (N, P) the first
    max channel.

    Grid: (N, cdiv(P, BLOCK_P)); each program walks all channels of its pixel block.
    """
    n = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    base = x + n.to(tl.int64) * sxn + p[:, None].to(tl.int64) * sxp
    total = _accumulator(tl.zeros([BLOCK_P], tl.float32), FP64)
    best = _accumulator(tl.full([BLOCK_P], float("-inf"), tl.float32), FP64)
    best_channel = tl.zeros([BLOCK_P], tl.int32)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = p_ok[:, None] & c_ok[None, :]
        weights = _accumulator(tl.load(gate + n * C + c, mask=c_ok, other=0.0), FP64)
        values = _accumulator(tl.load(base + c[None, :].to(tl.int64) * sxc, mask=ok, other=0.0), FP64)
        values = values * weights[None, :]
        total += tl.sum(values, axis=1)
        block_max, block_channel = tl.max(tl.where(ok, values, float("-inf")), axis=1, return_indices=True)
        better = block_max > best
        best = tl.where(better, block_max, best)
        best_channel = tl.where(better, block_channel + start, best_channel)
    out = n.to(tl.int64) * smn + p.to(tl.int64) * smp
    tl.store(maps_out + out, best.to(maps_out.dtype.element_ty), mask=p_ok)
    tl.store(maps_out + out + smc, (total / C).to(maps_out.dtype.element_ty), mask=p_ok)
    tl.store(argmax_out + n * P + p, best_channel, mask=p_ok)


@triton.jit
def gated_pool_backward_kernel(
    grad_maps,
    x,
    gate,
    argmax,
    dx,
    grad_gate,
    C,
    P,
    smn,
    smc,
    smp,
    sxn,
    sxc,
    sxp,
    sdn,
    sdc,
    sdp,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FP64: tl.constexpr,
):
    """With w[n, c, p] = grad_mean[n, p] / C + (c == argmax[n, p]) * grad_max[n, p]:
    dx = gate * w and grad_gate[n, c] = sum_p x * w (grad_maps (N, 2, P) with strides (smn, smc, smp),
    max first).

    Grid: (N, cdiv(C, BLOCK_C)); each program walks all pixels of its channel block.
    """
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    weights = _accumulator(tl.load(gate + n * C + c, mask=c_ok, other=0.0), FP64)
    x_base = x + n.to(tl.int64) * sxn + c[None, :].to(tl.int64) * sxc
    dx_base = dx + n.to(tl.int64) * sdn + c[None, :].to(tl.int64) * sdc
    gate_total = _accumulator(tl.zeros([BLOCK_P, BLOCK_C], tl.float32), FP64)  # reduced once, at the end
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        p_ok = p < P
        ok = p_ok[:, None] & c_ok[None, :]
        map_offsets = n.to(tl.int64) * smn + p.to(tl.int64) * smp
        to_max = _accumulator(tl.load(grad_maps + map_offsets, mask=p_ok, other=0.0), FP64)
        to_mean = _accumulator(tl.load(grad_maps + map_offsets + smc, mask=p_ok, other=0.0), FP64) / C
        winner = tl.load(argmax + n * P + p, mask=p_ok, other=-1)
        w = to_mean[:, None] + tl.where(c[None, :] == winner[:, None], to_max[:, None], 0.0)
        values = _accumulator(tl.load(x_base + p[:, None].to(tl.int64) * sxp, mask=ok, other=0.0), FP64)
        gate_total += values * w
        grad = weights[None, :] * w
        tl.store(dx_base + p[:, None].to(tl.int64) * sdp, grad.to(dx.dtype.element_ty), mask=ok)
    tl.store(grad_gate + n * C + c, tl.sum(gate_total, axis=0), mask=c_ok)


@triton.jit
def gated_output_kernel(
    x,
    gate,
    spatial,
    y,
    C,
    P,
    sxn,
    sxc,
    sxp,
    syn,
    syc,
    syp,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FP64: tl.constexpr,
):
    """y = x * gate[n, c] * spatial[n, p] (gate contiguous (N, C), spatial contiguous (N, P)).

    Grid: (N, cdiv(P, BLOCK_P), cdiv(C, BLOCK_C)).
    """
    n = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    ok = p_ok[:, None] & c_ok[None, :]
    weights = _accumulator(tl.load(gate + n * C + c, mask=c_ok, other=0.0), FP64)
    pixel_weights = _accumulator(tl.load(spatial + n * P + p, mask=p_ok, other=0.0), FP64)
    x_offsets = n.to(tl.int64) * sxn + c[None, :].to(tl.int64) * sxc + p[:, None].to(tl.int64) * sxp
    values = _accumulator(tl.load(x + x_offsets, mask=ok, other=0.0), FP64)
    out = values * weights[None, :] * pixel_weights[:, None]
    y_offsets = n.to(tl.int64) * syn + c[None, :].to(tl.int64) * syc + p[:, None].to(tl.int64) * syp
    tl.store(y + y_offsets, out.to(y.dtype.element_ty), mask=ok)


@triton.jit
def gated_output_backward_kernel(
    grad_y,
    x,
    gate,
    spatial,
    dx,
    grad_spatial,
    gate_partials,
    C,
    P,
    sgn,
    sgc,
    sgp,
    sxn,
    sxc,
    sxp,
    sdn,
    sdc,
    sdp,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FP64: tl.constexpr,
):
    """From t = grad_y * x: dx = grad_y * gate * spatial, grad_spatial[n, p] = sum_c t * gate, and
    gate_partials[n, block, c] = sum over this block's pixels of t * spatial (summed by the caller).

    Grid: (N, cdiv(P, BLOCK_P)); each program walks all channels of its pixel block, so the channel sum
    needs no atomics and the pixel sum leaves one row of partials per block.
    """
    n = tl.program_id(0)
    block = tl.program_id(1)
    p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    pixel_weights = _accumulator(tl.load(spatial + n * P + p, mask=p_ok, other=0.0), FP64)
    p64 = p[:, None].to(tl.int64)
    g_base = grad_y + n.to(tl.int64) * sgn + p64 * sgp
    x_base = x + n.to(tl.int64) * sxn + p64 * sxp
    dx_base = dx + n.to(tl.int64) * sdn + p64 * sdp
    partial_base = gate_partials + (n * tl.num_programs(1) + block).to(tl.int64) * C
    spatial_total = _accumulator(tl.zeros([BLOCK_P], tl.float32), FP64)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = p_ok[:, None] & c_ok[None, :]
        c64 = c[None, :].to(tl.int64)
        weights = _accumulator(tl.load(gate + n * C + c, mask=c_ok, other=0.0), FP64)
        upstream = _accumulator(tl.load(g_base + c64 * sgc, mask=ok, other=0.0), FP64)
        values = _accumulator(tl.load(x_base + c64 * sxc, mask=ok, other=0.0), FP64)
        t = upstream * values
        spatial_total += tl.sum(t * weights[None, :], axis=1)
        tl.store(partial_base + c, tl.sum(t * pixel_weights[:, None], axis=0), mask=c_ok)
        grad = upstream * weights[None, :] * pixel_weights[:, None]
        tl.store(dx_base + c64 * sdc, grad.to(dx.dtype.element_ty), mask=ok)
    tl.store(grad_spatial + n * P + p, spatial_total.to(grad_spatial.dtype.element_ty), mask=p_ok)
