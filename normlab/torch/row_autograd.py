"""The row norms' (layer, RMS, group norm) cached path when gradients are needed.

The forward and backward plans (:class:`normlab.kernels.fast.FastForward` and
:class:`normlab.kernels.fast.FastBackward`) are built once per module, input shape and dtypes;
a call checks its arguments, runs the forward kernel (keeping the float64 statistics as
NumPy arrays) and, in the backward pass, the backward kernel. This is the custom op's
autograd formula (:mod:`normlab.torch.ops`) without its general path: no pattern
resolution, layout search, statistics transposes or tensor round trips per call.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from normlab.torch.ops import (_bias_to_save, _differentiable_backward, _is_layer_norm, _needs_torch_backward,
                               _normalize_backward_op, _saved_bias, _spec_of)
from normlab.torch.paths import PLAIN_PARAMETERS as _EAGER_PARAMS
from normlab.torch.paths import _profiler, profiled_backward
from normlab.kernels import pool, threads
from normlab.torch.spec import LOWEST_ADDRESS, array_view, param_view, tensor_layout

_serial_below = threads.serial_below
_empty_like, _empty, _torch_of_array = torch.empty_like, torch.empty, torch.from_numpy


class RowGradCall:
    """One module's cached plans for one input shape and dtypes: the kernels' forward
    and backward, the custom op's arguments (for a differentiable backward), and the
    parameter tables of the last call, kept while the same parameter tensors hold the same
    values (same storage, no in-place change since)."""

    __slots__ = ("forward", "at_address", "strides", "itemsize", "size", "backward", "backward_at", "backward_facts",
                 "torch_dtype", "param_shape", "arguments", "params", "layer_norm")

    def __init__(self, forward, backward, arguments: tuple):
        self.forward = forward  # kernels.fast.FastForward
        self.at_address = forward.address_runner(return_stats=True)  # (its run on addresses, attributes bound)
        self.strides, self.itemsize, self.size = addressed_facts(forward)
        self.backward = backward.contiguous_runner()  # kernels.fast.FastBackward, its attributes bound
        # its serial kernel on addresses (kernels.addressed), for a plan of one chunk of rows whose
        # weight table is the weight reshaped (the parameter gradients are then the kernel's sums as
        # they lie); None for other plans. One chunk is below every serial size (threads.serial_below).
        from normlab.kernels import addressed

        self.backward_at = None
        if backward.chunks == 1 and forward.direct_params:
            self.backward_at = addressed.row_backward32_at if forward.dtype == np.float32 else addressed.row_backward_at
        self.backward_facts = (*forward.shape, forward.param_row_stride, forward.param_inner, forward.rms)
        self.torch_dtype = _TORCH_OF[forward.dtype]
        self.param_shape = forward.param_shape
        self.arguments = arguments  # (pattern, params, sizes, rms)
        self.params = ParamTables(forward)
        self.layer_norm = _is_layer_norm(_spec_of(*arguments))  # (whether backward saves the bias; once, not per call)

    def __call__(self, x: Tensor, weight, bias, eps: float):
        """``y`` with autograd through the kernels, or None where the full path must run."""
        if type(weight) not in _EAGER_PARAMS or type(bias) not in _EAGER_PARAMS:
            return None  # tensor subclasses take the registered op
        tables = self.params.of(weight, bias)
        if tables is None:
            return None
        # the tables go with the call: another thread may prepare the module's next ones meanwhile
        return _apply_row(_unwrap_if_dead(x), weight if weight is None else _unwrap_if_dead(weight),
                          bias if bias is None else _unwrap_if_dead(bias), self, tables, eps)


class ParamTables:
    """A row kernel's weight and bias tables (:meth:`FastForward.tables`) for a module's
    parameters, kept between calls while the same parameter tensors keep their memory,
    layout and version, and only where the tables are the parameters' own memory: a copy
    would miss a write through ``.data``, which no version counter records. A ``.data``
    assignment may also give the same tensor other strides or another shape at the same
    address (``w.data = buffer[::2]``), hence the layout. ``same_dtype``: parameters of
    another dtype than the kernel's get no tables (None)."""

    __slots__ = ("forward", "same_dtype", "held")

    def __init__(self, forward, same_dtype: bool = False):
        self.forward = forward
        self.same_dtype = same_dtype
        # (weight, its layout, its _version, bias, ..., the tables): one tuple, read and
        # replaced whole, so that threads calling one module never see half of another's
        self.held = None

    def of(self, weight, bias):
        """The ``(weight, bias)`` tables for these parameters, or None."""
        held = self.held
        # (tensor_layout written out: its two calls are a fair part of a small call's Python)
        if (held is None or weight is not held[0] or bias is not held[3]
                or (weight is not None and ((held[2] is not None and weight._version != held[2])
                                            or (weight.data_ptr(), weight.dtype, weight.shape, weight.stride())
                                            != held[1]))
                or (bias is not None and ((held[5] is not None and bias._version != held[5])
                                          or (bias.data_ptr(), bias.dtype, bias.shape, bias.stride()) != held[4]))):
            return self._prepare(weight, bias)
        return held[6]

    def _prepare(self, weight, bias):
        self.held = None
        if any(t is not None and (type(t) not in _EAGER_PARAMS or not t.is_cpu
                                  or (self.same_dtype and t.dtype != _TORCH_OF.get(self.forward.dtype)))
               for t in (weight, bias)):
            # tensor subclasses (a __torch_function__ class; DTensor weights beside a plain input,
            # which torch refuses as it does) take the registered op, which hands the call to them;
            # other devices (a module moved to "meta" after a call) and, with same_dtype, other
            # dtypes take the full path (torch refuses float32 input with float64 weights)
            return None
        arrays = (param_view(weight), param_view(bias))
        tables = self.forward.tables(*arrays)
        if tables is not None and self.forward.tables_are_views(tables, *arrays):
            self.held = (weight, None if weight is None else tensor_layout(weight), _version_of(weight),
                         bias, None if bias is None else tensor_layout(bias), _version_of(bias), tables)
        return tables


def _version_of(param):
    """``param._version``; None for an inference tensor (a module built inside
    ``torch.inference_mode``), which has no version counter. Its tables then read its
    memory (a write in place shows through them), and a new storage moves its data_ptr."""
    return None if param is None or param.is_inference() else param._version


_TORCH_OF = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class _RowFunction(torch.autograd.Function):
    """Forward: the cached kernel, its statistics saved with x; backward: the cached
    backward kernel, or (``create_graph=True``) the differentiable composite as the
    custom op takes it."""

    @staticmethod
    def forward(ctx, x, weight, bias, call: RowGradCall, tables, eps: float):  # the ctx-first form: no signature binding
        address = x.data_ptr()
        if (address % call.itemsize or x.stride() != call.strides or call.size >= _serial_below(True)
                or address < LOWEST_ADDRESS):  # (freed storage, or x of its first elements: array_view tells)
            y, mean, rstd = forward_tensor(call.forward, x, tables, eps, True)
            mean, rstd = None if mean is None else mean.reshape(-1), rstd.reshape(-1)  # (flat, as at_address's)
        else:
            y = _empty_like(x)
            mean, rstd = call.at_address(address, y.data_ptr(), *tables, eps)
        # (torch then checks that none changes before backward.) The statistics, one value a row, are saved with x,
        # as torch's norms save theirs: a checkpoint that recomputes the forward in backward
        # (use_reentrant=False) then hands over the recomputed x with its own statistics, where
        # the recomputation may differ (dropout before the norm, preserve_rng_state=False)
        ctx.save_for_backward(x, weight, _bias_to_save(ctx, bias, call.layer_norm), _torch_of_array(rstd),
                              None if mean is None else _torch_of_array(mean))
        ctx.kernel_inputs = (call, tables[0], eps,  # (not x's address: backward reads x as saved, see there)
                             None if weight is None else weight.data_ptr())
        return y

    @staticmethod
    def backward(ctx, grad_y, _recorded=False):
        x, weight, bias, rstd, mean = ctx.saved_tensors
        call, weight_table, eps, weight_address = ctx.kernel_inputs
        if torch.compiler.is_dynamo_compiling():
            # compiled autograd traces this backward of an eager call: the registered op, which Dynamo
            # keeps as one opaque call (the statistics are the plan's, as the op's forward gives them)
            stats_shape = call.forward.stats_shape
            return (*traced_backward(ctx, grad_y, x, weight,
                                     (torch.zeros_like(rstd) if mean is None else mean).reshape(stats_shape),
                                     rstd.reshape(stats_shape), *call.arguments[:3], eps, call.arguments[3]),
                    None, None, None)
        if _profiler._is_profiler_enabled and not _recorded:  # (an attribute read when no profiler runs)
            return profiled_backward(ctx, _RowFunction.backward, grad_y)
        if weight is not None and weight.data_ptr() != weight_address:
            # the saved weight is not the forward's memory, which the table may read: a copy
            # that allow_mutation_on_saved_tensors kept before an in-place change, or one a
            # saved-tensor hook gave back; its values are the forward's
            weight_table = call.forward.tables(param_view(weight), None)[0]
        if _needs_torch_backward(grad_y):  # create_graph=True, or batched gradients
            ctx.arguments = (*call.arguments[:3], eps, call.arguments[3])  # as _differentiable_backward reads them
            return (*_differentiable_backward(ctx, grad_y, x, weight, _saved_bias(ctx, bias))[:3], None, None, None)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        # x as saved_tensors gives it back: under saved-tensor hooks (activation offloading,
        # checkpointing) that is the hook's copy, and the forward's x may be freed or changed.
        # The gradients are tensors torch allocates (resizable, as torch.nn's), in the parameters'
        # dtype (x's, on this path), rounded once from their float64 sums by the kernels, so that
        # autograd's engine has no cast to make
        dtype = call.torch_dtype
        addressed = call.backward_at is not None and type(grad_y) is Tensor and grad_y.dtype is dtype and x.dtype is dtype
        if addressed:
            grad_strides, x_address, grad_address = grad_y.stride(), x.data_ptr(), grad_y.data_ptr()
            addressed = (x.stride() == call.strides and (grad_strides == call.strides or not any(grad_strides))
                         and not (x_address % call.itemsize or grad_address % call.itemsize)
                         and x_address >= LOWEST_ADDRESS and grad_address >= LOWEST_ADDRESS)  # (freed: array_view tells)
        if addressed:
            # the serial kernel on the tensors' addresses (grad_y C order, or one value expanded,
            # a .sum() loss's): no NumPy view made
            grad_x = _empty_like(x)
            grad_w = _empty(call.param_shape, dtype=dtype) if need_weight else None
            grad_b = _empty(call.param_shape, dtype=dtype) if need_bias else None
            rstd = rstd.numpy()
            call.backward_at(grad_address, grad_strides != call.strides, x_address, grad_x.data_ptr(),
                             0 if grad_w is None else grad_w.data_ptr(), 0 if grad_b is None else grad_b.data_ptr(),
                             weight_table, rstd if mean is None else mean.numpy(), rstd, *call.backward_facts)
            return grad_x if need_x else None, grad_w, grad_b, None, None, None
        # (grad_y.detach() only where it requires grad: rarely, and a detach costs a small call 0.3 µs)
        out = (_empty(call.forward.out_shape, dtype=dtype)
               if call.forward.nbytes < pool.MIN_BYTES or not pool.enabled() else None)
        grad_x, grad_w, grad_b = call.backward(array_view(grad_y), array_view(x), weight_table,
                                               None if mean is None else mean.numpy(), rstd.numpy(),
                                               need_weight or need_bias, None if out is None else array_view(out))
        # (grad_x from pool.MIN_BYTES on: normlab's recycled memory, as forward_tensor's output)
        return ((torch.from_numpy(grad_x) if out is None else out) if need_x else None,
                _torch_of_array(grad_w).clone() if need_weight else None,
                _torch_of_array(grad_b).clone() if need_bias else None,
                None, None, None)


def addressed_facts(forward) -> tuple:
    """``(strides, itemsize, size)`` of a :class:`~normlab.kernels.fast.FastForward`'s input:
    the strides of its shape in C order, its element size and count. An input of exactly
    these strides (C order, size-1 axes included, whose output then has them too, as
    torch.nn's has), at an address aligned to its elements, of fewer elements than
    ``threads.serial_below(True)``, takes the serial kernel on addresses
    (:meth:`~normlab.kernels.fast.FastForward.address_runner`)."""
    strides = torch.empty(forward.out_shape, device="meta").stride()  # (torch's, for a size 0 axis too)
    return strides, forward.dtype.itemsize, forward.shape[0] * forward.shape[1]


def forward_tensor(forward, x: Tensor, tables, eps: float, return_stats: bool):
    """The kernels' forward of ``x`` (any layout the plan takes: strided, unaligned) into an
    output that torch allocates, resizable as torch.nn's outputs are: ``y``, or ``(y, mean,
    rstd)`` with NumPy statistics. An output of ``pool.MIN_BYTES`` and more comes from
    normlab's recycled memory instead (through ``torch.from_numpy``, not resizable): a
    fresh one would cost its page zeroing on every call."""
    x_array = array_view(x)
    if forward.nbytes >= pool.MIN_BYTES and pool.enabled():  # (read now, as pool.empty reads them)
        result = forward.run(x_array, *tables, eps, return_stats)
        y = result[0] if return_stats else result
        y = torch.from_numpy(y)
    else:
        y = torch.empty(forward.out_shape, dtype=_TORCH_OF[forward.dtype])
        result = forward.run(x_array, *tables, eps, return_stats, array_view(y))
    return (y, *result[1:]) if return_stats else y


def traced_backward(ctx, grad_y, x, weight, mean, rstd, pattern, params, sizes, eps: float, rms: bool) -> tuple:
    """The gradients of x, weight and bias (None where not needed) by the registered backward
    op, for an eager Function's backward that Dynamo traces (compiled autograd): the kernels'
    NumPy calls would break its graph, and ``fullgraph=True`` (torch's own
    ``maybe_enable_compiled_autograd``) refuses that."""
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_x, grad_w, grad_b = _normalize_backward_op(grad_y, x, weight, mean, rstd, pattern, params, sizes, eps, rms,
                                                    need_bias)
    return (grad_x if need_x else None, grad_w if need_weight and weight is not None else None,
            grad_b if need_bias else None)


# Function.apply without its Python wrapper, which binds arguments for setup_context
# (_RowFunction has none) and routes functorch transforms (the caller returns None under
# one): a microsecond or two of a small input's call. Its one other step, unwrapping a
# tensor left over from a finished transform, is kept.
_apply_row = super(torch.autograd.Function, _RowFunction).apply
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def build(spec, forward, param_dtypes) -> RowGradCall | None:
    """The :class:`RowGradCall` over a built ``forward`` plan, or None where parameters of
    another dtype than float32/float64 need the full path's casts."""
    from normlab.kernels import fast

    if any(d is not None and d not in (np.float32, np.float64) for d in param_dtypes):
        return None
    return RowGradCall(forward, fast.fast_backward(forward), (spec.pattern, spec.params, spec.sizes, spec.rms))
