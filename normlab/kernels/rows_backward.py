"""The row backward for float32 rows in float32 SIMD arithmetic (layer, RMS, group norm).

Twin of ``reference.backward`` and of :func:`normlab.kernels.rows.row_backward` (its
float64 form). With ``x̂ = (x − mean)·rstd`` and ``ĝ = g·w``:

    grad_x = ((ĝ − x̂·Σ(ĝ·x̂)/n) − Σĝ/n)·rstd,   grad_w = Σ_rows g·x̂,   grad_b = Σ_rows g

(RMS: mean 0 and no Σĝ/n term). Numerics, and why they hold the float64 result:

* ``x̂ = ((x − hi) − lo)·rstd`` with the float64 mean split into ``hi = float32(mean)`` and
  ``lo = float32(mean − hi)``, as the float32 forward applies it (``rows.row_forward32``):
  ``x − hi`` is exact where x is near the mean, so x̂ keeps float32's relative accuracy
  however far the mean is from zero (|mean|/std = 1e6 included), and a constant row
  has x̂ exactly 0.
* the two row sums run in float32 over blocks of at most :data:`BLOCK` elements (SIMD
  lanes, a few dozen adds each) and the blocks are added in float64.
* the parameter gradients add up to :data:`FLUSH_ROWS` rows' float32 products in float32,
  then into float64 parts, one set per chunk of rows (chunks fixed by the shape, added in
  index order by the caller), so the sums are the same on every thread count.
* a row whose rstd leaves (RSTD_LOW, RSTD_HIGH), where float32 products could underflow
  or overflow, runs in float64, as in the forward.
* gradients so large that float32 could overflow where float64 does not send the whole
  call to the float64 kernel (the chunk's ``redo`` flag). Each row adds up, in float64,
  ``|proj|·√n + |mean_gw|`` (bounds of grad_x's terms x̂·proj and mean_gw, as |x̂| ≤ √n)
  and, with one weight per channel, ``Σ|g|·max|w|``; each flush of the parameter terms
  adds its float32 accumulators times 0. A block sum or a product g·w past float32's
  largest is inf there, a parameter term summed past it is inf in its accumulator, and
  every other term of grad_x is below the total; a total of :data:`TERMS_LIMIT` or more,
  inf or NaN, redoes the call. With one weight per element this reads nothing the kernel
  does not compute anyway (a third sum in those row loops cost rows of 64 twice their
  time). Left open: one product g·w within 6% of float32's largest, with an rstd below 1,
  can still round grad_x to inf where float64 gives a finite value.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.kernels._jit import STREAM_LANES, helper, inline_helper, kernel, reduction, store_fence, stream_gradient_line
from normlab.kernels.rows import RSTD_HIGH, RSTD_LOW, STREAM_ELEMENTS, STREAM_MIN_ROW, line_span, row_at
from normlab.kernels.sums import group_stats

BLOCK = 1024  # elements per float32 partial sum (64 SIMD accumulators × 16 adds), flushed to float64
FLUSH_ROWS = 16  # rows whose per-element parameter terms add up in float32 before a float64 flush
TERMS_LIMIT = 1e37  # a chunk's bound on grad_x's terms, a tenth of float32's largest (see above)


@reduction
def _weighted_sums(g, x, w, hi, lo, rs, zero):
    """(Σ g·w, Σ g·w·x̂) over one block, in the arithmetic of ``zero`` (float32 or
    float64), returned in float64. Small, so LLVM inlines it into a row loop."""
    sum_gw = zero
    sum_gwx = zero
    for i in range(x.shape[0]):
        gw = g[i] * w[i]
        sum_gw += gw
        sum_gwx += gw * (((x[i] - hi) - lo) * rs)
    return np.float64(sum_gw), np.float64(sum_gwx)


@reduction
def _plain_sums(g, x, hi, lo, rs, zero):
    """(Σ g, Σ g·x̂) over one block, in the arithmetic of ``zero``, returned in float64."""
    sum_g = zero
    sum_gx = zero
    for i in range(x.shape[0]):
        sum_g += g[i]
        sum_gx += g[i] * (((x[i] - hi) - lo) * rs)
    return np.float64(sum_g), np.float64(sum_gx)


@reduction
def _abs_sum(g, zero):
    """Σ |g| over a row, in the arithmetic of ``zero`` over blocks of :data:`BLOCK`, added
    in float64. A loop of its own over the whole row: as a third sum in the channel loops
    it cost group norm's short channels (64 to 256 values) twice those loops' time."""
    total = 0.0
    for start in range(0, g.shape[0], BLOCK):
        segment = g[start:start + BLOCK]  # (indexed from 0: no negative index, so LLVM vectorizes)
        block = zero
        for i in range(segment.shape[0]):
            block += abs(segment[i])
        total += np.float64(block)
    return total


@reduction
def _blocked_weighted_sums(g, x, w, hi, lo, rs, zero):
    """:func:`_weighted_sums` over a row longer than a block, block by block."""
    sum_gw = 0.0
    sum_gwx = 0.0
    for start in range(0, x.shape[0], BLOCK):
        stop = min(start + BLOCK, x.shape[0])
        sg, sgx = _weighted_sums(g[start:stop], x[start:stop], w[start:stop], hi, lo, rs, zero)
        sum_gw += sg
        sum_gwx += sgx
    return sum_gw, sum_gwx


@reduction
def _blocked_plain_sums(g, x, hi, lo, rs, zero):
    """:func:`_plain_sums` over a segment longer than a block, block by block."""
    sum_g = 0.0
    sum_gx = 0.0
    for start in range(0, x.shape[0], BLOCK):
        stop = min(start + BLOCK, x.shape[0])
        sg, sgx = _plain_sums(g[start:stop], x[start:stop], hi, lo, rs, zero)
        sum_g += sg
        sum_gx += sgx
    return sum_g, sum_gx


@inline_helper
def _row_sums(g_row, x_row, w_row, part_w, part_b, inner, hi, lo, rs, zero):
    """(Σ g·w, Σ g·w·x̂, a bound of every |g·w|) of one row in float64, the last 0 with one
    weight per element (their products g·w are in the first sum, in the row's arithmetic),
    else Σ|g|·max|w|; per-channel parameters (``inner > 1``) get their parts here, from
    the channel sums."""
    n = x_row.shape[0]
    channels = w_row.shape[0]
    if inner == 1:
        if n == channels and n <= BLOCK:  # one short row of per-element weights: one block
            sum_gw, sum_gwx = _weighted_sums(g_row, x_row, w_row, hi, lo, rs, zero)
            return sum_gw, sum_gwx, 0.0
        sum_gw = 0.0
        sum_gwx = 0.0
        for base in range(0, n, channels):
            sg, sgx = _blocked_weighted_sums(g_row[base:base + channels], x_row[base:base + channels], w_row,
                                             hi, lo, rs, zero)
            sum_gw += sg
            sum_gwx += sgx
        return sum_gw, sum_gwx, 0.0
    sum_gw = 0.0
    sum_gwx = 0.0
    largest_w = 0.0
    for a in range(n // (channels * inner)):
        for c in range(channels):
            base = (a * channels + c) * inner
            if inner <= BLOCK:
                sg, sgx = _plain_sums(g_row[base:base + inner], x_row[base:base + inner], hi, lo, rs, zero)
            else:
                sg, sgx = _blocked_plain_sums(g_row[base:base + inner], x_row[base:base + inner], hi, lo, rs, zero)
            sum_gw += np.float64(w_row[c]) * sg
            sum_gwx += np.float64(w_row[c]) * sgx
            largest_w = max(largest_w, abs(np.float64(w_row[c])))
            part_w[c] += sgx
            part_b[c] += sg
    return sum_gw, sum_gwx, _abs_sum(g_row, zero) * largest_w


@inline_helper
def _row_gradient(g_row, x_row, gx_row, w_row, acc_w, acc_b, inner, hi, lo, rs, proj, mean_gw):
    """One row's ``grad_x = ((g·w − x̂·proj) − mean_gw)·rs`` in the arithmetic of the
    scalars; with one weight per element (``inner == 1``) its terms g·x̂ and g are also
    added into ``acc_w``/``acc_b`` in the same loop."""
    n = x_row.shape[0]
    channels = w_row.shape[0]
    repeats = n // (channels * inner)
    # loops index slices from 0: LLVM then knows no index is negative and vectorizes
    if inner == 1:
        for a in range(repeats):
            x_seg = x_row[a * channels:(a + 1) * channels]
            g_seg = g_row[a * channels:(a + 1) * channels]
            gx_seg = gx_row[a * channels:(a + 1) * channels]
            for c in range(channels):
                gy = g_seg[c]
                x_hat = ((x_seg[c] - hi) - lo) * rs
                gx_seg[c] = ((gy * w_row[c] - x_hat * proj) - mean_gw) * rs
                acc_w[c] += gy * x_hat
                acc_b[c] += gy
    else:
        for a in range(repeats):
            for c in range(channels):
                w = w_row[c]
                base = (a * channels + c) * inner
                x_seg = x_row[base:base + inner]
                g_seg = g_row[base:base + inner]
                gx_seg = gx_row[base:base + inner]
                for s in range(inner):
                    x_hat = ((x_seg[s] - hi) - lo) * rs
                    gx_seg[s] = ((g_seg[s] * w - x_hat * proj) - mean_gw) * rs


@inline_helper
def _gradient_row_streaming(g_row, x_row, gx_row, w_row, acc_w, acc_b, hi, lo, rs, proj, mean_gw):
    """The hot loop of :func:`row_backward32` (one weight per element) with ``grad_x``
    written by non-temporal stores, line by line, in the same operations (the same bits);
    as ``rows.apply_row_streaming``, the head up to a line boundary and the short tail
    are stored as usual, and so is a row whose arrays are not contiguous or whose
    output is not aligned to a float32 (the kernel fences once at its end)."""
    n = x_row.shape[0]
    head, body_end = line_span(gx_row, g_row.strides[0] == 4 and x_row.strides[0] == 4 and w_row.strides[0] == 4)
    _gradient_elements(g_row, x_row, gx_row, w_row, acc_w, acc_b, 0, head, hi, lo, rs, proj, mean_gw)
    for c in range(head, body_end, STREAM_LANES):
        stream_gradient_line(g_row, x_row, w_row, gx_row, acc_w, acc_b, c, hi, lo, rs, proj, mean_gw)
    _gradient_elements(g_row, x_row, gx_row, w_row, acc_w, acc_b, body_end, n, hi, lo, rs, proj, mean_gw)


@inline_helper
def _gradient_elements(g_row, x_row, gx_row, w_row, acc_w, acc_b, start, stop, hi, lo, rs, proj, mean_gw):
    """Elements ``start:stop`` of :func:`_gradient_row_streaming`'s row, stored as usual."""
    for c in range(start, stop):
        gy = g_row[c]
        x_hat = ((x_row[c] - hi) - lo) * rs
        gx_row[c] = ((gy * w_row[c] - x_hat * proj) - mean_gw) * rs
        acc_w[c] += gy * x_hat
        acc_b[c] += gy


@reduction
def _flush(acc_w, acc_b, part_w, part_b):
    """Add float32 accumulators into float64 parts and zero them. Returns 0 where every
    accumulator is finite, else NaN (a float32 sum past float32's largest is inf there): a
    reduction, so that the check rides the flush's own vectorized loops."""
    check = np.float32(0.0)
    for c in range(acc_w.shape[0]):
        part_w[c] += np.float64(acc_w[c])
        check += acc_w[c] * np.float32(0.0)
        acc_w[c] = 0.0
    for c in range(acc_b.shape[0]):
        part_b[c] += np.float64(acc_b[c])
        check += acc_b[c] * np.float32(0.0)
        acc_b[c] = 0.0
    return np.float64(check)


@inline_helper
def _in_float32_range(rstd) -> bool:
    """True where every rstd lies in (RSTD_LOW, RSTD_HIGH), where float32 products of x̂
    neither underflow nor overflow."""
    inside = True
    for i in range(rstd.shape[0]):
        inside &= RSTD_LOW < rstd[i] < RSTD_HIGH
    return inside


@inline_helper
def _per_element_row(g_row, x_row, gx_row, w_row, acc_w, acc_b, m, rs, rms, streaming, root_n):
    """One row with one weight per element and an rstd in float32's range, in float32:
    its two sums block by block, then ``grad_x`` with the parameter terms added into
    ``acc_w``/``acc_b`` in the same loop (non-temporal stores where ``streaming``).
    Returns the row's bound on grad_x's terms (:func:`_terms`)."""
    n = x_row.shape[0]
    hi = np.float32(m)
    lo = np.float32(m - hi)
    rs32 = np.float32(rs)
    sum_gw = 0.0
    sum_gwx = 0.0
    for start in range(0, n, BLOCK):  # one inlined copy of the block sums, for short rows and long
        stop = min(start + BLOCK, n)
        sg, sgx = _weighted_sums(g_row[start:stop], x_row[start:stop], w_row[start:stop], hi, lo, rs32,
                                 np.float32(0.0))
        sum_gw += sg
        sum_gwx += sgx
    proj = np.float32(sum_gwx / n)
    mean_gw = np.float32(0.0 if rms else sum_gw / n)
    if streaming:
        _gradient_row_streaming(g_row, x_row, gx_row, w_row, acc_w, acc_b, hi, lo, rs32, proj, mean_gw)
    else:
        _gradient_elements(g_row, x_row, gx_row, w_row, acc_w, acc_b, 0, n, hi, lo, rs32, proj, mean_gw)
    return _terms(proj, mean_gw, root_n)


@inline_helper
def _terms(proj, mean_gw, root_n):
    """``|proj|·√n + |mean_gw|`` in float64: a bound of grad_x's terms x̂·proj and mean_gw
    (inf or NaN where a sum overflowed)."""
    return abs(np.float64(proj)) * root_n + abs(np.float64(mean_gw))


@helper
def _other_row(g_row, x_row, gx_row, w_row, acc_w, acc_b, part_w, part_b, inner, rms, m, rs, root_n):
    """A row off the kernel's hot path (parameters per channel or repeating along the row,
    or an rstd that float32 cannot hold), kept out of line so that the hot loop stays
    small. Returns (1 when its parameter terms went into the float32 accumulators, else 0;
    the row's bound on grad_x's terms, as :func:`_per_element_row`'s)."""
    n = x_row.shape[0]
    if RSTD_LOW < rs < RSTD_HIGH:
        hi = np.float32(m)
        lo = np.float32(m - hi)
        rs32 = np.float32(rs)
        sum_gw, sum_gwx, products = _row_sums(g_row, x_row, w_row, part_w, part_b, inner, hi, lo, rs32,
                                              np.float32(0.0))
        proj = np.float32(sum_gwx / n)
        mean_gw = np.float32(0.0 if rms else sum_gw / n)
        _row_gradient(g_row, x_row, gx_row, w_row, acc_w, acc_b, inner, hi, lo, rs32, proj, mean_gw)
        return (1 if inner == 1 else 0), _terms(proj, mean_gw, root_n) + products
    # float64 arithmetic (float32 products g·w), its parameter terms straight into the parts
    sum_gw, sum_gwx, products = _row_sums(g_row, x_row, w_row, part_w, part_b, inner, m, 0.0, rs, 0.0)
    mean_gw = 0.0 if rms else sum_gw / n
    _row_gradient(g_row, x_row, gx_row, w_row, part_w, part_b, inner, m, 0.0, rs, sum_gwx / n, mean_gw)
    return 0, _terms(sum_gwx / n, mean_gw, root_n) + products


@kernel
def row_backward32(grad_y, grad_y_layout, x, x_layout, n, weight, param_row_stride, param_inner, rms, eps,
                   stats_given, mean, rstd, chunk_rows, grad_x, grad_x_layout, grad_weight_parts, grad_bias_parts,
                   redo):
    """``rows.row_backward`` for float32 rows (float32 grad_y, x, grad_x and weight table),
    in float32 arithmetic (see the module docstring): ``grad_x`` for every row, and the
    weight and bias gradients summed per chunk of ``chunk_rows`` rows into the float64
    ``grad_weight_parts[k]`` / ``grad_bias_parts[k]`` (zeroed by the caller, which adds
    the chunks in order). Unless ``stats_given`` it computes ``mean``/``rstd`` per row.
    ``redo[k]`` is set where chunk k met gradients that float32 could not hold (see the
    module docstring); the caller then runs the float64 kernel instead.

    Per-element parameter gradients gather up to :data:`FLUSH_ROWS` rows in float32
    accumulators, then go into the float64 parts (at each change of parameter group too).
    The common chunk (one weight per element for every row, as in layer and RMS norm,
    statistics given, every rstd in float32's range) runs a loop with no test per row:
    a test on each row's rstd cost short rows a third of their time, though it never
    fails. Its rows get the same operations as in the general loop, so the same bits.
    No row is prefetched: on a 2-core AMD EPYC the hardware prefetcher keeps up alone,
    and prefetching the next row cost 3-15% (rows of 1024 and 4096, in cache and far past
    it), as it did in the forward.
    The rows come as ``rows.row_at`` reads them (2-D, or flat with a layout)."""
    rows = mean.shape[0]
    groups = weight.shape[0]
    channels = weight.shape[1]
    per_element = param_inner == 1 and channels == n  # one weight per element of the row
    streaming = rows * n >= STREAM_ELEMENTS and n >= STREAM_MIN_ROW  # grad_x far past the cache: non-temporal stores
    plain_rows = per_element and groups == 1 and stats_given and not streaming
    root_n = np.sqrt(np.float64(n))
    for k in prange(grad_weight_parts.shape[0]):
        acc_w = np.zeros(channels, np.float32)
        acc_b = np.zeros(channels, np.float32)
        first = k * chunk_rows
        stop = min(rows, first + chunk_rows)
        terms = 0.0  # the rows' bounds on grad_x's terms, added up (a sum, not a test per row: see above)
        if plain_rows and _in_float32_range(rstd[first:stop]):
            w_row = weight[0]
            pending = 0
            for r in range(first, stop):
                x_row = row_at(x, x_layout, r, n)
                g_row = row_at(grad_y, grad_y_layout, r, n)
                terms += _per_element_row(g_row, x_row, row_at(grad_x, grad_x_layout, r, n), w_row, acc_w, acc_b,
                                          mean[r], rstd[r], rms, False, root_n)
                pending += 1
                if pending == FLUSH_ROWS:
                    terms += _flush(acc_w, acc_b, grad_weight_parts[k, 0], grad_bias_parts[k, 0])
                    pending = 0
            if pending > 0:
                terms += _flush(acc_w, acc_b, grad_weight_parts[k, 0], grad_bias_parts[k, 0])
            redo[k] = not terms < TERMS_LIMIT
            continue
        pending = 0
        last_group = 0
        for r in range(first, stop):
            x_row = row_at(x, x_layout, r, n)
            g_row = row_at(grad_y, grad_y_layout, r, n)
            gx_row = row_at(grad_x, grad_x_layout, r, n)
            if not stats_given:
                row_mean, _, row_rstd = group_stats(x_row, rms, eps)
                mean[r] = row_mean
                rstd[r] = row_rstd
            m = mean[r]
            rs = rstd[r]
            g = 0 if groups == 1 else (r // param_row_stride) % groups  # (an integer division costs)
            w_row = weight[g]
            if pending > 0 and g != last_group:
                terms += _flush(acc_w, acc_b, grad_weight_parts[k, last_group], grad_bias_parts[k, last_group])
                pending = 0
            if per_element and RSTD_LOW < rs < RSTD_HIGH:
                terms += _per_element_row(g_row, x_row, gx_row, w_row, acc_w, acc_b, m, rs, rms, streaming, root_n)
                pending += 1
            else:
                gathered, row_terms = _other_row(g_row, x_row, gx_row, w_row, acc_w, acc_b, grad_weight_parts[k, g],
                                                 grad_bias_parts[k, g], param_inner, rms, m, rs, root_n)
                pending += gathered
                terms += row_terms
            last_group = g
            if pending == FLUSH_ROWS:
                terms += _flush(acc_w, acc_b, grad_weight_parts[k, g], grad_bias_parts[k, g])
                pending = 0
        if pending > 0:
            terms += _flush(acc_w, acc_b, grad_weight_parts[k, last_group], grad_bias_parts[k, last_group])
        redo[k] = not terms < TERMS_LIMIT
    if streaming:
        store_fence()  # (see rows.scaled_streaming)


@helper
def rounded_to_float32(gradients, rounded):
    """``rounded``: the float64 weight and bias gradients (a 2-D array, one parameter a row)
    rounded to nearest float32, ±inf past its range, as torch's cast rounds them (and with
    no NumPy warning or errstate to enter)."""
    for p in range(gradients.shape[0]):
        for i in range(gradients.shape[1]):
            rounded[p, i] = np.float32(gradients[p, i])
