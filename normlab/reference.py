r"""The NumPy math: statistics, forward and backward. The one place the formulas live.

All functions take arrays in a plan's *expanded view* (compositions split, ellipsis
expanded) and reduce over ``plan.reduced_axes``. For a group of ``n`` elements:

.. math::

    \mu = \frac1n\sum x_i,\qquad \sigma^2 = \frac1n\sum (x_i-\mu)^2,\qquad
    r = 1/\sqrt{\sigma^2+\varepsilon},\qquad y_i = (x_i-\mu)\,r\,w + b

with the *biased* variance, as PyTorch and ONNX normalize. With ``rms=True`` there is no
mean: :math:`r = 1/\sqrt{\frac1n\sum x_i^2+\varepsilon}` and :math:`y_i = x_i\,r\,w + b`.

Backward, with :math:`\hat x_i=(x_i-\mu)r` and :math:`g_i = \partial L/\partial y_i\cdot w`:

.. math::

    \frac{\partial L}{\partial x_i} = r\Big(g_i - \overline{g} - \hat x_i\,\overline{g\hat x}\Big)

(``rms`` drops :math:`\overline{g}`); the weight gradient sums :math:`\partial L/\partial y\cdot\hat x`
and the bias gradient sums :math:`\partial L/\partial y` over every axis that ``params`` omits.

Numerical choices, made once here and mirrored by the kernels:

* **float64 accumulation.** Every input (float16, float32, float64) is widened to float64
  for the statistics and the affine map; the result is rounded once to the input dtype.
* **Shifted two-pass variance, never E[x²]−E[x]².** Each group first subtracts its own
  first element ``s`` (the *shift*): ``d = x − s``. For float32 input that subtraction is
  exact in float64, so a large common offset (|mean|/std up to 1e6 and beyond) costs no
  precision. Then ``mean_d = Σd/n`` and ``var = Σ(d − mean_d)²/n`` (two passes).
* **Exact zeros.** A constant group gives ``d = 0`` exactly, so ``mean = s`` exactly and
  ``x − mean = 0``: the output is exactly 0 (exactly ``bias`` when affine; with ``eps=0``
  it is 0/0 = NaN, as in PyTorch). In a symmetric float16/float32 group such as
  [4, 3, 2] the deviations from ``s`` are exact in float64 with bits to spare, so ``Σd``
  and ``Σd/n`` are exact and the middle element equals the mean bit for bit: it becomes
  0. float64 input keeps this wherever the deviations' sum is representable, as for the
  demo's numbers. Equal inputs in one group go through the same elementwise arithmetic,
  so they give identical outputs.
* **Layout-independent.** Inputs are made C-contiguous before summing, so strided and
  contiguous inputs give the same bits.
* **NaN/Inf stay in their group**: statistics never mix groups.
* **Overflow is NaN, never zeros.** A float64 group whose variance (or mean square)
  overflows to inf (values beyond about 1e154) gets ``rstd = NaN``, so its outputs are
  NaN; ``1/sqrt(inf) = 0`` would make them silent zeros.
* **A result past its dtype's range is ±inf, quietly.** Rounding the float64 result (or
  gradient) to float16 or float32 gives ±inf where it does not fit, as torch gives it,
  without NumPy's "overflow encountered in cast" warning (:func:`rounded`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from normlab.plan import Plan

__all__ = ["Stats", "compute_stats", "apply_stats", "forward", "backward", "rounded"]

ACCUMULATE = np.float64


def rounded(values: np.ndarray, dtype, order: str = "K") -> np.ndarray:
    """``values`` rounded to ``dtype`` (``astype`` without a copy where none is needed); a
    value past the dtype's range becomes ±inf, as in torch, without NumPy's warning.

    >>> rounded(np.array([1.5, 1e6]), np.float16).tolist()
    [1.5, inf]
    """
    if values.dtype == dtype:  # nothing to round: no errstate to enter (a small call's time)
        return values.astype(dtype, order=order, copy=False)
    with np.errstate(over="ignore"):
        return values.astype(dtype, order=order, copy=False)


@dataclass(frozen=True)
class Stats:
    """Per-group statistics in float64, of ``plan.stats_shape``; ``mean`` is None for RMS."""

    mean: np.ndarray | None
    var: np.ndarray  # biased variance (for rms: the mean square)
    rstd: np.ndarray


def _first_of_group(x: np.ndarray, plan: Plan) -> np.ndarray:
    index = tuple(slice(0, 1) if r else slice(None) for r in plan.reduced)
    return x[index]


def compute_stats(x: np.ndarray, plan: Plan, eps: float, rms: bool = False) -> Stats:
    """Statistics of ``x`` (expanded view) per group, computed as the module docstring says.

    >>> from normlab.plan import make_plan
    >>> s = compute_stats(np.array([[4.0, 3.0, 2.0]]), make_plan("b [f]", (1, 3)), eps=0.0)
    >>> s.mean, s.var
    (array([[3.]]), array([[0.66666667]]))
    """
    axes = plan.reduced_axes
    n = plan.group_size
    # one summation order, whatever the strides (0-d stays 0-d: ascontiguousarray makes it 1-d)
    x64 = np.ascontiguousarray(x, dtype=ACCUMULATE).reshape(x.shape)
    if n == 0:  # empty groups: nothing to normalize, no variance to know (mean 0 and rstd NaN, as torch's)
        unknown = np.full(plan.stats_shape, np.nan)
        return Stats(None if rms else np.zeros(plan.stats_shape, ACCUMULATE), unknown, unknown.copy())
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if rms:
            var = np.square(x64).sum(axis=axes, keepdims=True) / n
            mean = None
        else:
            shift = _first_of_group(x64, plan)
            deviation = x64 - shift
            mean_shifted = deviation.sum(axis=axes, keepdims=True) / n
            var = np.square(deviation - mean_shifted).sum(axis=axes, keepdims=True) / n
            mean = shift + mean_shifted
        rstd = 1.0 / np.sqrt(var + eps)
    # NumPy's arithmetic on 0-d arrays (a 0-d x under "[...]") gives scalars; statistics are arrays
    mean, var, rstd = None if mean is None else np.asarray(mean), np.asarray(var), np.asarray(rstd)
    # a variance that overflowed (finite values beyond about 1e154) gives rstd = 0 above,
    # which would turn the group into silent zeros: NaN says the result is unknown
    rstd[var == np.inf] = np.nan
    return Stats(mean, var, rstd)


def apply_stats(x, mean, rstd, weight=None, bias=None, dtype=None, out=None):
    """``y = (x − mean)·rstd·weight + bias`` in float64, rounded once to ``dtype``.

    All arguments broadcast against ``x`` (expanded view); ``mean=None`` is RMS.
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        y = x.astype(ACCUMULATE, copy=True)
        if mean is not None:
            y -= mean
        y *= rstd
        if weight is not None:
            y *= weight
        if bias is not None:
            y += bias
        if out is None:
            return y.astype(dtype or x.dtype, copy=False)
        np.copyto(out, y, casting="unsafe")
    return out


def forward(x, plan: Plan, eps: float, rms: bool = False, weight=None, bias=None, dtype=None, out=None):
    """Statistics and output in one call; returns ``(y, stats)``."""
    stats = compute_stats(x, plan, eps, rms)
    return apply_stats(x, stats.mean, stats.rstd, weight, bias, dtype, out), stats


def backward(grad_y, x, plan: Plan, mean, rstd, weight=None, need_weight=False, need_bias=False):
    """Gradients of :func:`forward` w.r.t. x, weight and bias (expanded views, float64).

    ``weight`` broadcasts against ``x``; the parameter gradients come back in
    ``plan.param_broadcast_shape`` (or None when not asked for).
    """
    axes = plan.reduced_axes
    n = plan.group_size
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        g = np.ascontiguousarray(grad_y, dtype=ACCUMULATE)
        x_hat = np.array(x, dtype=ACCUMULATE, order="C")
        if mean is not None:
            x_hat -= mean
        x_hat *= rstd
        g_scaled = g * weight if weight is not None else g
        if n == 0:
            grad_x = np.zeros_like(x_hat)
        else:
            proj = (g_scaled * x_hat).sum(axis=axes, keepdims=True) / n
            grad_x = g_scaled - x_hat * proj
            if mean is not None:
                grad_x -= g_scaled.sum(axis=axes, keepdims=True) / n
            grad_x *= rstd
        outside = tuple(i for i in range(plan.ndim) if i not in set(plan.param_axes))
        grad_weight = (g * x_hat).sum(axis=outside, keepdims=True) if need_weight else None
        grad_bias = g.sum(axis=outside, keepdims=True) if need_bias else None
    return grad_x, grad_weight, grad_bias
