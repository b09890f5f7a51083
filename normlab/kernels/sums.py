"""Reductions shared by the kernels, in float64.

The sums are compiled with ``reassoc`` only (see :mod:`normlab.kernels._jit`), so LLVM
splits them into SIMD lanes; the order is fixed by the compiled code, so the result is
the same on every run and every thread count. Twin: the ``.sum`` calls in
:mod:`normlab.reference` (same terms, a different but fixed order of addition).
"""

from __future__ import annotations

import numpy as np

from normlab.kernels._jit import helper, reduction


@reduction
def shifted_sum(values, shift):
    """Σ (v − shift) over a 1-D array."""
    total = 0.0
    for i in range(values.shape[0]):
        total += values[i] - shift
    return total


@reduction
def centered_square_sum(values, shift, center):
    """Σ ((v − shift) − center)², the second pass of the shifted two-pass variance."""
    total = 0.0
    for i in range(values.shape[0]):
        d = (values[i] - shift) - center
        total += d * d
    return total


@reduction
def square_sum(values):
    """Σ v² (RMS norm has no mean and no shift)."""
    total = 0.0
    for i in range(values.shape[0]):
        v = np.float64(values[i])
        total += v * v
    return total


@reduction
def gradient_sums(grad, values, center):
    """(Σ g, Σ g·(v − center)): what the backward pass needs of one channel or group."""
    sum_g = 0.0
    sum_g_dev = 0.0
    for i in range(values.shape[0]):
        g = np.float64(grad[i])
        sum_g += g
        sum_g_dev += g * (values[i] - center)
    return sum_g, sum_g_dev


@reduction
def weighted_gradient_sums(grad, values, weight, center):
    """(Σ g·w, Σ g·w·(v − center)) with one weight per element."""
    sum_gw = 0.0
    sum_gw_dev = 0.0
    for i in range(values.shape[0]):
        gw = grad[i] * weight[i]
        sum_gw += gw
        sum_gw_dev += gw * (values[i] - center)
    return sum_gw, sum_gw_dev


@helper
def reciprocal_std(var, eps):
    """``1/sqrt(var + eps)``, as ``reference.compute_stats`` defines it: NaN when the
    variance overflowed to inf (finite float64 values beyond about 1e154). The true rstd
    is tiny there, not 0, and 0 would turn the group into silent zeros."""
    if var == np.inf:
        return np.nan
    return 1.0 / np.sqrt(var + eps)


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
    return mean, var, reciprocal_std(var, eps)


@reduction
def shifted_moments(values, shift):
    """(Σ d, Σ d²) with d = v − shift, in float64: one pass for the mean and the variance.

    For float32 values d is exact in float64 and d² nearly so, so the variance
    Σd²/n − (Σd/n)² loses only what the shift's distance from the mean costs: a factor
    1 + K² where K = |shift − mean|/std, and K² ≤ n because the shift is one of the values.
    """
    sum_d = 0.0
    sum_d2 = 0.0
    for i in range(values.shape[0]):
        d = values[i] - shift
        sum_d += d
        sum_d2 += d * d
    return sum_d, sum_d2
