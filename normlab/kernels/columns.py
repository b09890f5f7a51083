"""Column-family kernels: batch norm, where every channel's group is spread over the array.

Channels-first is an (outer, C, inner) view reduced over outer and inner; channels-last
is (rows, C) reduced over rows. The statistics take ONE pass over memory: the data is cut
into chunks fixed by index (never by thread), each small enough to stay in cache, so the
chunk's shifted two-pass (mean, M2) costs one read from DRAM. The chunks are then merged
in chunk order with Chan's formula,

    n = nₐ + n_b,  δ = mean_b − meanₐ,  mean = meanₐ + δ·n_b/n,  M2 = M2ₐ + M2_b + δ²·nₐ·n_b/n,

which is exact algebra, never E[x²] − E[x]². Every chunk shifts by the channel's first
element, so a constant channel gives δ = 0, mean = shift and a variance of exactly 0.
The result depends on the shape only, not on the number of threads.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.kernels._jit import helper, kernel
from normlab.kernels.sums import centered_square_sum, gradient_sums, reciprocal_std, shifted_sum, square_sum


@kernel
def channels_first_stats(x, rms, eps, outer_chunk, part_mean, part_m2, mean, var, rstd):
    """Twin of ``reference.compute_stats`` for an (outer, C, inner) view: per-channel
    ``mean`` (0 for RMS), ``var`` and ``rstd``; ``part_*`` are (chunks, C) scratch."""
    outer = x.shape[0]
    channels = x.shape[1]
    inner = x.shape[2]
    chunks = part_mean.shape[0]
    for unit in prange(chunks * channels):
        k = unit // channels
        c = unit % channels
        start = k * outer_chunk
        stop = min(outer, start + outer_chunk)
        if rms:
            total = 0.0
            for o in range(start, stop):
                total += square_sum(x[o, c])
            part_mean[k, c] = total
        else:
            shift = np.float64(x[0, c, 0])
            total = 0.0
            for o in range(start, stop):
                total += shifted_sum(x[o, c], shift)
            chunk_mean = total / ((stop - start) * inner)
            m2 = 0.0
            for o in range(start, stop):
                m2 += centered_square_sum(x[o, c], shift, chunk_mean)
            part_mean[k, c] = chunk_mean
            part_m2[k, c] = m2
    for c in prange(channels):
        shift = 0.0 if rms else np.float64(x[0, c, 0])
        _merge_channel(c, rms, eps, outer_chunk * inner, outer * inner, shift, part_mean, part_m2, mean, var, rstd)


@kernel
def channels_last_stats(x, rms, eps, chunk_rows, part_mean, part_m2, mean, var, rstd):
    """Twin of ``reference.compute_stats`` for a (rows, C) view reduced over rows;
    ``part_*`` are (chunks, C) scratch, zeroed by the caller."""
    rows = x.shape[0]
    channels = x.shape[1]
    chunks = part_mean.shape[0]
    shift = np.zeros(channels)
    if not rms:
        for c in range(channels):
            shift[c] = x[0, c]
    for k in prange(chunks):
        start = k * chunk_rows
        stop = min(rows, start + chunk_rows)
        sums = part_mean[k]
        squares = part_m2[k]
        for r in range(start, stop):
            x_row = x[r]
            if rms:
                for c in range(channels):
                    v = np.float64(x_row[c])
                    sums[c] += v * v
            else:
                for c in range(channels):
                    sums[c] += x_row[c] - shift[c]
        if not rms:
            for c in range(channels):
                sums[c] /= stop - start
            for r in range(start, stop):
                x_row = x[r]
                for c in range(channels):
                    d = (x_row[c] - shift[c]) - sums[c]
                    squares[c] += d * d
    for c in prange(channels):
        _merge_channel(c, rms, eps, chunk_rows, rows, shift[c], part_mean, part_m2, mean, var, rstd)


@helper
def _merge_channel(c, rms, eps, chunk_count, total_count, shift, part_mean, part_m2, mean, var, rstd):
    """Merge channel ``c``'s chunks in chunk order (Chan's formula; RMS: a plain sum)."""
    chunks = part_mean.shape[0]
    if rms:
        total = 0.0
        for k in range(chunks):
            total += part_mean[k, c]
        channel_var = total / total_count
        channel_mean = 0.0
    else:
        count = min(chunk_count, total_count)
        running_mean = part_mean[0, c]
        running_m2 = part_m2[0, c]
        for k in range(1, chunks):
            chunk = min(chunk_count, total_count - k * chunk_count)
            merged = count + chunk
            delta = part_mean[k, c] - running_mean
            running_mean += delta * chunk / merged
            running_m2 += part_m2[k, c] + delta * delta * count * chunk / merged
            count = merged
        channel_var = running_m2 / total_count
        channel_mean = shift + running_mean
    mean[c] = channel_mean
    var[c] = channel_var
    rstd[c] = reciprocal_std(channel_var, eps)


@kernel
def channels_first_apply(x, y, weight, bias, mean, rstd):
    """Twin of ``reference.apply_stats`` for (outer, C, inner) with per-channel statistics
    and parameters (float64, length C)."""
    outer = x.shape[0]
    channels = x.shape[1]
    inner = x.shape[2]
    for unit in prange(outer * channels):
        o = unit // channels
        c = unit % channels
        m = mean[c]
        rs = rstd[c]
        w = weight[c]
        b = bias[c]
        x_slab = x[o, c]
        y_slab = y[o, c]
        for i in range(inner):
            y_slab[i] = (x_slab[i] - m) * rs * w + b


@kernel
def channels_last_apply(x, y, weight, bias, mean, rstd, chunk_rows):
    """Twin of ``reference.apply_stats`` for (rows, C) with per-channel statistics."""
    rows = x.shape[0]
    channels = x.shape[1]
    chunks = (rows + chunk_rows - 1) // chunk_rows
    for k in prange(chunks):
        for r in range(k * chunk_rows, min(rows, (k + 1) * chunk_rows)):
            x_row = x[r]
            y_row = y[r]
            for c in range(channels):
                y_row[c] = (x_row[c] - mean[c]) * rstd[c] * weight[c] + bias[c]


@kernel
def channels_first_backward(grad_y, x, weight, mean, rstd, rms, outer_chunk, part_g, part_g_dev,
                            grad_x, grad_weight, grad_bias):
    """Twin of ``reference.backward`` for (outer, C, inner): one pass for Σg and
    Σg·(x − mean) per chunk, merged in chunk order into ``grad_bias`` and ``grad_weight``
    (length C), then one pass writing ``grad_x``."""
    outer = x.shape[0]
    channels = x.shape[1]
    inner = x.shape[2]
    chunks = part_g.shape[0]
    for unit in prange(chunks * channels):
        k = unit // channels
        c = unit % channels
        sum_g = 0.0
        sum_g_dev = 0.0
        for o in range(k * outer_chunk, min(outer, (k + 1) * outer_chunk)):
            sg, sgd = gradient_sums(grad_y[o, c], x[o, c], mean[c])
            sum_g += sg
            sum_g_dev += sgd
        part_g[k, c] = sum_g
        part_g_dev[k, c] = sum_g_dev
    count = outer * inner
    for c in prange(channels):
        sum_g = 0.0
        sum_g_dev = 0.0
        for k in range(chunks):
            sum_g += part_g[k, c]
            sum_g_dev += part_g_dev[k, c]
        grad_bias[c] = sum_g
        grad_weight[c] = sum_g_dev * rstd[c]
    for unit in prange(outer * channels):
        o = unit // channels
        c = unit % channels
        m = mean[c]
        rs = rstd[c]
        w = weight[c]
        proj = w * grad_weight[c] / count
        mean_gw = 0.0 if rms else w * grad_bias[c] / count
        g_slab = grad_y[o, c]
        x_slab = x[o, c]
        gx_slab = grad_x[o, c]
        for i in range(inner):
            x_hat = (x_slab[i] - m) * rs
            gx_slab[i] = ((g_slab[i] * w - x_hat * proj) - mean_gw) * rs


@kernel
def channels_last_backward(grad_y, x, weight, mean, rstd, rms, chunk_rows, part_g, part_g_dev,
                           grad_x, grad_weight, grad_bias):
    """Twin of ``reference.backward`` for (rows, C); ``part_*`` are (chunks, C) scratch,
    zeroed by the caller, added in chunk order."""
    rows = x.shape[0]
    channels = x.shape[1]
    chunks = part_g.shape[0]
    for k in prange(chunks):
        sums = part_g[k]
        dev_sums = part_g_dev[k]
        for r in range(k * chunk_rows, min(rows, (k + 1) * chunk_rows)):
            g_row = grad_y[r]
            x_row = x[r]
            for c in range(channels):
                gy = np.float64(g_row[c])
                sums[c] += gy
                dev_sums[c] += gy * (x_row[c] - mean[c])
    proj = np.empty(channels)
    mean_gw = np.zeros(channels)
    for c in range(channels):
        sum_g = 0.0
        sum_g_dev = 0.0
        for k in range(chunks):
            sum_g += part_g[k, c]
            sum_g_dev += part_g_dev[k, c]
        grad_bias[c] = sum_g
        grad_weight[c] = sum_g_dev * rstd[c]
        proj[c] = weight[c] * grad_weight[c] / rows
        if not rms:
            mean_gw[c] = weight[c] * sum_g / rows
    for k in prange(chunks):
        for r in range(k * chunk_rows, min(rows, (k + 1) * chunk_rows)):
            g_row = grad_y[r]
            x_row = x[r]
            gx_row = grad_x[r]
            for c in range(channels):
                x_hat = (x_row[c] - mean[c]) * rstd[c]
                gx_row[c] = ((g_row[c] * weight[c] - x_hat * proj[c]) - mean_gw[c]) * rstd[c]


@kernel
def channels_first_scale_shift(x, y, hi, lo, scale, shift):
    """Batch norm in evaluation, one pass: ``y = ((x − hi) − lo)·scale + shift`` per channel
    of an (outer, C, inner) view, with the running statistics and the parameters folded
    into ``scale = rstd·w`` and ``shift = b`` and the mean split as in ``rows.apply_row``
    (float32 tables for float32 x: float32 SIMD arithmetic)."""
    outer = x.shape[0]
    channels = x.shape[1]
    inner = x.shape[2]
    for unit in prange(outer * channels):
        o = unit // channels
        c = unit % channels
        h = hi[c]
        low = lo[c]
        s = scale[c]
        b = shift[c]
        x_slab = x[o, c]
        y_slab = y[o, c]
        for i in range(inner):
            y_slab[i] = ((x_slab[i] - h) - low) * s + b


@kernel
def channels_last_scale_shift(x, y, hi, lo, scale, shift, chunk_rows):
    """:func:`channels_first_scale_shift` for a (rows, C) view."""
    rows = x.shape[0]
    channels = x.shape[1]
    chunks = (rows + chunk_rows - 1) // chunk_rows
    for k in prange(chunks):
        for r in range(k * chunk_rows, min(rows, (k + 1) * chunk_rows)):
            x_row = x[r]
            y_row = y[r]
            for c in range(channels):
                y_row[c] = ((x_row[c] - hi[c]) - lo[c]) * scale[c] + shift[c]
