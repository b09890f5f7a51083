"""Reductions shared by the kernels, in float64 with four independent accumulators.

Four accumulators in a fixed order let LLVM keep the adds in flight (and pack them into
SIMD registers) without ``fastmath``: the order is part of the source, so the result is
the same on every run and every thread count. Twin: the ``.sum`` calls in
:mod:`normlab.reference` (same terms, a different but fixed order of addition).
"""

from __future__ import annotations

import numpy as np

from normlab.kernels._jit import helper


@helper
def shifted_sum(values, shift):
    """Σ (v − shift) over a 1-D array."""
    n = values.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    stop = n - n % 4
    for i in range(0, stop, 4):
        s0 += values[i] - shift
        s1 += values[i + 1] - shift
        s2 += values[i + 2] - shift
        s3 += values[i + 3] - shift
    for i in range(stop, n):
        s0 += values[i] - shift
    return (s0 + s1) + (s2 + s3)


@helper
def centered_square_sum(values, shift, center):
    """Σ ((v − shift) − center)², the second pass of the shifted two-pass variance."""
    n = values.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    stop = n - n % 4
    for i in range(0, stop, 4):
        d0 = (values[i] - shift) - center
        d1 = (values[i + 1] - shift) - center
        d2 = (values[i + 2] - shift) - center
        d3 = (values[i + 3] - shift) - center
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
    for i in range(stop, n):
        d = (values[i] - shift) - center
        s0 += d * d
    return (s0 + s1) + (s2 + s3)


@helper
def square_sum(values):
    """Σ v² (RMS norm has no mean and no shift)."""
    n = values.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    stop = n - n % 4
    for i in range(0, stop, 4):
        v0 = np.float64(values[i])
        v1 = np.float64(values[i + 1])
        v2 = np.float64(values[i + 2])
        v3 = np.float64(values[i + 3])
        s0 += v0 * v0
        s1 += v1 * v1
        s2 += v2 * v2
        s3 += v3 * v3
    for i in range(stop, n):
        v = np.float64(values[i])
        s0 += v * v
    return (s0 + s1) + (s2 + s3)


@helper
def gradient_sums(grad, values, center):
    """(Σ g, Σ g·(v − center)): what the backward pass needs of one channel or group."""
    n = values.shape[0]
    g0 = 0.0
    g1 = 0.0
    p0 = 0.0
    p1 = 0.0
    stop = n - n % 2
    for i in range(0, stop, 2):
        ga = np.float64(grad[i])
        gb = np.float64(grad[i + 1])
        g0 += ga
        g1 += gb
        p0 += ga * (values[i] - center)
        p1 += gb * (values[i + 1] - center)
    for i in range(stop, n):
        ga = np.float64(grad[i])
        g0 += ga
        p0 += ga * (values[i] - center)
    return g0 + g1, p0 + p1


@helper
def weighted_gradient_sums(grad, values, weight, center):
    """(Σ g·w, Σ g·w·(v − center)) with one weight per element."""
    n = values.shape[0]
    g0 = 0.0
    g1 = 0.0
    p0 = 0.0
    p1 = 0.0
    stop = n - n % 2
    for i in range(0, stop, 2):
        ga = grad[i] * weight[i]
        gb = grad[i + 1] * weight[i + 1]
        g0 += ga
        g1 += gb
        p0 += ga * (values[i] - center)
        p1 += gb * (values[i + 1] - center)
    for i in range(stop, n):
        ga = grad[i] * weight[i]
        g0 += ga
        p0 += ga * (values[i] - center)
    return g0 + g1, p0 + p1


@helper
def group_stats(values, rms, eps):
    """(mean, var, rstd) of one contiguous group, as ``reference.compute_stats`` defines
    them: shift by the first element, then a two-pass variance (RMS: mean square)."""
    n = values.shape[0]
    if rms:
        var = square_sum(values) / n
        mean = 0.0
    else:
        shift = np.float64(values[0])
        mean_shifted = shifted_sum(values, shift) / n
        var = centered_square_sum(values, shift, mean_shifted) / n
        mean = shift + mean_shifted
    return mean, var, 1.0 / np.sqrt(var + eps)
