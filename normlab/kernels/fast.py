"""The cached calls of the row kernels: :class:`FastForward` and :class:`FastBackward`,
built once per plan, dtypes and flags, so that a repeated call does almost no Python.

The NumPy API keeps a :class:`FastForward` per (pattern, shape, dtype, flags) of
``normalize`` (``core._FAST_CALLS``); the torch twins keep one per module and input
shape (:mod:`normlab.torch.compute`) and a :class:`FastBackward` beside it for training
(:mod:`normlab.torch.row_autograd`). Both run the kernels that
:func:`normlab.kernels.forward` and :func:`normlab.kernels.backward` run, with the same
tables, chunks and thresholds, so their results are the same bits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from normlab.kernels import (RowView, _constant_table, _param_table, _row_backward_kernel, _sum_parts, pool,
                             row_chunks, strided, threads, view_of)
from normlab.plan import Plan


def compiled_entry(dispatcher, arguments: tuple):
    """The machine code a Numba ``dispatcher`` compiled for these arguments' types, as a
    function that skips the dispatcher's type checks (about a microsecond of a small
    call with many arguments), or None. Only for a caller whose later arguments have the
    same types: the entry reads them as it was compiled for them, unchecked."""
    try:
        return dispatcher.get_overload(tuple(dispatcher.typeof_pyval(a) for a in arguments))
    except Exception:  # noqa: BLE001 - not compiled for exactly these types: the dispatcher serves
        return None


@dataclass(frozen=True)
class FastForward:
    """A row-kernel forward with everything but the arrays decided: the kernel, the
    shapes, the parameter tables' layout. Built once per (plan, dtypes, rms) by
    :func:`fast_forward`; a call does a few checks, allocates the output and runs the kernel.
    """

    kernel: object
    dtype: np.dtype
    shape: tuple[int, ...]  # (rows, n)
    out_shape: tuple[int, ...]
    stats_shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    table_shape: tuple[int, ...]
    table_dtype: type
    direct_params: bool  # the table is the parameter reshaped (no transposition)
    param_row_stride: int
    param_inner: int
    rms: bool
    nbytes: int  # the output's size: from the recycled pool from pool.MIN_BYTES
    plan: Plan
    view: RowView
    # where the kernel writes statistics nobody asked for: shared by every call, since the
    # kernel only writes them (never reads them back) when it computes them; empty for a
    # plan of more than KEPT_SCRATCH_ROWS rows, whose calls allocate their own (:meth:`_scratch`)
    scratch: tuple = ()
    # the serial kernel's compiled entry (run_serial) for aligned C-contiguous x of the plan's
    # dtype, per dtype of the parameter tables
    entries: dict = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, x, weight, bias, eps, return_stats: bool):
        """``y`` (or ``(y, mean, rstd)``), or None when an argument needs the full checks."""
        if not (0.0 <= eps < math.inf):
            return None
        weight_table = self._table(weight, 1.0)
        bias_table = self._table(bias, 0.0)
        if weight_table is None or bias_table is None:
            return None
        if x.dtype == self.dtype and x.flags.c_contiguous:  # (run's common case, its attributes bound)
            return (self._stats_runner if return_stats else self._runner)(x, weight_table, bias_table, eps)
        return self.run(x, weight_table, bias_table, eps, return_stats)

    @functools.cached_property
    def _runner(self):
        """:meth:`contiguous_runner`, made once (the NumPy API's repeated call)."""
        return self.contiguous_runner()

    @functools.cached_property
    def _stats_runner(self):
        """:meth:`contiguous_runner` with statistics, made once."""
        return self.contiguous_runner(return_stats=True)

    def tables(self, weight, bias):
        """The kernel's ``(weight, bias)`` tables for these parameters, or None where they
        need the full checks; :meth:`run` takes them (a caller may keep them between calls
        while the parameters stay unchanged)."""
        weight_table = self._table(weight, 1.0)
        bias_table = self._table(bias, 0.0)
        return None if weight_table is None or bias_table is None else (weight_table, bias_table)

    @staticmethod
    def tables_are_views(tables, weight, bias) -> bool:
        """True when each table reads its parameter's own memory (no copy), so that it
        sees every later write into the parameter, a write through ``tensor.data``
        included (which moves no version counter a cache could check)."""
        return all(param is None or np.may_share_memory(table, param)
                   for table, param in zip(tables, (weight, bias)))

    def run(self, x, weight_table, bias_table, eps: float, return_stats: bool = False, out=None):
        """The kernel on prepared tables; ``0 <= eps < inf`` is the caller's to check.
        ``out``: a C-contiguous array of the plan's dtype and size to write ``y`` into."""
        rows, n = shape = self.shape
        if out is not None:
            y = out.reshape(shape)
        else:
            y = pool.empty(shape, self.dtype) if self.nbytes >= pool.MIN_BYTES else np.empty(shape, self.dtype)
        stats = np.empty((3, rows)) if return_stats else self._scratch()
        plain = strided.PLAIN_ROWS
        rows_in_place = x.dtype == self.dtype and x.flags.c_contiguous
        if rows_in_place:  # the common case, without row_layout's checks
            x_rows, y_rows = (x.reshape(shape), plain), (y, plain)
        else:  # a strided x is read where it lies when its rows allow (row_layout), else copied
            x_rows, y_rows = strided.one_kind(self.rows_of(x), (y, plain))
        arguments = (*x_rows, *y_rows, n, weight_table, bias_table, self.param_row_stride, self.param_inner,
                     self.rms, float(eps), False, *stats)
        if rows * n >= threads.serial_below(row_forward=True):
            self.kernel(*arguments)
        else:
            self.run_serial(arguments, rows_in_place and x.flags.aligned, weight_table, bias_table)
        y = y.reshape(self.out_shape)
        if not return_stats:
            return y
        mean = None if self.rms else stats[0].reshape(self.stats_shape)
        return y, mean, stats[2].reshape(self.stats_shape)

    def contiguous_runner(self, return_stats: bool = False):
        """:meth:`run` for a C-contiguous ``x`` of the kernel's dtype, as a function with
        every attribute bound once (a module's call takes it: its per-call Python is most of
        a small input's time): ``y``, or with ``return_stats`` (a call that autograd records)
        ``(y, mean, rstd)`` as :meth:`run` gives them."""
        rows, n = shape = self.shape
        dtype, out_shape, stats_shape, plain = self.dtype, self.out_shape, self.stats_shape, strided.PLAIN_ROWS
        kernel, rms = self.kernel, self.rms
        params_and_flags = (self.param_row_stride, self.param_inner, self.rms)
        scratch, size, recycled = self.scratch, rows * n, self.nbytes >= pool.MIN_BYTES
        serial_below, empty, empty_recycled = threads.serial_below, np.empty, pool.empty
        run_serial, entries = self.run_serial, self.entries

        def run(x, weight_table, bias_table, eps: float):
            y = empty_recycled(shape, dtype) if recycled else empty(shape, dtype)
            stats = empty((3, rows)) if return_stats else scratch or empty((3, rows))
            arguments = (x.reshape(shape), plain, y, plain, n, weight_table, bias_table, *params_and_flags,
                         float(eps), False, *stats)
            if size >= serial_below(True):
                kernel(*arguments)
            else:
                # run_serial's lookup without its call (a frame costs what the entry saves here)
                tables = weight_table.dtype
                entry = entries.get(tables) if x.flags.aligned and bias_table.dtype == tables else None
                if entry is None:
                    run_serial(arguments, x.flags.aligned, weight_table, bias_table)
                else:
                    entry(*arguments)
            if not return_stats:
                return y.reshape(out_shape)
            return y.reshape(out_shape), None if rms else stats[0].reshape(stats_shape), stats[2].reshape(stats_shape)

        return run

    def address_runner(self, return_stats: bool = False):
        """:meth:`contiguous_runner` on raw addresses (:mod:`normlab.kernels.addressed`), for
        a caller that allocates the output itself (a torch twin: an output torch made is
        resizable, and a tensor's address costs less than a NumPy view of it): ``run(x_address,
        y_address, weight_table, bias_table, eps)`` writes ``y`` and returns None, or with
        ``return_stats`` ``(mean, rstd)`` as :meth:`run` gives them, flat: one value a row, as
        the backward's kernels read them (``(rows,)``, not ``stats_shape``). For C-contiguous,
        aligned ``x`` and ``y`` of the plan's dtype, of fewer elements than
        ``threads.serial_below(True)`` (the serial kernel's sizes): the caller checks."""
        from normlab.kernels import addressed

        rows, n = self.shape
        kernel = addressed.row_forward32_at if self.dtype == np.float32 else addressed.row_forward_at
        param_row_stride, param_inner, rms = self.param_row_stride, self.param_inner, self.rms
        scratch = self.scratch[0].base if self.scratch else None  # (the (3, rows) array the plan's scratch rows view)
        empty = np.empty

        def run(x_address: int, y_address: int, weight_table, bias_table, eps: float):
            stats = empty((3, rows)) if return_stats or scratch is None else scratch
            kernel(x_address, y_address, rows, n, weight_table, bias_table, param_row_stride, param_inner, rms,
                   float(eps), stats)
            if return_stats:
                return None if rms else stats[0], stats[2]
            return None

        return run

    def _scratch(self) -> tuple:
        """Where this call's kernel writes the statistics nobody asked for: the plan's own
        :attr:`scratch`, or (a plan of many rows) arrays of this call."""
        return self.scratch or tuple(np.empty((3, self.shape[0])))

    def run_serial(self, arguments: tuple, rows_in_place: bool, weight_table, bias_table) -> None:
        """The serial kernel on ``arguments``: through its compiled entry (:func:`compiled_entry`,
        without the dispatcher's checks) where x is an aligned C-contiguous array of the plan's
        dtype (``rows_in_place``; an unaligned array is another type to Numba) and both tables
        have one dtype, the types the entry was compiled for."""
        tables = weight_table.dtype
        if not rows_in_place or bias_table.dtype != tables:
            self.kernel.serial(*arguments)
            return
        entry = self.entries.get(tables)
        if entry is None:
            self.kernel.serial(*arguments)
            self.entries[tables] = compiled_entry(self.kernel.serial, arguments) or self.kernel.serial
        else:
            entry(*arguments)

    def rows_of(self, array: np.ndarray) -> tuple:
        """``array`` (of the input's shape) as the row kernels take it: read where it lies
        when :func:`row_layout` finds its rows, else copied."""
        if not array.flags.c_contiguous:
            array = strided.split(array, self.plan.axis_sizes)
        return strided.rows_of(array, self.shape[1], self.dtype)

    def _table(self, param, fill: float):
        if param is None:
            return _constant_table(self.table_shape, fill, self.table_dtype)
        if param.shape != self.param_shape:
            return None
        if self.direct_params:
            return np.ascontiguousarray(param, self.table_dtype).reshape(self.table_shape)
        return _param_table(self.plan.expand_params(param), self.view, fill == 1.0, self.table_dtype)


_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# A plan keeps scratch for the statistics nobody asked for (24 bytes a row) up to this many
# rows; a plan of more allocates it per call, where it costs little next to the kernel's
# work. The caches keep plans per shape (64 a module, 4096 in the NumPy API): a loop over
# 1000 sequence lengths of (8, L, 768) kept 94 MB of scratch in them (7 MB a LayerNorm)
KEPT_SCRATCH_ROWS = 1024


def fast_forward(plan: Plan, dtype: np.dtype, rms: bool, param_dtypes) -> FastForward | None:
    """The :class:`FastForward` of a plan whose view is plain rows, or None."""
    view = view_of(plan)
    if not isinstance(view, RowView) or view.order is not None or dtype not in _FAST_DTYPES:
        return None
    if any(d is not None and d.kind not in "fiub" for d in param_dtypes):
        return None
    from normlab.kernels.rows import row_forward, row_forward32

    float32 = dtype == np.float32
    table_shape = (view.param_groups, view.param_channels)
    size = math.prod(plan.param_shape)
    # the table is the parameter reshaped exactly when laying it out keeps element order
    probe = _param_table(plan.expand_params(np.arange(size, dtype=np.float64)), view, True) if plan.params else None
    direct = probe is not None and bool(np.array_equal(probe.reshape(-1), np.arange(probe.size)))
    return FastForward(row_forward32 if float32 else row_forward, dtype, (view.rows, view.n), plan.shape,
                       plan.stats_shape, plan.param_shape, table_shape, np.float32 if float32 else np.float64,
                       direct, view.param_row_stride, view.param_inner, rms,
                       view.rows * view.n * dtype.itemsize, plan, view,
                       tuple(np.empty((3, view.rows))) if view.rows <= KEPT_SCRATCH_ROWS else ())


@dataclass(frozen=True)
class FastBackward:
    """The row kernels' backward for a :class:`FastForward` plan, given the weight table
    and statistics its forward used: built once by :func:`fast_backward`; a call
    allocates the gradients and runs the kernel."""

    forward: FastForward
    kernel: object
    chunk_rows: int
    chunks: int

    @functools.cached_property
    def parts_shape(self) -> tuple[int, ...]:
        """The shape of the parameter-gradient parts: one weight table per chunk."""
        return (self.chunks,) + self.forward.table_shape

    @functools.cached_property
    def _both_parts_shape(self) -> tuple[int, ...]:
        """The weight's parts and the bias's, allocated as one array (one call, not two)."""
        return (2,) + self.parts_shape

    @functools.cached_property
    def _rounded_to_float32(self):
        """The helper that rounds float64 parameter gradients into float32 (float32 plans)."""
        from normlab.kernels.rows_backward import rounded_to_float32

        return rounded_to_float32

    def __call__(self, grad_y, x, weight_table, mean, rstd, need_params: bool, out=None):
        """``(grad_x, grad_weight, grad_bias)``: grad_x in x's shape and dtype, the parameter
        gradients of the plan's param_shape in x's dtype (None unless ``need_params``), each
        summed in float64 and rounded once. ``weight_table`` is :meth:`FastForward.tables`'
        first; ``mean`` and ``rstd`` are the forward's (``mean`` None for RMS). ``out``: a
        C-contiguous array of the plan's dtype and size to write grad_x into."""
        plan = self.forward
        rows, n = shape = plan.shape
        dtype, plain = plan.dtype, strided.PLAIN_ROWS
        if out is not None:
            grad_x = out.reshape(shape)
        else:
            grad_x = pool.empty(shape, dtype) if plan.nbytes >= pool.MIN_BYTES else np.empty(shape, dtype)
        weight_parts, bias_parts = np.zeros(self._both_parts_shape)
        mean_flat = np.zeros(rows) if mean is None else mean.reshape(rows)
        # (an output gradient of one value expanded, a .sum() loss's, is copied by contiguous_runner,
        # the only caller, before it gets here)
        if (grad_y.dtype == dtype and x.dtype == dtype and grad_y.flags.c_contiguous
                and x.flags.c_contiguous):  # the common case, without row_layout's checks
            g, x_rows, gx = (grad_y.reshape(shape), plain), (x.reshape(shape), plain), (grad_x, plain)
        else:  # a strided x (or grad_y) is read where it lies when its rows allow (row_layout), else copied
            g, x_rows, gx = strided.one_kind(plan.rows_of(grad_y), plan.rows_of(x), (grad_x, plain))
        arguments = (*g, *x_rows, n, weight_table, plan.param_row_stride, plan.param_inner, plan.rms, 0.0, True,
                     mean_flat, rstd.reshape(rows), self.chunk_rows, *gx, weight_parts, bias_parts)
        redo = np.zeros(self.chunks, np.bool_) if dtype == np.float32 else None  # (the float32 kernel's flags)
        if redo is not None:
            arguments += (redo,)
        if rows * n < threads.serial_below():
            self.kernel.serial(*arguments)
        else:
            self.kernel(*arguments)
        if redo is not None and b"\x01" in redo.tobytes():  # gradients past float32's range: in float64
            weight_parts, bias_parts = self._in_float64(grad_y, x, weight_table, mean_flat, rstd, grad_x)
        grad_x = grad_x.reshape(plan.out_shape)
        if not need_params:
            return grad_x, None, None
        return (grad_x, *self._param_gradients(weight_parts, bias_parts))

    def _param_gradients(self, weight_parts, bias_parts) -> tuple:
        """``(grad_weight, grad_bias)`` from the kernel's parts: summed over the chunks and
        laid out as the parameters, in float64, then rounded to a float32 plan's dtype."""
        grad_weight, grad_bias = self._params(_sum_parts(weight_parts)), self._params(_sum_parts(bias_parts))
        if self.forward.dtype == np.float64:
            return grad_weight, grad_bias
        rounded = np.empty((2, grad_weight.size), np.float32)
        self._rounded_to_float32(np.stack((grad_weight.reshape(-1), grad_bias.reshape(-1))), rounded)
        return rounded[0].reshape(grad_weight.shape), rounded[1].reshape(grad_bias.shape)

    def contiguous_runner(self):
        """:meth:`__call__` with every attribute bound once, for x of the plan's dtype in
        C order and an output gradient in C order or one value expanded (a training step's
        case: its per-call Python is most of a small input's backward). Other arrays, and a
        call the float32 kernel hands to float64, run :meth:`__call__`."""
        plan = self.forward
        rows, n = shape = plan.shape
        dtype, out_shape, param_shape, plain = plan.dtype, plan.out_shape, plan.param_shape, strided.PLAIN_ROWS
        kernel, serial = self.kernel, self.kernel.serial
        params_and_flags = (plan.param_row_stride, plan.param_inner, plan.rms, 0.0, True)
        chunk_rows, chunks, size = self.chunk_rows, self.chunks, rows * n
        both_parts, recycled, float32 = self._both_parts_shape, plan.nbytes >= pool.MIN_BYTES, dtype == np.float32
        # one chunk of parameters laid out as the table: the parts are the gradients, reshaped
        table_size = math.prod(plan.table_shape) if chunks == 1 and plan.direct_params else None
        rounded_to_float32 = self._rounded_to_float32 if float32 else None
        empty, zeros, empty_recycled, copy = np.empty, np.zeros, pool.empty, np.ascontiguousarray
        general = self.__call__
        float64 = np.dtype(np.float64)
        entries = {}  # the serial kernel's compiled entry per weight table dtype (see below)

        def run(grad_y, x, weight_table, mean, rstd, need_params: bool, out=None):
            if grad_y.dtype != dtype or x.dtype != dtype or not x.flags.c_contiguous:
                return general(grad_y, x, weight_table, mean, rstd, need_params, out)
            if not grad_y.flags.c_contiguous:
                if any(grad_y.strides):
                    return general(grad_y, x, weight_table, mean, rstd, need_params, out)
                # one value expanded (the gradient a .sum() loss hands in): row_layout would find
                # no rows in it and copy it; copied here at once, without its search
                grad_y = copy(grad_y)
            if out is not None:
                grad_x = out.reshape(shape)
            else:
                grad_x = empty_recycled(shape, dtype) if recycled else empty(shape, dtype)
            parts = zeros(both_parts)
            grad_rows, x_rows = grad_y.reshape(shape), x.reshape(shape)
            mean_rows, rstd_rows = zeros(rows) if mean is None else mean.reshape(rows), rstd.reshape(rows)
            arguments = (grad_rows, plain, x_rows, plain, n, weight_table, *params_and_flags, mean_rows, rstd_rows,
                         chunk_rows, grad_x, plain, parts[0], parts[1])
            if float32:
                redo = zeros(chunks, np.bool_)
                arguments += (redo,)
            if size < threads.serial_below():
                # the serial kernel's compiled entry (compiled_entry), where each array given is of
                # the one type it was compiled for: C order, aligned and writeable (flags.carray),
                # the statistics float64 (the rest is checked above or made here), without the
                # dispatcher's type checks of all 19 arguments (as the forward's runner does)
                entry = (entries.get(weight_table.dtype)
                         if (rstd_rows.dtype == float64 and mean_rows.dtype == float64 and grad_rows.flags.carray
                             and x_rows.flags.carray and weight_table.flags.carray and mean_rows.flags.carray
                             and rstd_rows.flags.carray) else False)
                if entry is None:
                    serial(*arguments)
                    entries[weight_table.dtype] = compiled_entry(serial, arguments) or serial
                elif entry is False:
                    serial(*arguments)
                else:
                    entry(*arguments)
            else:
                kernel(*arguments)
            if float32 and b"\x01" in redo.tobytes():  # gradients past float32's range: the float64 kernel's
                return general(grad_y, x, weight_table, mean, rstd, need_params, out)
            grad_x = grad_x.reshape(out_shape)
            if not need_params:
                return grad_x, None, None
            if table_size is None:
                return (grad_x, *self._param_gradients(parts[0], parts[1]))
            gradients = parts.reshape(2, table_size)
            if float32:
                # rounded here, as autograd's engine would round float64 gradients to their float32
                # parameters (the same bits: to nearest, ±inf past float32's range, no warning),
                # where the engine's two casts cost more than this call
                gradients, source = empty((2, table_size), np.float32), gradients
                rounded_to_float32(source, gradients)
            return grad_x, gradients[0].reshape(param_shape), gradients[1].reshape(param_shape)

        return run

    def _in_float64(self, grad_y, x, weight_table, mean_flat, rstd, grad_x):
        """The float64 kernel's ``(weight_parts, bias_parts)``, its grad_x rounded to float32
        into ``grad_x`` (the float32 (rows, n) array the float32 kernel wrote)."""
        from normlab.kernels.rows import row_backward

        plan, plain = self.forward, strided.PLAIN_ROWS
        rows, n = shape = plan.shape
        grad_x64 = np.empty(shape)
        weight_parts, bias_parts = np.zeros(self._both_parts_shape)
        row_backward(np.ascontiguousarray(grad_y, np.float64).reshape(shape), plain,
                     np.ascontiguousarray(x, np.float64).reshape(shape), plain, n, weight_table.astype(np.float64),
                     plan.param_row_stride, plan.param_inner, plan.rms, 0.0, True, mean_flat, rstd.reshape(rows),
                     self.chunk_rows, grad_x64, plain, weight_parts, bias_parts)
        with np.errstate(over="ignore"):  # (past float32's range: ±inf, as torch's cast and reference.rounded give)
            np.copyto(grad_x, grad_x64, casting="same_kind")
        return weight_parts, bias_parts

    def _params(self, table: np.ndarray) -> np.ndarray:
        plan = self.forward
        if plan.direct_params:
            return table.reshape(plan.param_shape)
        return plan.plan.collapse_params(table.reshape(plan.plan.param_broadcast_shape))


def fast_backward(forward: FastForward) -> FastBackward:
    """The :class:`FastBackward` of a :class:`FastForward`'s plan."""
    return FastBackward(forward, _row_backward_kernel(forward.dtype), *row_chunks(*forward.shape))
