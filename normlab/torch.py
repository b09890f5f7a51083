"""PyTorch front end: drop-in ``torch.nn`` normalization modules on normlab's engine.

Swap a model's norm layers in one call and keep its parameters, buffers and outputs::

    >>> import torch
    >>> from normlab.torch import convert
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> model = convert(model)
    >>> type(model[1]).__module__, model(torch.randn(2, 3, 8, 8)).shape
    ('normlab.torch', torch.Size([2, 8, 6, 6]))

Each module subclasses its ``torch.nn`` namesake, so constructor arguments, defaults,
attributes, ``state_dict`` keys, ``reset_parameters()``, ``extra_repr()`` and
``isinstance(m, torch.nn.BatchNorm2d)`` checks are torch's own; only ``forward`` differs.
:class:`Norm` takes any pattern.

**Momentum**, as torch defines it (frameworks disagree)::

    running = (1 − momentum) · running + momentum · batch          (momentum=0.1)
    running = running + (batch − running) / num_batches_tracked    (momentum=None)

``running_var`` stores the *unbiased* batch variance ``n/(n − 1)·var``; the batch is
normalized with the biased one.

**Paths.** Each forward takes one of three paths:

* ``"kernel"``: CPU float32/float64 tensors go zero-copy (contiguous, or any dense
  permutation such as channels_last) into :func:`normlab.normalize` through the custom
  op ``torch.ops.normlab.normalize``, registered with ``torch.library`` with a fake
  kernel and an autograd formula, so ``torch.compile(fullgraph=True)`` and
  ``torch.export`` see one op (plain eager tensors call the same functions through an
  ``autograd.Function``, skipping the dispatcher's per-call cost);
* ``"native"``: torch's own op (``F.batch_norm``, ``F.layer_norm``, ...) for other
  devices and dtypes, where the pattern has one;
* ``"composite"``: the same math written in torch operations, for any pattern.

``"auto"`` picks in that order; :func:`use_path` forces one (tests use it on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn

from normlab import core
from normlab.errors import InputError, ParamsError, ShapeError
from normlab.notation import parse_params, parse_pattern
from normlab.plan import make_plan

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "RMSNorm", "SyncBatchNorm", "Norm", "convert", "normalize",
    "use_path", "PATHS",
]

PATHS = ("auto", "kernel", "native", "composite")
_KERNEL_DTYPES = (torch.float32, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _PathSwitch:
    """The process-wide path choice; ``"auto"`` unless :func:`use_path` forces one."""

    path = "auto"


def _check_path(path: str) -> str:
    if path not in PATHS:
        raise InputError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    return path


@contextlib.contextmanager
def use_path(path: str):
    """Force every normlab module to take ``path`` (one of :data:`PATHS`) inside the block.

    ``"kernel"`` applies to CPU tensors only (the kernels are NumPy code); ``"native"``
    falls back to the composite for patterns torch has no op for.

    >>> m = LayerNorm(4)
    >>> with use_path("composite"):
    ...     y = m(torch.arange(8.).reshape(2, 4))
    >>> [round(v, 4) for v in y[0].tolist()]
    [-1.3416, -0.4472, 0.4472, 1.3416]
    """
    previous = _PathSwitch.path
    _PathSwitch.path = _check_path(path)
    try:
        yield
    finally:
        _PathSwitch.path = previous


def _choose_path(x: Tensor, has_native: bool) -> str:
    forced = _PathSwitch.path
    if forced == "kernel" and x.device.type == "cpu":
        return "kernel"
    if forced == "composite" or (forced == "native" and not has_native):
        return "composite"
    if forced == "native":
        return "native"
    if x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES:
        return "kernel"
    return "native" if has_native else "composite"


# ---------------------------------------------------------------------------------------
# Patterns and layouts


@dataclass(frozen=True)
class DimSpec:
    """One input axis of a pattern, as plain tuples: its factors' names, whether each is
    reduced and their sizes where given (None: inferred from the input)."""

    names: tuple[str, ...]
    reduced: tuple[bool, ...]
    sizes: tuple[Optional[int], ...]
    is_ellipsis: bool = False


@dataclass(frozen=True)
class Spec:
    """What one module normalizes: the pattern, the axes weight spans, the axis sizes
    (``"g=32"`` text, so the custom op can take it) and RMS or not, plus the parsed pattern
    as plain tuples (``dims``, ``param_items``) that torch.compile can trace through."""

    pattern: str
    params: Optional[str]
    sizes: str = ""
    rms: bool = False
    dims: tuple[DimSpec, ...] = ()
    param_items: tuple[tuple[str, ...], ...] = ()

    @staticmethod
    def build(pattern: str, params: Optional[str] = None, rms: bool = False, **sizes: int) -> "Spec":
        """Check the pattern and params now, so a bad one fails at construction time."""
        parsed = parse_pattern(pattern)
        items = parse_params(params) if params is not None else ()
        for item in items:
            for name in item:
                if name not in parsed.names:
                    raise ParamsError(f"params {params!r} names axis {name!r}, which pattern {pattern!r} "
                                      f"does not have: name axes from {', '.join(parsed.names)}")
        for name, value in sizes.items():
            if name not in parsed.names:
                raise ShapeError(f"pattern {pattern!r}: size {name}={value!r} names no axis of the pattern; "
                                 f"use one of {', '.join(parsed.names)}")
        dims = tuple(
            DimSpec((), (dim.reduced,), (), is_ellipsis=True) if dim.is_ellipsis else
            DimSpec(tuple(a.name for a in dim.factors), tuple(a.reduced for a in dim.factors),
                    tuple(sizes.get(a.name) for a in dim.factors))
            for dim in parsed.dims)
        return Spec(pattern, params, _sizes_text(sizes), rms, dims, tuple(items))

    @property
    def size_dict(self) -> dict:
        return _sizes_dict(self.sizes)

    def plan(self, shape) -> "PlanFacts":
        """The plan's facts the torch code needs, for an input of ``shape``: plain integer
        arithmetic on the shape, so torch.compile traces it (dynamic shapes included).
        In eager mode :func:`normlab.make_plan` checks the shape first, for its errors."""
        if not torch.compiler.is_compiling():
            make_plan(self.pattern, tuple(shape), self.params, **self.size_dict)
        names, axis_sizes, reduced = [], [], []
        ellipsis_rank = len(shape) - (len(self.dims) - 1)
        index = 0
        for dim in self.dims:
            if dim.is_ellipsis:
                for k in range(ellipsis_rank):
                    names.append(f"_ellipsis{k}")
                    axis_sizes.append(shape[index])
                    reduced.append(dim.reduced[0])
                    index += 1
                continue
            size = shape[index]
            index += 1
            known = 1
            for factor_size in dim.sizes:
                if factor_size is not None:
                    known *= factor_size
            for name, factor_reduced, factor_size in zip(dim.names, dim.reduced, dim.sizes):
                names.append(name)
                axis_sizes.append(size if len(dim.names) == 1 else factor_size if factor_size is not None
                                  else size // known)
                reduced.append(factor_reduced)
        lookup = {name: i for i, name in enumerate(names)}
        param_axes = [lookup[name] for item in self.param_items for name in item]
        group_size = 1
        for i, is_reduced in enumerate(reduced):
            if is_reduced:
                group_size *= axis_sizes[i]
        param_shape = []
        for item in self.param_items:
            size = 1
            for name in item:
                size *= axis_sizes[lookup[name]]
            param_shape.append(size)
        return PlanFacts(
            tuple(names), tuple(axis_sizes), tuple(reduced), tuple(i for i, r in enumerate(reduced) if r), group_size,
            tuple(axis_sizes[a] for a in param_axes),
            tuple(sorted(range(len(param_axes)), key=lambda k: param_axes[k])),
            tuple(s if i in param_axes else 1 for i, s in enumerate(axis_sizes)), tuple(param_shape))


class PlanFacts(NamedTuple):
    """What the torch-side code needs from a :class:`normlab.plan.Plan`, as plain tuples."""

    axis_names: tuple[str, ...]
    axis_sizes: tuple[int, ...]
    reduced: tuple[bool, ...]
    reduced_axes: tuple[int, ...]
    group_size: int
    param_split_shape: tuple[int, ...]  # weight split into its axes, in params order
    param_order: tuple[int, ...]  # the permutation that puts those axes in pattern order
    param_broadcast_shape: tuple[int, ...]
    param_shape: tuple[int, ...]


def _sizes_text(sizes: dict) -> str:
    return ",".join(f"{name}={int(value)}" for name, value in sorted(sizes.items()))


@functools.lru_cache(maxsize=256)
def _sizes_items(text: str) -> tuple:
    if not text:
        return ()
    return tuple((name, int(value)) for name, value in (item.split("=") for item in text.split(",")))


def _sizes_dict(text: str) -> dict:
    return dict(_sizes_items(text))


@functools.lru_cache(maxsize=256)
def _dim_texts(pattern: str, ndim: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The pattern as one text per input axis (the ellipsis spelled out as axes
    ``_ellipsis0 ...``) and how many expanded axes each input axis becomes."""
    parsed = parse_pattern(pattern)
    ellipsis_rank = ndim - (len(parsed.dims) - 1) if parsed.has_ellipsis else 0
    texts, counts = [], []
    for dim in parsed.dims:
        if dim.is_ellipsis:
            for k in range(ellipsis_rank):
                texts.append(f"[_ellipsis{k}]" if dim.reduced else f"_ellipsis{k}")
                counts.append(1)
        elif dim.composed:
            if dim.reduced:
                texts.append("[(" + " ".join(a.name for a in dim.factors) + ")]")
            else:
                texts.append("(" + " ".join(f"[{a.name}]" if a.reduced else a.name for a in dim.factors) + ")")
            counts.append(len(dim.factors))
        else:
            axis = dim.factors[0]
            texts.append(f"[{axis.name}]" if axis.reduced else axis.name)
            counts.append(1)
    return tuple(texts), tuple(counts)


@dataclass(frozen=True)
class Layout:
    """How a dense tensor is seen by the NumPy engine: ``x.permute(perm)`` is C-contiguous
    and ``pattern`` names its axes; ``stats_order`` takes the statistics from that
    order back to the pattern's (None when no permutation is needed)."""

    perm: Optional[tuple[int, ...]]
    pattern: str
    stats_order: Optional[tuple[int, ...]] = None
    expanded_order: Optional[tuple[int, ...]] = None


@functools.lru_cache(maxsize=1024)
def _layout(pattern: str, perm: Optional[tuple[int, ...]], ndim: int) -> Layout:
    if perm is None:
        return Layout(None, pattern)
    texts, counts = _dim_texts(pattern, ndim)
    offsets = np.cumsum((0,) + counts)
    expanded = [int(a) for p in perm for a in range(offsets[p], offsets[p] + counts[p])]
    return Layout(perm, " ".join(texts[p] for p in perm), tuple(int(i) for i in np.argsort(expanded)),
                  tuple(expanded))


def _dense_perm(x: Tensor) -> tuple[Tensor, Optional[tuple[int, ...]]]:
    """``(x, perm)`` with ``x.permute(perm)`` C-contiguous (channels_last: (0, 2, 3, 1));
    perm None for a contiguous tensor. Only a tensor with gaps or overlaps is copied."""
    if x.is_contiguous():
        return x, None
    perm = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
    if x.permute(perm).is_contiguous():
        return x, perm
    return x.contiguous(), None


def _empty_like_dense(x: Tensor, perm) -> Tensor:
    """An uninitialized tensor with ``x``'s shape and strides, carved from normlab's
    recycled output memory: ``torch.empty`` would hand the kernel fresh 4 KB pages, whose
    first-touch faults cost more than the normalization itself on large tensors."""
    from normlab.kernels import pool

    if x.dtype not in _NUMPY_DTYPES:
        return torch.empty_like(x)
    shape = tuple(x.shape) if perm is None else tuple(x.shape[p] for p in perm)
    y = torch.from_numpy(pool.empty(shape, _NUMPY_DTYPES[x.dtype]))
    return y if perm is None else y.permute(_inverse(perm))


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _engine_view(t: Tensor, perm) -> np.ndarray:
    t = t.detach()
    return (t if perm is None else t.permute(perm)).numpy()


def _inverse(perm):
    return tuple(int(i) for i in np.argsort(perm))


# ---------------------------------------------------------------------------------------
# The custom ops: the engine behind torch.library, with fake kernels and autograd


def _normalize_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pattern: str,
                  params: Optional[str], sizes: str, eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)``: y like x (same strides); mean and rstd float64 of the plan's
    stats_shape (mean is zeros for RMS)."""
    x, perm = _dense_perm(x)
    layout = _layout(pattern, perm, x.dim())
    y = _empty_like_dense(x, perm)
    _, stats = core.normalize_with_stats(
        _engine_view(x, perm), layout.pattern, params=params, eps=eps, rms=rms, out=_engine_view(y, perm),
        weight=None if weight is None else weight.detach().numpy(),
        bias=None if bias is None else bias.detach().numpy(), **_sizes_dict(sizes))
    rstd = stats.rstd if perm is None else stats.rstd.transpose(layout.stats_order)
    if rms:
        mean = np.zeros(rstd.shape)
    else:
        mean = stats.mean if perm is None else stats.mean.transpose(layout.stats_order)
    return y, torch.from_numpy(np.ascontiguousarray(mean)), torch.from_numpy(np.ascontiguousarray(rstd))


_normalize_op = torch.library.custom_op("normlab::normalize", mutates_args=())(_normalize_impl)


@_normalize_op.register_fake
def _normalize_fake(x, weight, bias, pattern, params, sizes, eps, rms):
    stats_shape = make_plan(pattern, tuple(x.shape), params, **_sizes_dict(sizes)).stats_shape
    return (torch.empty_like(x), x.new_empty(stats_shape, dtype=torch.float64),
            x.new_empty(stats_shape, dtype=torch.float64))


def _normalize_backward_impl(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                           pattern: str, params: Optional[str], sizes: str, eps: float, rms: bool,
                           need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)``; a gradient not asked for is an empty tensor."""
    x, perm = _dense_perm(x)
    layout = _layout(pattern, perm, x.dim())
    if grad_y.stride() != x.stride():  # give grad_y x's layout, so both share one permutation
        grad_y = torch.empty_like(x).copy_(grad_y)
    mean_np, rstd_np = mean.numpy(), rstd.numpy()
    if perm is not None:
        mean_np, rstd_np = mean_np.transpose(layout.expanded_order), rstd_np.transpose(layout.expanded_order)
    grad_x, grad_w, grad_b = core.normalize_backward(
        _engine_view(grad_y, perm), _engine_view(x, perm), layout.pattern,
        weight=None if weight is None else weight.detach().numpy(),
        params=params if (weight is not None or need_bias) else None, eps=eps, rms=rms,
        mean=None if rms else mean_np, rstd=rstd_np, **_sizes_dict(sizes))
    grad_x = torch.from_numpy(grad_x)
    if perm is not None:
        grad_x = grad_x.permute(_inverse(perm))
    empty = x.new_empty(0, dtype=x.dtype if weight is None else weight.dtype)  # as the fake kernel
    return (grad_x,
            empty if grad_w is None or weight is None else torch.from_numpy(grad_w),
            torch.from_numpy(grad_b) if need_bias and grad_b is not None else empty.clone())


_normalize_backward_op = torch.library.custom_op("normlab::normalize_backward",
                                                 mutates_args=())(_normalize_backward_impl)


@_normalize_backward_op.register_fake
def _normalize_backward_fake(grad_y, x, weight, mean, rstd, pattern, params, sizes, eps, rms, need_bias):
    param_shape = make_plan(pattern, tuple(x.shape), params, **_sizes_dict(sizes)).param_shape
    param_dtype = x.dtype if weight is None else weight.dtype  # as normlab.normalize_backward returns
    return (torch.empty_like(x),
            x.new_empty(param_shape if weight is not None else (0,), dtype=param_dtype),
            x.new_empty(param_shape if need_bias else (0,), dtype=param_dtype))


def _normalize_setup_context(ctx, inputs, output):
    x, weight, bias, pattern, params, sizes, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.arguments = (pattern, params, sizes, eps, rms)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _normalize_autograd(ctx, grad_y, _grad_mean, _grad_rstd, backward=_normalize_backward_op):
    x, weight, mean, rstd = ctx.saved_tensors
    pattern, params, sizes, eps, rms = ctx.arguments
    grad_x, grad_w, grad_b = backward(grad_y, x, weight, mean, rstd, pattern, params, sizes, eps, rms,
                                      ctx.has_bias)
    return (grad_x, grad_w if weight is not None else None, grad_b if ctx.has_bias else None,
            None, None, None, None, None)


torch.library.register_autograd("normlab::normalize", _normalize_autograd, setup_context=_normalize_setup_context)


class _EagerNormalize(torch.autograd.Function):
    """The custom op's forward and autograd without the dispatcher, for plain eager
    tensors: the same functions, about 100 µs less per call. Compilation, export and
    tensor subclasses (fake tensors among them) go through the registered op."""

    @staticmethod
    def forward(ctx, *inputs):  # the ctx-first form: apply() then skips inspect.signature
        output = _normalize_impl(*inputs)
        _normalize_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        return _normalize_autograd(ctx, grad_y, grad_mean, grad_rstd, backward=_normalize_backward_impl)


def _is_eager(*tensors) -> bool:
    return not torch.compiler.is_compiling() and all(t is None or type(t) in (Tensor, nn.Parameter) for t in tensors)


# ---------------------------------------------------------------------------------------
# Compute: one entry point for the kernel and composite paths


def _in_compute_dtype(compute):
    """Run ``compute(x, weight, bias, ...)`` in float32 for float16/bfloat16 input and
    cast ``y`` back; statistics stay in float32. The one place low precision is upcast."""

    @functools.wraps(compute)
    def wrapper(x: Tensor, weight, bias, *args):
        if x.dtype not in _LOW_PRECISION:
            return compute(x, weight, bias, *args)
        upcast = [None if t is None else t.float() for t in (x, weight, bias)]
        y, *stats = compute(*upcast, *args)
        return (y.to(x.dtype), *stats)

    return wrapper


def _expanded_param(param: Optional[Tensor], plan: PlanFacts) -> Optional[Tensor]:
    """A weight/bias of the plan's param_shape laid out to broadcast against the expanded view."""
    if param is None:
        return None
    return param.reshape(plan.param_split_shape).permute(plan.param_order).reshape(plan.param_broadcast_shape)


@_in_compute_dtype
def _kernel_normalize(x, weight, bias, spec: Spec, eps: float):
    run = _EagerNormalize.apply if _is_eager(x, weight, bias) else _normalize_op
    return run(x, weight, bias, spec.pattern, spec.params, spec.sizes, float(eps), spec.rms)


@_in_compute_dtype
def _composite_normalize(x, weight, bias, spec: Spec, eps: float):
    """The engine's math in torch operations (biased variance, rstd = 1/sqrt(var + eps))."""
    plan = spec.plan(x.shape)
    view = x.reshape(plan.axis_sizes)
    axes = plan.reduced_axes
    if spec.rms:
        mean = None
        var = view.square().mean(dim=axes, keepdim=True)
        centered = view
    else:
        var, mean = torch.var_mean(view, dim=axes, keepdim=True, correction=0)
        centered = view - mean
    rstd = torch.rsqrt(var + eps)
    y = centered * rstd
    if weight is not None:
        y = y * _expanded_param(weight, plan)
    if bias is not None:
        y = y + _expanded_param(bias, plan)
    y = y.reshape(x.shape)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y, torch.zeros_like(rstd) if mean is None else mean, rstd


def _normalize(x: Tensor, weight, bias, spec: Spec, eps: float, path: str):
    """``(y, mean, rstd)`` with statistics of ``spec.plan(x.shape).stats_shape``."""
    if path == "kernel":
        return _kernel_normalize(x, weight, bias, spec, eps)
    return _composite_normalize(x, weight, bias, spec, eps)


def normalize(x: Tensor, pattern: str, *, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              params: Optional[str] = None, eps: float = 1e-5, rms: bool = False, **sizes: int) -> Tensor:
    """:func:`normlab.normalize` on tensors, differentiable (the custom op on CPU
    float32/float64, the composite elsewhere).

    >>> x = torch.tensor([[4., 3., 2.], [3., 3., 2.], [2., 2., 2.]], dtype=torch.float64, requires_grad=True)
    >>> normalize(x, "[b] f")[:, 0].detach().round(decimals=4).tolist()
    [1.2247, 0.0, -1.2247]
    >>> torch.autograd.gradcheck(lambda t: normalize(t, "b [f]", eps=0.1), (x,))
    True
    """
    spec = Spec.build(pattern, params, rms, **sizes)
    return _normalize(x, weight, bias, spec, eps, _choose_path(x, has_native=False))[0]


def _apply_stats(x: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float, shape) -> Tensor:
    """``(x − mean)·rstd·weight + bias`` with given statistics (evaluation mode), as one
    scale and shift of ``shape`` that broadcasts against ``x``; keeps x's memory format."""
    compute = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    scale = torch.rsqrt(var.to(compute) + eps)
    if weight is not None:
        scale = scale * weight.to(compute)
    shift = -mean.to(compute) * scale
    if bias is not None:
        shift = shift + bias.to(compute)
    y = x.to(compute) * scale.reshape(shape) + shift.reshape(shape)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------
# Running statistics


def _average_factor(module) -> float:
    """torch's exponential_average_factor; counts the batch (call once per training step)."""
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    return factor


def _update_running(module, mean: Tensor, var: Tensor, count: int, factor: float) -> None:
    """``running = (1 − factor)·running + factor·batch``, with the unbiased variance."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        module.running_mean.mul_(1 - factor).add_(mean.to(module.running_mean.dtype), alpha=factor)
        module.running_var.mul_(1 - factor).add_(unbiased.to(module.running_var.dtype), alpha=factor)


def _variance(rstd: Tensor, eps: float) -> Tensor:
    """The biased variance back from ``rstd = 1/sqrt(var + eps)`` (float64 statistics keep
    it exact to rounding)."""
    return (rstd.pow(-2) - eps).clamp_min(0)


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _check_batch(x: Tensor, count: int) -> None:
    if count <= 1:
        raise InputError(f"expected more than 1 value per channel when training, got input size {tuple(x.shape)}; "
                         "use a larger batch or call .eval()")


def _batch_norm_forward(module, x: Tensor) -> Tensor:
    """BatchNorm{1,2,3}d's forward on the kernel or composite path (torch's semantics)."""
    path = _choose_path(x, has_native=True)
    if path == "native":
        return nn.modules.batchnorm._BatchNorm.forward(module, x)
    factor = _average_factor(module)
    use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    if not use_batch_stats:
        return _apply_stats(x, module.running_mean, module.running_var, module.weight, module.bias, module.eps,
                            _channel_shape(x))
    count = x.numel() // x.shape[1]
    if module.training:
        _check_batch(x, count)
    y, mean, rstd = _normalize(x, module.weight, module.bias, module._spec, module.eps, path)
    if module.training and module.track_running_stats and module.running_mean is not None:
        channels = x.shape[1]
        _update_running(module, mean.reshape(channels), _variance(rstd.reshape(channels), module.eps), count, factor)
    return y


# ---------------------------------------------------------------------------------------
# The modules


def _batch_norm_spec() -> Spec:
    return Spec.build("[b] c [...]", params="c")


class _BatchNormForward:
    """Mixin: the normlab forward for the three BatchNorm ranks (torch checks the rank)."""

    def _init_spec(self) -> None:
        self._spec = _batch_norm_spec()

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return _batch_norm_forward(self, input)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on normlab: pattern ``"[b] c [...]"``, per-channel weight.

    >>> m = BatchNorm1d(3)
    >>> y = m(torch.tensor([[4., 3., 2.], [3., 3., 2.], [2., 2., 2.]]))
    >>> [round(v, 4) for v in y[:, 0].tolist()], [round(v, 4) for v in m.running_mean.tolist()]
    ([1.2247, 0.0, -1.2247], [0.3, 0.2667, 0.2])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spec()


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on normlab; channels_last input stays channels_last.

    >>> x = torch.randn(4, 3, 5, 5)
    >>> torch.allclose(BatchNorm2d(3)(x), torch.nn.BatchNorm2d(3)(x), atol=1e-5)
    True
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spec()


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on normlab.

    >>> BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spec()


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` on normlab: pattern ``"... [n0 n1 ...]"`` over the trailing
    ``normalized_shape``, elementwise weight and bias.

    >>> [round(v, 4) for v in LayerNorm(3)(torch.tensor([[4., 3., 2.]]))[0].tolist()]
    [1.2247, 0.0, -1.2247]
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spec()

    def _init_spec(self) -> None:
        self._spec = _trailing_spec(self.normalized_shape, rms=False)

    def forward(self, input: Tensor) -> Tensor:
        path = _choose_path(input, has_native=True)
        if path == "native":
            return super().forward(input)
        return _normalize(input, self.weight, self.bias, self._spec, self.eps, path)[0]


def _trailing_spec(normalized_shape, rms: bool) -> Spec:
    names = [f"n{i}" for i in range(len(normalized_shape))]
    return Spec.build("... [" + " ".join(names) + "]", " ".join(names), rms,
                      **{name: int(size) for name, size in zip(names, normalized_shape)})


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` on normlab: ``y = x / sqrt(mean(x²) + eps) · weight`` over the
    trailing ``normalized_shape``; ``eps=None`` is the machine epsilon of x's dtype.

    >>> [round(v, 4) for v in RMSNorm(2, eps=0.0)(torch.tensor([[3., 4.]]))[0].tolist()]
    [0.8485, 1.1314]
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spec()

    def _init_spec(self) -> None:
        self._spec = _trailing_spec(self.normalized_shape, rms=True)

    def forward(self, x: Tensor) -> Tensor:
        path = _choose_path(x, has_native=True)
        if path == "native":
            return super().forward(x)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return _normalize(x, self.weight, None, self._spec, eps, path)[0]


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` on normlab: pattern ``"b (g [c]) [...]"`` with
    ``g=num_groups``, per-channel weight (``params="(g c)"``).

    >>> x = torch.arange(8.).reshape(1, 4, 2)
    >>> [round(v, 4) for v in GroupNorm(2, 4)(x)[0, :2].flatten().tolist()]
    [-1.3416, -0.4472, 0.4472, 1.3416]
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spec()

    def _init_spec(self) -> None:
        self._spec = Spec.build("b (g [c]) [...]", "(g c)", g=self.num_groups)

    def forward(self, input: Tensor) -> Tensor:
        path = _choose_path(input, has_native=True)
        if path == "native":
            return super().forward(input)
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ShapeError(f"GroupNorm({self.num_groups}, {self.num_channels}) expects input (N, "
                             f"{self.num_channels}, *), got {tuple(input.shape)}")
        return _normalize(input, self.weight, self.bias, self._spec, self.eps, path)[0]


class _InstanceNormForward:
    """Mixin: the normlab forward for the three InstanceNorm ranks: pattern ``"b c [...]"``;
    running statistics average the per-instance ones over the batch, as torch does."""

    def _init_spec(self) -> None:
        self._spec = Spec.build("b c [...]", "c")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        unbatched = input.dim() == self._get_no_batch_dim()
        x = input.unsqueeze(0) if unbatched else input
        path = _choose_path(x, has_native=True)
        if path == "native":
            y = nn.modules.instancenorm._InstanceNorm.forward(self, x)
            return y.squeeze(0) if unbatched else y
        batch, channels = x.shape[:2]
        if self.training or not self.track_running_stats:
            count = x.numel() // (batch * channels) if batch * channels else 0
            _check_batch(x, count)
            y, mean, rstd = _normalize(x, self.weight, self.bias, self._spec, self.eps, path)
            if self.running_mean is not None and self.training:
                factor = 0.0 if self.momentum is None else self.momentum
                with torch.no_grad():
                    unbiased = _variance(rstd.reshape(batch, channels), self.eps) * (count / (count - 1))
                    self.running_mean.mul_(1 - factor).add_(
                        mean.reshape(batch, channels).mean(0).to(self.running_mean.dtype), alpha=factor)
                    self.running_var.mul_(1 - factor).add_(unbiased.mean(0).to(self.running_var.dtype),
                                                           alpha=factor)
        else:
            y = _apply_stats(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                             _channel_shape(x))
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` on normlab (``affine`` and ``track_running_stats`` off by default).

    >>> [round(v, 4) for v in InstanceNorm1d(2)(torch.tensor([[[1., 4., 7.], [0., 2., 4.]]]))[0, 0].tolist()]
    [-1.2247, 0.0, 1.2247]
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spec()


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` on normlab.

    >>> InstanceNorm2d(3, affine=True)(torch.randn(2, 3, 4, 4)).shape
    torch.Size([2, 3, 4, 4])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spec()


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` on normlab.

    >>> InstanceNorm3d(1)(torch.randn(1, 1, 2, 2, 2)).shape
    torch.Size([1, 1, 2, 2, 2])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spec()


class Norm(nn.Module):
    """Any normalization, written as a pattern, with optional affine parameters and
    running statistics.

    ``params`` names the axes ``weight`` and ``bias`` span; their sizes must be given
    (``c=64``). With ``track_running_stats=True`` the running statistics span
    ``running_axes`` (default: the kept axes that ``params`` names), averaged over the
    other kept axes; in evaluation they normalize, as batch norm does. ``rms=True`` has a
    weight and no bias, as RMSNorm. Momentum follows
    torch (see the module docstring). A bad pattern fails here, not in the first forward.

    Channels-last batch norm and a group norm with per-group parameters:

    >>> x = torch.randn(4, 5, 5, 8)
    >>> bn = Norm("[b h w] c", params="c", c=8, track_running_stats=True)
    >>> y = bn(x); bn.running_mean.shape, float(y.detach().mean(dim=(0, 1, 2)).abs().max()) < 1e-5
    (torch.Size([8]), True)
    >>> Norm("b (g [c]) [h w]", params="g", g=2)(torch.randn(2, 4, 3, 3)).shape
    torch.Size([2, 4, 3, 3])
    >>> Norm("b [c", params="c")
    Traceback (most recent call last):
    ...
    normlab.errors.PatternSyntaxError: ...
    """

    def __init__(self, pattern: str, params: Optional[str] = None, *, eps: float = 1e-5, rms: bool = False,
                 affine: bool = True, bias: bool = True, momentum: Optional[float] = 0.1,
                 track_running_stats: bool = False, running_axes: Optional[str] = None,
                 device=None, dtype=None, **sizes: int):
        super().__init__()
        self._spec = Spec.build(pattern, params, rms, **sizes)
        parsed = parse_pattern(pattern)
        self.pattern, self.params, self.sizes = pattern, params, dict(sizes)
        self.eps, self.rms, self.momentum = eps, rms, momentum
        self.affine = affine and params is not None
        self.track_running_stats = track_running_stats
        factory = {"device": device, "dtype": dtype}
        param_shape = self._shape_of(parse_params(params) if params is not None else (), sizes, "params")
        if self.affine:
            self.weight = nn.Parameter(torch.empty(param_shape, **factory))
            self.bias = nn.Parameter(torch.empty(param_shape, **factory)) if bias and not rms else None
            if self.bias is None:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        kept = [a.name for d in parsed.dims if not d.is_ellipsis for a in d.factors if not a.reduced]
        if running_axes is None:
            named = {n for item in (parse_params(params) if params else ()) for n in item}
            running_names = [n for n in kept if n in named]
        else:
            running_names = running_axes.split()
            wrong = [n for n in running_names if n not in kept]
            if wrong:
                raise ParamsError(f"running_axes {running_axes!r} names {', '.join(wrong)}, which pattern "
                                  f"{pattern!r} does not keep; name kept (unbracketed) axes: {', '.join(kept)}")
        self._running_names = tuple(n for n in kept if n in running_names)  # in pattern order
        if track_running_stats:
            shape = self._shape_of(tuple((n,) for n in self._running_names), sizes, "running_axes")
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def _shape_of(self, items, sizes: dict, what: str) -> tuple[int, ...]:
        missing = [n for item in items for n in item if n not in sizes]
        if missing:
            raise ShapeError(f"pattern {self.pattern!r}: the {what} axes need their sizes at construction; "
                             f"pass {', '.join(f'{n}=...' for n in missing)}")
        return tuple(math.prod(sizes[n] for n in item) for item in items)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        sizes = "".join(f", {k}={v}" for k, v in self.sizes.items())
        return (f"{self.pattern!r}, params={self.params!r}{sizes}, eps={self.eps}, rms={self.rms}, "
                f"affine={self.affine}, momentum={self.momentum}, track_running_stats={self.track_running_stats}")

    def forward(self, x: Tensor) -> Tensor:
        path = _choose_path(x, has_native=False)
        factor = _average_factor(self) if self.track_running_stats else 0.0
        plan = self._spec.plan(x.shape)
        running_shape = tuple(s if n in self._running_names else 1 for n, s in zip(plan.axis_names, plan.axis_sizes))
        if self.training or not self.track_running_stats:
            if self.training and self.track_running_stats:
                _check_batch(x, plan.group_size)
            y, mean, rstd = _normalize(x, self.weight, self.bias, self._spec, self.eps, path)
            if self.training and self.track_running_stats:
                # average over the kept axes the running statistics do not span
                other = tuple(i for i, (n, r) in enumerate(zip(plan.axis_names, plan.reduced))
                              if not r and n not in self._running_names)
                var = _variance(rstd, self.eps)
                if other:
                    mean, var = mean.mean(dim=other, keepdim=True), var.mean(dim=other, keepdim=True)
                n = plan.group_size
                _update_running(self, mean.reshape(self.running_mean.shape), var.reshape(self.running_var.shape),
                                n, factor)
            return y
        # evaluation with running statistics: one scale and shift on the expanded view
        view = x.reshape(plan.axis_sizes)
        mean = self.running_mean.reshape(running_shape)
        var = self.running_var.reshape(running_shape)
        weight = _expanded_param(self.weight, plan)
        bias = _expanded_param(self.bias, plan)
        compute = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
        y = (view.to(compute) - mean.to(compute)) * torch.rsqrt(var.to(compute) + self.eps)
        if weight is not None:
            y = y * weight.to(compute)
        if bias is not None:
            y = y + bias.to(compute)
        return y.reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------------------
# SyncBatchNorm


def _merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al.'s parallel merge of per-rank (count, mean, M2) rows into the totals:
    ``mean = Σ nᵣ·meanᵣ / n`` and ``M2 = Σ M2ᵣ + nᵣ·(meanᵣ − mean)²``: exact for unequal counts.

    >>> c, m, v = _merge_moments(torch.tensor([[1.], [3.]]), torch.tensor([[0.], [4.]]), torch.tensor([[0.], [0.]]))
    >>> c.item(), m.item(), v.item()
    (4.0, 3.0, 12.0)
    """
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total.clamp_min(1)
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return total, mean, m2


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm whose statistics and gradient sums span every rank of ``group``."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, factor, group, world_size):
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // channels if channels else 0
        compute = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
        xc = x.to(compute)
        if count:
            var, mean = torch.var_mean(xc, dim=dims, correction=0)
        else:
            var = mean = xc.new_zeros(channels)
        local = torch.stack([torch.full_like(mean, count), mean, var * count]).to(torch.float64)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, local, group=group)
        stacked = torch.stack(gathered)  # (ranks, 3, channels)
        total, mean, m2 = _merge_moments(stacked[:, 0], stacked[:, 1], stacked[:, 2])
        total_count = int(total[0].item()) if channels else 0
        if module.training and total_count <= 1:
            _check_batch(x, total_count)
        var = m2 / total_count
        if module.training and module.track_running_stats and module.running_mean is not None:
            _update_running(module, mean, var, total_count, factor)
        rstd = torch.rsqrt(var + module.eps)
        shape = _channel_shape(x)
        mean_c, rstd_c = mean.to(compute).reshape(shape), rstd.to(compute).reshape(shape)
        x_hat = (xc - mean_c) * rstd_c
        y = x_hat
        if weight is not None:
            y = y * weight.to(compute).reshape(shape)
        if bias is not None:
            y = y + bias.to(compute).reshape(shape)
        ctx.save_for_backward(x, weight, mean_c, rstd_c)
        ctx.total_count, ctx.group, ctx.has_bias = total_count, group, bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, rstd = ctx.saved_tensors
        shape = _channel_shape(x)
        dims = [0] + list(range(2, x.dim()))
        g = grad_y.to(mean.dtype)
        x_hat = (x.to(mean.dtype) - mean) * rstd
        sum_dy = g.sum(dims)
        sum_dy_xhat = (g * x_hat).sum(dims)
        # the two per-channel sums, over every rank: one all-reduce
        packed = torch.cat([sum_dy, sum_dy_xhat])
        torch.distributed.all_reduce(packed, group=ctx.group)
        total_dy, total_dy_xhat = packed.chunk(2)
        n = ctx.total_count
        scale = rstd if weight is None else rstd * weight.to(mean.dtype).reshape(shape)
        grad_x = scale * (g - total_dy.reshape(shape) / n - x_hat * total_dy_xhat.reshape(shape) / n)
        # parameter gradients stay local: DistributedDataParallel averages them, as with torch's
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(weight.dtype if weight is not None else x.dtype) if ctx.has_bias else None
        return grad_x.to(x.dtype), grad_w, grad_b, None, None, None, None


class SyncBatchNorm(_BatchNormForward, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on any ``torch.distributed`` backend: gloo on CPU
    (torch's own is CUDA-only) and NCCL on GPU.

    In training with more than one rank (on CUDA: torch's own fused SyncBatchNorm unless
    :func:`use_path` forces ``"composite"``), each rank all-gathers the per-channel
    ``(count, mean, M2)`` and merges them count-weighted (exact for unequal batch sizes);
    the backward pass all-reduces the two per-channel sums Σdy and Σdy·x̂. Running
    statistics then equal BatchNorm's on the concatenated batch. Otherwise it is
    :class:`BatchNorm2d` (any rank ≥ 2). Use it as torch's::

        model = SyncBatchNorm.convert_sync_batchnorm(model)   # after dist.init_process_group

    >>> SyncBatchNorm(3)(torch.randn(4, 3, 2)).shape   # no process group: batch norm
    torch.Size([4, 3, 2])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_spec()

    def _world_size(self) -> int:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1
        group = self.process_group or torch.distributed.group.WORLD
        return torch.distributed.get_world_size(group)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        world_size = self._world_size() if self.training else 1
        if world_size == 1:
            path = _choose_path(input, has_native=True)
            if path == "native":  # torch's SyncBatchNorm is batch norm with one rank
                return nn.modules.batchnorm._BatchNorm.forward(self, input)
            return _batch_norm_forward(self, input)
        if _choose_path(input, has_native=input.is_cuda) == "native":
            # torch's fused CUDA kernels (also count-weighted); gloo on CPU has no native op
            return nn.SyncBatchNorm.forward(self, input)
        factor = _average_factor(self)
        group = self.process_group or torch.distributed.group.WORLD
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, self, factor, group, world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch norm layer (torch's or normlab's) with a normlab
        SyncBatchNorm sharing its parameters and buffers."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
            twin = _twin(module, cls)
            twin.process_group = process_group
            return twin
        for name, child in module.named_children():
            converted = cls.convert_sync_batchnorm(child, process_group)
            if converted is not child:
                module.add_module(name, converted)
        return module


# ---------------------------------------------------------------------------------------
# convert


_TWINS = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.LayerNorm: LayerNorm, nn.GroupNorm: GroupNorm, nn.RMSNorm: RMSNorm,
    nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}


def _twin(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance holding ``module``'s attributes, sharing its Parameter and buffer
    objects (so an optimizer built on the old model keeps working)."""
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        setattr(twin, name, type(getattr(module, name))(getattr(module, name)))
    if cls is SyncBatchNorm and not hasattr(twin, "process_group"):
        twin.process_group = None
    twin._init_spec()
    return twin


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``torch.nn`` normalization layer of ``model`` (in place) with its
    normlab twin, keeping parameters and buffers (same objects, so device and dtype too).
    Returns the model (the twin itself when ``model`` is one norm layer).

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> x = torch.randn(3, 4)
    >>> expected = model(x)
    >>> torch.allclose(convert(model)(x), expected, atol=1e-6), type(model[1]).__name__
    (True, 'LayerNorm')
    """
    cls = _TWINS.get(type(model))
    if cls is not None:
        return _twin(model, cls)
    for name, child in model.named_children():
        converted = convert(child)
        if converted is not child:
            model.add_module(name, converted)
    return model
