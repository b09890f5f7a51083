"""Channels-last kernels for masks and segments: the ``I == 1`` case of
:mod:`normlab.kernels.segments`, on an ``(A, O, C)`` view (PyG's ``"[n] c"``, masked
``"[b t] c"``). Twin: :mod:`normlab.masked`.

A unit is one segment of one block of up to :data:`BLOCK` channels; its rows are walked
with the block's accumulators side by side, so every inner loop runs along contiguous
channels and vectorizes. Units are taken in fixed chunks (scratch allocated once per
chunk); each unit is computed by one thread from start to end, so the bits do not depend
on the number of threads. An element that does not count is skipped by a select.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.kernels._jit import helper, kernel
from normlab.kernels.sums import reciprocal_std

BLOCK = 64  # channels per unit: four cache lines of float32 per row


@helper
def _unit(unit, segments, blocks, block, channels, offsets):
    """(a, c0, width, start, stop, base): the unit's place; ``base`` its flat statistics index."""
    a = unit // (segments * blocks)
    s = (unit // blocks) % segments
    c0 = (unit % blocks) * block
    return a, c0, min(block, channels - c0), offsets[s], offsets[s + 1], (a * segments + s) * channels + c0


@helper
def _shifts(x, mask, has_mask, a, c0, width, start, stop, shift):
    """The first counted value of each channel of the block (0 where none counts)."""
    shift[:width] = 0.0
    if not has_mask:
        if stop > start:
            for j in range(width):
                shift[j] = x[a, start, c0 + j]
        return
    remaining = width
    found = np.zeros(width, np.bool_)
    for o in range(start, stop):
        counted = mask[a, o]
        for j in range(width):
            if not found[j] and counted[c0 + j]:
                shift[j] = x[a, o, c0 + j]
                found[j] = True
                remaining -= 1
        if remaining == 0:
            return


@kernel
def last_stats(x, mask, has_mask, offsets, rms, eps, block, chunk_units, mean, var, rstd, count):
    """Per-group statistics of an (A, O, C) view into the flat (A, S, C) arrays."""
    outer_a = x.shape[0]
    channels = x.shape[2]
    segments = offsets.shape[0] - 1
    blocks = (channels + block - 1) // block
    units = outer_a * segments * blocks
    chunks = (units + chunk_units - 1) // chunk_units
    for k in prange(chunks):
        shift = np.zeros(block)
        total = np.zeros(block)
        counts = np.zeros(block, np.int64)
        m2 = np.zeros(block)
        for unit in range(k * chunk_units, min(units, (k + 1) * chunk_units)):
            a, c0, width, start, stop, base = _unit(unit, segments, blocks, block, channels, offsets)
            total[:] = 0.0
            counts[:] = 0
            m2[:] = 0.0
            if not rms:
                _shifts(x, mask, has_mask, a, c0, width, start, stop, shift)
            for o in range(start, stop):
                row = x[a, o, c0:c0 + width]
                if has_mask:
                    counted = mask[a, o, c0:c0 + width]
                    for j in range(width):
                        v = np.float64(row[j])
                        d = v * v if rms else v - shift[j]
                        total[j] += d if counted[j] else 0.0
                        counts[j] += 1 if counted[j] else 0
                elif rms:
                    for j in range(width):
                        v = np.float64(row[j])
                        total[j] += v * v
                else:
                    for j in range(width):
                        total[j] += row[j] - shift[j]
            if not has_mask:
                counts[:width] = stop - start
            if not rms:
                for j in range(width):
                    total[j] = total[j] / counts[j] if counts[j] > 0 else 0.0
                for o in range(start, stop):
                    row = x[a, o, c0:c0 + width]
                    if has_mask:
                        counted = mask[a, o, c0:c0 + width]
                        for j in range(width):
                            d = (row[j] - shift[j]) - total[j]
                            m2[j] += d * d if counted[j] else 0.0
                    else:
                        for j in range(width):
                            d = (row[j] - shift[j]) - total[j]
                            m2[j] += d * d
            for j in range(width):
                n = counts[j]
                count[base + j] = n
                if n == 0:
                    mean[base + j] = 0.0
                    var[base + j] = 0.0
                    rstd[base + j] = 0.0
                else:
                    group_var = total[j] / n if rms else m2[j] / n
                    mean[base + j] = 0.0 if rms else shift[j] + total[j]
                    var[base + j] = group_var
                    rstd[base + j] = reciprocal_std(group_var, eps)


@helper
def _unit_params(a, c0, width, base, channels, row_stride, weight, bias, mean, rstd, m, rs, w, b, live):
    groups = weight.shape[0]
    for j in range(width):
        p = ((a * channels + c0 + j) // row_stride) % groups
        m[j] = mean[base + j]
        rs[j] = rstd[base + j]
        w[j] = weight[p, 0]
        b[j] = bias[p, 0]
        live[j] = rs[j] != 0.0


@kernel
def last_apply(x, offsets, weight, bias, row_stride, block, chunk_units, mean, rstd, y):
    """``y = (x − mean)·rstd·w + b`` on an (A, O, C) view, exactly ``b`` where rstd is 0."""
    outer_a = x.shape[0]
    channels = x.shape[2]
    segments = offsets.shape[0] - 1
    blocks = (channels + block - 1) // block
    units = outer_a * segments * blocks
    chunks = (units + chunk_units - 1) // chunk_units
    for k in prange(chunks):
        m = np.zeros(block)
        rs = np.zeros(block)
        w = np.zeros(block)
        b = np.zeros(block)
        live = np.zeros(block, np.bool_)
        for unit in range(k * chunk_units, min(units, (k + 1) * chunk_units)):
            a, c0, width, start, stop, base = _unit(unit, segments, blocks, block, channels, offsets)
            _unit_params(a, c0, width, base, channels, row_stride, weight, bias, mean, rstd, m, rs, w, b, live)
            for o in range(start, stop):
                x_row = x[a, o, c0:c0 + width]
                y_row = y[a, o, c0:c0 + width]
                for j in range(width):
                    v = (x_row[j] - m[j]) * rs[j] * w[j] + b[j]
                    y_row[j] = v if live[j] else b[j]


@kernel
def last_backward(grad_y, x, mask, has_mask, offsets, weight, row_stride, rms, mean, rstd, block, chunk_units,
                  grad_x, weight_parts, bias_parts):
    """Twin of ``masked.backward`` on an (A, O, C) view; parameter gradients per chunk
    into ``*_parts`` (chunks, groups, 1), zeroed by the caller."""
    outer_a = x.shape[0]
    channels = x.shape[2]
    segments = offsets.shape[0] - 1
    blocks = (channels + block - 1) // block
    units = outer_a * segments * blocks
    chunks = weight_parts.shape[0]
    for k in prange(chunks):
        w_part = weight_parts[k]
        b_part = bias_parts[k]
        m = np.zeros(block)
        rs = np.zeros(block)
        w = np.zeros(block)
        unused = np.zeros(block)
        live = np.zeros(block, np.bool_)
        sum_gw = np.zeros(block)
        sum_gw_xhat = np.zeros(block)
        sum_g = np.zeros(block)
        sum_g_xhat = np.zeros(block)
        counts = np.zeros(block, np.int64)
        proj = np.zeros(block)
        mean_gw = np.zeros(block)
        for unit in range(k * chunk_units, min(units, (k + 1) * chunk_units)):
            a, c0, width, start, stop, base = _unit(unit, segments, blocks, block, channels, offsets)
            _unit_params(a, c0, width, base, channels, row_stride, weight, weight, mean, rstd, m, rs, w, unused,
                         live)
            sum_gw[:] = 0.0
            sum_gw_xhat[:] = 0.0
            sum_g[:] = 0.0
            sum_g_xhat[:] = 0.0
            counts[:] = 0
            for o in range(start, stop):
                g_row = grad_y[a, o, c0:c0 + width]
                x_row = x[a, o, c0:c0 + width]
                if has_mask:
                    counted = mask[a, o, c0:c0 + width]
                    for j in range(width):
                        g = np.float64(g_row[j])
                        x_hat = (x_row[j] - m[j]) * rs[j]
                        x_hat = x_hat if live[j] else 0.0
                        sum_g[j] += g
                        # an uncounted NaN or Inf (garbage in the padding) adds nothing: 0·NaN is NaN
                        sum_g_xhat[j] += g * x_hat if counted[j] or np.isfinite(x_hat) else 0.0
                        counts[j] += 1 if counted[j] else 0
                else:
                    for j in range(width):
                        g = np.float64(g_row[j])
                        x_hat = (x_row[j] - m[j]) * rs[j]
                        x_hat = x_hat if live[j] else 0.0
                        sum_g[j] += g
                        sum_g_xhat[j] += g * x_hat
            if not has_mask:
                counts[:width] = stop - start
            for j in range(width):
                n = counts[j]
                sum_gw[j] = sum_g[j] * w[j]
                sum_gw_xhat[j] = sum_g_xhat[j] * w[j]
                proj[j] = sum_gw_xhat[j] / n if n > 0 else 0.0
                mean_gw[j] = 0.0 if rms or n == 0 else sum_gw[j] / n
                p = ((a * channels + c0 + j) // row_stride) % weight.shape[0]
                w_part[p, 0] += sum_g_xhat[j]
                b_part[p, 0] += sum_g[j]
            for o in range(start, stop):
                g_row = grad_y[a, o, c0:c0 + width]
                x_row = x[a, o, c0:c0 + width]
                gx_row = grad_x[a, o, c0:c0 + width]
                if has_mask:
                    counted = mask[a, o, c0:c0 + width]
                    for j in range(width):
                        x_hat = (x_row[j] - m[j]) * rs[j]
                        x_hat = x_hat if live[j] else 0.0
                        gw = g_row[j] * w[j]
                        full = ((gw - x_hat * proj[j]) - mean_gw[j]) * rs[j]
                        gx_row[j] = full if counted[j] else gw * rs[j]
                else:
                    for j in range(width):
                        x_hat = (x_row[j] - m[j]) * rs[j]
                        x_hat = x_hat if live[j] else 0.0
                        gw = g_row[j] * w[j]
                        gx_row[j] = ((gw - x_hat * proj[j]) - mean_gw[j]) * rs[j]
