"""Fused Numba kernels over the canonical views that every pattern maps to.

:func:`canonical_view` reads a plan's runs of axes and picks a kernel family:

* **rows** ``(rows, n)``: runs ``[kept, reduced]`` or ``[reduced]`` (layer, instance,
  group and RMS norm). Kernels in :mod:`normlab.kernels.rows`. A strided input (or
  ``out``) whose rows are contiguous is read (written) where it lies, without a copy,
  when its rows are spaced in at most two levels (:func:`row_layout`): a slice of
  columns, or the heads of q and k sliced from a packed qkv projection.
* **channels-first** ``(outer, C, inner)``: ``[reduced, kept, reduced]``; **channels-last**
  ``(rows, C)``: ``[reduced, kept]`` (batch norm). Kernels in :mod:`normlab.kernels.columns`.
* any other order of axes (kept axes between reduced ones, say): a transposed copy with
  the kept axes first, run through the row kernels and transposed back.
* parameters laid out in a way no table describes, or empty input: ``None``, and the
  caller uses :mod:`normlab.reference`.

A repeated call (the NumPy API's, a torch twin's) runs the same kernels through the
cached calls of :mod:`normlab.kernels.fast`, built once per plan and dtypes.

Importing this package does not import Numba; the kernel modules are imported, and each
kernel compiled, on first use. Numerics and determinism are those of the reference (see
its module docstring): float64 statistics, groups shifted by their first element,
chunks fixed by index and merged in a fixed order. One difference: float32 rows are
applied in float32 SIMD arithmetic, with the mean split into a float32 high and low part
so that exact zeros and exact symmetric middles survive (see ``rows.row_forward32``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from normlab.kernels import pool
from normlab.kernels import threads
from normlab.kernels import strided
from normlab.kernels.strided import row_layout
from normlab.plan import Plan

__all__ = ["available", "canonical_view", "forward", "backward", "row_layout", "RowView", "ColumnView",
           "SERIAL_BELOW"]

SERIAL_BELOW = threads.POOL_SERIAL_BELOW  # elements: serial below this on normlab's own pool (see
# threads.serial_below, which a call asks: lower where the kernels run on torch's OpenMP pool)
CHUNKED_FROM = 1 << 15  # backward: from this many elements the parameter gradients are summed in chunks
ROW_CHUNKS = 64  # masked backward: units are cut into this many chunks for the parameter gradients
# row backward (layer, RMS, group norm and the fused blocks): at most this many chunks for the
# parameter gradients. 64 cost long rows up to 2.5x (1024x8192: 16.5 against 6.6 ms, float64
# 21.8 against 12.1; 8192x4096: 32.5 against 21.3, on 2 threads); 16 still lets 16 threads share a large input
GRADIENT_CHUNKS = 16
CHUNK_ELEMENTS = 1 << 14  # channels-first batch norm: elements per (chunk, channel) unit of work
# channels-last batch norm: rows are summed in groups of at least this many elements (and
# 64 rows), each group's per-channel sums kept apart and added in order; a unit of work is
# one group's rows over a block of CHANNEL_BLOCK channels
COLUMN_GROUP_ELEMENTS = 1 << 16
CHANNEL_BLOCK = 1024


def column_group_rows(channels: int) -> int:
    """Rows per group of the channels-last kernels: a function of the shape alone, so
    that the order of addition (and the result) is the same on any thread count."""
    rows = max(64, -(-COLUMN_GROUP_ELEMENTS // channels))
    return -(-rows // 4) * 4  # whole blocks of columns.ROW_BLOCK rows


def column_parts(rows: int, channels: int) -> np.ndarray:
    """Scratch of the channels-last kernels: four (groups, C) float64 tables of per-group
    sums, shared by the threads of one call (never touched whole: no page is zeroed)."""
    return np.empty((4, -(-rows // column_group_rows(channels)), channels))


_FLOAT32_INPUTS = (np.dtype(np.float16), np.dtype(np.float32))


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when Numba imports (the kernels can run)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class RowView:
    """Groups are the rows of ``(rows, n)``; parameters form a ``(groups, channels)`` table
    indexed by ``(r // row_stride) % groups`` and ``(j // inner) % channels``."""

    rows: int
    n: int
    param_groups: int = 1
    param_channels: int = 1
    param_row_stride: int = 1
    param_inner: int = 1
    order: tuple[int, ...] | None = None  # expanded axes, kept then reduced, when a transposed copy is needed

    def source(self, array: np.ndarray) -> np.ndarray:
        """``array`` (expanded view) with its axes in kernel order."""
        return array if self.order is None else array.transpose(self.order)

    def to_expanded(self, array: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`source` for an array of kernel-order ``sizes`` (any shape of that size)."""
        if self.order is None:
            return array.reshape(sizes)
        permuted = array.reshape(tuple(sizes[a] for a in self.order))
        return permuted.transpose(tuple(self.order.index(a) for a in range(len(sizes))))


@dataclass(frozen=True)
class ColumnView:
    """Batch norm: ``(outer, channels, inner)``, reduced over outer and inner; ``inner == 1``
    is channels-last ``(rows, channels)``. Parameters, if any, are per channel."""

    outer: int
    channels: int
    inner: int


def _spanned_block(axes: tuple[int, ...], sizes: tuple[int, ...], spanned: set[int]):
    """(block size, product of the sizes after the block) when the spanned axes among
    ``axes`` are contiguous; None when they are not."""
    flags = [a in spanned for a in axes]
    if not any(flags):
        return 1, math.prod(sizes[a] for a in axes)
    first = flags.index(True)
    last = len(flags) - 1 - flags[::-1].index(True)
    if not all(flags[first:last + 1]):
        return None
    return math.prod(sizes[a] for a in axes[first:last + 1]), math.prod(sizes[a] for a in axes[last + 1:])


_VIEWS: dict = {}  # id(plan) -> (plan, view); holding the plan keeps its id from being reused


def view_of(plan: Plan) -> RowView | ColumnView | None:
    """:func:`canonical_view`, remembered per plan object (plans are cached by make_plan,
    and hashing a plan's fields on every call costs more than the small kernels do)."""
    hit = _VIEWS.get(id(plan))
    if hit is not None and hit[0] is plan:
        return hit[1]
    if len(_VIEWS) >= 4096:
        _VIEWS.clear()
    view = canonical_view(plan)
    _VIEWS[id(plan)] = (plan, view)
    return view


@functools.lru_cache(maxsize=1024)
def canonical_view(plan: Plan) -> RowView | ColumnView | None:
    """The kernel view of ``plan``, or None when only the reference fits.

    >>> from normlab.plan import make_plan
    >>> canonical_view(make_plan("b (g [c]) [h w]", (2, 6, 4, 4), "(g c)", g=3))
    RowView(rows=6, n=32, param_groups=3, param_channels=2, param_row_stride=1, param_inner=16, order=None)
    >>> canonical_view(make_plan("[b] c [h w]", (8, 3, 4, 4), "c"))
    ColumnView(outer=8, channels=3, inner=16)
    >>> canonical_view(make_plan("b [h] w [c]", (2, 3, 4, 5))).order   # transposed: kept axes first
    (0, 2, 1, 3)
    """
    if math.prod(plan.shape) == 0:
        return None
    runs = plan.runs
    kinds = tuple(run.reduced for run in runs)
    sizes = plan.axis_sizes
    spanned = {a for a in plan.param_axes if sizes[a] > 1}
    if kinds in ((), (False,), (True,), (False, True)):
        kept = runs[0].axes if kinds and not kinds[0] else ()
        reduced = runs[-1].axes if kinds and kinds[-1] else ()
        row_block = _spanned_block(kept, sizes, spanned)
        col_block = _spanned_block(reduced, sizes, spanned)
        if row_block is None or col_block is None:
            return None
        rows = math.prod(sizes[a] for a in kept)
        n = math.prod(sizes[a] for a in reduced)
        return RowView(rows, n, row_block[0], col_block[0], row_block[1], col_block[1])
    if kinds in ((True, False), (True, False, True)):
        kept = runs[1]
        if plan.params is None or spanned == set(kept.axes):
            inner = runs[2].size if len(runs) == 3 else 1
            return ColumnView(runs[0].size, kept.size, inner)
    # any other order: a transposed copy with the kept axes first is a row view
    kept = tuple(a for a in plan.kept_axes if sizes[a] > 1)
    reduced = tuple(a for a in plan.reduced_axes if sizes[a] > 1)
    row_block = _spanned_block(kept, sizes, spanned)
    col_block = _spanned_block(reduced, sizes, spanned)
    if row_block is None or col_block is None:
        return None
    return RowView(math.prod(sizes[a] for a in kept), math.prod(sizes[a] for a in reduced), row_block[0],
                   col_block[0], row_block[1], col_block[1], plan.kept_axes + plan.reduced_axes)


def _compute_dtype(*arrays) -> np.dtype:
    """float32 when every array is float16/float32 (float16 goes through float32), else float64."""
    if all(a.dtype in _FLOAT32_INPUTS for a in arrays):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _result_buffer_dtype(result: np.dtype, compute: np.dtype) -> np.dtype:
    """The dtype the kernels write: the compute dtype, except float64 for a float16
    result, which is then rounded once (float64 -> float16), as the reference rounds it;
    through float32 it would be rounded twice and differ in the last bit."""
    return np.dtype(np.float64) if result == np.float16 else compute


@functools.lru_cache(maxsize=256)
def _constant_table(shape: tuple[int, ...], value: float, dtype=np.float64) -> np.ndarray:
    # shared between calls (kernels only read parameters); left writeable because a
    # read-only array is another Numba signature, compiled once more
    return np.full(shape, value, dtype)


def _param_table(expanded, view, ones: bool, dtype=np.float64):
    """A parameter laid out as the kernels index it: (groups, channels) for rows, (C,) for columns."""
    shape = (view.param_groups, view.param_channels) if isinstance(view, RowView) else (view.channels,)
    if expanded is None:
        return _constant_table(shape, 1.0 if ones else 0.0, dtype)
    if isinstance(view, RowView):
        expanded = view.source(expanded)
    return np.ascontiguousarray(expanded, dtype=dtype).reshape(shape)


def _flat_stats(value, length: int) -> np.ndarray:
    """Given statistics as a fresh writeable float64 vector (a read-only array would be
    another kernel signature, and the backward kernel writes its statistics array)."""
    return np.array(np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (length,)), np.float64)


def forward(prepared, eps: float, rms: bool, mean=None, rstd=None, out=None):
    """Twin of :func:`normlab.reference.forward` through the kernels.

    Takes the :class:`normlab.core.Prepared` arguments; ``mean``/``rstd`` (float64, the
    statistics' shape) apply given statistics. Returns ``(y, stats)`` with ``y`` in the
    input's shape (written into ``out`` when given) and ``stats`` a
    :class:`normlab.reference.Stats`, or None when the plan has no canonical view.
    """
    from normlab.reference import Stats, rounded

    plan = prepared.plan
    view = view_of(plan)
    if view is None:
        return None
    dtype = _compute_dtype(prepared.x)
    shape = (view.rows, view.n) if isinstance(view, RowView) else (view.outer, view.channels, view.inner)
    transposed = isinstance(view, RowView) and view.order is not None
    plain_rows = isinstance(view, RowView) and not transposed
    y_dtype = _result_buffer_dtype(prepared.dtype, dtype)
    # strided rows are read (and written into out) where they lie; anything else is copied
    x = x_rows = None
    if plain_rows:
        x_rows = strided.rows_of(prepared.x, view.n, dtype)
    else:
        x = np.ascontiguousarray(view.source(prepared.x) if transposed else prepared.x, dtype=dtype).reshape(shape)
        x_rows = (x, strided.PLAIN_ROWS) if transposed else None
    y_rows = None
    if plain_rows and out is not None and out.dtype == y_dtype:
        y_rows = row_layout(strided.split(out, plan.axis_sizes), view.n, disjoint=True)
    direct = y_rows is not None or (out is not None and out.dtype == y_dtype and out.flags.c_contiguous
                                    and not transposed)
    y = None if y_rows is not None else out.reshape(shape) if direct else pool.empty(shape, y_dtype)
    if isinstance(view, RowView):
        x_rows, y_rows = strided.one_kind(x_rows, (y, strided.PLAIN_ROWS) if y_rows is None else y_rows)
    # float32 rows run in float32 arithmetic (see rows.row_forward32), with float32 parameters
    # (not for a float16 result: that is rounded once from float64)
    float32_rows = isinstance(view, RowView) and dtype == np.float32 and y_dtype == np.float32
    table_dtype = np.float32 if float32_rows else np.float64
    weight = _param_table(prepared.weight, view, ones=True, dtype=table_dtype)
    bias = _param_table(prepared.bias, view, ones=False, dtype=table_dtype)
    serial = math.prod(shape) < threads.serial_below(row_forward=isinstance(view, RowView))
    groups = view.rows if isinstance(view, RowView) else view.channels
    stats_given = rstd is not None
    if stats_given:
        mean_flat = np.zeros(groups) if mean is None else _flat_stats(mean, groups)
        rstd_flat = _flat_stats(rstd, groups)
        var_flat = np.empty(groups)
    else:
        mean_flat, var_flat, rstd_flat = np.empty((3, groups))

    if isinstance(view, RowView):
        from normlab.kernels.rows import row_forward, row_forward32

        (row_forward32 if float32_rows else row_forward)(*x_rows, *y_rows, view.n, weight, bias, view.param_row_stride,
                                                         view.param_inner, rms, eps, stats_given, mean_flat, var_flat,
                                                         rstd_flat, serial=serial)
    else:
        column_forward(x, y, weight, bias, rms, eps, stats_given, mean_flat, var_flat, rstd_flat)

    if stats_given:
        stats = Stats(None if rms else mean, None, rstd)
    else:
        stats_shape = plan.stats_shape
        stats = Stats(None if rms else mean_flat.reshape(stats_shape), var_flat.reshape(stats_shape),
                      rstd_flat.reshape(stats_shape))
    if transposed:
        y = view.to_expanded(y, plan.axis_sizes)
    if out is not None:
        if not direct:
            with np.errstate(over="ignore"):  # past out's range: ±inf, as reference.rounded rounds
                np.copyto(out, y.reshape(plan.shape), casting="unsafe")
        return out, stats
    return rounded(y, prepared.dtype, order="C").reshape(plan.shape), stats


def _columns():
    """:mod:`normlab.kernels.columns`, imported on first use (the import statement's own
    cost is a microsecond per call)."""
    global _COLUMNS
    if _COLUMNS is None:
        from normlab.kernels import columns

        _COLUMNS = columns
    return _COLUMNS


_COLUMNS = None


def column_forward(x, y, weight, bias, rms: bool, eps: float, stats_given: bool, mean, var, rstd) -> None:
    """Batch norm's forward on a C-contiguous (outer, C, inner) view into ``y`` (same
    shape; float32 only for float32 ``x``): per-channel statistics into ``mean``, ``var``
    and ``rstd`` (float64, length C; read instead when ``stats_given``), then the output.
    ``weight`` and ``bias`` are float64 vectors of length C. ``inner == 1`` is
    channels-last (rows, C)."""
    columns = _columns()

    serial = x.size < threads.serial_below()
    outer, channels, inner = x.shape
    if inner == 1:
        x2, y2 = x.reshape(outer, channels), y.reshape(outer, channels)
        group_rows = column_group_rows(channels)
        if not stats_given:
            columns.channels_last_stats(x2, rms, eps, columns.CANCELLATION, group_rows, CHANNEL_BLOCK,
                                        column_parts(outer, channels), mean, var, rstd, serial=serial)
        # float32 output: float32 arithmetic (see columns.channels_last_apply32)
        apply = columns.channels_last_apply32 if y.dtype == np.float32 else columns.channels_last_apply
        apply(x2, y2, weight, bias, mean, rstd, group_rows, CHANNEL_BLOCK, serial=serial)
        return
    if not stats_given:
        outer_chunk = max(1, CHUNK_ELEMENTS // inner)
        columns.channels_first_stats(x, rms, eps, columns.CANCELLATION, outer_chunk,
                                     np.empty((4, -(-outer // outer_chunk), channels)), mean, var, rstd, serial=serial)
    apply = columns.channels_first_apply32 if y.dtype == np.float32 else columns.channels_first_apply
    apply(x, y, weight, bias, mean, rstd, serial=serial)


def column_backward(grad_y, x, weight, rms: bool, eps: float, stats_given: bool, mean, rstd, grad_x, grad_weight,
                    grad_bias) -> None:
    """Batch norm's backward on C-contiguous (outer, C, inner) views of one dtype: writes
    ``grad_x`` and the float64 ``grad_weight``/``grad_bias`` (length C); the statistics
    are recomputed into ``mean``/``rstd`` unless ``stats_given``."""
    columns = _columns()

    serial = x.size < threads.serial_below()
    outer, channels, inner = x.shape
    if inner == 1:
        x2, g2 = x.reshape(outer, channels), grad_y.reshape(outer, channels)
        group_rows = column_group_rows(channels)
        parts = column_parts(outer, channels)
        if not stats_given:
            columns.channels_last_stats(x2, rms, eps, columns.CANCELLATION, group_rows, CHANNEL_BLOCK, parts, mean,
                                        np.empty(channels), rstd, serial=serial)
        columns.channels_last_backward(g2, x2, weight, mean, rstd, rms, group_rows, CHANNEL_BLOCK, parts,
                                       grad_x.reshape(outer, channels), grad_weight, grad_bias, serial=serial)
        return
    outer_chunk = max(1, CHUNK_ELEMENTS // inner)
    chunks = -(-outer // outer_chunk)
    if not stats_given:
        columns.channels_first_stats(x, rms, eps, columns.CANCELLATION, outer_chunk, np.empty((4, chunks, channels)),
                                     mean, np.empty(channels), rstd, serial=serial)
    columns.channels_first_backward(grad_y, x, weight, mean, rstd, rms, outer_chunk, np.empty((chunks, channels)),
                                    np.empty((chunks, channels)), grad_x, grad_weight, grad_bias, serial=serial)


def fold_scale_shift(mean, var, weight, bias, eps: float, dtype) -> tuple[np.ndarray, ...]:
    """Running statistics and parameters (vectors of length C; weight and bias may be None)
    folded in float64 into ``(hi, lo, scale, shift)`` tables of the kernel dtype for
    :func:`scale_shift_view`: ``scale = w/sqrt(var + eps)``, ``shift = b`` and the mean
    split into ``hi = mean`` rounded and ``lo = mean − hi`` rounded."""
    table = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    mean64 = np.asarray(mean, np.float64)
    scale = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    if weight is not None:
        scale = scale * np.asarray(weight, np.float64)
    hi = mean64.astype(table)
    lo = (mean64 - hi).astype(table)
    shift = np.zeros(len(mean64), table) if bias is None else np.array(bias, table)
    return hi, lo, scale.astype(table), shift


def scale_shift_view(x: np.ndarray, y: np.ndarray, folded: tuple[np.ndarray, ...]) -> None:
    """Batch norm in evaluation as one fused pass over a C-contiguous (outer, C, inner)
    view: ``y = ((x − hi) − lo)·scale + shift`` per channel, with ``folded`` from
    :func:`fold_scale_shift`; ``inner == 1`` is channels-last (outer, C).

    >>> x = np.arange(12, dtype=np.float32).reshape(2, 3, 2); y = np.empty_like(x)
    >>> folded = fold_scale_shift(np.array([1., 2., 3.]), np.array([4., 1., 0.25]), None, None, 0.0, x.dtype)
    >>> scale_shift_view(x, y, folded)
    >>> y[0].tolist()
    [[-0.5, 0.0], [0.0, 1.0], [2.0, 4.0]]
    """
    from normlab.kernels import columns

    serial = x.size < threads.serial_below()
    if x.shape[2] == 1:
        channels = x.shape[1]
        columns.channels_last_scale_shift(x.reshape(-1, channels), y.reshape(-1, channels), *folded,
                                          max(1, CHUNK_ELEMENTS // channels), serial=serial)
    else:
        columns.channels_first_scale_shift(x, y, *folded, serial=serial)


MIN_CHUNK_ROWS = 8  # backward: a chunk's parameter-gradient parts cost a pass over n; 8 rows repay it


def row_chunks(rows: int, n: int) -> tuple[int, int]:
    """``(chunk_rows, chunks)``: how the row backward cuts its rows for the parameter
    gradients. A function of the shape alone, so that the sums (chunks added in index
    order) are the same on every thread count and either pool: one chunk below
    :data:`CHUNKED_FROM` elements, else up to :data:`GRADIENT_CHUNKS` chunks of at least
    :data:`MIN_CHUNK_ROWS` rows (each chunk's parts are n-long rows to zero, fill and
    add, more than the work they split for short chunks of long rows).

    >>> row_chunks(16, 64), row_chunks(64, 1 << 16), row_chunks(1 << 15, 64)
    ((16, 1), (8, 8), (2048, 16))
    """
    if rows * n < CHUNKED_FROM:
        return rows, 1
    chunk_rows = max(-(-rows // GRADIENT_CHUNKS), MIN_CHUNK_ROWS)
    return chunk_rows, -(-rows // chunk_rows)


def _sum_parts(parts: np.ndarray) -> np.ndarray:
    """The chunks' parts added in index order (one chunk: itself, no copy)."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(axis=0)


def _row_backward_kernel(dtype: np.dtype):
    """The row backward for a compute dtype: float32 SIMD arithmetic for float32 rows (with
    a float32 weight table), float64 otherwise."""
    if dtype == np.float32:
        from normlab.kernels.rows_backward import row_backward32

        return row_backward32
    from normlab.kernels.rows import row_backward

    return row_backward


def _laid_out_as_input(expanded: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``expanded`` (the kernels' rows seen in the expanded axes' order), or, where the
    input's ``shape`` cannot view it (grouped axes that the rows split, ``"b (g [c]) t [h w]"``),
    its copy in :func:`pool.empty`'s memory in C order, which then views as ``shape``: the
    copy NumPy's reshape would make, in memory the torch front end allocates (an input
    gradient that resizes, as torch.nn's do)."""
    try:
        np.reshape(expanded, shape, copy=False)
    except TypeError:  # (NumPy before 2.1 has no copy=: a view's shape set in place raises instead)
        try:
            expanded.view().shape = shape
        except AttributeError:
            pass
        else:
            return expanded
    except ValueError:
        pass
    else:
        return expanded
    copied = pool.empty(expanded.shape, expanded.dtype)
    np.copyto(copied, expanded)
    return copied


def backward(prepared, grad_y, eps: float, rms: bool, mean=None, rstd=None, need_params=False, dtype=None):
    """Twin of :func:`normlab.reference.backward` through the kernels.

    Returns ``(grad_x, grad_weight, grad_bias)``: ``grad_x`` in the expanded view (float32
    or float64), the parameter gradients in ``plan.param_broadcast_shape`` (float64) when
    ``need_params``, else None; or None when the plan has no canonical view. Statistics
    are recomputed when ``rstd`` is None. ``dtype`` forces the compute dtype (float64 where
    the float32 kernel met gradients past float32's range).
    """
    plan = prepared.plan
    view = view_of(plan)
    if view is None:
        return None
    dtype = _compute_dtype(prepared.x, grad_y) if dtype is None else dtype
    shape = (view.rows, view.n) if isinstance(view, RowView) else (view.outer, view.channels, view.inner)
    transposed = isinstance(view, RowView) and view.order is not None
    if transposed:
        x = np.ascontiguousarray(view.source(prepared.x), dtype=dtype).reshape(shape)
        g = np.ascontiguousarray(view.source(grad_y.reshape(plan.axis_sizes)), dtype=dtype).reshape(shape)
    elif isinstance(view, RowView):  # strided rows are read where they lie (row_layout)
        x = strided.rows_of(prepared.x, view.n, dtype)
        g = strided.rows_of(strided.split(grad_y, plan.axis_sizes), view.n, dtype)
    else:
        x = np.ascontiguousarray(prepared.x, dtype=dtype).reshape(shape)
        g = np.ascontiguousarray(grad_y, dtype=dtype).reshape(shape)
    grad_x = pool.empty(shape, _result_buffer_dtype(prepared.dtype, dtype))
    # float32 rows with a float32 result run in float32 arithmetic (see kernels.rows_backward)
    float32_rows = isinstance(view, RowView) and grad_x.dtype == np.float32
    weight = _param_table(prepared.weight, view, ones=True, dtype=np.float32 if float32_rows else np.float64)
    serial = math.prod(shape) < threads.serial_below()
    groups = view.rows if isinstance(view, RowView) else view.channels
    stats_given = rstd is not None
    if stats_given:
        mean_flat = np.zeros(groups) if mean is None else _flat_stats(mean, groups)
        rstd_flat = _flat_stats(rstd, groups)
    else:
        mean_flat, rstd_flat = np.empty(groups), np.empty(groups)

    if isinstance(view, RowView):
        chunk_rows, chunks = row_chunks(view.rows, view.n)
        weight_parts = np.zeros((chunks,) + weight.shape)
        bias_parts = np.zeros((chunks,) + weight.shape)
        if transposed:
            x, g = (x, strided.PLAIN_ROWS), (g, strided.PLAIN_ROWS)
        g, x, gx = strided.one_kind(g, x, (grad_x, strided.PLAIN_ROWS))
        arguments = (*g, *x, view.n, weight, view.param_row_stride, view.param_inner, rms, eps, stats_given,
                     mean_flat, rstd_flat, chunk_rows, *gx, weight_parts, bias_parts)
        if float32_rows:
            redo = np.zeros(chunks, np.bool_)
            _row_backward_kernel(grad_x.dtype)(*arguments, redo, serial=serial)
            if b"\x01" in redo.tobytes():  # gradients past float32's range: the float64 kernel
                return backward(prepared, grad_y, eps, rms, mean, rstd, need_params, dtype=np.dtype(np.float64))
        else:
            _row_backward_kernel(grad_x.dtype)(*arguments, serial=serial)
        grad_weight, grad_bias = _sum_parts(weight_parts), _sum_parts(bias_parts)
    else:
        grad_weight, grad_bias = np.empty(groups), np.empty(groups)
        column_backward(g, x, weight, rms, eps, stats_given, mean_flat, rstd_flat, grad_x, grad_weight, grad_bias)
    if transposed:
        grad_x = _laid_out_as_input(view.to_expanded(grad_x, plan.axis_sizes), plan.shape)
        if need_params:
            broadcast = plan.param_broadcast_shape
            grad_weight = view.to_expanded(grad_weight, broadcast)
            grad_bias = view.to_expanded(grad_bias, broadcast)
    grad_x = grad_x.reshape(plan.axis_sizes)
    if not need_params:
        return grad_x, None, None
    broadcast = plan.param_broadcast_shape
    return grad_x, grad_weight.reshape(broadcast), grad_bias.reshape(broadcast)
