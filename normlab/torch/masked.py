"""Masks and segments on tensors: the custom op ``torch.ops.normlab.normalize_masked``
(with a fake kernel and an autograd formula, so ``torch.compile`` and ``torch.export`` see
one op carrying the mask and the ids) and :func:`normalize_masked`, its differentiable
entry point. The math is :mod:`normlab.masked`'s; a composite in torch operations serves
other devices and dtypes."""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import numpy as np
import torch
from torch import Tensor
from torch.autograd import forward_ad

from normlab import core
from normlab.errors import InputError, ParamsError, ShapeError
from normlab.kernels import pool
from normlab.masked import _segment_axis, make_grouping
from normlab.notation import parse_pattern
from normlab.plan import make_plan, merge_sizes
from normlab.torch.compute import _expanded_param, _fake
from normlab.torch.ops import _functorch_active, _grads_of, _needs_torch_backward, _spec_of, _vmapped
from normlab.torch.paths import _LOW_PRECISION, _exporting_to_onnx, _profiler, profiled, profiled_backward
from normlab.torch.spec import PlanFacts, Spec, TorchOutputs, _sizes_dict, array_view, owned_tensor, param_view
from normlab.torch.thread_warnings import ignored_in_this_thread

__all__ = ["normalize_masked", "MaskedResult", "check_segment_ids"]


class PatternParamsError(ParamsError, RuntimeError):
    """``weight`` or ``bias`` that do not fit the input: normlab's :class:`ParamsError` (a
    ``ValueError``) that is also a ``RuntimeError``, as torch's size mismatches are."""


def _torch_error(error: Exception) -> Exception:
    """normlab's shape and parameter errors as ones that ``except RuntimeError`` (torch's
    type for a misfit, and PyG's for a bad batch vector) catches too."""
    from normlab.torch.modules import PatternShapeError  # (modules imports this module)

    if isinstance(error, ShapeError):
        return PatternShapeError(str(error))
    return PatternParamsError(str(error)) if isinstance(error, ParamsError) else error


def _check_ids_dtype(x: Tensor, pattern: str, segment_ids: Tensor) -> None:
    if not isinstance(segment_ids, Tensor) or segment_ids.dtype == torch.bool or segment_ids.is_floating_point() \
            or segment_ids.is_complex():
        raise TypeError(f"pattern {pattern!r}, input shape {tuple(x.shape)}: segment_ids (a batch vector) must be an "
                        f"integer tensor, got {getattr(segment_ids, 'dtype', type(segment_ids).__name__)}; "
                        "pass ids.long()")


def _check_segment_axis_type(x: Tensor, spec: Spec, segment_axis) -> None:
    """Refuse a ``segment_axis`` that is no str (an int, a NumPy array) with torch's type for an
    argument of the wrong type, in the NumPy API's words (it raises an ``InputError`` there)."""
    try:
        with ignored_in_this_thread(torch.jit.TracerWarning):  # (sizes as ints: this call raises)
            plan = make_plan(spec.pattern, tuple(map(int, x.shape)), spec.params, sizes=_sizes_dict(spec.sizes))
        _segment_axis(plan, segment_axis)
    except (ShapeError, ParamsError) as error:
        raise _torch_error(error) from None
    except InputError as error:
        raise TypeError(str(error)) from None


def check_segment_ids(x: Tensor, pattern: str, segment_ids: Tensor, num_segments: Optional[int] = None,
                      segment_axis: Optional[str] = None) -> None:
    """Refuse ids that :func:`normalize_masked` would refuse (dtype, shape, range), in the
    same words, for callers that index with them first.

    >>> check_segment_ids(torch.randn(3, 2), "[n] c", torch.tensor([0, 2, 1]), num_segments=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    normlab.torch.modules.PatternShapeError: pattern '[n] c', input shape (3, 2): num_segments=2 but segment_ids ...
    """
    _check_ids_dtype(x, pattern, segment_ids)
    if torch.compiler.is_compiling() or _functorch_active() or _fake(x, segment_ids):
        # (the values are not known while tracing or under shape propagation; NumPy cannot read a
        # tensor under functorch's transforms, where normalize_masked takes the composite, whose
        # indexing refuses bad ids)
        return
    try:
        make_grouping(make_plan(pattern, tuple(x.shape)), segment_ids=_numpy(segment_ids.cpu()),
                      num_segments=num_segments, segment_axis=segment_axis)
    except (ShapeError, ParamsError) as error:
        raise _torch_error(error) from None


def _numpy(t: Optional[Tensor]):
    return None if t is None else array_view(t.detach().contiguous())


def _hints(shape) -> tuple[int, ...]:
    """``shape``, which may hold symbolic sizes (``torch.export`` with dynamic shapes), as
    their hints, without the guards that ``int()`` would add, so the graph stays dynamic."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return tuple(size if isinstance(size, int) else optimization_hint(size) for size in shape)


def _count(n) -> int:
    """``n`` as an int, a symbolic one (``torch.export`` with ``Dim.DYNAMIC``) as it is:
    ``int()`` would specialize it to its value."""
    return n if isinstance(n, torch.SymInt) else int(n)


def _hinted_plan(pattern, shape, params, sizes):
    """The plan of an input of ``shape`` (maybe symbolic), planned on its hints."""
    return make_plan(pattern, _hints(shape), params, sizes=_sizes_dict(sizes))


def _refuse_misfits(x, mask, segment_ids, pattern, params, sizes, num_segments, segment_axis) -> None:
    """Refuse a mask or ids that do not fit ``x`` from their shapes alone, in eager's words
    (``make_grouping``'s, on stand-ins of the same shapes): the fake kernel's check, so that
    ``torch.export`` and ``torch.compile`` refuse them while tracing, not the program's run."""
    plan = _hinted_plan(pattern, x.shape, params, sizes)
    stand_ins = {"mask": None if mask is None else np.broadcast_to(np.True_, _hints(mask.shape))}
    if segment_ids is not None:
        # (the count as its hint: make_grouping's int check would specialize a symbolic one,
        # and torch.compile(dynamic=True) recompile for each number of graphs; only a plain int
        # is the -1 for "none given": comparing an unbacked count, max(ids) + 1 read while
        # compiling, would guard on data; such a count has no value to check, only a made-up hint)
        known = num_segments.node.has_hint() if isinstance(num_segments, torch.SymInt) else num_segments >= 0
        stand_ins.update(segment_ids=np.zeros(_hints(segment_ids.shape), np.int64), segment_axis=segment_axis,
                         num_segments=_hints((num_segments,))[0] if known else None)
    try:
        make_grouping(plan, **stand_ins)
    except (ShapeError, ParamsError) as error:
        raise _torch_error(error) from None


def _symbolic_axis_sizes(plan, pattern, shape) -> list:
    """``plan.axis_sizes`` with the input's own (maybe symbolic) size for every expanded
    axis that is a whole input dimension; the factors of a grouped one keep their values."""
    parsed = parse_pattern(pattern)
    ellipsis_rank = len(shape) - (len(parsed.dims) - 1) if parsed.has_ellipsis else 0
    sizes, index = list(plan.axis_sizes), 0
    axis = 0
    for dim in parsed.dims:
        whole = ellipsis_rank if dim.is_ellipsis else (1 if len(dim.factors) == 1 else 0)
        for k in range(whole):
            sizes[axis + k] = shape[index + k]
        axis += ellipsis_rank if dim.is_ellipsis else len(dim.factors)
        index += ellipsis_rank if dim.is_ellipsis else 1
    return sizes


def _stats_shape(pattern, shape, params, sizes, num_segments, segment_axis, segmented) -> tuple[int, ...]:
    plan = _hinted_plan(pattern, shape, params, sizes)
    stats = [1 if reduced else size
             for size, reduced in zip(_symbolic_axis_sizes(plan, pattern, shape), plan.reduced)]
    if segmented:
        names = [plan.axis_names[i] for i in plan.reduced_axes if not plan.axis_names[i].startswith("...")]
        name = segment_axis if segment_axis is not None else (names[0] if names else None)
        if name in plan.axis_names:
            stats[plan.axis_names.index(name)] = num_segments
    return tuple(stats)


def _grouping_kwargs(mask, segment_ids, num_segments, segment_axis):
    if segment_ids is None:  # a 0-d True mask counts everything, and still returns the counts
        return {"mask": np.True_ if mask is None else _numpy(mask)}
    return {"mask": _numpy(mask), "segment_ids": _numpy(segment_ids), "num_segments": num_segments,
            "segment_axis": segment_axis}


def _forward_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mask: Optional[Tensor],
                  segment_ids: Optional[Tensor], pattern: str, params: Optional[str], sizes: str, eps: float,
                  rms: bool, num_segments: int, segment_axis: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, rstd, count)``: statistics float64 (mean 0 for RMS), count int64; y in
    memory torch allocates below the recycled pool's size (its storage resizes, as torch.nn's
    outputs' do)."""
    outputs = TorchOutputs()
    try:
        with pool.fresh_memory_from(outputs):
            y, stats = core.normalize_with_stats(
                _numpy(x), pattern, weight=param_view(weight), bias=param_view(bias), params=params, eps=eps,
                rms=rms, **_grouping_kwargs(mask, segment_ids, num_segments, segment_axis), sizes=_sizes_dict(sizes))
    except (ShapeError, ParamsError) as error:  # (raised in a compiled or exported graph too: torch's type)
        raise _torch_error(error) from None
    mean = np.zeros(stats.rstd.shape) if stats.mean is None else stats.mean
    return (outputs.tensor(np.ascontiguousarray(y)), torch.from_numpy(np.ascontiguousarray(mean)),
            torch.from_numpy(np.ascontiguousarray(stats.rstd)),
            torch.from_numpy(np.ascontiguousarray(stats.count, dtype=np.int64)))


_forward_op = torch.library.custom_op("normlab::normalize_masked", mutates_args=())(_forward_impl)


@_forward_op.register_fake
def _forward_fake(x, weight, bias, mask, segment_ids, pattern, params, sizes, eps, rms, num_segments, segment_axis):
    _refuse_misfits(x, mask, segment_ids, pattern, params, sizes, num_segments, segment_axis)
    shape = _stats_shape(pattern, x.shape, params, sizes, num_segments, segment_axis, segment_ids is not None)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(shape, dtype=torch.float64),
            x.new_empty(shape, dtype=torch.float64), x.new_empty(shape, dtype=torch.int64))


def _backward_impl(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], mask: Optional[Tensor],
                   segment_ids: Optional[Tensor], mean: Tensor, rstd: Tensor, pattern: str, params: Optional[str],
                   sizes: str, eps: float, rms: bool, num_segments: int, segment_axis: Optional[str],
                   need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)``; a gradient not asked for is an empty tensor;
    grad_x in memory torch allocates, as the forward's y."""
    outputs = TorchOutputs()
    with pool.fresh_memory_from(outputs):
        grad_x, grad_w, grad_b = core.normalize_backward(
            _numpy(grad_y), _numpy(x), pattern, weight=param_view(weight),
            params=params if (weight is not None or need_bias) else None, eps=eps, rms=rms,
            mean=None if rms else mean.numpy(), rstd=rstd.numpy(),
            **_grouping_kwargs(mask, segment_ids, num_segments, segment_axis), sizes=_sizes_dict(sizes))
    empty = x.new_empty(0, dtype=x.dtype if weight is None else weight.dtype)
    # (contiguous, as the fake kernel states them and Inductor asserts: the engine's parameter
    # gradients come back transposed where params are in another order than the pattern's)
    # (the parameters' gradients copied into tensors torch allocates, whose storage resizes as
    # torch.nn's do: torch.from_numpy's never does)
    return (outputs.tensor(np.ascontiguousarray(grad_x)),
            empty if grad_w is None or weight is None else owned_tensor(grad_w),
            owned_tensor(grad_b) if need_bias and grad_b is not None else empty.clone())


_backward_op = torch.library.custom_op("normlab::normalize_masked_backward", mutates_args=())(_backward_impl)


@_backward_op.register_fake
def _backward_fake(grad_y, x, weight, mask, segment_ids, mean, rstd, pattern, params, sizes, eps, rms, num_segments,
                   segment_axis, need_bias):
    param_shape = _hinted_plan(pattern, x.shape, params, sizes).param_shape
    dtype = x.dtype if weight is None else weight.dtype
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(param_shape if weight is not None else (0,), dtype=dtype),
            x.new_empty(param_shape if need_bias else (0,), dtype=dtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask, segment_ids, pattern, params, sizes, eps, rms, num_segments, segment_axis = inputs
    _, mean, rstd, count = output
    ctx.save_for_backward(x, weight, bias, mask, segment_ids, mean, rstd)
    ctx.arguments = (pattern, params, sizes, eps, rms, num_segments, segment_axis)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd, count)


def _autograd(ctx, grad_y, _grad_mean, _grad_rstd, _grad_count, backward=_backward_op):
    x, weight, bias, mask, segment_ids, mean, rstd = ctx.saved_tensors
    pattern, params, sizes, eps, rms, num_segments, segment_axis = ctx.arguments
    if torch.compiler.is_dynamo_compiling():  # (see normlab.torch.ops._normalize_autograd)
        backward = _backward_op
    elif _needs_torch_backward(grad_y) and not torch.compiler.is_compiling():
        # (create_graph=True, batched gradients) torch's autograd of the composite
        spec, segments = _spec_of(pattern, params, sizes, rms), None if num_segments < 0 else num_segments
        grads = _grads_of(lambda *inputs: _composite(*inputs, mask, segment_ids, spec, eps, segments, segment_axis)[0],
                          (x, weight, bias), ctx.needs_input_grad, grad_y)
        return (*grads, None, None, None, None, None, None, None, None, None)
    grad_x, grad_w, grad_b = backward(grad_y.contiguous(), x, weight, mask, segment_ids, mean, rstd, pattern, params,
                                      sizes, eps, rms, num_segments, segment_axis, ctx.has_bias)
    return (grad_x, grad_w if weight is not None else None, grad_b if ctx.has_bias else None,
            None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("normlab::normalize_masked", _autograd, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The op's forward and autograd without the dispatcher, for plain eager tensors."""

    @staticmethod
    def forward(ctx, *inputs):
        *inputs, then = inputs  # (last, so that ctx.needs_input_grad[i] stays the op's input i)
        output = _forward_impl(*inputs)
        if then is not None:  # (see _run_masked)
            then(*output[1:])
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_rstd, grad_count, _recorded=False):
        if not _recorded and not torch.compiler.is_dynamo_compiling() and _profiler._is_profiler_enabled:
            # (compiled autograd's check first, as normlab.torch.ops._EagerNormalize's)
            return profiled_backward(ctx, _Eager.backward, grad_y, grad_mean, grad_rstd, grad_count)
        return *_autograd(ctx, grad_y, grad_mean, grad_rstd, grad_count, backward=_backward_impl), None


class MaskedResult(tuple):
    """``(y, mean, rstd, count)``: statistics of the grouping's shape (float64; mean 0 for
    RMS), ``count`` the counted elements per group; each also by name (``count`` is the
    tensor, not ``tuple.count``)."""

    __slots__ = ()

    @property
    def y(self) -> Tensor:
        return self[0]

    @property
    def mean(self) -> Tensor:
        return self[1]

    @property
    def rstd(self) -> Tensor:
        return self[2]

    @property
    def count(self) -> Tensor:  # (shadows tuple.count, as a namedtuple field of that name does)
        return self[3]


def _composite(x, weight, bias, mask, segment_ids, spec: Spec, eps, num_segments, segment_axis, then=None):
    """The same definition in torch operations (any device, differentiable by autograd);
    ``then`` as in :func:`_run_masked`."""
    plan = make_plan(spec.pattern, tuple(x.shape), spec.params, sizes=spec.size_dict)
    shape = list(plan.stats_shape)
    index = None
    view = x.reshape(plan.axis_sizes)
    counted = torch.ones((), dtype=torch.bool, device=x.device) if mask is None else mask
    counted = counted.broadcast_to(x.shape).reshape(plan.axis_sizes)
    if segment_ids is not None:
        axis = plan.axis_names.index(segment_axis) if segment_axis is not None else next(
            i for i in plan.reduced_axes if not plan.axis_names[i].startswith("..."))
        shape[axis] = num_segments
    groups = torch.arange(int(np.prod(shape)), device=x.device).reshape(shape)
    if segment_ids is not None:
        groups = groups.index_select(axis, segment_ids.to(x.device).long())
    index = groups.broadcast_to(plan.axis_sizes).reshape(-1)
    size = int(np.prod(shape))
    # the kernels' numerics: float64 statistics (float32 where the device has no float64),
    # shifted by each group's first counted element, so a constant group centres to exact zeros
    compute = torch.float32 if x.device.type == "mps" else torch.float64
    flat, where = view.reshape(-1).to(compute), counted.reshape(-1)
    # the statistics read the counted elements alone: an uncounted NaN or Inf (garbage in the
    # padding) would reach their gradients as 0·NaN through any product it entered
    kept = torch.where(where, flat, 0)
    count = torch.zeros(size, dtype=compute, device=x.device).index_add(0, index, where.to(compute))
    safe = count.clamp_min(1)
    if spec.rms:
        var = torch.zeros(size, dtype=compute, device=x.device).index_add(0, index, kept * kept) / safe
        mean = torch.zeros_like(var)
    else:
        positions = torch.where(where, torch.arange(flat.numel(), device=x.device), flat.numel())
        first = torch.full((size,), flat.numel(), device=x.device).scatter_reduce(0, index, positions, "amin")
        shift = flat.detach().index_select(0, first.clamp_max(max(flat.numel() - 1, 0))) if flat.numel() \
            else torch.zeros(size, dtype=compute, device=x.device)
        shift = torch.where(count > 0, shift, 0)
        shifted = kept - shift[index]
        mean = shift + torch.zeros(size, dtype=compute, device=x.device).index_add(0, index, torch.where(
            where, shifted, 0)) / safe
        centered = kept - mean[index]
        var = torch.zeros(size, dtype=compute, device=x.device).index_add(0, index, torch.where(
            where, centered * centered, 0)) / safe
    rstd = torch.where(count > 0, torch.rsqrt(var + eps), 0)
    stats = (mean.detach().double().reshape(shape), rstd.detach().double().reshape(shape),
             count.detach().long().reshape(shape))
    if then is not None:  # (before the output's operations save their inputs)
        then(*stats)
    mean_e, rstd_e = mean[index], rstd[index]
    with torch.no_grad():
        # as the kernels: a group with nothing counted gives x̂ = 0 (its output exactly bias,
        # NaN there too), and an uncounted x̂ that is NaN or ±Inf stays in its own output and
        # gradient, taking no part in the statistics' or the weight's (normlab.masked)
        dead = (count == 0)[index]
        confined = ~where & ~torch.isfinite((flat - mean_e) * rstd_e) & ~dead
    x_hat = (torch.where(dead | confined, 0, flat) - mean_e) * rstd_e
    garbage = (flat - mean_e.detach()) * rstd_e.detach()
    w = None if weight is None else _expand(weight, plan).to(compute)
    b = None if bias is None else _expand(bias, plan).to(compute)
    y = _affine(x_hat.reshape(plan.axis_sizes), w, b)
    y = torch.where(confined.reshape(plan.axis_sizes),
                    _affine(garbage.reshape(plan.axis_sizes), None if w is None else w.detach(), b), y)
    y = y.to(x.dtype)  # the input's dtype whatever the parameters', as torch.nn and the kernels give
    return (y.reshape(x.shape),) + stats


def _affine(x_hat: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    y = x_hat if weight is None else x_hat * weight
    return y if bias is None else y + bias


# the names of the ellipsis' axes: a Plan's ("...0") and Spec.plan's ("_ellipsis0")
_ELLIPSIS_NAMES = ("...", "_ellipsis")


def _traced_plan(spec: Spec, x: Tensor) -> PlanFacts:
    """``x``'s plan for the traced definitions below, its axis sizes the input's own where
    they are whole dimensions, so that a dynamic one stays dynamic: under ``torch.export``
    :meth:`Spec.plan`'s integer arithmetic on the symbolic sizes (which Dynamo traces, for a
    strict export too); under ``torch.jit.trace``, which hands sizes as tensors, planned on
    their values (without its warning) while the reshapes take them as they are."""
    if torch.compiler.is_compiling():
        return spec.plan(x.shape)
    with ignored_in_this_thread(torch.jit.TracerWarning):
        shape = tuple(int(n) if isinstance(n, Tensor) else n for n in x.shape)
    plan = spec.plan(shape)
    return plan._replace(axis_sizes=tuple(_symbolic_axis_sizes(plan, spec.pattern, x.shape)))


def _reduced_composite(x, weight, bias, mask, spec: Spec, eps):
    """The same definition for a mask without segments, in reductions over the bracketed
    axes that ONNX has (``_composite``'s scatter operations it has not, or exports wrong):
    what ``torch.onnx.export`` records for ``mask=``. Float64 statistics, two-pass."""
    plan = _traced_plan(spec, x)
    sizes, axes = plan.axis_sizes, plan.reduced_axes
    compute = torch.float32 if x.device.type == "mps" else torch.float64
    view = x.reshape(sizes).to(compute)
    counted = (torch.ones((), dtype=torch.bool, device=x.device) if mask is None else mask).expand(
        x.shape).reshape(sizes)
    count = counted.to(compute).sum(dim=axes, keepdim=True)
    # (not clamp_min(1): ONNX Runtime has no float64 Clip before opset 12, and the exporter
    # records clamp as Clip at opsets 9 and 11)
    safe = torch.where(count > 0, count, 1)
    kept = torch.where(counted, view, 0)  # (see _composite)
    mean = torch.zeros_like(count) if spec.rms else kept.sum(dim=axes, keepdim=True) / safe
    centered = kept - mean
    var = torch.where(counted, centered * centered, 0).sum(dim=axes, keepdim=True) / safe
    rstd = torch.where(count > 0, torch.rsqrt(var + eps), 0)
    y = _every_element(view, counted, count > 0, mean, rstd, weight, bias, plan, compute)
    # (the statistics keep their reduced axes: stats_shape already)
    return y.to(x.dtype).reshape(x.shape), mean.detach().double(), rstd.detach().double(), count.detach().long()


def _traced_segments(x, weight, bias, mask, segment_ids, spec: Spec, eps, num_segments: Optional[int],
                     segment_axis):
    """The same definition with segments, in torch operations that ``torch.jit.trace``
    records with the input's sizes and the number of segments as they come (``_composite``
    plans them as constants): the statistics summed per element of the segment axis, then
    into the segments with ``index_add``, as PyG's scatter does; ``num_segments=None`` is
    max(ids) + 1 in the graph. The traced call's ids are checked as eager checks them.
    ``torch.export`` records the same operations (with the number of segments given).
    Float64 statistics, two-pass."""
    if not torch.compiler.is_compiling():
        num_segments = _checked_traced_count(x, segment_ids, spec, num_segments, segment_axis)
    plan = _traced_plan(spec, x)
    sizes = plan.axis_sizes
    axis = plan.axis_names.index(segment_axis) if segment_axis is not None else next(
        i for i in plan.reduced_axes if not plan.axis_names[i].startswith(_ELLIPSIS_NAMES))
    others = tuple(i for i in plan.reduced_axes if i != axis)
    ids = segment_ids.to(x.device).long()
    compute = torch.float32 if x.device.type == "mps" else torch.float64
    view = x.reshape(sizes).to(compute)
    counted = (torch.ones((), dtype=torch.bool, device=x.device) if mask is None else mask).expand(
        x.shape).reshape(sizes)

    def segment_sum(t: Tensor) -> Tensor:
        per_element = t.sum(dim=others, keepdim=True) if others else t
        stats_shape = list(per_element.shape)
        stats_shape[axis] = num_segments
        return per_element.new_zeros(stats_shape).index_add(axis, ids, per_element)

    count = segment_sum(counted.to(compute))
    safe = count.clamp_min(1)
    kept = torch.where(counted, view, 0)  # (see _composite)
    mean = torch.zeros_like(count) if spec.rms else segment_sum(kept) / safe
    centered = kept - mean.index_select(axis, ids)
    var = segment_sum(torch.where(counted, centered * centered, 0)) / safe
    rstd = torch.where(count > 0, torch.rsqrt(var + eps), 0)
    y = _every_element(view, counted, (count > 0).index_select(axis, ids), mean.index_select(axis, ids),
                       rstd.index_select(axis, ids), weight, bias, plan, compute)
    return y.to(x.dtype).reshape(x.shape), mean.detach().double(), rstd.detach().double(), count.detach().long()


def _every_element(view, counted, live, mean, rstd, weight, bias, plan, compute) -> Tensor:
    """The traced definitions' output, every element normalized as in ``_composite``: a
    group with nothing counted gives x̂ = 0, and an uncounted x̂ that is NaN or ±Inf takes the
    statistics and weight detached (``mean``, ``rstd`` and ``live`` broadcast to ``view``)."""
    with torch.no_grad():  # (|x̂| < inf is isfinite, which ONNX lacks before opset 10)
        confined = ~counted & ~((view - mean) * rstd).abs().lt(float("inf")) & live
    x_hat = (torch.where(confined | ~live, 0, view) - mean) * rstd
    garbage = (view - mean.detach()) * rstd.detach()
    w = None if weight is None else _expanded_param(weight, plan).to(compute)
    b = None if bias is None else _expanded_param(bias, plan).to(compute)
    return torch.where(confined, _affine(garbage, None if w is None else w.detach(), b), _affine(x_hat, w, b))


def _checked_traced_count(x, segment_ids, spec: Spec, num_segments, segment_axis):
    """The traced call's ids checked as eager checks them (on their values, without the
    tracer's warning); the number of segments, max(ids) + 1 as a tensor (a size in the
    graph) where none is given."""
    with ignored_in_this_thread(torch.jit.TracerWarning):
        given = num_segments is not None
        count_now = num_segments if given else int(segment_ids.max()) + 1 if segment_ids.numel() else 0
        _refuse_too_many_segments(x, spec, segment_ids, count_now, given)
        check_segment_ids(x, spec.pattern, segment_ids, count_now, segment_axis)
        if not given:
            num_segments = segment_ids.max() + 1 if segment_ids.numel() else 0
    return num_segments


def _expand(param: Tensor, plan) -> Tensor:
    split = param.reshape(tuple(plan.axis_sizes[i] for i in plan.param_axes))
    order = sorted(range(len(plan.param_axes)), key=lambda k: plan.param_axes[k])
    return split.permute(order).reshape(plan.param_broadcast_shape)


def _refuse_too_many_segments(x: Tensor, spec: Spec, segment_ids: Tensor, num_segments: int, given: bool) -> None:
    """Refuse, as a torch error, segments whose statistics would dwarf the input (as the
    NumPy API does), from the largest id alone: torch reductions, so functorch's transforms
    and other devices take it too."""
    if torch.compiler.is_compiling() or _vmapped(segment_ids):  # the values are not known while tracing
        return
    from normlab.masked import check_segment_count

    largest = int(segment_ids.max()) if segment_ids.numel() else None
    try:
        plan = make_plan(spec.pattern, tuple(x.shape), spec.params, sizes=spec.size_dict)
        check_segment_count(plan, largest, num_segments, given, unique="torch.unique")
    except (ShapeError, ParamsError) as error:
        raise _torch_error(error) from None


def vmapped_ids_need_a_count(keyword: str) -> str:
    """What vmap over per-sample ids needs, for :func:`normalize_masked` (``num_segments``)
    and the PyG twins (``batch_size``)."""
    return (f"segment ids batched by torch.func.vmap need {keyword}=: vmap cannot read the number of segments "
            f"off their values; pass {keyword}= (the largest id in the batch + 1), or loop over the batch in Python")


SEGMENTS_DO_NOT_EXPORT = ("segment_ids= does not export to ONNX, which has no normlab op; mask= does (as ONNX "
                          "reductions), and so do normlab.torch.geometric's twins (as PyG's own definitions): export "
                          "a model that uses one of those")


def normalize_masked(x: Tensor, pattern: str, *, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     params: Optional[str] = None, eps: float = 1e-5, rms: bool = False,
                     mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                     num_segments: Optional[int] = None, segment_axis: Optional[str] = None,
                     sizes: Optional[Mapping[str, int]] = None, **axis_sizes: int) -> MaskedResult:
    """:func:`normlab.normalize` with ``mask=`` and ``segment_ids=`` on tensors,
    differentiable; returns :class:`MaskedResult` ``(y, mean, rstd, count)``. Axis sizes
    come as keywords or in the mapping ``sizes``, as in :func:`normlab.normalize`.

    >>> x = torch.tensor([[4., 3., 2., 100.]], dtype=torch.float64, requires_grad=True)
    >>> y = normalize_masked(x, "b [f]", mask=torch.tensor([True, True, True, False])).y
    >>> [round(v, 4) for v in y[0, :3].tolist()]
    [1.2247, 0.0, -1.2247]
    >>> ids = torch.tensor([0, 0, 1, 1])
    >>> normalize_masked(torch.tensor([1., 3., 5., 9.]), "[n]", segment_ids=ids, eps=0.0).y.tolist()
    [-1.0, 1.0, -1.0, 1.0]
    """
    spec = Spec.build(pattern, params, rms, **merge_sizes(pattern, sizes, axis_sizes, x.shape))
    return _run_masked(x, spec, weight, bias, eps, mask, segment_ids, num_segments, segment_axis)


def _run_masked(x: Tensor, spec: Spec, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                num_segments: Optional[int] = None, segment_axis: Optional[str] = None,
                then: Optional[Callable[[Tensor, Tensor, Tensor], None]] = None, module=None) -> MaskedResult:
    """:func:`normalize_masked` of a built ``spec``. ``then(mean, rstd, count)`` runs once
    the statistics are known and before anything is saved for backward: where the modules
    update their running statistics, as torch.nn's ops do inside, so that the recomputation
    of ``torch.utils.checkpoint``, which stops at the last saved tensor, updates them too.
    ``module``: the twin whose call torch's profiler lists (:func:`normlab.torch.paths.profiled`)."""
    pattern = spec.pattern
    given_segments = num_segments
    tracing = torch.jit.is_tracing()  # (asked once a call)
    if segment_ids is not None:
        _check_ids_dtype(x, pattern, segment_ids)
        if segment_axis is not None and not isinstance(segment_axis, str):
            _check_segment_axis_type(x, spec, segment_axis)
        if num_segments is None and not tracing:  # (traced: read in the graph, see _traced_segments)
            # (not while compiling: Dynamo cannot trace the check, and would refuse a fullgraph for it)
            if not torch.compiler.is_compiling() and _vmapped(segment_ids):
                raise RuntimeError(f"pattern {pattern!r}, input shape {tuple(x.shape)}: "
                                   + vmapped_ids_need_a_count("num_segments"))
            # (item(): a size torch.export keeps unknown, where int() would ask it for the value)
            num_segments = segment_ids.max().item() + 1 if segment_ids.numel() else 0
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"pattern {pattern!r}, input shape {tuple(x.shape)}: mask must be a bool tensor, "
                        f"got {mask.dtype}; pass mask.bool() (True where an element counts)")
    if not (x.is_floating_point() or x.is_complex()):
        # (the statistics would be computed and the output cast back to it: made-up values,
        # where the unmasked Norm and normalize raise, torch's var_mean refusing the input)
        raise RuntimeError(f"pattern {pattern!r}, input shape {tuple(x.shape)}: the input must be floating point, "
                           f"got {x.dtype}; pass x.float()")
    # (either ONNX exporter: ONNX has no normlab op; torch.jit.trace: torch operations, which take
    # other sizes and which torch.jit.save saves, where a call into the kernels is a Python call;
    # torch.export: core ATen operations, which a runtime without normlab runs, AOTInductor's too)
    exporting = torch.compiler.is_exporting()  # (the dynamo ONNX exporter's too; the TorchScript one traces)
    if exporting or tracing:
        if segment_ids is not None and _exporting_to_onnx():
            raise RuntimeError(f"pattern {pattern!r}, input shape {tuple(map(int, x.shape))}: "
                               + SEGMENTS_DO_NOT_EXPORT)
        if exporting and not torch.compiler.is_dynamo_compiling():
            # a misfit refused while tracing, in eager's words (a strict export, whose Dynamo
            # cannot read the sizes' hints, leaves it to torch's broadcasting error)
            _refuse_misfits(x, mask, segment_ids, pattern, spec.params, spec.sizes,
                            -1 if num_segments is None else num_segments, segment_axis)
        if segment_ids is not None:
            result = MaskedResult(_traced_segments(x, weight, bias, mask, segment_ids, spec, eps, num_segments,
                                                   segment_axis))
        else:
            result = MaskedResult(_reduced_composite(x, weight, bias, mask, spec, eps))
        if then is not None:
            then(*result[1:])
        return result
    low = x.dtype in _LOW_PRECISION
    kernel = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, *_LOW_PRECISION)
              and (mask is None or mask.device.type == "cpu") and not x.is_complex()
              # (parameters NumPy cannot read, bfloat16 beside float32 input: the composite, as torch computes)
              and (low or all(t is None or t.dtype in (torch.float32, torch.float64) for t in (weight, bias)))
              and not (_functorch_active() or forward_ad._current_level >= 0))  # (transforms: torch ops)
    if not kernel:
        if segment_ids is not None:  # before the composite allocates statistics for every id up to the largest
            _refuse_too_many_segments(x, spec, segment_ids, num_segments, given_segments is not None)
        if not torch.compiler.is_compiling():  # (torch's broadcast would refuse a misfit without the pattern)
            _refuse_misfits(x, mask, segment_ids, pattern, spec.params, spec.sizes,
                            -1 if num_segments is None else num_segments, segment_axis)
        return MaskedResult(_composite(x, weight, bias, mask, segment_ids, spec, eps, num_segments, segment_axis,
                                       then))
    xs = [None if t is None else (t.float() if low else t) for t in (x, weight, bias)]
    args = (xs[0].contiguous(), xs[1], xs[2], mask, None if segment_ids is None else segment_ids.long(), spec.pattern,
            spec.params, spec.sizes, float(eps), spec.rms, -1 if num_segments is None else _count(num_segments),
            segment_axis)
    eager = not torch.compiler.is_compiling() and all(
        t is None or type(t) in (Tensor, torch.nn.Parameter) for t in args[:5])
    # (torch.jit.trace cannot record operations inside a Function's forward: after it there)
    inside = then if eager and not tracing else None
    try:
        if not eager:
            y, mean, rstd, count = _forward_op(*args)
        elif _profiler._is_profiler_enabled:  # (an attribute read when no profiler runs; never while compiling)
            y, mean, rstd, count = profiled(module, _Eager.apply, *args, inside)
        else:
            y, mean, rstd, count = _Eager.apply(*args, inside)
    except (ShapeError, ParamsError) as error:
        if segment_ids is not None and given_segments is None:
            # the op was handed max(ids) + 1: refuse in the words for the ids alone, which
            # do not tell the user to pass that very num_segments
            _refuse_too_many_segments(x, spec, segment_ids, num_segments, False)
        raise _torch_error(error) from None
    if then is not None and inside is None:
        then(mean, rstd, count)
    if low:
        y = y.to(x.dtype)
    return MaskedResult((y, mean, rstd, count))
