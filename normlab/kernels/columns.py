"""Column-family kernels: batch norm, where every channel's group is spread over the array.

Channels-first is an (outer, C, inner) view reduced over outer and inner: each (chunk,
channel) unit is a run of contiguous slabs, summed by the vectorized reductions of
:mod:`normlab.kernels.sums`. Channels-last is (rows, C) reduced over rows: every channel
is a strided column, so the kernels run rows outer and channels inner, into per-channel
float64 accumulators that vectorize across channels.

Statistics take one pass over memory: the shifted moments Σd and Σd² (d = x minus the
channel's first element) of each unit, fixed by the shape (never by the thread count),
added in a fixed order; the variance Σd²/n − (Σd/n)² loses at most a factor 1 + K²,
K = |shift − mean|/std ≤ √n (see ``sums.shifted_moments``), and a channel past
:data:`CANCELLATION` takes the two-pass variance in a second pass. A constant channel
has d = 0 throughout: a mean of exactly its value and a variance of exactly 0. float32
outputs are applied in float32 SIMD arithmetic with the mean split in a high and a low
part (:func:`_folded32`), as the row kernels do. Results depend on the shape only, not
on the number of threads.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.kernels._jit import helper, kernel, store_fence
from normlab.kernels.rows import CANCELLATION  # noqa: F401 (the column kernels' callers pass columns.CANCELLATION)
from normlab.kernels.rows import RSTD_HIGH, RSTD_LOW, STREAM_MIN_ROW, streamed_scale_shift
from normlab.kernels.sums import centered_square_sum, gradient_sums, reciprocal_std, shifted_moments, square_sum

ROW_BLOCK = 4  # channels-last: rows that share one load and store of the per-channel accumulators
# float32 channels-first apply passes of this many elements and more, on slabs of
# rows.STREAM_MIN_ROW elements and more, write with non-temporal stores
# (rows.streamed_scale_shift): twice the row kernels' threshold, since the stats pass has
# just read x, and at 16 MiB streamed and plain stores broke even here (0.70-1.23; 1.22-1.39
# at 32 MiB, 1.40-1.63 at 128 MiB: benchmarks/streaming_stores.py). Channels-last rows,
# a block of channels wide, ran up to 6x slower streamed and keep plain stores.
COLUMN_STREAM_ELEMENTS = 8 << 20


@kernel
def channels_first_stats(x, rms, eps, cancellation, outer_chunk, parts, mean, var, rstd):
    """Twin of ``reference.compute_stats`` for an (outer, C, inner) view: per-channel
    ``mean`` (0 for RMS), ``var`` and ``rstd``; ``parts`` is (4, chunks, C) scratch.

    One pass over memory: the shifted moments Σd, Σd² (d = x − x[0, c, 0],
    ``sums.shifted_moments``) of each (chunk of ``outer_chunk`` outer indices, channel)
    unit, added in chunk order; a channel past ``cancellation`` takes its centred
    squares in a second pass, as in :func:`channels_last_stats`."""
    outer = x.shape[0]
    channels = x.shape[1]
    inner = x.shape[2]
    chunks = parts.shape[1]
    for unit in prange(chunks * channels):
        k = unit // channels
        c = unit % channels
        sum_d = 0.0
        sum_d2 = 0.0
        if rms:
            for o in range(k * outer_chunk, min(outer, (k + 1) * outer_chunk)):
                sum_d2 += square_sum(x[o, c])
        else:
            shift = np.float64(x[0, c, 0])
            for o in range(k * outer_chunk, min(outer, (k + 1) * outer_chunk)):
                part_d, part_d2 = shifted_moments(x[o, c], shift)
                sum_d += part_d
                sum_d2 += part_d2
        parts[0, k, c] = sum_d
        parts[1, k, c] = sum_d2
    count = outer * inner
    total, squares = _in_group_order(parts[0], parts[1])
    center = np.zeros(channels)
    one_pass = np.empty(channels)
    flagged = np.zeros(channels, np.bool_)
    cancelled = False
    for c in range(channels):
        center[c] = total[c] / count
        one_pass[c] = max(squares[c] / count - center[c] * center[c], 0.0)
        flagged[c] = not rms and squares[c] / count > cancellation * one_pass[c]
        cancelled = cancelled or flagged[c]
    # a far outlier first in some channel: the two-pass variance, Σ((x − shift) − Σd/n)²
    for unit in prange(chunks * channels if cancelled else 0):
        k = unit // channels
        c = unit % channels
        m2 = 0.0
        if flagged[c]:
            shift = np.float64(x[0, c, 0])
            for o in range(k * outer_chunk, min(outer, (k + 1) * outer_chunk)):
                m2 += centered_square_sum(x[o, c], shift, center[c])
        parts[2, k, c] = 0.0
        parts[3, k, c] = m2
    centered = squares
    if cancelled:
        _, centered = _in_group_order(parts[2], parts[3])
    for c in prange(channels):
        channel_var = centered[c] / count if flagged[c] else one_pass[c]
        mean[c] = 0.0 if rms else np.float64(x[0, c, 0]) + center[c]
        var[c] = channel_var
        rstd[c] = reciprocal_std(channel_var, eps)


@kernel
def channels_last_stats(x, rms, eps, cancellation, group_rows, block_channels, parts, mean, var, rstd):
    """Twin of ``reference.compute_stats`` for a (rows, C) view reduced over rows;
    ``parts`` is (4, groups, C) scratch (see :func:`column_parts`).

    One pass over memory, rows outer and channels inner, so that every load feeds a run
    of per-channel float64 accumulators that vectorizes: the shifted moments Σd and Σd²,
    d = x − x[0, c], of each group of ``group_rows`` rows (fixed by the shape, never by
    the thread count), added up in group order. The variance Σd²/n − (Σd/n)² loses at
    most a factor 1 + K² (K = |x[0, c] − mean|/std, see ``sums.shifted_moments``); a
    channel where Σd²/n exceeds ``cancellation`` (:data:`CANCELLATION`) times the variance
    takes its centred squares in a second pass. A constant channel has d = 0 throughout:
    mean = x[0, c] and a variance of exactly 0. Work units are (row group, block of
    ``block_channels`` channels). Between the loops every thread computes the same
    locals (see ``_claims``); each output is written once, in the last loop.
    """
    rows = x.shape[0]
    channels = x.shape[1]
    groups = (rows + group_rows - 1) // group_rows
    blocks = (channels + block_channels - 1) // block_channels
    shift = np.zeros(channels)
    if not rms:
        for c in range(channels):
            shift[c] = x[0, c]
    center = np.zeros(channels)
    for unit in prange(groups * blocks):
        g = unit // blocks
        c0 = (unit % blocks) * block_channels
        _column_moments(x, g * group_rows, min(rows, (g + 1) * group_rows), c0, min(channels, c0 + block_channels),
                        shift, center, parts[0, g], parts[1, g])
    total, squares = _in_group_order(parts[0], parts[1])
    one_pass = np.empty(channels)
    cancelled = False
    for c in range(channels):
        if rms:
            one_pass[c] = squares[c] / rows
        else:
            center[c] = total[c] / rows
            one_pass[c] = max(squares[c] / rows - center[c] * center[c], 0.0)
            if squares[c] / rows > cancellation * one_pass[c]:
                cancelled = True
    # a far outlier first in some channel: the two-pass variance, Σ((x − shift) − Σd/n)²
    for unit in prange(groups * blocks if cancelled else 0):
        g = unit // blocks
        c0 = (unit % blocks) * block_channels
        _column_moments(x, g * group_rows, min(rows, (g + 1) * group_rows), c0, min(channels, c0 + block_channels),
                        shift, center, parts[2, g], parts[3, g])
    centered = squares
    if cancelled:
        _, centered = _in_group_order(parts[2], parts[3])
    for c in prange(channels):
        channel_var = one_pass[c]
        if not rms and squares[c] / rows > cancellation * channel_var:
            channel_var = centered[c] / rows
        mean[c] = shift[c] + center[c]
        var[c] = channel_var
        rstd[c] = reciprocal_std(channel_var, eps)


@helper
def _column_moments(x, start, stop, c0, c1, shift, center, sums, squares):
    """Σd and Σd² with d = (x − shift) − center, over rows [start, stop) of channels
    [c0, c1), into ``sums[c0:c1]`` and ``squares[c0:c1]``. Rows are taken ROW_BLOCK at a
    time and added as ((d0 + d1) + (d2 + d3)): the accumulators are loaded and stored once
    per block instead of once per row (the loads and stores set the pace otherwise).
    The order depends on ``start`` and ``stop`` only."""
    width = c1 - c0
    shift_block = shift[c0:c1]
    center_block = center[c0:c1]
    total = sums[c0:c1]
    square = squares[c0:c1]
    for c in range(width):
        total[c] = 0.0
        square[c] = 0.0
    r = start
    while r + ROW_BLOCK <= stop:
        x0 = x[r, c0:c1]
        x1 = x[r + 1, c0:c1]
        x2 = x[r + 2, c0:c1]
        x3 = x[r + 3, c0:c1]
        for c in range(width):
            s = shift_block[c]
            m = center_block[c]
            d0 = (x0[c] - s) - m
            d1 = (x1[c] - s) - m
            d2 = (x2[c] - s) - m
            d3 = (x3[c] - s) - m
            total[c] += (d0 + d1) + (d2 + d3)
            square[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += ROW_BLOCK
    while r < stop:
        x_row = x[r, c0:c1]
        for c in range(width):
            d = (x_row[c] - shift_block[c]) - center_block[c]
            total[c] += d
            square[c] += d * d
        r += 1


@helper
def _in_group_order(part_a, part_b):
    """Column sums of two (groups, C) tables, group 0 first (vectorized across channels)."""
    total_a = part_a[0].copy()
    total_b = part_b[0].copy()
    channels = part_a.shape[1]
    for g in range(1, part_a.shape[0]):
        row_a = part_a[g]
        row_b = part_b[g]
        for c in range(channels):
            total_a[c] += row_a[c]
            total_b[c] += row_b[c]
    return total_a, total_b


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
def channels_first_apply32(x, y, weight, bias, mean, rstd):
    """:func:`channels_first_apply` for float32 x and y in float32 SIMD arithmetic, with
    the tables of :func:`_folded32`: ``y = ((x − hi) − lo)·scale + shift``; a channel
    unfit for float32 is applied in float64, as :func:`channels_first_apply` does."""
    hi, lo, scale, shift, unfit = _folded32(weight, bias, mean, rstd)
    outer = x.shape[0]
    channels = x.shape[1]
    inner = x.shape[2]
    streaming = x.size >= COLUMN_STREAM_ELEMENTS and inner >= STREAM_MIN_ROW  # (see rows.scaled_streaming)
    for unit in prange(outer * channels):
        o = unit // channels
        c = unit % channels
        x_slab = x[o, c]
        y_slab = y[o, c]
        if unfit[c]:
            m = mean[c]
            rs = rstd[c]
            w = weight[c]
            b = bias[c]
            for i in range(inner):
                y_slab[i] = (x_slab[i] - m) * rs * w + b
        elif streaming:
            streamed_scale_shift(x_slab, y_slab, hi[c], lo[c], scale[c], shift[c])
        else:
            h = hi[c]
            low = lo[c]
            s = scale[c]
            b32 = shift[c]
            for i in range(inner):
                y_slab[i] = ((x_slab[i] - h) - low) * s + b32
    if streaming:
        store_fence()  # (see rows.scaled_streaming)


@kernel
def channels_last_apply(x, y, weight, bias, mean, rstd, group_rows, block_channels):
    """Twin of ``reference.apply_stats`` for (rows, C) with per-channel statistics, in
    units of (row group, channel block) as :func:`channels_last_stats`."""
    rows = x.shape[0]
    channels = x.shape[1]
    groups = (rows + group_rows - 1) // group_rows
    blocks = (channels + block_channels - 1) // block_channels
    for unit in prange(groups * blocks):
        g = unit // blocks
        c0 = (unit % blocks) * block_channels
        c1 = min(channels, c0 + block_channels)
        width = c1 - c0
        m = mean[c0:c1]
        rs = rstd[c0:c1]
        w = weight[c0:c1]
        b = bias[c0:c1]
        for r in range(g * group_rows, min(rows, (g + 1) * group_rows)):
            x_row = x[r, c0:c1]
            y_row = y[r, c0:c1]
            for c in range(width):
                y_row[c] = (x_row[c] - m[c]) * rs[c] * w[c] + b[c]


@kernel
def channels_last_apply32(x, y, weight, bias, mean, rstd, group_rows, block_channels):
    """:func:`channels_last_apply` for float32 x and y in float32 SIMD arithmetic:
    ``y = ((x − hi) − lo)·scale + shift`` with the tables of :func:`_folded32`; a channel
    that :func:`_folded32` finds unfit for float32 is written again in float64, as
    :func:`channels_last_apply` writes it (the other channels keep their bits)."""
    hi, lo, scale, shift, unfit = _folded32(weight, bias, mean, rstd)
    rows = x.shape[0]
    channels = x.shape[1]
    groups = (rows + group_rows - 1) // group_rows
    blocks = (channels + block_channels - 1) // block_channels
    for unit in prange(groups * blocks):
        g = unit // blocks
        c0 = (unit % blocks) * block_channels
        c1 = min(channels, c0 + block_channels)
        width = c1 - c0
        start = g * group_rows
        stop = min(rows, start + group_rows)
        h = hi[c0:c1]
        low = lo[c0:c1]
        s = scale[c0:c1]
        b = shift[c0:c1]
        for r in range(start, stop):
            x_row = x[r, c0:c1]
            y_row = y[r, c0:c1]
            for c in range(width):
                y_row[c] = ((x_row[c] - h[c]) - low[c]) * s[c] + b[c]
        for c in range(c0, c1):
            if unfit[c]:
                for r in range(start, stop):
                    y[r, c] = (x[r, c] - mean[c]) * rstd[c] * weight[c] + bias[c]


@helper
def _folded32(weight, bias, mean, rstd):
    """(hi, lo, scale, shift, unfit): float32 tables of the training forward's apply, the
    mean split as in ``rows.apply_row`` (``hi = float32(mean)``, ``lo = float32(mean − hi)``,
    so that ``x − hi`` is exact near the mean: a constant channel gives exactly the bias,
    a symmetric one an exact zero in the middle) and ``scale = float32(rstd·w)``. ``unfit``
    marks the channels whose rstd or scale leaves (rows.RSTD_LOW, rows.RSTD_HIGH), where
    float32 products could underflow or overflow, or is NaN: those are applied in float64."""
    channels = mean.shape[0]
    hi = np.empty(channels, np.float32)
    lo = np.empty(channels, np.float32)
    scale = np.empty(channels, np.float32)
    shift = np.empty(channels, np.float32)
    unfit = np.zeros(channels, np.bool_)
    for c in range(channels):
        rs = rstd[c]
        folded = rs * weight[c]
        unfit[c] = not (RSTD_LOW < rs < RSTD_HIGH) or not (folded == 0.0 or RSTD_LOW < abs(folded) < RSTD_HIGH)
        m = mean[c]
        hi[c] = np.float32(m)
        lo[c] = np.float32(m - np.float64(hi[c]))
        scale[c] = np.float32(folded)
        shift[c] = np.float32(bias[c])
    return hi, lo, scale, shift, unfit


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
def channels_last_backward(grad_y, x, weight, mean, rstd, rms, group_rows, block_channels, parts, grad_x, grad_weight,
                           grad_bias):
    """Twin of ``reference.backward`` for (rows, C): one pass for Σg and Σg·(x − mean)
    per group of ``group_rows`` rows (rows outer, channels inner, as in
    :func:`channels_last_stats`; ``parts`` is its scratch), added up in group order into
    ``grad_bias`` and ``grad_weight``, then one pass writing ``grad_x``."""
    rows = x.shape[0]
    channels = x.shape[1]
    groups = (rows + group_rows - 1) // group_rows
    blocks = (channels + block_channels - 1) // block_channels
    for unit in prange(groups * blocks):
        g = unit // blocks
        c0 = (unit % blocks) * block_channels
        _column_gradient_sums(grad_y, x, g * group_rows, min(rows, (g + 1) * group_rows), c0,
                              min(channels, c0 + block_channels), mean, parts[0, g], parts[1, g])
    sum_g, sum_g_dev = _in_group_order(parts[0], parts[1])
    proj = np.empty(channels)
    mean_gw = np.zeros(channels)
    for c in range(channels):
        proj[c] = weight[c] * (sum_g_dev[c] * rstd[c]) / rows
        if not rms:
            mean_gw[c] = weight[c] * sum_g[c] / rows
    for unit in prange(groups * blocks):
        g = unit // blocks
        c0 = (unit % blocks) * block_channels
        c1 = min(channels, c0 + block_channels)
        width = c1 - c0
        if g == 0:  # each channel's parameter gradients written once
            for c in range(c0, c1):
                grad_bias[c] = sum_g[c]
                grad_weight[c] = sum_g_dev[c] * rstd[c]
        m = mean[c0:c1]
        rs = rstd[c0:c1]
        w = weight[c0:c1]
        p = proj[c0:c1]
        mg = mean_gw[c0:c1]
        start = g * group_rows
        stop = min(rows, start + group_rows)
        r = start
        while r + 2 <= stop:  # two rows per load of the five per-channel tables
            g0 = grad_y[r, c0:c1]
            g1 = grad_y[r + 1, c0:c1]
            x0 = x[r, c0:c1]
            x1 = x[r + 1, c0:c1]
            gx0 = grad_x[r, c0:c1]
            gx1 = grad_x[r + 1, c0:c1]
            for c in range(width):
                mc = m[c]
                rc = rs[c]
                wc = w[c]
                pc = p[c]
                mgc = mg[c]
                gx0[c] = ((g0[c] * wc - ((x0[c] - mc) * rc) * pc) - mgc) * rc
                gx1[c] = ((g1[c] * wc - ((x1[c] - mc) * rc) * pc) - mgc) * rc
            r += 2
        while r < stop:
            g_row = grad_y[r, c0:c1]
            x_row = x[r, c0:c1]
            gx_row = grad_x[r, c0:c1]
            for c in range(width):
                x_hat = (x_row[c] - m[c]) * rs[c]
                gx_row[c] = ((g_row[c] * w[c] - x_hat * p[c]) - mg[c]) * rs[c]
            r += 1


@helper
def _column_gradient_sums(grad_y, x, start, stop, c0, c1, mean, sums, dev_sums):
    """Σg and Σg·(x − mean) over rows [start, stop) of channels [c0, c1), into
    ``sums[c0:c1]`` and ``dev_sums[c0:c1]``, ROW_BLOCK rows at a time as in
    :func:`_column_moments`."""
    width = c1 - c0
    center = mean[c0:c1]
    total = sums[c0:c1]
    dev_total = dev_sums[c0:c1]
    for c in range(width):
        total[c] = 0.0
        dev_total[c] = 0.0
    r = start
    while r + ROW_BLOCK <= stop:
        g0 = grad_y[r, c0:c1]
        g1 = grad_y[r + 1, c0:c1]
        g2 = grad_y[r + 2, c0:c1]
        g3 = grad_y[r + 3, c0:c1]
        x0 = x[r, c0:c1]
        x1 = x[r + 1, c0:c1]
        x2 = x[r + 2, c0:c1]
        x3 = x[r + 3, c0:c1]
        for c in range(width):
            m = center[c]
            a0 = np.float64(g0[c])
            a1 = np.float64(g1[c])
            a2 = np.float64(g2[c])
            a3 = np.float64(g3[c])
            total[c] += (a0 + a1) + (a2 + a3)
            dev_total[c] += (a0 * (x0[c] - m) + a1 * (x1[c] - m)) + (a2 * (x2[c] - m) + a3 * (x3[c] - m))
        r += ROW_BLOCK
    while r < stop:
        g_row = grad_y[r, c0:c1]
        x_row = x[r, c0:c1]
        for c in range(width):
            a = np.float64(g_row[c])
            total[c] += a
            dev_total[c] += a * (x_row[c] - center[c])
        r += 1


@kernel
def channels_first_scale_shift(x, y, hi, lo, scale, shift):
    """Batch norm in evaluation, one pass: ``y = ((x − hi) − lo)·scale + shift`` per channel
    of an (outer, C, inner) view, with the running statistics and the parameters folded
    into ``scale = rstd·w`` and ``shift = b`` and the mean split as in ``rows.apply_row``
    (float32 tables for float32 x: float32 SIMD arithmetic)."""
    outer = x.shape[0]
    channels = x.shape[1]
    inner = x.shape[2]
    # non-temporal stores for float32 (see rows.streamed_scale_shift)
    streaming = x.size >= COLUMN_STREAM_ELEMENTS and inner >= STREAM_MIN_ROW
    for unit in prange(outer * channels):
        o = unit // channels
        c = unit % channels
        h = hi[c]
        low = lo[c]
        s = scale[c]
        b = shift[c]
        x_slab = x[o, c]
        y_slab = y[o, c]
        if streaming:
            streamed_scale_shift(x_slab, y_slab, h, low, s, b)
        else:
            for i in range(inner):
                y_slab[i] = ((x_slab[i] - h) - low) * s + b
    if streaming:
        store_fence()  # (see rows.scaled_streaming)


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


@helper
def _average_into(running_mean, running_var, mean, var, count, factor):
    correction = count / (count - 1)
    for c in range(mean.shape[0]):
        running_mean[c] = (1.0 - factor) * np.float64(running_mean[c]) + factor * mean[c]
        running_var[c] = (1.0 - factor) * np.float64(running_var[c]) + factor * (var[c] * correction)


@kernel
def update_running(running_mean, running_var, mean, var, count, factor):
    """Batch norm's running statistics, in place: ``running = (1 − factor)·running +
    factor·batch`` with the unbiased batch variance ``var·count/(count − 1)``, computed
    in float64 and rounded once to the running statistics' dtype."""
    _average_into(running_mean, running_var, mean, var, count, factor)


@kernel
def update_running_counted(running_mean, running_var, mean, var, count, momentum, cumulative, counter):
    """:func:`update_running` after counting the batch in ``counter`` (the one-element
    ``num_batches_tracked``), with ``factor`` = ``momentum``, or with ``cumulative``
    (torch's ``momentum=None``) the cumulative average's 1/``counter``."""
    counter[0] += 1
    _average_into(running_mean, running_var, mean, var, count, 1.0 / counter[0] if cumulative else momentum)
