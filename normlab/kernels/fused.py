"""Fused row kernels: residual add, gate, modulation and weight offset around a row norm.

Twin of :mod:`normlab.fused` (the formulas live in its docstring). As flash-attention's
layer norm does, one forward and one backward take every option as an argument instead
of a kernel per combination: absent inputs are 1×1 placeholders behind a flag, absent
parameters are tables of ones and zeros (``v·1`` and ``v + 0`` are exact).

Each row (one group, ``n`` contiguous elements) is read once from memory: the forward
forms ``s = x + r`` (written out, the residual stream), gates it when the gate comes
first into a float64 row buffer that stays in cache, takes the shifted two-pass
statistics of it and writes ``y``; the backward reads ``x``, ``r``, ``z`` and ``∂y``
once, keeps ``γ`` in a cache-resident row buffer between its two passes and writes
``∂x`` and ``∂z``; with no residual and no gate it reads the rows where they lie in each
pass, and on float32 and bfloat16 rows with no residual (and no gelu gate) it computes
in float32 (:func:`direct_row_backward32`). Parameter gradients are summed per chunk of rows (fixed by index)
and the chunks added in order, so every thread count gives the same bits.

Parameters are float64 tables ``(groups, n)``: row ``r`` uses group
``(r // row_stride) % groups``. That covers weights over the reduced axes (one group),
per-group weights of gated group norm (``"(g c)"`` on ``"... (g [c])"``) and per-sample
modulation (``"b d"`` on ``"b t [d]"``). Layouts that repeat within a row at a stride
(spatial group norm with per-channel weights) go to the reference.
"""

from __future__ import annotations

import types

import numpy as np
from numba import prange

import normlab.kernels as _kernels
from normlab.kernels import pool, threads
from normlab.kernels._jit import helper, kernel, prefetch, reduction
from normlab.kernels.gates import (gelu_gate, gelu_gate_derivative, logistic_gate, logistic_gate32,
                                   logistic_gate_derivative, logistic_gate_derivative32)
from normlab.kernels.rows import RSTD_HIGH, RSTD_LOW
from normlab.kernels.rows_backward import BLOCK, FLUSH_ROWS
from normlab.kernels.sums import group_stats

GATE_NONE, GATE_FIRST, GATE_LAST = 0, 1, 2
# which parameters a call has (``steps``, the fifth of Layout.tables), as bits of one int
# (an OpenMP region's packed arguments take no tuples)
STEP_WEIGHT, STEP_SCALE, STEP_SHIFT, STEP_BIAS = 1, 2, 4, 8
ACTIVATION_CODES = {"silu": 0, "sigmoid": 1, "gelu": 2}
# rows the backward takes at once into the parameter sums: 2 ran the backward kernel
# 1.15-1.3x faster in cache (AdaLN-Zero float32 and add + RMS bfloat16 rows, 2-core AMD
# EPYC), 4 only 1.1x (the loop's live values outgrow the registers)
PAIR = 2
# the float32 backward's bounds (direct_row_backward32): parameter tables below TABLE_LIMIT and
# gradients below GRADIENT_LIMIT keep every float32 product and block sum below float32's
# maximum (γ < 1e32; a block's Σγ·x̂ < 1024·1e32·256 for rows up to 65536, |x̂| ≤ √n)
TABLE_LIMIT = 1e4
GRADIENT_LIMIT = 1e24
# weight rows the float32 backward gathers sums for, each chunk two float32 rows apiece (gated
# norms' groups; more, as per-sample weights of a large batch, take the float64 kernel)
ACCUMULATED_WEIGHT_ROWS = 64
# The kernels call the helpers below by these global names; each kernel is built once per
# family of helpers (see _variant): the gate's (float64, float32 or gelu's library erf, so
# that no loop branches between a library call and a vector exp), and the element type's
# (float rows here; bfloat16 rows and their casting recipes in normlab.kernels.fused_half).
gate_value = logistic_gate
gate_derivative = logistic_gate_derivative


@helper
def load(value):
    """An element of a row, as float64."""
    return np.float64(value)


@helper
def load32(value):
    """An element of a row, as float32 (the float32 backward's arithmetic)."""
    return np.float32(value)


@helper
def store(value):
    """A float64 result as an output element (the row's dtype rounds it on assignment)."""
    return value


@helper
def add(a, b):
    """The residual stream's element ``x + r``, in the rows' dtype."""
    return a + b


@helper
def stage(source, h):
    """The row the statistics read: float rows are read where they lie."""
    return source


@helper
def gated(value):
    """The product of a gate that comes first."""
    return value


@helper
def finish(normalized, w, scale, shift, b):
    """The epilogue ``x̂·w·(1 + scale) + shift + b`` (the tables hold ``w + o`` and
    ``1 + scale``) of one element."""
    return ((normalized * w) * scale + shift) + b


@helper
def weigh(normalized, w):
    """:func:`finish` with a weight alone (``v·1`` and ``v + 0`` are exact)."""
    return normalized * w


@helper
def gate_applied(value, phi):
    """The output of a gate after the norm."""
    return value * phi


@helper
def gate_used(phi):
    """The gate's value as the backward multiplies by it."""
    return phi


@reduction
def gamma_sums(gamma, h, center, rstd):
    """(Σ γ, Σ γ·(h − center)·rstd): the two sums of the norm's backward for one row."""
    sum_gamma = 0.0
    sum_gamma_hat = 0.0
    for i in range(gamma.shape[0]):
        c = gamma[i]
        sum_gamma += c
        sum_gamma_hat += c * ((h[i] - center) * rstd)
    return sum_gamma, sum_gamma_hat


@reduction
def direct_gamma_sums(grad, x, w, scale, center, rstd):
    """:func:`gamma_sums` of a row with no residual and no gate, from the rows themselves:
    ``γ = g·w·(1 + scale)``, ``ĥ = (x − center)·rstd``."""
    sum_gamma = 0.0
    sum_gamma_hat = 0.0
    for i in range(x.shape[0]):
        c = (load(grad[i]) * w[i]) * scale[i]
        sum_gamma += c
        sum_gamma_hat += c * ((load(x[i]) - center) * rstd)
    return sum_gamma, sum_gamma_hat


@kernel
def fused_row_forward(x, residual, has_residual, gate, gate_mode, code, weight, bias, row_stride, mod_scale,
                      mod_shift, mod_stride, steps, rms, eps, stats_given, chunk_rows, mean, var, rstd, y, total):
    """Twin of ``normlab.fused.reference_forward`` on (rows, n). ``weight`` holds ``w + o``
    and ``mod_scale`` holds ``1 + scale``. Writes ``y``, ``total`` (= x + r, when
    ``has_residual``) and, unless ``stats_given``, the row statistics. ``steps`` (the
    ``STEP_*`` bits of the parameters present) picks a shorter loop for a weight alone."""
    rows = x.shape[0]
    n = x.shape[1]
    chunks = (rows + chunk_rows - 1) // chunk_rows
    for k in prange(chunks):
        h = np.empty(n)  # the row as the statistics see it, float64, cache-resident
        for r in range(k * chunk_rows, min(rows, (k + 1) * chunk_rows)):
            x_row = x[r]
            if r + 1 < rows:
                prefetch(x[r + 1])
            if has_residual:
                r_row = residual[r]
                raw = total[r]
                for j in range(n):
                    raw[j] = add(x_row[j], r_row[j])
            else:
                raw = x_row
            source = stage(raw, h)
            if gate_mode == GATE_FIRST:
                z_row = gate[r]
                for j in range(n):
                    # (from the row itself: reading the staged bfloat16 row, the buffer this loop
                    # writes, kept the loop from vectorizing, 5x slower)
                    h[j] = gated(load(raw[j]) * gate_value(load(z_row[j]), code))
                row_mean, row_var, row_rstd = group_stats(h, rms, eps)
            else:
                row_mean, row_var, row_rstd = group_stats(source, rms, eps)
            if not stats_given:
                mean[r] = row_mean
                var[r] = row_var
                rstd[r] = row_rstd
            m = mean[r]
            rs = rstd[r]
            w_row = weight[(r // row_stride) % weight.shape[0]]
            b_row = bias[(r // row_stride) % bias.shape[0]]
            sc_row = mod_scale[(r // mod_stride) % mod_scale.shape[0]]
            sh_row = mod_shift[(r // mod_stride) % mod_shift.shape[0]]
            y_row = y[r]
            if gate_mode == GATE_FIRST and steps == STEP_WEIGHT:  # (the gated row is h, float64)
                for j in range(n):
                    y_row[j] = store(weigh((h[j] - m) * rs, w_row[j]))
            elif gate_mode == GATE_FIRST:
                for j in range(n):
                    y_row[j] = store(finish((h[j] - m) * rs, w_row[j], sc_row[j], sh_row[j], b_row[j]))
            elif gate_mode == GATE_LAST:
                z_row = gate[r]
                for j in range(n):
                    y0 = finish((load(raw[j]) - m) * rs, w_row[j], sc_row[j], sh_row[j], b_row[j])
                    y_row[j] = store(gate_applied(y0, gate_value(load(z_row[j]), code)))
            elif steps == STEP_WEIGHT:
                for j in range(n):
                    y_row[j] = store(weigh((load(raw[j]) - m) * rs, w_row[j]))
            else:
                for j in range(n):
                    y_row[j] = store(finish((load(raw[j]) - m) * rs, w_row[j], sc_row[j], sh_row[j], b_row[j]))


@kernel
def fused_row_backward(grad_y, grad_sum, has_grad_sum, x, residual, has_residual, gate, gate_mode, code, weight,
                       bias, row_stride, mod_scale, mod_shift, mod_stride, need_weight, need_bias, need_mod, rms, eps,
                       stats_given, mean, rstd, chunk_rows, grad_x, grad_residual, has_grad_residual, grad_gate,
                       weight_parts, bias_parts, scale_parts, shift_parts):
    """Twin of ``normlab.fused.reference_backward`` on (rows, n): ``grad_x`` (also the
    residual's, written to ``grad_residual`` as well when ``has_grad_residual``: a second
    array costs a write from cache, where one array handed to both inputs costs torch's
    autograd a copy), ``grad_gate``, and per chunk the weight, bias, scale and shift
    gradients (zeroed by the caller, which adds the chunks in order).

    Rows go two at a time where both use the same parameter rows: their contributions to
    the parameter sums are added to each other and then once to the chunk's sums, which
    halves the read-modify-writes of those float64 tables, the backward's largest cost
    after the rows themselves (a fixed order by row index, so every thread count gives
    the same bits)."""
    rows = x.shape[0]
    n = x.shape[1]
    direct = not has_residual and gate_mode == GATE_NONE
    for k in prange(weight_parts.shape[0]):
        # the pair's rows as the statistics see them, and their ∂ĥ, kept between passes (rows
        # 64 bytes longer than n, so that the pair's rows of 4096 float64 do not share cache sets)
        h = np.empty((PAIR, n + 8))
        gamma = np.empty((PAIR, n + 8))
        ms = np.empty(PAIR)
        rss = np.empty(PAIR)
        projs = np.empty(PAIR)
        mean_gammas = np.empty(PAIR)
        part_w = weight_parts[k]
        part_b = bias_parts[k]
        part_sc = scale_parts[k]
        part_sh = shift_parts[k]
        end = min(rows, (k + 1) * chunk_rows)
        r0 = k * chunk_rows
        while r0 < end:
            wg = (r0 // row_stride) % weight.shape[0]
            mg = (r0 // mod_stride) % mod_scale.shape[0]
            last = r0 + PAIR - 1  # a pair where its last row is in the chunk and uses the same parameter rows
            count = PAIR if (last < end and (last // row_stride) % weight.shape[0] == wg
                             and (last // mod_stride) % mod_scale.shape[0] == mg) else 1
            for i in range(count):
                r = r0 + i
                x_row = x[r]
                h_i = h[i, :n]
                if r + 1 < rows:
                    prefetch(x[r + 1])
                    prefetch(grad_y[r + 1])
                if direct and stats_given:
                    pass
                elif has_residual:
                    for j in range(n):
                        h_i[j] = load(add(x_row[j], residual[r, j]))
                else:
                    for j in range(n):
                        h_i[j] = load(x_row[j])
                if gate_mode == GATE_FIRST:
                    z_row = gate[r]
                    for j in range(n):
                        h_i[j] = gated(h_i[j] * gate_value(load(z_row[j]), code))
                if not stats_given:
                    row_mean, row_var, row_rstd = group_stats(h_i, rms, eps)
                    mean[r] = row_mean
                    rstd[r] = row_rstd
                ms[i] = mean[r]
                rss[i] = rstd[r]
            w_row = weight[wg]
            b_row = bias[wg]
            sc_row = mod_scale[mg]
            sh_row = mod_shift[mg]
            if direct:
                # no residual and no gate: each pass reads the rows where they lie (float64
                # copies of them ran the kernel 2x slower, their traffic through the caches)
                for i in range(count):
                    sum_gamma, sum_gamma_hat = direct_gamma_sums(grad_y[r0 + i], x[r0 + i], w_row, sc_row, ms[i],
                                                                 rss[i])
                    projs[i] = sum_gamma_hat / n
                    mean_gammas[i] = 0.0 if rms else sum_gamma / n
                if count == PAIR:
                    for j in range(n):
                        w = w_row[j]
                        s = sc_row[j]
                        sum_w = 0.0
                        sum_g = 0.0
                        sum_sc = 0.0
                        for i in range(PAIR):
                            h_hat = (load(x[r0 + i, j]) - ms[i]) * rss[i]
                            g = load(grad_y[r0 + i, j])
                            grad_h = (((g * w) * s - h_hat * projs[i]) - mean_gammas[i]) * rss[i]
                            grad_x[r0 + i, j] = store(grad_h + load(grad_sum[r0 + i, j]) if has_grad_sum else grad_h)
                            sum_w += (g * h_hat) * s
                            sum_g += g
                            sum_sc += (g * h_hat) * w
                        if need_weight:
                            part_w[wg, j] += sum_w
                        if need_bias:
                            part_b[wg, j] += sum_g
                        if need_mod:
                            part_sc[mg, j] += sum_sc
                            part_sh[mg, j] += sum_g
                else:
                    m = ms[0]
                    rs = rss[0]
                    proj = projs[0]
                    mean_gamma = mean_gammas[0]
                    x_row = x[r0]
                    g_row = grad_y[r0]
                    gx_row = grad_x[r0]
                    for j in range(n):
                        h_hat = (load(x_row[j]) - m) * rs
                        g = load(g_row[j])
                        grad_h = (((g * w_row[j]) * sc_row[j] - h_hat * proj) - mean_gamma) * rs
                        gx_row[j] = store(grad_h + load(grad_sum[r0, j]) if has_grad_sum else grad_h)
                        if need_weight:
                            part_w[wg, j] += (g * h_hat) * sc_row[j]
                        if need_bias:
                            part_b[wg, j] += g
                        if need_mod:
                            part_sc[mg, j] += (g * h_hat) * w_row[j]
                            part_sh[mg, j] += g
                if has_grad_residual:
                    for i in range(count):
                        gr_row = grad_residual[r0 + i]
                        gx_row = grad_x[r0 + i]
                        for j in range(n):
                            gr_row[j] = gx_row[j]
                r0 += count
                continue
            # (each loop below writes out its parameter sums: a helper holding those writes, even
            # one Numba inlines, kept LLVM from vectorizing the loop, 10x slower in cache)
            if count == PAIR:
                if gate_mode == GATE_LAST:
                    for j in range(n):
                        w = w_row[j]
                        s = sc_row[j]
                        sum_w = 0.0
                        sum_g = 0.0
                        sum_sc = 0.0
                        for i in range(PAIR):
                            h_hat = (h[i, j] - ms[i]) * rss[i]
                            y0 = finish(h_hat, w, s, sh_row[j], b_row[j])
                            phi, dphi = gate_derivative(load(gate[r0 + i, j]), code)
                            gy = load(grad_y[r0 + i, j])
                            grad_gate[r0 + i, j] = store((gy * y0) * dphi)
                            g = gy * gate_used(phi)
                            gamma[i, j] = (g * w) * s
                            sum_w += (g * h_hat) * s
                            sum_g += g
                            sum_sc += (g * h_hat) * w
                        if need_weight:
                            part_w[wg, j] += sum_w
                        if need_bias:
                            part_b[wg, j] += sum_g
                        if need_mod:
                            part_sc[mg, j] += sum_sc
                            part_sh[mg, j] += sum_g
                else:
                    for j in range(n):
                        w = w_row[j]
                        s = sc_row[j]
                        sum_w = 0.0
                        sum_g = 0.0
                        sum_sc = 0.0
                        for i in range(PAIR):
                            h_hat = (h[i, j] - ms[i]) * rss[i]
                            g = load(grad_y[r0 + i, j])
                            gamma[i, j] = (g * w) * s
                            sum_w += (g * h_hat) * s
                            sum_g += g
                            sum_sc += (g * h_hat) * w
                        if need_weight:
                            part_w[wg, j] += sum_w
                        if need_bias:
                            part_b[wg, j] += sum_g
                        if need_mod:
                            part_sc[mg, j] += sum_sc
                            part_sh[mg, j] += sum_g
            else:
                m = ms[0]
                rs = rss[0]
                h_i = h[0, :n]
                gamma_i = gamma[0, :n]
                g_row = grad_y[r0]
                if gate_mode == GATE_LAST:
                    z_row = gate[r0]
                    gz_row = grad_gate[r0]
                    for j in range(n):
                        h_hat = (h_i[j] - m) * rs
                        y0 = finish(h_hat, w_row[j], sc_row[j], sh_row[j], b_row[j])
                        phi, dphi = gate_derivative(load(z_row[j]), code)
                        gy = load(g_row[j])
                        gz_row[j] = store((gy * y0) * dphi)
                        g = gy * gate_used(phi)
                        gamma_i[j] = (g * w_row[j]) * sc_row[j]
                        if need_weight:
                            part_w[wg, j] += (g * h_hat) * sc_row[j]
                        if need_bias:
                            part_b[wg, j] += g
                        if need_mod:
                            part_sc[mg, j] += (g * h_hat) * w_row[j]
                            part_sh[mg, j] += g
                else:
                    for j in range(n):
                        h_hat = (h_i[j] - m) * rs
                        g = load(g_row[j])
                        gamma_i[j] = (g * w_row[j]) * sc_row[j]
                        if need_weight:
                            part_w[wg, j] += (g * h_hat) * sc_row[j]
                        if need_bias:
                            part_b[wg, j] += g
                        if need_mod:
                            part_sc[mg, j] += (g * h_hat) * w_row[j]
                            part_sh[mg, j] += g
            for i in range(count):
                r = r0 + i
                m = ms[i]
                rs = rss[i]
                h_i = h[i, :n]
                gamma_i = gamma[i, :n]
                x_row = x[r]
                sum_gamma, sum_gamma_hat = gamma_sums(gamma_i, h_i, m, rs)
                proj = sum_gamma_hat / n
                mean_gamma = 0.0 if rms else sum_gamma / n
                gx_row = grad_x[r]
                if gate_mode == GATE_FIRST:
                    z_row = gate[r]
                    gz_row = grad_gate[r]
                    for j in range(n):
                        h_hat = (h_i[j] - m) * rs
                        grad_h = ((gamma_i[j] - h_hat * proj) - mean_gamma) * rs
                        s = load(add(x_row[j], residual[r, j])) if has_residual else load(x_row[j])
                        phi, dphi = gate_derivative(load(z_row[j]), code)
                        gz_row[j] = store((grad_h * s) * dphi)
                        grad_s = grad_h * phi
                        gx_row[j] = store(grad_s + load(grad_sum[r, j]) if has_grad_sum else grad_s)
                elif has_grad_sum:
                    gs_row = grad_sum[r]
                    for j in range(n):
                        h_hat = (h_i[j] - m) * rs
                        gx_row[j] = store(((gamma_i[j] - h_hat * proj) - mean_gamma) * rs + load(gs_row[j]))
                else:
                    for j in range(n):
                        h_hat = (h_i[j] - m) * rs
                        gx_row[j] = store(((gamma_i[j] - h_hat * proj) - mean_gamma) * rs)
                if has_grad_residual:
                    gr_row = grad_residual[r]
                    for j in range(n):
                        gr_row[j] = gx_row[j]
            r0 += count


@reduction
def direct_gamma_sums32(grad, x, w, scale, hi, lo, rs):
    """(Σ γ, Σ γ·x̂, Σ |g|) of one block with no gate, in float32, returned in float64:
    ``γ = g·w·(1 + scale)``, ``x̂ = ((x − hi) − lo)·rs``."""
    sum_gamma = np.float32(0.0)
    sum_gamma_hat = np.float32(0.0)
    sum_abs = np.float32(0.0)
    for i in range(x.shape[0]):
        g = load32(grad[i])
        c = (g * w[i]) * scale[i]
        sum_gamma += c
        sum_gamma_hat += c * (((load32(x[i]) - hi) - lo) * rs)
        sum_abs += abs(g)
    return np.float64(sum_gamma), np.float64(sum_gamma_hat), np.float64(sum_abs)


@reduction
def buffered_gamma_sums32(gamma, x_hat, grad, entering):
    """:func:`direct_gamma_sums32` of a gated block: γ and x̂ from their float32 buffers,
    Σ |g| of the larger of the gradient before the gate and the one entering the norm (a
    gate after the norm multiplies it, by up to |z|)."""
    sum_gamma = np.float32(0.0)
    sum_gamma_hat = np.float32(0.0)
    sum_abs = np.float32(0.0)
    for i in range(gamma.shape[0]):
        c = gamma[i]
        sum_gamma += c
        sum_gamma_hat += c * x_hat[i]
        sum_abs += max(abs(load32(grad[i])), abs(entering[i]))
    return np.float64(sum_gamma), np.float64(sum_gamma_hat), np.float64(sum_abs)


@reduction
def float32_sum(values):
    """Σ values of a float32 buffer, in float32 (inf past float32's range)."""
    total = np.float32(0.0)
    for i in range(values.shape[0]):
        total += values[i]
    return total


@kernel
def direct_row_backward32(grad_y, grad_sum, has_grad_sum, x, gate, gate_mode, code, weight, bias, row_stride,
                          mod_scale, mod_shift, mod_stride, need_weight, need_bias, need_mod, rms, mean, rstd,
                          chunk_rows, grad_x, grad_residual, has_grad_residual, grad_gate, weight_parts, bias_parts,
                          scale_parts, shift_parts, redo):
    """:func:`fused_row_backward` with no residual (and a gate or none, not gelu, not before a
    layer norm), in float32 SIMD arithmetic as ``rows_backward.row_backward32`` computes (its docstring has
    the numerics). The parameter tables are float32 and below TABLE_LIMIT, every ``rstd``
    lies in (RSTD_LOW, RSTD_HIGH) (the caller checks); ``x̂ = ((x − hi) − lo)·rstd`` with
    the float64 mean split; the row sums run in float32 over blocks of BLOCK added in
    float64; each element's g·x̂ and g add up in float32 per weight row over at most
    FLUSH_ROWS rows of one modulation row, then go into the float64 parts (times the other
    parameter there). A row whose gradients reach GRADIENT_LIMIT, where float32 products
    and sums could overflow, sets ``redo[k]``: the caller then runs the float64 kernel."""
    rows = x.shape[0]
    n = x.shape[1]
    groups = weight.shape[0]
    for k in prange(weight_parts.shape[0]):
        acc_gx = np.zeros((groups, n), np.float32)
        acc_g = np.zeros((groups, n), np.float32)
        held = np.zeros(groups, np.int64)
        gamma = np.empty(n, np.float32)  # a gated row's γ, x̂, g entering the norm, and (gate first) φ and φ'
        x_hats = np.empty(n, np.float32)
        entering = np.empty(n, np.float32)
        phis = np.empty(n, np.float32)
        dphis = np.empty(n, np.float32)
        part_w = weight_parts[k]
        part_b = bias_parts[k]
        part_sc = scale_parts[k]
        part_sh = shift_parts[k]
        held_mg = -1
        end = min(rows, (k + 1) * chunk_rows)
        for r in range(k * chunk_rows, end + 1):
            wg = (r // row_stride) % groups
            mg = (r // mod_stride) % mod_scale.shape[0]
            for fg in range(groups):  # flush: a row of another modulation row, a full window, the end
                if held[fg] > 0 and (r == end or mg != held_mg or (fg == wg and held[fg] == FLUSH_ROWS)):
                    w_held = weight[fg]
                    sc_held = mod_scale[held_mg]
                    for j in range(n):
                        gx_sum = np.float64(acc_gx[fg, j])
                        g_sum = np.float64(acc_g[fg, j])
                        if need_weight:
                            part_w[fg, j] += gx_sum * sc_held[j]
                        if need_bias:
                            part_b[fg, j] += g_sum
                        if need_mod:
                            part_sc[held_mg, j] += gx_sum * w_held[j]
                            part_sh[held_mg, j] += g_sum
                        acc_gx[fg, j] = 0.0
                        acc_g[fg, j] = 0.0
                    held[fg] = 0
            if r == end:
                break
            held_mg = mg
            held[wg] += 1
            m = mean[r]
            hi = np.float32(m)
            lo = np.float32(m - hi)
            rs = np.float32(rstd[r])
            x_row = x[r]
            g_row = grad_y[r]
            w_row = weight[wg]
            sc_row = mod_scale[mg]
            a_gx = acc_gx[wg]
            a_g = acc_g[wg]
            sum_gamma = 0.0  # (no prefetch of the next row: it cost 8-15% here, as in rows_backward)
            sum_gamma_hat = 0.0
            sum_abs = 0.0
            if gate_mode == GATE_LAST:
                z_row = gate[r]
                gz_row = grad_gate[r]
                b_row = bias[wg]
                sh_row = mod_shift[mg]
                for j in range(n):
                    x_hat = ((load32(x_row[j]) - hi) - lo) * rs
                    y0 = np.float32(finish(x_hat, w_row[j], sc_row[j], sh_row[j], b_row[j]))
                    phi, dphi = gate_derivative(load(z_row[j]), code)
                    gy = load32(g_row[j])
                    gz_row[j] = store((gy * y0) * np.float32(dphi))
                    g = gy * np.float32(gate_used(phi))
                    gamma[j] = (g * w_row[j]) * sc_row[j]
                    x_hats[j] = x_hat
                    entering[j] = g
                    a_gx[j] += g * x_hat
                    a_g[j] += g
            elif gate_mode == GATE_FIRST:  # the gated row h = x·φ is what the statistics saw
                z_row = gate[r]
                for j in range(n):
                    phi, dphi = gate_derivative(load(z_row[j]), code)
                    phis[j] = np.float32(phi)
                    dphis[j] = np.float32(dphi)
                    x_hat = ((load32(x_row[j]) * np.float32(phi) - hi) - lo) * rs
                    g = load32(g_row[j])
                    gamma[j] = (g * w_row[j]) * sc_row[j]
                    x_hats[j] = x_hat
                    entering[j] = g
                    a_gx[j] += g * x_hat
                    a_g[j] += g
            if gate_mode != GATE_NONE:
                for start in range(0, n, BLOCK):
                    stop = min(n, start + BLOCK)
                    a, b, c = buffered_gamma_sums32(gamma[start:stop], x_hats[start:stop], g_row[start:stop],
                                                    entering[start:stop])
                    sum_gamma += a
                    sum_gamma_hat += b
                    sum_abs += c
            else:
                for start in range(0, n, BLOCK):
                    stop = min(n, start + BLOCK)
                    a, b, c = direct_gamma_sums32(g_row[start:stop], x_row[start:stop], w_row[start:stop],
                                                  sc_row[start:stop], hi, lo, rs)
                    sum_gamma += a
                    sum_gamma_hat += b
                    sum_abs += c
            if not sum_abs < GRADIENT_LIMIT:
                redo[k] = True
                break
            proj = np.float32(sum_gamma_hat / n)
            mean_gamma = np.float32(0.0) if rms else np.float32(sum_gamma / n)
            gx_row = grad_x[r]
            if gate_mode == GATE_LAST:
                for j in range(n):
                    grad_h = ((gamma[j] - x_hats[j] * proj) - mean_gamma) * rs
                    gx_row[j] = store(grad_h + load32(grad_sum[r, j]) if has_grad_sum else grad_h)
            elif gate_mode == GATE_FIRST:
                gz_row = grad_gate[r]
                for j in range(n):
                    grad_h = ((gamma[j] - x_hats[j] * proj) - mean_gamma) * rs
                    grad_z = (grad_h * load32(x_row[j])) * dphis[j]
                    gz_row[j] = store(grad_z)
                    grad_s = grad_h * phis[j]
                    # (into a buffer, summed below: a sum in this loop kept it from vectorizing, 2x slower)
                    entering[j] = abs(grad_z) + abs(grad_s)
                    gx_row[j] = store(grad_s + load32(grad_sum[r, j]) if has_grad_sum else grad_s)
                # inf where grad_h or grad_h·x overflowed before φ, φ' made them small
                if not float32_sum(entering) < np.inf:
                    redo[k] = True
                    break
            elif has_grad_sum:
                gs_row = grad_sum[r]
                for j in range(n):
                    x_hat = ((load32(x_row[j]) - hi) - lo) * rs
                    g = load32(g_row[j])
                    gx_row[j] = store((((g * w_row[j]) * sc_row[j] - x_hat * proj) - mean_gamma) * rs
                                      + load32(gs_row[j]))
                    a_gx[j] += g * x_hat
                    a_g[j] += g
            else:
                for j in range(n):
                    x_hat = ((load32(x_row[j]) - hi) - lo) * rs
                    g = load32(g_row[j])
                    gx_row[j] = store((((g * w_row[j]) * sc_row[j] - x_hat * proj) - mean_gamma) * rs)
                    a_gx[j] += g * x_hat
                    a_g[j] += g
            if has_grad_residual:
                gr_row = grad_residual[r]
                for j in range(n):
                    gr_row[j] = gx_row[j]


def _renamed_copy(fn, suffix: str, namespace):
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    return copy


def _variant(kern, suffix: str, **helpers):
    """The kernel ``kern`` compiled with other helpers in place of its globals (its own
    name, so its own cache file); the reductions that load row elements are rebuilt with
    them too."""
    fn = kern.py_func
    namespace = dict(fn.__globals__, **helpers)
    if "load" in helpers:
        namespace["direct_gamma_sums"] = reduction(_renamed_copy(direct_gamma_sums.py_func, suffix, namespace))
    if "load32" in helpers:
        for sums in (direct_gamma_sums32, buffered_gamma_sums32):
            namespace[sums.py_func.__name__] = reduction(_renamed_copy(sums.py_func, suffix, namespace))
    return kernel(_renamed_copy(fn, suffix, namespace))


fused_row_forward_gelu = _variant(fused_row_forward, "_gelu", gate_value=gelu_gate,
                                  gate_derivative=gelu_gate_derivative)
fused_row_backward_gelu = _variant(fused_row_backward, "_gelu", gate_value=gelu_gate,
                                   gate_derivative=gelu_gate_derivative)
direct_row_backward32_float = _variant(direct_row_backward32, "_float", gate_value=logistic_gate32,
                                       gate_derivative=logistic_gate_derivative32)
# float32 rows: silu and sigmoid in float32 arithmetic
fused_row_forward_32 = _variant(fused_row_forward, "_32", gate_value=logistic_gate32,
                                gate_derivative=logistic_gate_derivative32)
fused_row_backward_32 = _variant(fused_row_backward, "_32", gate_value=logistic_gate32,
                                 gate_derivative=logistic_gate_derivative32)


# ---------------------------------------------------------------------------------------
# Laying out the arguments


def _full_table(expanded, view, value: float, n: int) -> np.ndarray | None:
    """A parameter as a ``(groups, n)`` float64 table, or None when its layout repeats
    inside a row at a stride (the reference handles those). An absent parameter is a
    constant table of the same shape, so that its gradient has somewhere to go."""
    if expanded is None:
        return _kernels._constant_table((view.param_groups, n), value)
    if view.param_inner != 1:
        return None
    table = np.ascontiguousarray(expanded, dtype=np.float64).reshape(view.param_groups, view.param_channels)
    if view.param_channels != n:
        table = np.tile(table, (1, n // view.param_channels))
    return table


class Layout:
    """The kernel view of a fused call, decided by the plans, the options and the dtype
    alone (so a caller may keep it for repeated calls of one shape): shapes, strides,
    gate mode and chunks, or ``ok=False`` where only the reference fits."""

    def __init__(self, plan, mod_plan, epilogue, dtype):
        from normlab.kernels import RowView, row_chunks, view_of

        self.ok = False
        view = view_of(plan)
        if not isinstance(view, RowView) or view.order is not None:
            return
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
            return
        self.plan, self.mod_plan, self.epilogue = plan, mod_plan, epilogue
        self.view = view
        self.dtype = np.dtype(dtype)
        self.shape = (view.rows, view.n)
        self.row_stride = view.param_row_stride
        self.mod_view = None
        self.mod_stride = 1
        if mod_plan is not None:
            self.mod_view = view_of(mod_plan)
            if not isinstance(self.mod_view, RowView) or self.mod_view.order is not None:
                return
            self.mod_stride = self.mod_view.param_row_stride
        self.gate_mode = GATE_NONE if epilogue.gate is None else GATE_LAST if epilogue.norm_before_gate else GATE_FIRST
        self.code = ACTIVATION_CODES.get(epilogue.gate, 0)
        self.chunk_rows, self.chunks = row_chunks(view.rows, view.n)
        self.broadcast_shapes = (plan.param_broadcast_shape, None if mod_plan is None else mod_plan.param_broadcast_shape)
        self.size = view.rows * view.n
        single = self.dtype == np.float32
        self.forward_kernel = (fused_row_forward_gelu if self.code == 2 else
                               fused_row_forward_32 if single else fused_row_forward)
        self.backward_kernel = (fused_row_backward_gelu if self.code == 2 else
                                fused_row_backward_32 if single else fused_row_backward)
        # float32 rows: the backward with no residual and no gate in float32 arithmetic
        self.direct32_kernel = direct_row_backward32_float if single else None
        self.ok = True

    def tables(self, weight, bias, scale, shift, as_given: bool = False):
        """``(w + o, b, 1 + scale, shift, steps)``: the kernels' float64 tables from
        parameters in their expanded (broadcast) layouts (an absent one: ones or zeros) and
        the ``STEP_*`` bits of those present; None where a layout repeats inside a row (only
        the reference fits). ``as_given``: ``weight`` and ``scale`` are already ``w + o`` and
        ``1 + scale`` (rounded as a casting recipe rounds them)."""
        n = self.view.n
        offset = 0.0 if as_given else self.epilogue.weight_offset
        mod_view = self.mod_view if self.mod_view is not None else self.view
        tables = (_full_table(weight + offset if weight is not None and offset else weight, self.view, 1.0, n),
                  _full_table(bias, self.view, 0.0, n),
                  _full_table(scale if scale is None or as_given else 1.0 + scale, mod_view, 1.0, n),
                  _full_table(shift, mod_view, 0.0, n))
        if any(t is None for t in tables):
            return None
        present = (weight, scale, shift, bias)
        return (*tables, sum(bit for bit, t in zip((STEP_WEIGHT, STEP_SCALE, STEP_SHIFT, STEP_BIAS), present)
                             if t is not None))

    def _output(self) -> np.ndarray:
        # (two outputs a call: recycled from glibc's mmap threshold, see pool.MULTI_OUTPUT_MIN_BYTES)
        return pool.empty(self.shape, self.dtype, pool.MULTI_OUTPUT_MIN_BYTES)

    def rows_of(self, array):
        if array is None:
            return np.zeros((1, 1), self.dtype)
        return np.ascontiguousarray(array, dtype=self.dtype).reshape(self.shape)

    def forward(self, tables, x, residual, gate, eps: float, rms: bool, mean_flat=None, rstd_flat=None,
                outputs=None):
        """``(y, total, mean, var, rstd)`` on the (rows, n) view: ``total`` is None without a
        residual; the statistics are flat float64 (those given, when ``rstd_flat`` is).
        ``outputs``: ``(y, total)`` arrays of the view to write instead of new ones (total None
        without a residual)."""
        rows = self.shape[0]
        if outputs is None:
            y = self._output()
            total = self._output() if residual is not None else np.zeros((1, 1), self.dtype)
        else:
            y, total = outputs
            if total is None:
                total = np.zeros((1, 1), self.dtype)
        stats_given = rstd_flat is not None
        if stats_given:
            mean_flat = np.zeros(rows) if mean_flat is None else mean_flat
            var_flat = np.empty(rows)
        else:
            mean_flat, var_flat, rstd_flat = np.empty((3, rows))
        self.forward_kernel(self.rows_of(x), self.rows_of(residual), residual is not None, self.rows_of(gate),
                            self.gate_mode, self.code, tables[0], tables[1], self.row_stride, tables[2], tables[3],
                            self.mod_stride, tables[4], rms, eps, stats_given, self.chunk_rows, mean_flat, var_flat,
                            rstd_flat,
                            y, total, serial=self.size < threads.serial_below())
        return y, (total if residual is not None else None), mean_flat, var_flat, rstd_flat

    def backward(self, tables, grad_y, grad_sum, x, residual, gate, eps: float, rms: bool, mean_flat, rstd_flat,
                 need_weight: bool, need_bias: bool, need_mod: bool, two_grads: bool = False, outputs=None):
        """``(grad_x, grad_gate, weight, bias, scale, shift, grad_residual)`` on the (rows, n)
        view: the parameter gradients as summed float64 tables (None where not needed),
        ``grad_gate`` None without a gate, ``grad_residual`` a second array of ``grad_x``'s
        values with ``two_grads`` (None without). Statistics are recomputed where
        ``rstd_flat`` is None. ``outputs``: ``(grad_x, grad_gate)`` arrays of the view to
        write instead of new ones (grad_gate None without a gate; not with ``two_grads``)."""
        rows = self.shape[0]
        has_gate = self.gate_mode != GATE_NONE
        if outputs is None:
            grad_x = self._output()
            grad_gate = self._output() if has_gate else np.zeros((1, 1), self.dtype)
        else:
            grad_x, grad_gate = outputs
            if grad_gate is None:
                grad_gate = np.zeros((1, 1), self.dtype)
        grad_residual = self._output() if two_grads else np.zeros((1, 1), self.dtype)
        weight_parts = np.zeros((self.chunks,) + tables[0].shape if need_weight else (self.chunks, 1, 1))
        bias_parts = np.zeros((self.chunks,) + tables[1].shape if need_bias else (self.chunks, 1, 1))
        scale_parts = np.zeros((self.chunks,) + tables[2].shape if need_mod else (self.chunks, 1, 1))
        shift_parts = np.zeros_like(scale_parts)
        stats_given = rstd_flat is not None
        if stats_given:
            mean_flat = np.zeros(rows) if mean_flat is None else mean_flat
        else:
            mean_flat, rstd_flat = np.empty(rows), np.empty(rows)
        # (a gate before a layer norm keeps float64: x·φ rounded to float32 would move x̂ by
        # |mean|/std float32 steps, where an RMS norm's x̂ moves by √n at most)
        if (stats_given and residual is None and self.code != 2 and (rms or self.gate_mode != GATE_FIRST)
                and self.direct32_kernel is not None):
            done = self._backward32(tables, grad_y, grad_sum, x, gate, rms, mean_flat, rstd_flat, need_weight,
                                    need_bias, need_mod, two_grads, grad_x, grad_residual, grad_gate, weight_parts,
                                    bias_parts, scale_parts, shift_parts)
            if done:
                return self._backward_result(grad_x, grad_gate if has_gate else None, weight_parts, bias_parts,
                                             scale_parts, shift_parts, need_weight, need_bias, need_mod,
                                             grad_residual, two_grads)
            for parts in (weight_parts, bias_parts, scale_parts, shift_parts):
                parts[...] = 0.0
        self.backward_kernel(self.rows_of(grad_y), self.rows_of(grad_sum), grad_sum is not None, self.rows_of(x),
                             self.rows_of(residual), residual is not None, self.rows_of(gate), self.gate_mode,
                             self.code, tables[0], tables[1], self.row_stride, tables[2], tables[3], self.mod_stride,
                             need_weight, need_bias, need_mod, rms, eps, stats_given, mean_flat, rstd_flat,
                             self.chunk_rows,
                             grad_x, grad_residual, two_grads, grad_gate, weight_parts, bias_parts, scale_parts,
                             shift_parts, serial=self.size < threads.serial_below())
        return self._backward_result(grad_x, grad_gate if has_gate else None, weight_parts, bias_parts, scale_parts,
                                     shift_parts, need_weight, need_bias, need_mod, grad_residual, two_grads)

    @staticmethod
    def _backward_result(grad_x, grad_gate, weight_parts, bias_parts, scale_parts, shift_parts, need_weight,
                         need_bias, need_mod, grad_residual, two_grads):
        sums = [_kernels._sum_parts(parts) if need else None for parts, need in
                ((weight_parts, need_weight), (bias_parts, need_bias), (scale_parts, need_mod),
                 (shift_parts, need_mod))]
        return (grad_x, grad_gate, *sums, grad_residual if two_grads else None)

    def _backward32(self, tables, grad_y, grad_sum, x, gate, rms, mean_flat, rstd_flat, need_weight, need_bias,
                    need_mod, two_grads, grad_x, grad_residual, grad_gate, weight_parts, bias_parts, scale_parts,
                    shift_parts) -> bool:
        """The backward with no residual (and no gelu gate) in float32 arithmetic
        (:func:`direct_row_backward32`), where its numerics hold: every rstd in (RSTD_LOW,
        RSTD_HIGH), the parameter tables it reads below TABLE_LIMIT, the gradients below
        GRADIENT_LIMIT (the kernel checks). False where they do not, or the kernel met such
        a gradient; the float64 kernel then runs."""
        if not (np.all(rstd_flat > RSTD_LOW) and np.all(rstd_flat < RSTD_HIGH)):
            return False
        if tables[0].shape[0] > ACCUMULATED_WEIGHT_ROWS:
            return False
        tables32 = [t.astype(np.float32) for t in tables[:4]]
        read = tables32 if self.gate_mode == GATE_LAST else tables32[::2]  # (the bias and shift: y0, for the gate)
        if not all(np.abs(t).max() < TABLE_LIMIT for t in read):
            return False
        redo = np.zeros(weight_parts.shape[0], np.bool_)
        self.direct32_kernel(self.rows_of(grad_y), self.rows_of(grad_sum), grad_sum is not None, self.rows_of(x),
                             self.rows_of(gate), self.gate_mode, self.code, tables32[0], tables32[1], self.row_stride,
                             tables32[2], tables32[3], self.mod_stride, need_weight, need_bias, need_mod, rms,
                             mean_flat, rstd_flat, self.chunk_rows, grad_x, grad_residual, two_grads, grad_gate,
                             weight_parts, bias_parts, scale_parts, shift_parts, redo,
                             serial=self.size < threads.serial_below())
        return not redo.any()

    def collapse(self, table, mod: bool):
        """A summed ``(groups, n)`` gradient table in its plan's broadcast layout: column ``j``
        belongs to parameter column ``(j // inner) % channels`` (an absent parameter's constant
        table spans every layout, ``"b (g [c]) [s]"``'s too, where each channel repeats ``s`` times)."""
        view = self.mod_view if mod else self.view
        if view.param_channels != view.n:
            table = table.reshape(table.shape[0], -1, view.param_channels, view.param_inner).sum(axis=(1, 3))
        return table.reshape(self.broadcast_shapes[mod])


def _layout(inputs, dtypes):
    """The layout of a NumPy call, with its tables, or (None, None) where only the reference fits."""
    if len(set(dtypes)) != 1:
        return None, None
    layout = Layout(inputs.plan, inputs.mod_plan, inputs.epilogue, dtypes[0])
    if not layout.ok:
        return None, None
    tables = layout.tables(inputs.weight, inputs.bias, inputs.scale, inputs.shift)
    return (layout, tables) if tables is not None else (None, None)


def forward(inputs, eps: float, rms: bool, mean=None, rstd=None):
    """Kernel twin of :func:`normlab.fused.reference_forward`: ``(y, sum, stats)`` in the
    expanded view, or None when only the reference fits."""
    from normlab.kernels import _flat_stats
    from normlab.reference import Stats

    layout, tables = _layout(inputs, [a.dtype for a in (inputs.x, inputs.residual, inputs.gate) if a is not None])
    if layout is None:
        return None
    plan = inputs.plan
    rows = layout.view.rows
    stats_given = rstd is not None
    y, total, mean_flat, var_flat, rstd_flat = layout.forward(
        tables, inputs.x, inputs.residual, inputs.gate, eps, rms,
        None if not stats_given or mean is None else _flat_stats(mean, rows),
        _flat_stats(rstd, rows) if stats_given else None)
    if stats_given:
        stats = Stats(None if rms else mean, None, rstd)
    else:
        shape = plan.stats_shape
        stats = Stats(None if rms else mean_flat.reshape(shape), var_flat.reshape(shape), rstd_flat.reshape(shape))
    summed = total.reshape(plan.axis_sizes) if total is not None else None
    return y.reshape(plan.axis_sizes), summed, stats


def backward(inputs, grad_y, grad_sum, eps: float, rms: bool, mean=None, rstd=None, need_bias=False):
    """Kernel twin of :func:`normlab.fused.reference_backward`, or None when only the
    reference fits."""
    from normlab.fused import Gradients64
    from normlab.kernels import _flat_stats

    layout, tables = _layout(inputs, [a.dtype for a in (inputs.x, inputs.residual, inputs.gate, grad_y, grad_sum)
                                      if a is not None])
    if layout is None:
        return None
    plan = inputs.plan
    rows = layout.view.rows
    ep = inputs.epilogue
    need_mod = inputs.mod_plan is not None
    stats_given = rstd is not None
    grad_x, grad_gate, weight, bias, scale, shift, _ = layout.backward(
        tables, grad_y, grad_sum, inputs.x, inputs.residual, inputs.gate, eps, rms,
        None if not stats_given or mean is None else _flat_stats(mean, rows),
        _flat_stats(rstd, rows) if stats_given else None, inputs.weight is not None, need_bias, need_mod)
    return Gradients64(grad_x.reshape(plan.axis_sizes),
                       grad_gate.reshape(plan.axis_sizes) if grad_gate is not None else None,
                       layout.collapse(weight, False) if inputs.weight is not None else None,
                       layout.collapse(bias, False) if need_bias else None,
                       layout.collapse(scale, True) if ep.has_scale else None,
                       layout.collapse(shift, True) if ep.has_shift else None)
