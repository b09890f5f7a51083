"""Row-family kernels: every group is one contiguous row of a (rows, n) view.

The rows come as a C-contiguous (rows, n) array, or as a flat array read through a row
layout ``(per, outer_stride, per_stride)``: row ``r`` is ``flat[start:start + n]`` with
``start = (r // per)·outer_stride + (r % per)·per_stride`` (see :func:`row_at`). So a
strided view whose rows are contiguous but spaced in up to two levels, such as the heads
of q sliced from a packed qkv projection (rows ``(b·t, h)``, strides ``(3·h·d, d)``), is
read where it lies, with no copy (``kernels.strided.row_layout`` finds it).

This covers layer norm (NLP and vision), instance norm, group norm and RMS norm. The
affine parameters are a float64 table ``weight[G, C]``: element ``j`` of row ``r`` uses
``weight[(r // param_row_stride) % G, (j // param_inner) % C]``. That is the
(rows, groups, channels-per-group, spatial) layout of group norm (``G`` groups, ``C``
channels per group, ``param_inner`` positions per channel), per-element layer norm
(``G = 1``, ``C = n``, ``param_inner = 1``) and no parameters at all (a (1, 1) table of ones).

A row fits in cache, so its statistics take two passes over it (shifted sum, then
centred squares) and the output a third, all while it is cache-resident. The statistics
come from :func:`normlab.kernels.sums.group_stats` (rstd is NaN where the variance overflows).

A float32 output of STREAM_ELEMENTS and more is written with non-temporal stores
(:func:`apply_row_streaming`): an ordinary store first reads its line into the cache,
which for an output far past the last-level cache is a third of the pass's memory
traffic spent for nothing. On a 2-core AMD EPYC (32 MiB L3) the layer norm forward
kernel ran 1.23-1.46× faster this way on outputs of 16 and 32 MiB and 1.37-1.40× at
128 MiB, one thread or two, but 0.81-0.96× at 8 MiB, where input and output still fit
the L3: hence the threshold (``benchmarks/streaming_stores.py``).
"""

from __future__ import annotations

import numpy as np
from numba import prange
from numba.extending import overload

from normlab.kernels._jit import (NUMBA_OPTIONS, STREAM_LANES, all_float32, data_address, helper, inline_helper, kernel, prefetch,
                                  store_fence, stream_affine_line, stream_scaled_line)
from normlab.kernels.sums import (centered_square_sum, gradient_sums, group_stats, reciprocal_std, shifted_moments,
                                  square_sum, weighted_gradient_sums)

# float32 rows are applied in float32 where rstd and x̂ = (x − mean)·rstd (|x̂| ≤ √n) stay
# normal float32 numbers; outside, in float64
RSTD_LOW = 1e-30
RSTD_HIGH = 1e30
# Σd²/n over the variance past which the one-pass variance has lost more than 8 of
# float64's 16 digits: the row then takes the two-pass variance (K ≥ 1e4, a far outlier first)
CANCELLATION = 1e8
# float32 outputs of this many elements and more are written with non-temporal stores
# (:func:`apply_row_streaming`): far past the last-level cache, where the output goes to
# memory anyway, and a store that first reads the line in costs a third of the traffic
STREAM_ELEMENTS = 4 << 20
# ... and only rows (or slabs) of this many elements: rows of a few lines ran 2-3x slower
# streamed (likely each row waiting, at some atomic operation between rows, for its lines
# to reach memory); rows of 1024 elements and more ran faster
STREAM_MIN_ROW = 1024


@helper
def strided_start(layout, r):
    """Where row ``r`` starts in a flat array read under ``layout = (per, outer_stride, per_stride)``."""
    per, outer_stride, per_stride = layout
    if per == 1:  # evenly spaced rows: no division per row
        return r * outer_stride
    return (r // per) * outer_stride + (r % per) * per_stride


def row_at(rows, layout, r, n):
    """Row ``r`` (of length ``n``) of ``rows``: a 2-D C-contiguous ``(rows, n)`` array, or a
    flat 1-D array read under ``layout``. Either way a contiguous 1-D slice, so the loops
    over it vectorize. Numba compiles a kernel once per kind of ``rows``; with the 2-D
    kind it is plain ``rows[r]``, with no index arithmetic."""
    if rows.ndim == 2:
        return rows[r]
    start = strided_start(layout, r)
    return rows[start:start + n]


@overload(row_at, jit_options=NUMBA_OPTIONS)
def _row_at_compiled(rows, layout, r, n):
    if rows.ndim == 2:
        return lambda rows, layout, r, n: rows[r]
    return lambda rows, layout, r, n: rows[strided_start(layout, r):strided_start(layout, r) + n]


@inline_helper
def apply_row(x_row, y_row, w_row, b_row, param_inner, hi, lo, rs):
    """``y = ((x − hi) − lo)·rs·w + b`` along one row, in the arithmetic of ``hi``/``lo``/``rs``
    (float32 scalars: float32 SIMD; float64 scalars: float64). ``hi + lo`` is the mean split
    so that ``x − hi`` is exact where x is near the mean: a constant row gives exact zeros
    and a symmetric row an exact zero in the middle, as in float64."""
    n = x_row.shape[0]
    channels = w_row.shape[0]
    inner = param_inner
    repeats = n // (channels * inner)
    # loops index slices from 0: LLVM then knows no index is negative and vectorizes
    if channels == 1 and inner == n:
        # one weight and bias for the whole row (none given): a single flat loop
        w = w_row[0]
        b = b_row[0]
        for j in range(n):
            y_row[j] = ((x_row[j] - hi) - lo) * rs * w + b
    elif inner == 1:
        # per-element parameters: the innermost loop runs along the row
        for a in range(repeats):
            x_seg = x_row[a * channels:(a + 1) * channels]
            y_seg = y_row[a * channels:(a + 1) * channels]
            for c in range(channels):
                y_seg[c] = ((x_seg[c] - hi) - lo) * rs * w_row[c] + b_row[c]
    else:
        for a in range(repeats):
            for c in range(channels):
                w = w_row[c]
                b = b_row[c]
                base = (a * channels + c) * inner
                x_seg = x_row[base:base + inner]
                y_seg = y_row[base:base + inner]
                for s in range(inner):
                    y_seg[s] = ((x_seg[s] - hi) - lo) * rs * w + b


@inline_helper
def line_span(y_row, contiguous):
    """Where the non-temporal lines of a float32 row start and end: (head, body_end) with
    ``y_row[head]`` the first element on a 64-byte boundary and the body a whole number
    of lines; (n, n), nothing streamed, where the row's arrays are not ``contiguous`` or
    the output is not aligned to a float32 (the lines load and store contiguous memory)."""
    n = y_row.shape[0]
    address = data_address(y_row)
    if not contiguous or address % 4 != 0 or y_row.strides[0] != 4:
        return n, n
    head = min(n, ((64 - address % 64) % 64) // 4)
    return head, head + (n - head) // STREAM_LANES * STREAM_LANES


@inline_helper
def scaled_streaming(x_row, y_row, hi, lo, rs, w, b):
    """``y = ((x − hi) − lo)·rs·w + b`` along a float32 row with float32 scalars, the output
    written by non-temporal stores one 64-byte line at a time, the same operations in the
    same order (the same bits); the row's first elements, up to a line boundary, and its
    last, short of a line, are stored as usual. Streamed lines are not ordered with other
    stores: the kernel ends with :func:`store_fence` (once per thread and call), and a
    thread's claim of work done, an atomic read-modify-write, also writes them out before
    it is seen. (``w = 1`` gives ``((x − hi) − lo)·rs + b`` exactly: a product by 1
    rounds nothing.)"""
    n = x_row.shape[0]
    head, body_end = line_span(y_row, x_row.strides[0] == 4)
    for j in range(head):
        y_row[j] = ((x_row[j] - hi) - lo) * rs * w + b
    for j in range(head, body_end, STREAM_LANES):
        stream_scaled_line(x_row, y_row, j, hi, lo, rs, w, b)
    for j in range(body_end, n):
        y_row[j] = ((x_row[j] - hi) - lo) * rs * w + b


@inline_helper
def apply_row_streaming(x_row, y_row, w_row, b_row, param_inner, hi, lo, rs):
    """:func:`apply_row` on float32 with the output written by non-temporal stores, as
    :func:`scaled_streaming` writes it, for a weight and bias per element (layer and RMS
    norm); other rows take :func:`apply_row` (streamed, rows with one weight and bias ran
    0.7-0.9x of plain stores, rows whose parameters repeat within them are group norm's)."""
    n = x_row.shape[0]
    channels = w_row.shape[0]
    if param_inner != 1 or channels != n:  # (one weight for the row: plain stores measured faster)
        apply_row(x_row, y_row, w_row, b_row, param_inner, hi, lo, rs)
        return
    head, body_end = line_span(y_row, x_row.strides[0] == 4 and w_row.strides[0] == 4 and b_row.strides[0] == 4)
    for j in range(head):
        y_row[j] = ((x_row[j] - hi) - lo) * rs * w_row[j] + b_row[j]
    for j in range(head, body_end, STREAM_LANES):
        stream_affine_line(x_row, y_row, w_row, b_row, j, hi, lo, rs)
    for j in range(body_end, n):
        y_row[j] = ((x_row[j] - hi) - lo) * rs * w_row[j] + b_row[j]


def streamed_scale_shift(x_row, y_row, hi, lo, scale, shift):
    """``y = ((x − hi) − lo)·scale + shift`` along a row with scalar operands (batch norm's
    folded tables, one channel's slab), by :func:`scaled_streaming` (times a weight of 1,
    which rounds nothing) for float32, as a plain loop for other dtypes."""
    for j in range(x_row.shape[0]):
        y_row[j] = ((x_row[j] - hi) - lo) * scale + shift


@overload(streamed_scale_shift, jit_options=NUMBA_OPTIONS)
def _streamed_scale_shift_compiled(x_row, y_row, hi, lo, scale, shift):
    if all_float32(x_row.dtype, y_row.dtype, hi, lo, scale, shift):
        def streamed(x_row, y_row, hi, lo, scale, shift):
            scaled_streaming(x_row, y_row, hi, lo, scale, np.float32(1.0), shift)
        return streamed
    return streamed_scale_shift


@kernel
def row_forward32(x, x_layout, y, y_layout, n, weight, bias, param_row_stride, param_inner, rms, eps, stats_given,
                  mean, var, rstd):
    """:func:`row_forward` for float32 rows, with float32 parameter tables: one float64
    pass for the statistics, then the output in float32 SIMD arithmetic.

    Statistics: d = x − x[0] is exact in float64, so Σd (hence the mean, and an exact
    middle of a symmetric row) is as in :func:`group_stats`; the variance is
    Σd²/n − (Σd/n)², whose cancellation is at most a factor 1 + n (see
    ``sums.shifted_moments``); past CANCELLATION the row takes the two-pass variance.
    Output: ``((x − hi) − lo)·rstd·w + b`` in float32 with the mean split as
    ``hi = float32(mean)``, ``lo = float32(mean − hi)``: where x is near the mean,
    ``x − hi`` is exact, so constant rows give exact zeros (exactly the bias) and
    symmetric rows an exact zero in the middle. A row whose rstd leaves
    (RSTD_LOW, RSTD_HIGH), where float32 products could underflow, is applied in float64.
    """
    rows = mean.shape[0]
    groups = weight.shape[0]
    streaming = rows * n >= STREAM_ELEMENTS and n >= STREAM_MIN_ROW
    for r in prange(rows):
        x_row = row_at(x, x_layout, r, n)
        y_row = row_at(y, y_layout, r, n)
        if stats_given:
            m = mean[r]
            rs = rstd[r]
        else:
            if rms:
                m = 0.0
                row_var = square_sum(x_row) / n
            else:
                shift = np.float64(x_row[0])
                sum_d, sum_d2 = shifted_moments(x_row, shift)
                mean_shifted = sum_d / n
                mean_square = sum_d2 / n
                row_var = max(mean_square - mean_shifted * mean_shifted, 0.0)
                if mean_square > CANCELLATION * row_var:
                    row_var = centered_square_sum(x_row, shift, mean_shifted) / n
                m = shift + mean_shifted
            rs = reciprocal_std(row_var, eps)
            mean[r] = m
            var[r] = row_var
            rstd[r] = rs
        g = 0 if groups == 1 else (r // param_row_stride) % groups  # (an integer division costs)
        if RSTD_LOW < rs < RSTD_HIGH:
            hi = np.float32(m)
            if streaming:
                apply_row_streaming(x_row, y_row, weight[g], bias[g], param_inner, hi, np.float32(m - hi),
                                    np.float32(rs))
            else:
                apply_row(x_row, y_row, weight[g], bias[g], param_inner, hi, np.float32(m - hi), np.float32(rs))
        else:
            apply_row(x_row, y_row, weight[g], bias[g], param_inner, m, 0.0, rs)
    if streaming:
        store_fence()  # (see scaled_streaming)


@kernel
def row_forward(x, x_layout, y, y_layout, n, weight, bias, param_row_stride, param_inner, rms, eps, stats_given,
                mean, var, rstd):
    """Twin of ``reference.forward`` (``compute_stats`` then ``apply_stats``) on (rows, n).

    Writes ``y`` and, unless ``stats_given``, the per-row ``mean``, ``var`` and ``rstd``
    (float64, length rows; ``mean`` is 0 for RMS). With ``stats_given`` it reads ``mean``
    and ``rstd`` instead, as batch norm does in evaluation.
    """
    rows = mean.shape[0]
    groups = weight.shape[0]
    for r in prange(rows):
        x_row = row_at(x, x_layout, r, n)
        y_row = row_at(y, y_layout, r, n)
        if stats_given:
            m = mean[r]
            rs = rstd[r]
        else:
            # applied from the locals, never read back: a caller may pass statistics arrays
            # that another thread's call writes at the same time (FastForward.scratch)
            m, row_var, rs = group_stats(x_row, rms, eps)
            mean[r] = m
            var[r] = row_var
            rstd[r] = rs
        g = 0 if groups == 1 else (r // param_row_stride) % groups  # (an integer division costs)
        apply_row(x_row, y_row, weight[g], bias[g], param_inner, m, 0.0, rs)


@kernel
def row_backward(grad_y, grad_y_layout, x, x_layout, n, weight, param_row_stride, param_inner, rms, eps, stats_given,
                 mean, rstd, chunk_rows, grad_x, grad_x_layout, grad_weight_parts, grad_bias_parts):
    """Twin of ``reference.backward`` on (rows, n): ``grad_x`` for every row, and the
    weight and bias gradients summed per chunk of ``chunk_rows`` rows into
    ``grad_weight_parts[k]`` / ``grad_bias_parts[k]`` (zeroed by the caller, which adds
    the chunks in order). Unless ``stats_given`` it recomputes ``mean``/``rstd`` per row.

    Two passes over each cache-resident row: the sums Σg·w and Σg·w·x̂, then grad_x.
    """
    rows = mean.shape[0]
    groups = weight.shape[0]
    channels = weight.shape[1]
    inner = param_inner
    repeats = n // (channels * inner)
    for k in prange(grad_weight_parts.shape[0]):
        part_w = grad_weight_parts[k]
        part_b = grad_bias_parts[k]
        for r in range(k * chunk_rows, min(rows, (k + 1) * chunk_rows)):
            x_row = row_at(x, x_layout, r, n)
            g_row = row_at(grad_y, grad_y_layout, r, n)
            gx_row = row_at(grad_x, grad_x_layout, r, n)
            if r + 1 < rows:
                prefetch(row_at(x, x_layout, r + 1, n))
                prefetch(row_at(grad_y, grad_y_layout, r + 1, n))
            if not stats_given:
                row_mean, row_var, row_rstd = group_stats(x_row, rms, eps)
                mean[r] = row_mean
                rstd[r] = row_rstd
            m = mean[r]
            rs = rstd[r]
            g = 0 if groups == 1 else (r // param_row_stride) % groups  # (an integer division costs)
            w_row = weight[g]
            sum_gw = 0.0  # Σ g·w
            sum_gw_dev = 0.0  # Σ g·w·(x − mean)
            if inner == 1:
                for a in range(repeats):
                    base = a * channels
                    sg, sgd = weighted_gradient_sums(g_row[base:base + channels], x_row[base:base + channels],
                                                     w_row, m)
                    sum_gw += sg
                    sum_gw_dev += sgd
            else:
                for a in range(repeats):
                    for c in range(channels):
                        base = (a * channels + c) * inner
                        sg, sgd = gradient_sums(g_row[base:base + inner], x_row[base:base + inner], m)
                        sum_gw += w_row[c] * sg
                        sum_gw_dev += w_row[c] * sgd
                        part_w[g, c] += sgd * rs
                        part_b[g, c] += sg
            proj = sum_gw_dev * rs / n
            mean_gw = 0.0 if rms else sum_gw / n
            if inner == 1:
                part_w_row = part_w[g]
                part_b_row = part_b[g]
                for a in range(repeats):
                    x_seg = x_row[a * channels:(a + 1) * channels]
                    g_seg = g_row[a * channels:(a + 1) * channels]
                    gx_seg = gx_row[a * channels:(a + 1) * channels]
                    for c in range(channels):
                        gy = np.float64(g_seg[c])
                        x_hat = (x_seg[c] - m) * rs
                        gx_seg[c] = ((gy * w_row[c] - x_hat * proj) - mean_gw) * rs
                        part_w_row[c] += gy * x_hat
                        part_b_row[c] += gy
            else:
                for a in range(repeats):
                    for c in range(channels):
                        w = w_row[c]
                        base = (a * channels + c) * inner
                        x_seg = x_row[base:base + inner]
                        g_seg = g_row[base:base + inner]
                        gx_seg = gx_row[base:base + inner]
                        for s in range(inner):
                            x_hat = (x_seg[s] - m) * rs
                            gx_seg[s] = ((g_seg[s] * w - x_hat * proj) - mean_gw) * rs
