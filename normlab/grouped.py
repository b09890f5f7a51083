"""The engine behind ``mask=`` and ``segment_ids=`` of :func:`normlab.normalize` and
:func:`normlab.normalize_backward`: checks the arguments, then runs the kernels of
:mod:`normlab.kernels.masked` or the reference math of :mod:`normlab.masked`."""

from __future__ import annotations

import numpy as np

from normlab import core, masked
from normlab.errors import InputError, ShapeError
from normlab.plan import merge_sizes

__all__ = ["normalize_with_stats", "normalize_backward"]


def _given(value, name: str, grouping: masked.Grouping) -> np.ndarray:
    """Given statistics laid out in ``grouping.stats_shape``, taken as
    :func:`normlab.core.normalize` takes them: that shape, the kept axes and the segment
    axis alone in order, or an array that broadcasts to it. Any other shape is an error,
    even when the number of values fits: a reshape would reorder them."""
    plan, shape = grouping.plan, grouping.stats_shape
    axes = [a for a in range(plan.ndim) if a in plan.kept_axes or a == grouping.segment_axis]
    return core.stats_in_shape(value, name, plan, shape, tuple(shape[a] for a in axes),
                               "the kept axes, and the segment axis of length num_segments, in order")


def _given_stats(grouping, rms, mean, rstd):
    plan = grouping.plan
    core.refuse_mean_with_rms(mean, rms, f"pattern {plan.pattern!r}, input shape {plan.shape}")
    if rstd is None and mean is None:
        return None, None
    if rstd is None or (mean is None and not rms):
        raise InputError(f"pattern {plan.pattern!r}, input shape {plan.shape}: pass both mean and rstd "
                         "(rstd alone with rms=True)")
    return (None if rms else _given(mean, "mean", grouping)), _given(rstd, "rstd", grouping)


def normalize_with_stats(x, pattern, *, weight=None, bias=None, params=None, eps=1e-5, rms=False, out=None,
                         mean=None, rstd=None, backend=None, mask=None, segment_ids=None, num_segments=None,
                         segment_axis=None, sizes=None, **axis_sizes):
    """:func:`normlab.normalize` with a mask or segments: ``(y, stats)``, ``stats`` a
    :class:`normlab.masked.MaskedStats` (for ``mean`` and ``rstd`` given: those, read into the
    statistics' shape, with no variance or counts)."""
    sizes = merge_sizes(pattern, sizes, axis_sizes, core._shape_of(x))
    prepared = core.prepare(x, pattern, weight, bias, params, sizes)
    plan = prepared.plan
    eps = core._check_eps(eps, plan)
    rms = core._check_flag(rms, "rms", plan)  # a Python bool: the kernels compile once per flag type
    if out is not None:
        core._check_out(out, prepared)
    grouping = masked.make_grouping(plan, mask, segment_ids, num_segments, segment_axis)
    mean, rstd = _given_stats(grouping, rms, mean, rstd)
    result = None
    if core._resolve_backend(backend, plan, prepared.x.dtype) == "numba":
        from normlab.kernels import masked as masked_kernels

        result = masked_kernels.forward(prepared, grouping, eps, rms, mean, rstd)
    if result is None:
        result = masked.forward(prepared.x, grouping, eps, rms, prepared.weight, prepared.bias, prepared.dtype,
                                mean, rstd)
    y, stats = result
    if stats is None:  # given statistics: handed back as read, in the statistics' shape (as without a mask)
        stats = masked.MaskedStats(mean, None, rstd, None)
    y = y.reshape(plan.shape)
    if out is not None:
        np.copyto(out, y, casting="unsafe")
        y = out
    return y, stats


def normalize_backward(grad_y, x, pattern, *, weight=None, params=None, eps=1e-5, rms=False, mean=None, rstd=None,
                       backend=None, mask=None, segment_ids=None, num_segments=None, segment_axis=None,
                       sizes=None, **axis_sizes):
    """:func:`normlab.normalize_backward` with a mask or segments."""
    core.reject_masked(grad_y, "grad_y", f"pattern {pattern!r}, input shape {np.shape(x)}")
    sizes = merge_sizes(pattern, sizes, axis_sizes, core._shape_of(x))
    prepared = core.prepare(x, pattern, weight, None, params, sizes)
    plan = prepared.plan
    eps = core._check_eps(eps, plan)
    rms = core._check_flag(rms, "rms", plan)
    given_grad_y, grad_y = grad_y, core.as_array(grad_y, "grad_y", pattern, plan.shape)
    core.check_gradient_shape(given_grad_y, grad_y, "grad_y", plan)
    core.result_dtype(grad_y, pattern, "grad_y")
    grad_y = core.computable(grad_y)
    grouping = masked.make_grouping(plan, mask, segment_ids, num_segments, segment_axis)
    mean, rstd = _given_stats(grouping, rms, mean, rstd)
    need_weight, need_bias = weight is not None, params is not None
    result = None
    if core._resolve_backend(backend, plan, prepared.x.dtype, grad_y.dtype) == "numba":
        from normlab.kernels import masked as masked_kernels

        result = masked_kernels.backward(prepared, grouping, grad_y, eps, rms, mean, rstd,
                                         need_params=need_weight or need_bias)
    if result is None:
        if rstd is None:
            stats = masked.compute_stats(prepared.x, grouping, eps, rms)
            mean, rstd = stats.mean, stats.rstd
        count = masked.group_counts(grouping)
        result = masked.backward(grad_y.reshape(plan.axis_sizes), prepared.x, grouping, mean, rstd, count,
                                 prepared.weight, need_weight, need_bias)
    grad_x, grad_w, grad_b = result
    return core._finish_backward(prepared, grad_x, grad_w if need_weight else None, grad_b if need_bias else None,
                                 weight)
