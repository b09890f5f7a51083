"""Kernels for masks and segments: groups decided by data. Twin: :mod:`normlab.masked`.

Every masked or segmented pattern is laid out as an ``(A, O, C, I)`` view: ``A`` and
``C`` kept, ``O`` and ``I`` reduced, and segments cut ``O`` into runs of rows given by
``offsets`` (one segment spanning ``O`` without ids). A group is one ``(a, segment, c)``:
batch norm is ``(1, outer, C, inner)``, layer norm ``(rows, 1, 1, n)``, PyG's per-graph
instance norm ``(1, nodes, C, 1)`` with the batch vector's offsets, its graph-mode layer
norm ``(1, nodes, 1, C)``.

A *unit* of work is one group and its rows of ``I`` contiguous values; ``I == 1``
(channels last) has its own kernels in :mod:`normlab.kernels.segments_last`. Each
unit is computed by one thread from start to end, so the bits do not depend on the
number of threads; parameter gradients are summed per fixed chunk of units and the chunks
merged in index order. Statistics shift by the group's first counted element, then take
the two-pass variance over counted elements, in float64; an element that does not count
is skipped by a select, never multiplied by 0 (so a NaN there stays out of the sums).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.kernels._jit import helper, kernel, reduction
from normlab.kernels.sums import centered_square_sum as _centered_square_sum
from normlab.kernels.sums import reciprocal_std
from normlab.kernels.sums import shifted_sum as _shifted_sum
from normlab.kernels.sums import square_sum as _square_sum


@reduction
def _masked_shifted_sum(values, counted, shift):
    total = 0.0
    count = 0
    for i in range(values.shape[0]):
        d = values[i] - shift
        total += d if counted[i] else 0.0
        count += 1 if counted[i] else 0
    return total, count


@reduction
def _masked_centered_square_sum(values, counted, shift, center):
    total = 0.0
    for i in range(values.shape[0]):
        d = (values[i] - shift) - center
        total += d * d if counted[i] else 0.0
    return total


@reduction
def _masked_square_sum(values, counted):
    total = 0.0
    count = 0
    for i in range(values.shape[0]):
        v = np.float64(values[i])
        total += v * v if counted[i] else 0.0
        count += 1 if counted[i] else 0
    return total, count


@helper
def _first_counted(x, mask, has_mask, a, c, start, stop):
    """The group's first counted value (the shift) and whether there is one."""
    for o in range(start, stop):
        if not has_mask:
            return np.float64(x[a, o, c, 0]), True
        row = mask[a, o, c]
        for i in range(row.shape[0]):
            if row[i]:
                return np.float64(x[a, o, c, i]), True
    return 0.0, False


@helper
def _inner_stats(x, mask, has_mask, rms, eps, a, c, start, stop):
    """(mean, var, rstd, count) of the group of rows start..stop of channel c (I > 1)."""
    inner = x.shape[3]
    if rms:
        total = 0.0
        count = 0
        for o in range(start, stop):
            if has_mask:
                s, k = _masked_square_sum(x[a, o, c], mask[a, o, c])
                total += s
                count += k
            else:
                total += _square_sum(x[a, o, c])
                count += inner
        if count == 0:
            return 0.0, 0.0, 0.0, 0
        var = total / count
        return 0.0, var, reciprocal_std(var, eps), count
    shift, found = _first_counted(x, mask, has_mask, a, c, start, stop)
    if not found:
        return 0.0, 0.0, 0.0, 0
    total = 0.0
    count = 0
    for o in range(start, stop):
        if has_mask:
            s, k = _masked_shifted_sum(x[a, o, c], mask[a, o, c], shift)
            total += s
            count += k
        else:
            total += _shifted_sum(x[a, o, c], shift)
            count += inner
    center = total / count
    m2 = 0.0
    for o in range(start, stop):
        if has_mask:
            m2 += _masked_centered_square_sum(x[a, o, c], mask[a, o, c], shift, center)
        else:
            m2 += _centered_square_sum(x[a, o, c], shift, center)
    var = m2 / count
    return shift + center, var, reciprocal_std(var, eps), count


@kernel
def inner_stats(x, mask, has_mask, offsets, rms, eps, mean, var, rstd, count):
    """Groups with ``I > 1``: per-group statistics into the flat (A, S, C) arrays."""
    outer_a = x.shape[0]
    channels = x.shape[2]
    segments = offsets.shape[0] - 1
    for unit in prange(outer_a * segments * channels):
        a = unit // (segments * channels)
        s = (unit // channels) % segments
        c = unit % channels
        group_mean, group_var, group_rstd, group_count = _inner_stats(x, mask, has_mask, rms, eps, a, c,
                                                                      offsets[s], offsets[s + 1])
        mean[unit] = group_mean
        var[unit] = group_var
        rstd[unit] = group_rstd
        count[unit] = group_count


@kernel
def inner_apply(x, offsets, weight, bias, row_stride, mean, rstd, y):
    """Groups with ``I > 1``: ``y = (x − mean)·rstd·w + b``, exactly ``b`` where rstd is 0.
    ``weight``/``bias`` are (groups, 1) or (groups, I) float64 tables, row
    ``(a·C + c) // row_stride % groups``."""
    outer_a = x.shape[0]
    channels = x.shape[2]
    segments = offsets.shape[0] - 1
    groups = weight.shape[0]
    wide = weight.shape[1] > 1
    for unit in prange(outer_a * segments * channels):
        a = unit // (segments * channels)
        s = (unit // channels) % segments
        c = unit % channels
        _apply_rows(x, y, weight, bias, wide, a, c, ((a * channels + c) // row_stride) % groups, offsets[s],
                    offsets[s + 1], mean[unit], rstd[unit])


@helper
def _apply_rows(x, y, weight, bias, wide, a, c, p, start, stop, m, rs):
    inner = x.shape[3]
    w_row = weight[p]
    b_row = bias[p]
    for o in range(start, stop):
        x_row = x[a, o, c]
        y_row = y[a, o, c]
        if rs == 0.0:  # no counted element: exactly bias
            for i in range(inner):
                y_row[i] = b_row[i] if wide else b_row[0]
        elif wide:
            for i in range(inner):
                y_row[i] = (x_row[i] - m) * rs * w_row[i] + b_row[i]
        else:
            w = w_row[0]
            b = b_row[0]
            for i in range(inner):
                y_row[i] = (x_row[i] - m) * rs * w + b


@kernel
def inner_backward(grad_y, x, mask, has_mask, offsets, weight, row_stride, rms, mean, rstd, chunk_units,
                   grad_x, weight_parts, bias_parts):
    """Twin of ``masked.backward`` for ``I > 1``: per group, Σ g·w and Σ g·w·x̂ over every
    element and the count, then ``grad_x``; parameter gradients per chunk of units into
    ``*_parts`` (chunks, groups, 1 or I), zeroed by the caller."""
    outer_a = x.shape[0]
    channels = x.shape[2]
    segments = offsets.shape[0] - 1
    groups = weight.shape[0]
    wide = weight.shape[1] > 1
    units = outer_a * segments * channels
    chunks = weight_parts.shape[0]
    for k in prange(chunks):
        for unit in range(k * chunk_units, min(units, (k + 1) * chunk_units)):
            a = unit // (segments * channels)
            s = (unit // channels) % segments
            c = unit % channels
            p = ((a * channels + c) // row_stride) % groups
            _inner_backward_unit(grad_y, x, mask, has_mask, weight[p], wide, rms, mean[unit], rstd[unit], a, c,
                                 offsets[s], offsets[s + 1], grad_x, weight_parts[k, p], bias_parts[k, p])


@helper
def _inner_backward_unit(grad_y, x, mask, has_mask, w_row, wide, rms, m, rs, a, c, start, stop, grad_x, w_part,
                         b_part):
    inner = x.shape[3]
    live = rs != 0.0  # a group with nothing counted: x̂ = 0, output = bias, no x-gradient
    sum_g = 0.0
    sum_g_xhat = 0.0
    sum_gw = 0.0
    sum_gw_xhat = 0.0
    n = 0
    for o in range(start, stop):
        g_row = grad_y[a, o, c]
        x_row = x[a, o, c]
        if wide:
            for i in range(inner):
                g = np.float64(g_row[i])
                x_hat = (x_row[i] - m) * rs if live else 0.0
                if has_mask and not mask[a, o, c][i] and not np.isfinite(x_hat):
                    x_hat = 0.0  # (see _masked_gradient_sums)
                gw = g * w_row[i]
                sum_gw += gw
                sum_gw_xhat += gw * x_hat
                w_part[i] += g * x_hat
                b_part[i] += g
        else:
            if has_mask:
                sg, sgx = _masked_gradient_sums(g_row, x_row, mask[a, o, c], m, rs, live)
            else:
                sg, sgx = _gradient_sums(g_row, x_row, m, rs, live)
            sum_g += sg
            sum_g_xhat += sgx
        if has_mask:
            n += _count(mask[a, o, c])
        else:
            n += inner
    if not wide:
        sum_gw = sum_g * w_row[0]
        sum_gw_xhat = sum_g_xhat * w_row[0]
        w_part[0] += sum_g_xhat
        b_part[0] += sum_g
    proj = sum_gw_xhat / n if n > 0 else 0.0
    mean_gw = 0.0 if rms or n == 0 else sum_gw / n
    for o in range(start, stop):
        g_row = grad_y[a, o, c]
        x_row = x[a, o, c]
        gx_row = grad_x[a, o, c]
        if not live:
            for i in range(inner):
                gx_row[i] = 0.0
        elif has_mask:
            counted = mask[a, o, c]
            for i in range(inner):
                x_hat = (x_row[i] - m) * rs
                gw = g_row[i] * (w_row[i] if wide else w_row[0])
                full = ((gw - x_hat * proj) - mean_gw) * rs
                gx_row[i] = full if counted[i] else gw * rs
        else:
            for i in range(inner):
                x_hat = (x_row[i] - m) * rs
                gw = g_row[i] * (w_row[i] if wide else w_row[0])
                gx_row[i] = ((gw - x_hat * proj) - mean_gw) * rs


@reduction
def _gradient_sums(grad, values, m, rs, live):
    """(Σ g, Σ g·x̂) over one row, x̂ = 0 when the group is not live."""
    sum_g = 0.0
    sum_g_xhat = 0.0
    for i in range(values.shape[0]):
        g = np.float64(grad[i])
        x_hat = (values[i] - m) * rs if live else 0.0
        sum_g += g
        sum_g_xhat += g * x_hat
    return sum_g, sum_g_xhat


@reduction
def _masked_gradient_sums(grad, values, counted, m, rs, live):
    """As :func:`_gradient_sums`, but an uncounted x̂ that is NaN or ±Inf (garbage in the
    padding) adds nothing: its g·x̂ would be NaN even where g is 0, and poison the group."""
    sum_g = 0.0
    sum_g_xhat = 0.0
    for i in range(values.shape[0]):
        g = np.float64(grad[i])
        x_hat = (values[i] - m) * rs if live else 0.0
        sum_g += g
        sum_g_xhat += g * x_hat if counted[i] or np.isfinite(x_hat) else 0.0
    return sum_g, sum_g_xhat


@reduction
def _count(counted):
    n = 0
    for i in range(counted.shape[0]):
        n += 1 if counted[i] else 0
    return n
