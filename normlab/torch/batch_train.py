"""Batch norm in training straight on the column kernels, with little Python per call.

The full path (:func:`normlab.torch.compute._normalize`) goes through the engine's NumPy
API: it checks the arguments, builds the plan and lays out parameters on every call,
about 100 µs before a kernel starts. Batch norm's view is always the same, (outer, C,
inner) for channels-first input and (rows, C, 1) for channels_last, so a module keeps
a :class:`TrainCall` per input shape and strides and calls
:func:`normlab.kernels.column_forward` / :func:`normlab.kernels.column_backward`
directly. The running statistics are updated in place by one small kernel (their version
counters kept, as torch's batch norm op keeps them). Gradients go through
:class:`_TrainFunction`, whose backward calls the kernel with the saved statistics; a
differentiable backward (``create_graph=True``) is torch's autograd of the composite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from normlab import kernels
from normlab.kernels import pool
from normlab.torch.ops import _bias_to_save, _grads_of, _needs_torch_backward, _saved_bias
from normlab.torch.paths import _needs_torch_ops, _PathSwitch, _profiler, profiled, profiled_backward
from normlab.torch.row_autograd import traced_backward
from normlab.torch.spec import (_ABSENT, LOWEST_ADDRESS, affine_parameters, array_view, module_cache, param_view,
                                tensor_layout)

_NUMPY_OF = {torch.float32: np.float32, torch.float64: np.float64}
_empty_like = torch.empty_like
_serial_below = kernels.threads.serial_below
_ADDRESSED = None


def _addressed():
    """:mod:`normlab.kernels.addressed`, imported on first use (it imports Numba)."""
    global _ADDRESSED
    if _ADDRESSED is None:
        from normlab.kernels import addressed

        _ADDRESSED = addressed
    return _ADDRESSED


_MAX_CALLS = 64  # shapes remembered per module


@dataclass(frozen=True)
class TrainCall:
    """How one input shape, strides and dtype runs: ``x.permute(perm)`` (``perm`` None:
    ``x`` itself) is C-contiguous, of shape ``dense``, and reshapes to ``view`` =
    (outer, C, inner)."""

    view: tuple[int, int, int]
    perm: Optional[tuple[int, ...]]
    inverse: Optional[tuple[int, ...]]
    dense: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    count: int  # values per channel
    strides: tuple[int, ...]  # x's
    out_strides: tuple[int, ...]  # the outputs': the dense layout's C order, laid out as x
    witness: np.ndarray  # an empty array of the dtype, which types the addressed kernels' pointers
    group_rows: int  # the column kernels' units of work (kernels.column_forward's choices)
    outer_chunk: int

    def engine(self, t: Tensor) -> np.ndarray:
        t = t.detach()
        return array_view(t if self.perm is None else t.permute(self.perm)).reshape(self.view)

    def output(self, x: Tensor) -> tuple[Tensor, Optional[np.ndarray]]:
        """A new tensor laid out as x, and its engine view where it is recycled memory (from
        ``pool.MIN_BYTES``, through ``torch.from_numpy``, not resizable), else None: below,
        torch allocates it (resizable, as torch.nn's outputs are)."""
        # (pool.MIN_BYTES read now, as pool.empty reads it)
        if self.count * self.view[1] * self.dtype.itemsize < pool.MIN_BYTES or not pool.enabled():
            # (not torch's permute of a C-order tensor: a view, which autograd would refuse to let a
            # ReLU(inplace=True) modify; see normlab.torch.spec._empty_like_dense)
            # (x's layout is the call's, except a saved-tensor hook's copy in backward)
            return (_empty_like(x) if x.stride() == self.out_strides
                    else torch.empty_strided(self.shape, self.out_strides, dtype=x.dtype)), None
        array = pool.empty(self.dense, self.dtype)
        tensor = torch.from_numpy(array if self.perm is None else array.transpose(self.inverse))
        return tensor, array.reshape(self.view)

    def addressed(self, *tensors: Tensor) -> bool:
        """True where the addressed kernels (:mod:`normlab.kernels.addressed`) take these
        tensors: of x's strides, aligned to their elements, and a call of serial size."""
        for t in tensors:  # (a loop, not all() over a generator: every training call runs this)
            address = t.data_ptr()
            if address % self.witness.itemsize or t.stride() != self.strides or address < LOWEST_ADDRESS:
                return False  # (the views' path; array_view refuses freed storage)
        return self.count * self.view[1] < _serial_below()


def _plan_call(x: Tensor) -> Optional[TrainCall]:
    channels = x.shape[1]
    if x.numel() == 0:
        return None  # the full path says what an empty batch gives
    dtype = np.dtype(_NUMPY_OF[x.dtype])
    shape = tuple(x.shape)
    witness = np.empty(0, dtype)
    if x.is_contiguous():
        inner = math.prod(shape[2:])
        return TrainCall((shape[0], channels, inner), None, None, shape, shape, dtype, shape[0] * inner, x.stride(),
                         _c_strides(shape), witness, kernels.column_group_rows(channels),
                         max(1, kernels.CHUNK_ELEMENTS // inner))
    perm = (0,) + tuple(range(2, x.dim())) + (1,)  # channels_last: (N, *spatial, C)
    if x.dim() > 2 and x.permute(perm).is_contiguous():
        rows = x.numel() // channels
        inverse = tuple(perm.index(d) for d in range(x.dim()))
        dense = tuple(shape[p] for p in perm)
        dense_strides = _c_strides(dense)
        return TrainCall((rows, channels, 1), perm, inverse, dense, shape, dtype, rows, x.stride(),
                         tuple(dense_strides[i] for i in inverse), witness,
                         kernels.column_group_rows(channels), kernels.CHUNK_ELEMENTS)
    return None


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of C order for a shape of no empty axis (NumPy's, in elements)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _call_for(module, x: Tensor) -> Optional[TrainCall]:
    calls = module_cache(module, "_normlab_train")
    key = (x.shape, x.stride(), x.dtype)
    call = calls.get(key, False)
    if call is False:
        if len(calls) >= _MAX_CALLS:
            calls.clear()
        call = calls[key] = _plan_call(x)
    return call


def _fits(t: Optional[Tensor], dtype) -> bool:
    return t is None or (type(t) in (Tensor, torch.nn.Parameter) and t.dtype == dtype and t.device.type == "cpu")


def forward(module, x: Tensor, factor: float, _recorded: bool = False) -> Optional[Tensor]:
    """BatchNorm's training forward (batch statistics; the running ones updated with
    ``factor`` when the module tracks them) where ``paths._choose_path`` chose the
    kernel, or None where the full path must run:
    other dtypes, devices or strides, tensor subclasses, tracing and compilation,
    parameters or running statistics of another dtype."""
    if type(x) is not Tensor or x.dtype not in _NUMPY_OF or torch.compiler.is_compiling():
        return None  # (the caller chose the kernel path: a CPU tensor, no tracing or transforms)
    if _profiler._is_profiler_enabled and not _recorded:  # (an attribute read when no profiler runs)
        return profiled(module, forward, module, x, factor, True)
    weight, bias = affine_parameters(module)
    if not (_fits(weight, x.dtype) and _fits(bias, x.dtype)):
        return None
    running = _running(module) if _tracks(module) else None
    if running is False:
        return None
    call = _call_for(module, x)
    if call is None:
        return None
    tables = _tables(weight, bias, call.view[1])
    if tables is None:
        return None
    _remember_step(module, x, call, weight, bias, running)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return _apply_train(_unwrap_if_dead(x), weight, bias, module, call, factor, running, tables)
    return _run_forward(module, call, x, tables, factor, running)[0]


class TrainStep:
    """A module's last training call on the kernels, repeated by :func:`repeat_step` while
    the input has the same shape, strides and dtype and the module holds the same tensors:
    the checks of the full path (:func:`normlab.torch.compute._batch_norm_forward`) then
    come out as they did, and a call costs a few identity checks instead."""

    __slots__ = ("key", "weight", "bias", "tracked", "running", "checked", "call", "counter", "views")

    def __init__(self, key, weight, bias, tracked, running, call, checked):
        self.key, self.weight, self.bias, self.tracked = key, weight, bias, tracked
        self.running, self.call, self.checked = running, call, checked
        self.counter = tracked.numpy().reshape(1)  # num_batches_tracked's memory, counted in by the kernel
        channels = call.view[1]
        # the parameters' memory as NumPy sees it (detach().numpy() costs 1.5 µs a call)
        self.views = (kernels._constant_table((channels,), 1.0) if weight is None else param_view(weight),
                      kernels._constant_table((channels,), 0.0) if bias is None else param_view(bias))


def _checked(weight, bias, running, tracked) -> tuple:
    """What a repeat compares besides the tensors' identity: what a write of ``.data`` may
    change under the same Python object. The running statistics and the counter are
    written, and the parameters read, through NumPy views of their memory kept in the
    :class:`TrainStep`, which must still be theirs, with the same layout; the dtypes
    decide whether torch refuses the call."""
    return (tracked.data_ptr(), running[0].data_ptr(), running[1].data_ptr(),
            None if weight is None else tensor_layout(weight), None if bias is None else tensor_layout(bias))


def _remember_step(module, x: Tensor, call: TrainCall, weight, bias, running) -> None:
    """Keep this call as the module's :class:`TrainStep` where a repeat can take it: the
    module tracks running statistics (NumPy views in ``running``) with a plain CPU
    counter, and every tensor has x's dtype."""
    tracked = module._buffers.get("num_batches_tracked")
    if running is None or not (type(tracked) is Tensor and tracked.device.type == "cpu" and not tracked.is_inference()
                               and tracked.dtype == torch.int64 and tracked.dim() == 0 and not tracked.requires_grad):
        return  # (no running statistics: the full path, whose checks are few then)
    if all(t is None or t.dtype == x.dtype for t in (weight, bias, running[0], running[1])):
        # in the module's cache, which pickles and deep-copies empty (the step holds views of memory)
        module_cache(module, "_normlab_train")["step"] = TrainStep((x.shape, x.stride(), x.dtype), weight, bias,
                                                                   tracked, running, call,
                                                                   _checked(weight, bias, running, tracked))


def repeat_step(module, x: Tensor, _recorded: bool = False) -> Optional[Tensor]:
    """BatchNorm's training forward as the module's last one (:class:`TrainStep`), or None
    where anything differs and the full path must decide."""
    if type(x) is not Tensor or _needs_torch_ops(x):
        # (traced, compiled or exported first, before the cache is read: the size comparison would be a
        # TracerWarning or a guard on the batch, and a compiled call that read the cache would guard on what
        # the eager calls last left in it, and compile again after each of theirs that changed it)
        return None
    if _profiler._is_profiler_enabled and not _recorded:  # (as forward)
        return profiled(module, repeat_step, module, x, True)
    cache = module.__dict__.get("_normlab_train")
    step = None if cache is None else cache.get("step")
    if step is None or not x.is_cpu or (x.shape, x.stride(), x.dtype) != step.key:
        return None
    parameters, buffers = module._parameters, module._buffers
    weight, bias = parameters.get("weight", _ABSENT), parameters.get("bias", _ABSENT)
    running = step.running
    if (weight is not step.weight or bias is not step.bias or buffers.get("running_mean") is not running[0]
            or buffers.get("running_var") is not running[1] or buffers.get("num_batches_tracked") is not step.tracked
            or _PathSwitch.path not in ("auto", "kernel")):
        return None
    call = step.call
    channels = call.view[1]
    if (_checked(weight, bias, running, step.tracked) != step.checked or module.num_features != channels
            or not 0.0 < module.eps < math.inf or not module.track_running_stats):
        return None
    grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))
    if grad and x.is_inference():
        return None  # torch raises its error (before counting the batch)
    momentum = module.momentum
    weight_view, bias_view = step.views
    tables = (np.asarray(weight_view, np.float64), np.asarray(bias_view, np.float64))
    counted = (0.0 if momentum is None else float(momentum), momentum is None, step.counter, step.tracked)
    if grad:
        return _apply_train(_unwrap_if_dead(x), weight, bias, module, call, counted, running, tables)
    return _run_forward(module, call, x, tables, counted, running)[0]


def _tracks(module) -> bool:
    return module.training and module.track_running_stats and module._buffers.get("running_mean") is not None


def _running(module):
    """(running_mean, running_var, their NumPy views) to update in place, remembered
    while the module holds the same tensors at the same addresses; False where they
    cannot be updated through NumPy (the full path updates them)."""
    buffers = module._buffers
    mean, var = buffers.get("running_mean"), buffers.get("running_var")
    if mean is not None and mean.is_inference() and not torch.is_inference_mode_enabled():
        return False  # built inside inference_mode: torch's in-place update raises its own error outside it
    caches = module_cache(module, "_normlab_train")
    cached = caches.get("running")
    if (cached is not None and cached[0] is mean and cached[1] is var and cached[4] == mean.data_ptr()
            and cached[5] == var.data_ptr()):
        return cached
    if not all(t is not None and type(t) is Tensor and t.dtype in _NUMPY_OF and t.device.type == "cpu"
               and t.is_contiguous() and not t.requires_grad for t in (mean, var)):
        return False
    running = (mean, var, mean.numpy(), var.numpy(), mean.data_ptr(), var.data_ptr())
    caches["running"] = running
    return running


def _table(param: Optional[Tensor], fill: float, channels: int) -> np.ndarray:
    """A parameter as the kernels read it: float64 of length C (shared constants for
    None). Not remembered between calls: a write through ``.data`` (gradcheck's, many
    optimizers') moves no version counter, and the conversion costs a microsecond."""
    if param is None:
        return kernels._constant_table((channels,), fill)
    return np.asarray(param_view(param), np.float64)


def _tables(weight, bias, channels: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Both parameters' tables, or None where one is not of length C (a ``.data`` write
    after the full path's checks, which then say what torch does)."""
    weight_table, bias_table = _table(weight, 1.0, channels), _table(bias, 0.0, channels)
    if weight_table.shape != (channels,) or bias_table.shape != (channels,):
        return None
    return weight_table, bias_table


def _run_forward(module, call: TrainCall, x: Tensor, tables, factor, running):
    """The kernels' training forward into a new tensor; the running statistics (where
    ``running`` is given) updated with ``factor``, or with ``factor`` = (momentum,
    cumulative, counter, num_batches_tracked) the batch counted in first (:class:`TrainStep`)."""
    channels = call.view[1]
    y, y_view = call.output(x)
    stats = np.empty((3, channels))
    mean, var, rstd = stats
    if y_view is None and call.addressed(x):
        # (kernels.column_forward's serial kernels, on the tensors' addresses: no NumPy views made)
        addressed = _addressed()
        (addressed.column_forward32_at if call.witness.dtype == np.float32 else addressed.column_forward_at)(
            x.data_ptr(), y.data_ptr(), *call.view, call.witness, *tables, False, float(module.eps),
            addressed.CANCELLATION, call.group_rows, kernels.CHANNEL_BLOCK, call.outer_chunk, mean, var, rstd)
    else:
        kernels.column_forward(call.engine(x), call.engine(y) if y_view is None else y_view, *tables, False,
                               float(module.eps), False, mean, var, rstd)
    if running is not None:
        columns = kernels._columns()
        if type(factor) is tuple:
            momentum, cumulative, counter, tracked = factor  # the batch is counted by the kernel
            columns.update_running_counted(running[2], running[3], mean, var, call.count, momentum, cumulative,
                                           counter, serial=True)
            torch.autograd.graph.increment_version(tracked)
        else:
            columns.update_running(running[2], running[3], mean, var, call.count, float(factor), serial=True)
        # (written through NumPy, their version counters kept, as torch's batch norm op keeps them:
        # a training call of that op saves them for its backward, which a bump would make raise)
    return y, mean, rstd


def _run_backward(module, call: TrainCall, grad_y: Tensor, x: Tensor, weight, eps: float, mean, rstd):
    if type(grad_y) is not Tensor or grad_y.dtype != x.dtype or grad_y.stride() != x.stride():
        grad_y = torch.empty_like(x).copy_(grad_y)  # x's layout, so one view fits both
    channels = call.view[1]
    grad_x, grad_x_view = call.output(x)
    grad_weight, grad_bias = np.empty((2, channels))
    if grad_x_view is None and call.addressed(x, grad_y):
        # (x as saved: a saved-tensor hook may hand back another layout, which takes the views below)
        _addressed().column_backward_at(grad_y.data_ptr(), x.data_ptr(), grad_x.data_ptr(), *call.view, call.witness,
                                        _table(weight, 1.0, channels), False, mean, rstd, call.group_rows,
                                        kernels.CHANNEL_BLOCK, call.outer_chunk, grad_weight, grad_bias)
    else:
        kernels.column_backward(call.engine(grad_y), call.engine(x), _table(weight, 1.0, channels), False, eps, True,
                                mean, rstd, call.engine(grad_x) if grad_x_view is None else grad_x_view, grad_weight,
                                grad_bias)
    return grad_x, grad_weight, grad_bias


class _TrainFunction(torch.autograd.Function):
    """The training forward and its backward on the kernels (inputs x, weight, bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, call, factor, running, tables):
        y, mean, rstd = _run_forward(module, call, x, tables, factor, running)
        # the bias: batch norm's backward saves none. The statistics are saved with x, as torch's
        # batch norm saves its own: a checkpoint that recomputes the forward in backward
        # (use_reentrant=False) then hands over the recomputed x with its own statistics, where
        # the recomputation may differ (dropout before the norm, preserve_rng_state=False)
        ctx.save_for_backward(x, weight, _bias_to_save(ctx, bias, False), torch.from_numpy(mean),
                              torch.from_numpy(rstd))
        ctx.module, ctx.call, ctx.eps = module, call, float(module.eps)
        return y

    @staticmethod
    def backward(ctx, grad_y, _recorded=False):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.compiler.is_dynamo_compiling():  # compiled autograd traces it (see row_autograd.traced_backward)
            spec, per_channel = ctx.module._spec, (1, x.shape[1]) + (1,) * (x.dim() - 2)  # "[b] c [...]"'s statistics
            grads = traced_backward(ctx, grad_y, x, weight, mean.reshape(per_channel), rstd.reshape(per_channel),
                                    spec.pattern, spec.params, spec.sizes, ctx.eps, spec.rms)
        elif _profiler._is_profiler_enabled and not _recorded:  # (after compiled autograd's branch, which must
            # not read the flag: its graph would be compiled again when a profiler starts; an attribute read)
            return profiled_backward(ctx, _TrainFunction.backward, grad_y)
        elif _needs_torch_backward(grad_y):
            grads = _differentiable_backward(ctx, grad_y, x, weight, _saved_bias(ctx, bias))
        else:
            grad_x, grad_weight, grad_bias = _run_backward(ctx.module, ctx.call, grad_y, x, weight, ctx.eps,
                                                           mean.numpy(), rstd.numpy())
            needs = ctx.needs_input_grad
            # float64: autograd's engine rounds each to its parameter's dtype, in C++ (past the dtype's
            # range it is ±inf without NumPy's warning; no errstate or .to() from Python), into a tensor
            # torch allocates. A float64 parameter would take them as they are, two views of one NumPy
            # buffer whose storage cannot be resized: each is copied into its own tensor instead
            grad_weight = torch.from_numpy(grad_weight) if needs[1] else None
            grad_bias = torch.from_numpy(grad_bias) if needs[2] else None
            if grad_weight is not None and weight.dtype is torch.float64:
                grad_weight = grad_weight.clone()
            if grad_bias is not None and ctx.bias_like[1] is torch.float64:
                grad_bias = grad_bias.clone()
            grads = (grad_x if needs[0] else None, grad_weight, grad_bias)
        return (*grads, None, None, None, None, None)


# Function.apply without its Python wrapper (see normlab.torch.row_autograd._apply_row)
_apply_train = super(torch.autograd.Function, _TrainFunction).apply
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _differentiable_backward(ctx, grad_y, x, weight, bias):
    """The gradient as torch's autograd of the composite forward (the same math in torch
    operations), where the kernels cannot take the backward pass (create_graph=True,
    batched gradients: :func:`normlab.torch.ops._needs_torch_backward`)."""
    from normlab.torch.compute import _composite_normalize  # compute imports this module

    spec, eps = ctx.module._spec, ctx.eps
    return tuple(_grads_of(lambda *inputs: _composite_normalize(*inputs, spec, eps)[0], (x, weight, bias),
                           ctx.needs_input_grad, grad_y))
