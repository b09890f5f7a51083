"""Masks and segments through the kernels of :mod:`normlab.kernels.segments`.

:func:`group_view` lays a plan out as the ``(A, O, C, I)`` view those kernels take (kept,
reduced, kept, reduced; segments cut ``O``), in place when the axes already come in that
order with the segment axis first in ``O``, otherwise as a transposed copy with the kept
axes first and the segment axis next. Unsorted segment ids are sorted first (a stable
sort, so each group keeps its first counted element); sorted ids skip that copy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from normlab.kernels import ROW_CHUNKS, _compute_dtype, _result_buffer_dtype, _spanned_block, pool, threads
from normlab.plan import Plan

__all__ = ["GroupView", "group_view", "forward", "backward"]


@dataclass(frozen=True)
class GroupView:
    """The ``(A, O, C, I)`` layout of a plan; ``order`` transposes the expanded view into it
    (None: already in order). ``segment_step`` is how many ``O`` rows one step along the
    segment axis spans. Parameters: a (groups, channels) table indexed as the row kernels do,
    row ``(a·C + c) // row_stride % groups`` and column ``(i // inner) % channels``."""

    sizes: tuple[int, int, int, int]
    order: tuple[int, ...] | None
    segment_step: int
    param_groups: int
    param_channels: int
    param_row_stride: int
    param_inner: int


def _fit(axes, plan: Plan, segment_axis):
    """Split ``axes`` (in memory order) into the four runs A, O, C, I, or None."""
    parts = [[], [], [], []]
    slot = 0
    for axis in axes:
        reduced = plan.reduced[axis]
        while slot < 4 and (slot % 2 == 1) != reduced:
            slot += 1
        if slot == 4:
            return None
        parts[slot].append(axis)
    if segment_axis is not None and (not parts[1] or parts[1][0] != segment_axis):
        return None
    return parts


@functools.lru_cache(maxsize=1024)
def group_view(plan: Plan, segment_axis: int | None) -> GroupView | None:
    """The kernel layout of ``plan`` with segments along ``segment_axis``, or None when only
    the reference fits (parameters that span a reduced axis in ``O``, or empty input).

    >>> from normlab.plan import make_plan
    >>> group_view(make_plan("[b] c [t]", (4, 3, 5), "c"), None).sizes
    (1, 4, 3, 5)
    >>> group_view(make_plan("[n] c", (6, 2)), 0).sizes
    (1, 6, 2, 1)
    """
    if math.prod(plan.shape) == 0:
        return None
    sizes = plan.axis_sizes
    axes = [a for a in range(plan.ndim) if sizes[a] > 1 or a == segment_axis]
    parts = _fit(axes, plan, segment_axis)
    order = None
    if parts is None:
        kept = [a for a in axes if not plan.reduced[a]]
        reduced = [a for a in axes if plan.reduced[a]]
        if segment_axis is not None:
            reduced.remove(segment_axis)
            parts = [kept, [segment_axis], [], reduced]
        else:
            parts = [kept, [], [], reduced]
        order = tuple(a for a in range(plan.ndim) if a not in axes) + tuple(kept) + tuple(parts[1]) + tuple(reduced)
    a_axes, o_axes, c_axes, i_axes = parts
    if segment_axis is None and not c_axes and not i_axes:  # rows: let the reduced run be I, contiguous
        o_axes, i_axes = [], o_axes
    spanned = {a for a in plan.param_axes if sizes[a] > 1}
    if spanned & set(o_axes):
        return None
    row_block = _spanned_block(tuple(a_axes + c_axes), sizes, spanned)
    col_block = _spanned_block(tuple(i_axes), sizes, spanned)
    if row_block is None or col_block is None:
        return None
    view_sizes = tuple(math.prod(sizes[a] for a in part) for part in (a_axes, o_axes, c_axes, i_axes))
    step = math.prod(sizes[a] for a in o_axes[1:]) if segment_axis is not None else 1
    return GroupView(view_sizes, order, step, row_block[0], col_block[0], row_block[1], col_block[1])


def _inverse(order):
    return tuple(np.argsort(order))


def _to_view(array, view: GroupView, dtype=None):
    if view.order is not None:
        array = array.transpose(view.order)
    return np.ascontiguousarray(array, dtype=dtype).reshape(view.sizes)


def _from_view(array, view: GroupView, sizes: tuple[int, ...]):
    if view.order is None:
        return array.reshape(sizes)
    return array.reshape(tuple(sizes[a] for a in view.order)).transpose(_inverse(view.order))


def _table(expanded, view: GroupView, inner: int, ones: bool) -> np.ndarray:
    """A parameter as the kernels read it: (groups, 1), or (groups, I) when it varies along I."""
    if expanded is None:
        return np.full((1, 1), 1.0 if ones else 0.0)
    if view.order is not None:
        expanded = expanded.transpose(view.order)
    table = np.ascontiguousarray(expanded, dtype=np.float64).reshape(view.param_groups, view.param_channels)
    if view.param_channels == 1:
        return table
    wide = np.repeat(table, view.param_inner, axis=1)
    return np.ascontiguousarray(np.tile(wide, (1, inner // wide.shape[1])))


@dataclass(frozen=True)
class _Laid:
    """Arrays of one call in the kernel view."""

    view: GroupView
    perm: np.ndarray | None  # the stable sort of unsorted segment ids
    offsets: np.ndarray
    mask: np.ndarray
    has_mask: bool


def _lay_out(grouping, arrays, dtype):
    """The view, the segments' offsets and mask, and ``arrays`` (expanded views) in the
    kernel view; None when only the reference fits."""
    plan = grouping.plan
    view = group_view(plan, grouping.segment_axis)
    if view is None:
        return None
    perm = None
    axis = grouping.segment_axis
    mask = grouping.counted
    if axis is not None:
        ids = grouping.segment_ids
        if not grouping.ids_sorted:
            perm = np.argsort(ids, kind="stable")
            ids = ids[perm]
            arrays = [np.take(a, perm, axis=axis) for a in arrays]
            if mask is not None:
                mask = np.take(mask, perm, axis=axis)
        offsets = np.searchsorted(ids, np.arange(grouping.num_segments + 1)).astype(np.int64) * view.segment_step
    else:
        offsets = np.array([0, view.sizes[1]], np.int64)
    laid = [_to_view(a, view, dtype) for a in arrays]
    if mask is None:
        mask_view, has_mask = np.ones((1, 1, 1, 1), np.bool_), False
    else:
        mask_view, has_mask = _to_view(np.broadcast_to(mask, plan.axis_sizes), view, np.bool_), True
    return _Laid(view, perm, offsets, mask_view, has_mask), laid


def _undo(laid: _Laid, array, grouping):
    """An output in the kernel view back to the expanded view (unsorted ids unsorted)."""
    result = _from_view(array, laid.view, grouping.plan.axis_sizes)
    if laid.perm is not None:
        result = np.take(result, np.argsort(laid.perm), axis=grouping.segment_axis)
    return result


def _stats_to_expanded(flat, laid: _Laid, grouping):
    shape = grouping.stats_shape
    order = laid.view.order or tuple(range(len(shape)))
    return flat.reshape(tuple(shape[a] for a in order)).transpose(_inverse(order))


def _stats_to_flat(value, laid: _Laid, grouping):
    order = laid.view.order or tuple(range(len(grouping.stats_shape)))
    return np.array(np.broadcast_to(value, grouping.stats_shape).transpose(order), np.float64).reshape(-1)


def _last_chunks(laid, channels: int) -> tuple[int, int]:
    """(units, units per chunk) of the channels-last kernels: fixed by the shape alone."""
    from normlab.kernels.segments_last import BLOCK

    units = laid.view.sizes[0] * (len(laid.offsets) - 1) * (-(-channels // BLOCK))
    return units, max(1, -(-units // ROW_CHUNKS))


def _three(array):
    """An (A, O, C, 1) array as (A, O, C), for the channels-last kernels."""
    return array.reshape(array.shape[:3])


def _run(x, laid, rms, eps, weight, bias, stats, write_y, y):
    """Statistics (unless given: ``var`` is None) and, if ``write_y``, the output; returns ``var``."""
    from normlab.kernels import segments, segments_last

    mean, var, rstd, count = stats
    serial = x.size < threads.serial_below()
    inner = x.shape[3] > 1
    given = var is None
    if given:
        var = np.empty(mean.shape)
    if inner:
        if not given:
            segments.inner_stats(x, laid.mask, laid.has_mask, laid.offsets, rms, eps, mean, var, rstd, count,
                                 serial=serial)
        if write_y:
            segments.inner_apply(x, laid.offsets, weight, bias, laid.view.param_row_stride, mean, rstd, y,
                                 serial=serial)
        return var
    _, chunk_units = _last_chunks(laid, x.shape[2])
    if not given:
        segments_last.last_stats(_three(x), _three(laid.mask), laid.has_mask, laid.offsets,
                                 rms, eps, segments_last.BLOCK, chunk_units, mean, var, rstd, count, serial=serial)
    if write_y:
        segments_last.last_apply(_three(x), laid.offsets, weight, bias, laid.view.param_row_stride,
                                 segments_last.BLOCK, chunk_units, mean, rstd, _three(y), serial=serial)
    return var


def forward(prepared, grouping, eps: float, rms: bool, mean=None, rstd=None):
    """Twin of :func:`normlab.masked.forward`: ``(y, stats)`` with ``y`` in the expanded
    view (the input's dtype) and ``stats`` a :class:`~normlab.masked.MaskedStats` (None
    when ``mean``/``rstd`` are given), or None when the plan has no kernel view."""
    from normlab.masked import MaskedStats
    from normlab.reference import rounded

    dtype = _compute_dtype(prepared.x)
    found = _lay_out(grouping, [prepared.x], dtype)
    if found is None:
        return None
    laid, (x,) = found
    view = laid.view
    weight = _table(prepared.weight, view, view.sizes[3], ones=True)
    bias = _table(prepared.bias, view, view.sizes[3], ones=False)
    # the kernels index both tables alike: a missing one takes the other's shape
    if prepared.weight is None and prepared.bias is not None:
        weight = np.ones(bias.shape)
    if prepared.bias is None and prepared.weight is not None:
        bias = np.zeros(weight.shape)
    groups = view.sizes[0] * (len(laid.offsets) - 1) * view.sizes[2]
    y = pool.empty(x.shape, _result_buffer_dtype(prepared.dtype, dtype))  # float16: rounded once
    count = np.zeros(groups, np.int64)
    given = rstd is not None
    if given:
        mean_flat = np.zeros(groups) if mean is None else _stats_to_flat(mean, laid, grouping)
        stats = (mean_flat, None, _stats_to_flat(rstd, laid, grouping), count)
    else:
        stats = (np.zeros(groups), np.zeros(groups), np.zeros(groups), count)
    var = _run(x, laid, rms, eps, weight, bias, stats, True, y)
    y = rounded(_undo(laid, y, grouping), prepared.dtype)
    if given:
        return y, None
    unflat = functools.partial(_stats_to_expanded, laid=laid, grouping=grouping)
    result = MaskedStats(None if rms else unflat(stats[0]), unflat(var), unflat(stats[2]), unflat(count))
    return y, result


def backward(prepared, grouping, grad_y, eps: float, rms: bool, mean=None, rstd=None, need_params=False):
    """Twin of :func:`normlab.masked.backward`: ``(grad_x, grad_weight, grad_bias)``, the
    parameter gradients in ``param_broadcast_shape`` when ``need_params``; or None."""
    from normlab.kernels import segments

    plan = prepared.plan
    dtype = _compute_dtype(prepared.x, grad_y)
    found = _lay_out(grouping, [prepared.x, grad_y.reshape(plan.axis_sizes)], dtype)
    if found is None:
        return None
    laid, (x, g) = found
    view = laid.view
    inner = view.sizes[3]
    weight = _table(prepared.weight, view, inner, ones=True)
    if prepared.weight is None and need_params:  # the gradient tables take the weight table's shape
        weight = _table(plan.expand_params(np.ones(plan.param_shape)), view, inner, ones=True)
    groups = view.sizes[0] * (len(laid.offsets) - 1) * view.sizes[2]
    if rstd is None:
        mean_flat, rstd_flat = np.zeros(groups), np.zeros(groups)
        stats = (mean_flat, np.zeros(groups), rstd_flat, np.zeros(groups, np.int64))
        _run(x, laid, rms, eps, weight, weight, stats, False, x)
    else:
        mean_flat = np.zeros(groups) if mean is None else _stats_to_flat(mean, laid, grouping)
        rstd_flat = _stats_to_flat(rstd, laid, grouping)
    grad_x = pool.empty(x.shape, _result_buffer_dtype(prepared.dtype, dtype))
    serial = x.size < threads.serial_below()
    args = (g, x, laid.mask, laid.has_mask, laid.offsets, weight, view.param_row_stride, rms, mean_flat, rstd_flat)
    if inner > 1:
        units = groups
        chunk_units = -(-units // ROW_CHUNKS)
        chunks = -(-units // chunk_units)
        parts = np.zeros((2, chunks) + weight.shape)
        segments.inner_backward(*args, chunk_units, grad_x, parts[0], parts[1], serial=serial)
    else:
        from normlab.kernels import segments_last

        units, chunk_units = _last_chunks(laid, view.sizes[2])
        chunks = -(-units // chunk_units)
        parts = np.zeros((2, chunks) + weight.shape)
        segments_last.last_backward(_three(g), _three(x), _three(laid.mask), laid.has_mask, laid.offsets, weight,
                                    view.param_row_stride, rms, mean_flat, rstd_flat, segments_last.BLOCK,
                                    chunk_units, _three(grad_x), parts[0], parts[1], serial=serial)
    grad_x = _undo(laid, grad_x, grouping)
    if not need_params:
        return grad_x, None, None
    # chunk order fixed by index: the same sum on any number of threads
    grad_w, grad_b = parts[0].sum(axis=0), parts[1].sum(axis=0)
    return grad_x, _param_grad(grad_w, view, plan), _param_grad(grad_b, view, plan)


def _param_grad(table, view: GroupView, plan: Plan):
    """A (groups, 1 or I) gradient table back to ``param_broadcast_shape``."""
    if view.param_channels > 1:
        # fold the tiled columns back: column i belongs to parameter column (i // inner) % channels
        table = table.reshape(view.param_groups, -1, view.param_channels, view.param_inner).sum(axis=(1, 3))
    shape = plan.param_broadcast_shape
    if view.order is None:
        return table.reshape(shape)
    return table.reshape(tuple(shape[a] for a in view.order)).transpose(_inverse(view.order))
