"""Triton kernels of the fused CBAM layer: the whole layer, gate math included, in three forward and three
backward launches.

Notation: x is (N, C, P) with P = H*W flattened and one stride per axis (contiguous NCHW and channels_last
use the same kernels; the caller picks tile shapes with the contiguous axis along the wide side). The
channel MLP is ``W2 relu(W1 d + b1) + b2`` (W1: (HID, C), W2: (C, HID)), applied to the average and/or max
descriptors d and summed; g = sigmoid of that sum, (N, C). The spatial gate is s = sigmoid(BN(conv(maps))),
(N, P), with maps = the channel-wise max and mean of x * g, (N, 2, P), and a k x k convolution without bias
(weights (2, k*k)); BN is a one-channel BatchNorm. y = x * g * s.

Forward: ``channel_pool`` (descriptors), ``gate_conv`` (per sample: MLP, g, maps, z = conv(maps) and the
BatchNorm partial statistics), ``gated_output`` (BatchNorm statistics, running statistics, s, y).
Backward: ``output_backward`` (d s -> d z through the sigmoid, d g from y, BatchNorm partial sums),
``spatial_backward`` (BatchNorm and convolution backward, d maps, d g from the maps, the MLP's output
gradient), ``input_backward`` (the input gradient's three terms in one write, and the MLP's and the
convolution's weight gradients).

Where a result must be summed over the whole batch (the BatchNorm statistics and their gradients, weight
gradients), each program of a persistent grid (a fixed number of programs looping over the tiles) writes
one partial result, and the next kernel's programs each sum the partials: no atomics, so every run gives
the same bits. Reductions run in fp32 (fp64 for fp64 inputs) whatever the storage dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _zero(ACC: tl.constexpr):
    """A scalar 0 in the accumulator dtype (a loop-carried value must keep one dtype)."""
    return tl.sum(tl.zeros([1], ACC), axis=0)


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
    ACC: tl.constexpr,
):
    """Per (n, c): mean and max over the P pixels, and the first pixel holding the max.

    Grid: (N, cdiv(C, BLOCK_C)); each program walks all pixels of its channel block. The running sums
    and maxima are tiles, reduced across pixels once at the end rather than in every step.
    """
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = x + n.to(tl.int64) * sxn + c[None, :].to(tl.int64) * sxc
    total = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), ACC)
    best_pixel = tl.zeros([BLOCK_P, BLOCK_C], tl.int32)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        values = tl.load(base + p[:, None].to(tl.int64) * sxp, mask=ok, other=0.0).to(ACC)
        total += values
        better = tl.where(ok, values, float("-inf")) > best  # strict: each row keeps its earliest pixel
        best = tl.where(better, values, best)
        best_pixel = tl.where(better, p[:, None], best_pixel)
    maximum = tl.max(best, axis=0)
    # ties between rows: the smallest pixel index among the rows holding the maximum, as max pooling
    first = tl.min(tl.where(best == maximum[None, :], best_pixel, P), axis=0)
    out = n * C + c
    tl.store(avg_out + out, tl.sum(total, axis=0) / P, mask=c_ok)
    tl.store(max_out + out, maximum, mask=c_ok)
    tl.store(argmax_out + out, tl.where(first < P, first, 0), mask=c_ok)


@triton.jit
def _taps(conv_w, swc, swy, swx, KS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """The convolution's taps (ky * KS + kx) for the max map and for the mean map, (BLOCK_K,) each, from a
    (1, 2, KS, KS) weight with strides (., swc, swy, swx) (NCHW or channels_last)."""
    k = tl.arange(0, BLOCK_K)
    offsets = (k // KS) * swy + (k % KS) * swx
    k_ok = k < KS * KS
    tap_max = tl.load(conv_w + offsets, mask=k_ok, other=0.0).to(ACC)
    tap_mean = tl.load(conv_w + swc + offsets, mask=k_ok, other=0.0).to(ACC)
    return tap_max, tap_mean


@triton.jit
def _neighbours(p, P, H, W, KS: tl.constexpr, BLOCK_K: tl.constexpr, SIGN: tl.constexpr):
    """For pixels p (BLOCK_P,) and the k*k kernel taps k (BLOCK_K,): the flattened pixel p + SIGN * offset
    of each tap (offset (ky - k//2, kx - k//2)) and whether it lies inside the H x W map."""
    k = tl.arange(0, BLOCK_K)
    radius = KS // 2
    dy = k // KS - radius
    dx = k % KS - radius
    qy = (p // W)[None, :] + SIGN * dy[:, None]
    qx = (p % W)[None, :] + SIGN * dx[:, None]
    inside = (k < KS * KS)[:, None] & (p < P)[None, :] & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    return qy * W + qx, inside


@triton.jit
def gate_conv_kernel(
    x,
    avg,
    mx,
    w1,
    b1,
    w2,
    b2,
    conv_w,
    gate_out,
    hidden_out,
    maps_out,
    argmax_out,
    z_out,
    partials,
    C,
    P,
    H,
    W,
    HID,
    sxn,
    sxc,
    sxp,
    swc,
    swy,
    swx,
    USE_AVG: tl.constexpr,
    USE_MAX: tl.constexpr,
    BRANCHES: tl.constexpr,
    KS: tl.constexpr,
    TRAINING: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_CM: tl.constexpr,
    BLOCK_CP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Sample n's channel MLP and gate g (N, C), with the hidden pre-activations (N, 2, HID) kept for the
    backward; then the channel-wise max and mean of x * g (without storing x * g): maps_out (N, 2, P), max
    first, and the max's first channel; then z = conv_k(maps), (N, P), and, when training, the sample's
    (count, mean, M2) of z in partials (N, 3): the BatchNorm's partial statistics, combined with Chan's
    formula over the pixel blocks.

    One program per sample (grid (N,)): the convolution reads the maps of neighbouring pixels, which this
    program itself stored, so a barrier between the two loops is enough (no second launch).
    """
    n = tl.program_id(0)
    j = tl.arange(0, BLOCK_H)
    j_ok = j < HID
    hidden_avg = tl.zeros([BLOCK_H], ACC)
    hidden_max = tl.zeros([BLOCK_H], ACC)
    for start in range(0, C, BLOCK_CM):
        c = start + tl.arange(0, BLOCK_CM)
        c_ok = c < C
        weights = tl.load(w1 + j[:, None] * C + c[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)
        weights = weights.to(ACC)
        if USE_AVG:
            hidden_avg += tl.sum(weights * tl.load(avg + n * C + c, mask=c_ok, other=0.0)[None, :], axis=1)
        if USE_MAX:
            hidden_max += tl.sum(weights * tl.load(mx + n * C + c, mask=c_ok, other=0.0)[None, :], axis=1)
    bias = tl.load(b1 + j, mask=j_ok, other=0.0).to(ACC)
    hidden_sum = tl.zeros([BLOCK_H], ACC)
    if USE_AVG:
        hidden_avg += bias
        hidden_sum += tl.maximum(hidden_avg, 0.0)
        tl.store(hidden_out + (n * 2) * HID + j, hidden_avg, mask=j_ok)
    if USE_MAX:
        hidden_max += bias
        hidden_sum += tl.maximum(hidden_max, 0.0)
        tl.store(hidden_out + (n * 2 + 1) * HID + j, hidden_max, mask=j_ok)
    for start in range(0, C, BLOCK_CM):
        c = start + tl.arange(0, BLOCK_CM)
        c_ok = c < C
        out_weights = tl.load(
            w2 + c[:, None] * HID + j[None, :], mask=c_ok[:, None] & j_ok[None, :], other=0.0
        )
        logits = tl.sum(out_weights.to(ACC) * hidden_sum[None, :], axis=1)
        logits += BRANCHES * tl.load(b2 + c, mask=c_ok, other=0.0).to(ACC)
        tl.store(gate_out + n * C + c, 1.0 / (1.0 + tl.exp(-logits)), mask=c_ok)  # sigmoid
    tl.debug_barrier()  # g, stored by all of this program's threads, is read back by others below

    sample = x + n.to(tl.int64) * sxn
    maps = maps_out + n.to(tl.int64) * 2 * P
    for pixel_start in range(0, P, BLOCK_P):
        p = pixel_start + tl.arange(0, BLOCK_P)
        p_ok = p < P
        total = tl.zeros([BLOCK_P], ACC)
        best = tl.full([BLOCK_P], float("-inf"), ACC)
        best_channel = tl.zeros([BLOCK_P], tl.int32)
        for start in range(0, C, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            c_ok = c < C
            ok = p_ok[:, None] & c_ok[None, :]
            gate = tl.load(gate_out + n * C + c, mask=c_ok, other=0.0)
            offsets = c[None, :].to(tl.int64) * sxc + p[:, None].to(tl.int64) * sxp
            values = tl.load(sample + offsets, mask=ok, other=0.0).to(ACC) * gate[None, :]
            total += tl.sum(values, axis=1)
            block_max, block_channel = tl.max(
                tl.where(ok, values, float("-inf")), axis=1, return_indices=True
            )
            better = block_max > best  # strict: the first channel holding the max, as max pooling
            best = tl.where(better, block_max, best)
            best_channel = tl.where(better, block_channel + start, best_channel)
        tl.store(maps + p, best, mask=p_ok)
        tl.store(maps + P + p, total / C, mask=p_ok)
        tl.store(argmax_out + n * P + p, best_channel, mask=p_ok)
    tl.debug_barrier()  # the convolution reads maps that other threads of this program stored

    tap_max, tap_mean = _taps(conv_w, swc, swy, swx, KS, BLOCK_K, ACC)
    count = _zero(ACC)
    mean = _zero(ACC)
    m2 = _zero(ACC)
    for pixel_start in range(0, P, BLOCK_CP):
        p = pixel_start + tl.arange(0, BLOCK_CP)
        p_ok = p < P
        q, inside = _neighbours(p, P, H, W, KS, BLOCK_K, 1)
        z = tl.sum(tl.load(maps + q, mask=inside, other=0.0).to(ACC) * tap_max[:, None], axis=0)
        z += tl.sum(tl.load(maps + P + q, mask=inside, other=0.0).to(ACC) * tap_mean[:, None], axis=0)
        tl.store(z_out + n * P + p, z, mask=p_ok)
        if TRAINING:
            tile_count = tl.sum(p_ok.to(tl.int32), axis=0).to(z.dtype)
            tile_mean = tl.sum(tl.where(p_ok, z, 0.0), axis=0) / tile_count
            tile_m2 = tl.sum(tl.where(p_ok, (z - tile_mean) * (z - tile_mean), 0.0), axis=0)
            combined = count + tile_count
            delta = tile_mean - mean
            mean += delta * tile_count / combined
            m2 += tile_m2 + delta * delta * count * tile_count / combined
            count = combined
    if TRAINING:
        tl.store(partials + n * 3, count)
        tl.store(partials + n * 3 + 1, mean)
        tl.store(partials + n * 3 + 2, m2)


@triton.jit
def _batch_statistics(partials, NPART, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """(count, mean, biased variance) of z from the per-program (count, mean, M2) partials."""
    count = _zero(ACC)
    weighted = _zero(ACC)
    for start in range(0, NPART, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        ok = r < NPART
        part_count = tl.load(partials + r * 3, mask=ok, other=0.0)
        count += tl.sum(part_count, axis=0)
        weighted += tl.sum(part_count * tl.load(partials + r * 3 + 1, mask=ok, other=0.0), axis=0)
    mean = weighted / count
    m2 = _zero(ACC)
    for start in range(0, NPART, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        ok = r < NPART
        part_count = tl.load(partials + r * 3, mask=ok, other=0.0)
        delta = tl.load(partials + r * 3 + 1, mask=ok, other=0.0) - mean
        m2 += tl.sum(tl.load(partials + r * 3 + 2, mask=ok, other=0.0) + part_count * delta * delta, axis=0)
    return count, mean, m2 / count


@triton.jit
def gated_output_kernel(
    x,
    gate,
    z,
    bn_w,
    bn_b,
    running_mean,
    running_var,
    batches_tracked,
    partials,
    y,
    s_out,
    stats_out,
    N,
    C,
    P,
    eps,
    momentum,
    sxn,
    sxc,
    sxp,
    syn,
    syc,
    syp,
    PIXEL_BLOCKS,
    CHANNEL_BLOCKS,
    TRAINING: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
):
    """s = sigmoid(BN(z)) and y = x * g * s.

    Training: the batch statistics from the partials (every program sums them: the partials are few);
    program 0 stores (mean, 1/sqrt(var + eps), var) in stats_out and, with UPDATE_RUNNING, moves the
    running statistics as BatchNorm does (unbiased variance) and counts the batch. Evaluation: the running
    statistics. Grid: persistent, G programs over the N * PIXEL_BLOCKS * CHANNEL_BLOCKS tiles of x; the
    tiles of the first channel block store s (N, P).
    """
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    if TRAINING:
        count, mean, var = _batch_statistics(partials, N, BLOCK_R, ACC)  # gate_conv's, one per sample
    else:
        mean = tl.load(running_mean).to(ACC)
        var = tl.load(running_var).to(ACC)
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(bn_w).to(ACC) * rstd
    shift = tl.load(bn_b).to(ACC) - mean * scale
    first = program == 0
    tl.store(stats_out, mean, mask=first)
    tl.store(stats_out + 1, rstd, mask=first)
    tl.store(stats_out + 2, var, mask=first)
    if UPDATE_RUNNING:
        unbiased = var * count / tl.maximum(count - 1.0, 1.0)
        old_mean = tl.load(running_mean).to(ACC)
        old_var = tl.load(running_var).to(ACC)
        tl.store(running_mean, old_mean + momentum * (mean - old_mean), mask=first)
        tl.store(running_var, old_var + momentum * (unbiased - old_var), mask=first)
        tl.store(batches_tracked, tl.load(batches_tracked) + 1, mask=first)
    for step in range(tl.cdiv(N * PIXEL_BLOCKS * CHANNEL_BLOCKS - program, programs)):
        tile = program + step * programs  # a tensor, also under the interpreter
        n = tile // (PIXEL_BLOCKS * CHANNEL_BLOCKS)
        rest = tile % (PIXEL_BLOCKS * CHANNEL_BLOCKS)
        channel_block = rest % CHANNEL_BLOCKS
        p = (rest // CHANNEL_BLOCKS) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = p < P
        c_ok = c < C
        logits = tl.load(z + n * P + p, mask=p_ok, other=0.0).to(ACC) * scale + shift
        s = 1.0 / (1.0 + tl.exp(-logits))  # sigmoid
        tl.store(s_out + n * P + p, s, mask=p_ok & (channel_block == 0))
        weights = tl.load(gate + n * C + c, mask=c_ok, other=0.0).to(ACC)
        ok = p_ok[:, None] & c_ok[None, :]
        n64 = n.to(tl.int64)
        x_offsets = n64 * sxn + c[None, :].to(tl.int64) * sxc + p[:, None].to(tl.int64) * sxp
        values = tl.load(x + x_offsets, mask=ok, other=0.0).to(ACC) * weights[None, :] * s[:, None]
        y_offsets = n64 * syn + c[None, :].to(tl.int64) * syc + p[:, None].to(tl.int64) * syp
        tl.store(y + y_offsets, values.to(y.dtype.element_ty), mask=ok)


@triton.jit
def output_backward_kernel(
    grad_y,
    x,
    gate,
    s,
    z,
    stats,
    grad_z,
    gate_partials,
    sums_out,
    N,
    C,
    P,
    sgn,
    sgc,
    sgp,
    sxn,
    sxc,
    sxp,
    PIXEL_BLOCKS,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """From t = dy * x over a block of pixels of sample n (walking all channels):
    d s[p] = sum_c t * g, hence grad_z = d s * s (1 - s) (the gradient at the BatchNorm's output);
    gate_partials[n, block, c] = sum over the block's pixels of t * s (the d g term of y, summed by the
    next kernel); and this program's sums of grad_z and grad_z * zhat over its tiles (sums_out (G, 2)).

    Grid: persistent, G programs over the N * PIXEL_BLOCKS tiles.
    """
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    mean = tl.load(stats).to(ACC)
    rstd = tl.load(stats + 1).to(ACC)
    sum_grad = _zero(ACC)
    sum_grad_zhat = _zero(ACC)
    for step in range(tl.cdiv(N * PIXEL_BLOCKS - program, programs)):
        tile = program + step * programs  # a tensor, also under the interpreter
        n = tile // PIXEL_BLOCKS
        p = (tile % PIXEL_BLOCKS) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < P
        pixel_weights = tl.load(s + n * P + p, mask=p_ok, other=0.0).to(ACC)
        p64 = p[:, None].to(tl.int64)
        n64 = n.to(tl.int64)
        partial_row = gate_partials + tile.to(tl.int64) * C
        spatial_total = tl.zeros([BLOCK_P], ACC)
        for start in range(0, C, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            c_ok = c < C
            ok = p_ok[:, None] & c_ok[None, :]
            c64 = c[None, :].to(tl.int64)
            weights = tl.load(gate + n * C + c, mask=c_ok, other=0.0).to(ACC)
            upstream = tl.load(grad_y + n64 * sgn + c64 * sgc + p64 * sgp, mask=ok, other=0.0).to(ACC)
            t = upstream * tl.load(x + n64 * sxn + c64 * sxc + p64 * sxp, mask=ok, other=0.0).to(ACC)
            spatial_total += tl.sum(t * weights[None, :], axis=1)
            tl.store(partial_row + c, tl.sum(t * pixel_weights[:, None], axis=0), mask=c_ok)
        grad = spatial_total * pixel_weights * (1.0 - pixel_weights)
        tl.store(grad_z + n * P + p, grad, mask=p_ok)
        zhat = (tl.load(z + n * P + p, mask=p_ok, other=0.0).to(ACC) - mean) * rstd
        sum_grad += tl.sum(tl.where(p_ok, grad, 0.0), axis=0)
        sum_grad_zhat += tl.sum(tl.where(p_ok, grad * zhat, 0.0), axis=0)
    tl.store(sums_out + program * 2, sum_grad)
    tl.store(sums_out + program * 2 + 1, sum_grad_zhat)


@triton.jit
def spatial_backward_kernel(
    x,
    gate,
    maps,
    channel_argmax,
    grad_z,
    z,
    stats,
    sums,
    bn_w,
    conv_w,
    w2,
    gate_partials,
    grad_bn_w,
    grad_bn_b,
    grad_maps_out,
    conv_partials,
    grad_logits_out,
    hidden_grad_out,
    N,
    C,
    P,
    H,
    W,
    HID,
    NPART,
    sxn,
    sxc,
    sxp,
    GATE_BLOCKS,
    swc,
    swy,
    swx,
    KS: tl.constexpr,
    TRAINING: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per sample n, walking its channels in blocks and, for each, all its pixels:

    * the BatchNorm backward (training: ``dz = w rstd (grad_z - mean(grad_z) - zhat mean(grad_z zhat))``
      from the partial sums; evaluation: ``dz = w rstd grad_z``) and the convolution's backward,
      ``d maps[ch, p] = sum_k conv_w[ch, k] dz[p - offset_k]`` (recomputed for every channel block: a few
      multiply-adds per pixel, where keeping them would need a pass over memory);
    * the maps' gradient sent back through the channel-wise max (to the first max channel) and mean:
      ``d g[c] += sum_p x[c, p] (d mean[p] / C + (c == argmax[p]) d max[p])``;
    * with the d g term of y (gate_partials), the gate's full gradient, the MLP's output gradient
      ``grad_logits = d g * g (1 - g)`` (N, C), and the gradient at the MLP's hidden layer (before its
      ReLU), ``W2^T grad_logits`` (N, HID).

    The first channel block also stores d maps (N, 2, P) and the convolution weight gradient's per-sample
    sums (N, 2, k*k); program 0 stores the BatchNorm's weight and bias gradients. Grid: persistent, over
    the N samples.
    """
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    sum_grad = _zero(ACC)
    sum_grad_zhat = _zero(ACC)
    for start in range(0, NPART, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        ok = r < NPART
        sum_grad += tl.sum(tl.load(sums + r * 2, mask=ok, other=0.0), axis=0)
        sum_grad_zhat += tl.sum(tl.load(sums + r * 2 + 1, mask=ok, other=0.0), axis=0)
    tl.store(grad_bn_w, sum_grad_zhat.to(grad_bn_w.dtype.element_ty), mask=program == 0)
    tl.store(grad_bn_b, sum_grad.to(grad_bn_b.dtype.element_ty), mask=program == 0)
    mean = tl.load(stats).to(ACC)
    rstd = tl.load(stats + 1).to(ACC)
    scale = tl.load(bn_w).to(ACC) * rstd
    if TRAINING:
        count = (N * P).to(ACC)
        centre = sum_grad / count
        slope = sum_grad_zhat / count
    else:  # evaluation: the statistics are constants
        centre = _zero(ACC)
        slope = _zero(ACC)
    k = tl.arange(0, BLOCK_K)
    k_ok = k < KS * KS
    tap_max, tap_mean = _taps(conv_w, swc, swy, swx, KS, BLOCK_K, ACC)
    j = tl.arange(0, BLOCK_H)
    j_ok = j < HID
    for step in range(tl.cdiv(N - program, programs)):
        n = program + step * programs  # a tensor, also under the interpreter
        n64 = n.to(tl.int64)
        sample_maps = maps + n64 * 2 * P
        d_hidden = tl.zeros([BLOCK_H], ACC)
        for channel_start in range(0, C, BLOCK_C):
            first_channels = channel_start == 0
            c = channel_start + tl.arange(0, BLOCK_C)
            c_ok = c < C
            grad_gate = tl.zeros([BLOCK_C], ACC)
            conv_max = tl.zeros([BLOCK_K], ACC)
            conv_mean = tl.zeros([BLOCK_K], ACC)
            for pixel_start in range(0, P, BLOCK_P):
                p = pixel_start + tl.arange(0, BLOCK_P)
                p_ok = p < P
                # d maps at p gathers dz at p - offset_k: dz recomputed there from grad_z and z
                q, inside = _neighbours(p, P, H, W, KS, BLOCK_K, -1)
                upstream = tl.load(grad_z + n * P + q, mask=inside, other=0.0).to(ACC)
                zhat = (tl.load(z + n * P + q, mask=inside, other=0.0).to(ACC) - mean) * rstd
                dz = tl.where(inside, scale * (upstream - centre - zhat * slope), 0.0)
                grad_max = tl.sum(dz * tap_max[:, None], axis=0)
                grad_mean = tl.sum(dz * tap_mean[:, None], axis=0)
                if first_channels:  # d maps, and the weight gradient sum_p maps[p + offset_k] dz[p]
                    grad_maps = grad_maps_out + n64 * 2 * P + p
                    tl.store(grad_maps, grad_max, mask=p_ok)
                    tl.store(grad_maps + P, grad_mean, mask=p_ok)
                    here_z = (tl.load(z + n * P + p, mask=p_ok, other=0.0).to(ACC) - mean) * rstd
                    here_grad = tl.load(grad_z + n * P + p, mask=p_ok, other=0.0).to(ACC)
                    here = tl.where(p_ok, scale * (here_grad - centre - here_z * slope), 0.0)
                    ahead, ahead_inside = _neighbours(p, P, H, W, KS, BLOCK_K, 1)
                    ahead_max = tl.load(sample_maps + ahead, mask=ahead_inside, other=0.0).to(ACC)
                    ahead_mean = tl.load(sample_maps + P + ahead, mask=ahead_inside, other=0.0).to(ACC)
                    conv_max += tl.sum(ahead_max * here[None, :], axis=1)
                    conv_mean += tl.sum(ahead_mean * here[None, :], axis=1)
                winner = tl.load(channel_argmax + n * P + p, mask=p_ok, other=-1)
                ok = p_ok[:, None] & c_ok[None, :]
                share = grad_mean[:, None] / C + tl.where(
                    c[None, :] == winner[:, None], grad_max[:, None], 0.0
                )
                x_offsets = n64 * sxn + c[None, :].to(tl.int64) * sxc + p[:, None].to(tl.int64) * sxp
                values = tl.load(x + x_offsets, mask=ok, other=0.0).to(ACC)
                grad_gate += tl.sum(tl.where(ok, values * share, 0.0), axis=0)
            conv_row = conv_partials + n64 * 2 * KS * KS
            tl.store(conv_row + k, conv_max, mask=k_ok & first_channels)
            tl.store(conv_row + KS * KS + k, conv_mean, mask=k_ok & first_channels)
            for block in range(GATE_BLOCKS):  # the d g term of y, summed over its pixel blocks
                rows = gate_partials + (n * GATE_BLOCKS + block) * C + c
                grad_gate += tl.load(rows, mask=c_ok, other=0.0).to(ACC)
            weights = tl.load(gate + n * C + c, mask=c_ok, other=0.0).to(ACC)
            grad_logits = grad_gate * weights * (1.0 - weights)
            tl.store(grad_logits_out + n * C + c, grad_logits, mask=c_ok)
            out_weights = tl.load(
                w2 + c[:, None] * HID + j[None, :], mask=c_ok[:, None] & j_ok[None, :], other=0.0
            )
            d_hidden += tl.sum(out_weights.to(ACC) * grad_logits[:, None], axis=0)
        tl.store(hidden_grad_out + n * HID + j, d_hidden, mask=j_ok)


@triton.jit
def input_backward_kernel(
    grad_y,
    x,
    gate,
    s,
    grad_maps,
    channel_argmax,
    pixel_argmax,
    avg,
    mx,
    hidden,
    hidden_grad,
    grad_logits,
    conv_partials,
    w1,
    grad_x,
    grad_w1,
    grad_b1,
    grad_w2,
    grad_b2,
    grad_conv_w,
    N,
    C,
    P,
    HID,
    sgn,
    sgc,
    sgp,
    sxn,
    sxc,
    sxp,
    sdn,
    sdc,
    sdp,
    PIXEL_BLOCKS,
    CHANNEL_BLOCKS,
    WEIGHT_CHANNEL_BLOCKS,
    WEIGHT_HIDDEN_BLOCKS,
    swc,
    swy,
    swx,
    KS: tl.constexpr,
    USE_AVG: tl.constexpr,
    USE_MAX: tl.constexpr,
    BRANCHES: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_WC: tl.constexpr,
    BLOCK_WH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ACC: tl.constexpr,
):
    """The input gradient, written once, and the weight gradients. Tiles of a persistent grid:

    * weight tiles first (the longest: each walks the batch): the MLP's (channel block, hidden block)
      gradients ``dW2 = sum_n grad_logits h^T`` (h: the ReLU outputs, summed over branches), ``dW1 = sum_n
      d hidden d^T`` per branch, ``db2 = branches * sum_n grad_logits``, ``db1 = sum_n d hidden``; then one
      tile summing the convolution weight gradient's per-sample rows;
    * then the (n, pixel block, channel block) tiles of x: ``dx = dy g s`` (the output's term)
      ``+ g (d mean[p] / C + (c == argmax[p]) d max[p])`` (the spatial maps' term)
      ``+ d avg[c] / P + (p == argmax[c]) d max[c]`` (the channel descriptors' term), the descriptors'
      gradients ``W1^T d hidden`` computed per tile from the sample's hidden gradient.
    """
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    weight_tiles = WEIGHT_CHANNEL_BLOCKS * WEIGHT_HIDDEN_BLOCKS
    input_tiles = N * PIXEL_BLOCKS * CHANNEL_BLOCKS
    for step in range(tl.cdiv(weight_tiles + 1 + input_tiles - program, programs)):
        tile = program + step * programs  # a tensor, also under the interpreter
        if tile < weight_tiles:
            cw = (tile // WEIGHT_HIDDEN_BLOCKS) * BLOCK_WC + tl.arange(0, BLOCK_WC)
            jw = (tile % WEIGHT_HIDDEN_BLOCKS) * BLOCK_WH + tl.arange(0, BLOCK_WH)
            cw_ok = cw < C
            jw_ok = jw < HID
            acc_w2 = tl.zeros([BLOCK_WC, BLOCK_WH], ACC)
            acc_w1 = tl.zeros([BLOCK_WH, BLOCK_WC], ACC)
            acc_b2 = tl.zeros([BLOCK_WC], ACC)
            acc_b1 = tl.zeros([BLOCK_WH], ACC)
            for n_start in range(0, N, BLOCK_N):
                ns = n_start + tl.arange(0, BLOCK_N)
                ns_ok = ns < N
                nc = ns_ok[:, None] & cw_ok[None, :]
                nj = ns_ok[:, None] & jw_ok[None, :]
                logits = tl.load(grad_logits + ns[:, None] * C + cw[None, :], mask=nc, other=0.0).to(ACC)
                d_hidden = tl.load(hidden_grad + ns[:, None] * HID + jw[None, :], mask=nj, other=0.0).to(ACC)
                relu_total = tl.zeros([BLOCK_N, BLOCK_WH], ACC)
                if USE_AVG:
                    pre = tl.load(hidden + (ns[:, None] * 2) * HID + jw[None, :], mask=nj, other=0.0).to(ACC)
                    relu_total += tl.maximum(pre, 0.0)
                    d_avg = tl.where(pre > 0, d_hidden, 0.0)
                    acc_b1 += tl.sum(d_avg, axis=0)
                    desc = tl.load(avg + ns[:, None] * C + cw[None, :], mask=nc, other=0.0).to(ACC)
                    acc_w1 += tl.sum(d_avg[:, :, None] * desc[:, None, :], axis=0)
                if USE_MAX:
                    pre = tl.load(hidden + (ns[:, None] * 2 + 1) * HID + jw[None, :], mask=nj, other=0.0).to(
                        ACC
                    )
                    relu_total += tl.maximum(pre, 0.0)
                    d_max = tl.where(pre > 0, d_hidden, 0.0)
                    acc_b1 += tl.sum(d_max, axis=0)
                    desc = tl.load(mx + ns[:, None] * C + cw[None, :], mask=nc, other=0.0).to(ACC)
                    acc_w1 += tl.sum(d_max[:, :, None] * desc[:, None, :], axis=0)
                acc_w2 += tl.sum(logits[:, :, None] * relu_total[:, None, :], axis=0)
                acc_b2 += tl.sum(logits, axis=0)
            tl.store(
                grad_w2 + cw[:, None] * HID + jw[None, :],
                acc_w2.to(grad_w2.dtype.element_ty),
                mask=cw_ok[:, None] & jw_ok[None, :],
            )
            tl.store(
                grad_w1 + jw[:, None] * C + cw[None, :],
                acc_w1.to(grad_w1.dtype.element_ty),
                mask=jw_ok[:, None] & cw_ok[None, :],
            )
            first_hidden_block = (tile % WEIGHT_HIDDEN_BLOCKS) == 0
            first_channel_block = (tile // WEIGHT_HIDDEN_BLOCKS) == 0
            tl.store(
                grad_b2 + cw,
                (BRANCHES * acc_b2).to(grad_b2.dtype.element_ty),
                mask=cw_ok & first_hidden_block,
            )
            tl.store(grad_b1 + jw, acc_b1.to(grad_b1.dtype.element_ty), mask=jw_ok & first_channel_block)
        elif tile == weight_tiles:
            taps = tl.arange(0, BLOCK_T)  # (map channel, ky, kx) flattened, as conv_partials holds them
            taps_ok = taps < 2 * KS * KS
            total = tl.zeros([BLOCK_T], ACC)
            for n in range(N):
                total += tl.load(conv_partials + n * 2 * KS * KS + taps, mask=taps_ok, other=0.0).to(ACC)
            kernel_tap = taps % (KS * KS)
            offsets = (taps // (KS * KS)) * swc + (kernel_tap // KS) * swy + (kernel_tap % KS) * swx
            tl.store(grad_conv_w + offsets, total.to(grad_conv_w.dtype.element_ty), mask=taps_ok)
        else:
            index = tile - weight_tiles - 1
            n = index // (PIXEL_BLOCKS * CHANNEL_BLOCKS)
            rest = index % (PIXEL_BLOCKS * CHANNEL_BLOCKS)
            p = (rest // CHANNEL_BLOCKS) * BLOCK_P + tl.arange(0, BLOCK_P)
            c = (rest % CHANNEL_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
            p_ok = p < P
            c_ok = c < C
            j = tl.arange(0, BLOCK_H)
            j_ok = j < HID
            d_hidden = tl.load(hidden_grad + n * HID + j, mask=j_ok, other=0.0).to(ACC)
            first_weights = tl.load(
                w1 + j[:, None] * C + c[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0
            ).to(ACC)
            channel_term = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            if USE_AVG:
                pre = tl.load(hidden + (n * 2) * HID + j, mask=j_ok, other=0.0).to(ACC)
                d_avg = tl.sum(first_weights * tl.where(pre > 0, d_hidden, 0.0)[:, None], axis=0)
                channel_term += d_avg[None, :] / P
            if USE_MAX:
                pre = tl.load(hidden + (n * 2 + 1) * HID + j, mask=j_ok, other=0.0).to(ACC)
                d_max = tl.sum(first_weights * tl.where(pre > 0, d_hidden, 0.0)[:, None], axis=0)
                winner_pixel = tl.load(pixel_argmax + n * C + c, mask=c_ok, other=-1)
                channel_term += tl.where(p[:, None] == winner_pixel[None, :], d_max[None, :], 0.0)
            weights = tl.load(gate + n * C + c, mask=c_ok, other=0.0).to(ACC)
            pixel_weights = tl.load(s + n * P + p, mask=p_ok, other=0.0).to(ACC)
            sample_grad_maps = grad_maps + n.to(tl.int64) * 2 * P + p
            grad_max = tl.load(sample_grad_maps, mask=p_ok, other=0.0).to(ACC)
            grad_mean = tl.load(sample_grad_maps + P, mask=p_ok, other=0.0).to(ACC)
            winner_channel = tl.load(channel_argmax + n * P + p, mask=p_ok, other=-1)
            spatial_share = grad_mean[:, None] / C + tl.where(
                c[None, :] == winner_channel[:, None], grad_max[:, None], 0.0
            )
            ok = p_ok[:, None] & c_ok[None, :]
            n64 = n.to(tl.int64)
            c64 = c[None, :].to(tl.int64)
            p64 = p[:, None].to(tl.int64)
            upstream = tl.load(grad_y + n64 * sgn + c64 * sgc + p64 * sgp, mask=ok, other=0.0).to(ACC)
            grad = weights[None, :] * (upstream * pixel_weights[:, None] + spatial_share) + channel_term
            tl.store(grad_x + n64 * sdn + c64 * sdc + p64 * sdp, grad.to(grad_x.dtype.element_ty), mask=ok)
