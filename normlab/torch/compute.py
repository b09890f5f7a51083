"""Compute: one entry point for the kernel and composite paths, and running statistics."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd import forward_ad

from normlab import kernels
from normlab.kernels import fast
from normlab.errors import InputError
from normlab.plan import make_plan, merge_sizes
from normlab.torch import batch_train, row_autograd
from normlab.torch.ops import _EagerNormalize, _functorch_active, _is_eager, _normalize_op, _vmapping
from normlab.torch.paths import _LOW_PRECISION, _PathSwitch, _choose_path, _profiler, profiled
from normlab.torch.spec import (PlanFacts, Spec, _dense_perm, _empty_like_dense, _engine_view, _has_gaps,
                                affine_parameters, array_view, module_buffer, module_cache, param_view,
                                LOWEST_ADDRESS, sizes, torch_layout)


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
def _kernel_normalize(x, weight, bias, spec: Spec, eps: float, module=None):
    if not _is_eager(x, weight, bias):
        return _normalize_op(x, weight, bias, spec.pattern, spec.params, spec.sizes, float(eps), spec.rms)
    if _profiler._is_profiler_enabled:  # (an attribute read when no profiler runs)
        return profiled(module, _EagerNormalize.apply, x, weight, bias, spec.pattern, spec.params, spec.sizes,
                        float(eps), spec.rms)
    return _EagerNormalize.apply(x, weight, bias, spec.pattern, spec.params, spec.sizes, float(eps), spec.rms)


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
    # the input's dtype whatever the parameters' (float64 beside float32 input), as the kernels give
    y = y.reshape(x.shape).to(x.dtype)
    if (x.dim() == 4 and not x.is_contiguous() and not _vmapping()
            and x.is_contiguous(memory_format=torch.channels_last)):
        # (vmap answers is_contiguous for the default format only; it lays out its outputs itself)
        y = y.contiguous(memory_format=torch.channels_last)
    return y, torch.zeros_like(rstd) if mean is None else mean, rstd


def _engine_takes(eps: float) -> bool:
    """The engine takes eps in [0, ∞) (its NumPy API refuses the rest); torch computes
    ``rsqrt(var + eps)`` for any eps, negative, infinite or NaN."""
    return 0.0 <= eps < math.inf


def _engine_reads(x: Tensor, weight, bias) -> bool:
    """The kernels read the parameters through NumPy, which has no bfloat16 (a float32
    or float64 input with bfloat16 parameters, which torch.nn.RMSNorm takes); for
    low-precision input they are upcast first. Parameters on another device than the CPU
    input (a module moved to "meta") go to torch's operations, which raise torch's error."""
    return all(t is None or t.is_cpu for t in (weight, bias)) and (
        x.dtype in _LOW_PRECISION or all(t is None or t.dtype in _NUMPY_OF for t in (weight, bias)))


def _normalize(x: Tensor, weight, bias, spec: Spec, eps: float, path: str, module=None):
    """``(y, mean, rstd)`` with statistics of ``spec.plan(x.shape).stats_shape``; ``module``:
    the twin whose call torch's profiler lists (:func:`normlab.torch.paths.profiled`)."""
    if path == "kernel" and _engine_takes(eps) and _engine_reads(x, weight, bias):
        return _kernel_normalize(x, weight, bias, spec, eps, module)
    return _composite_normalize(x, weight, bias, spec, eps)


def normalize(x: Tensor, pattern: str, *, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              params: Optional[str] = None, eps: float = 1e-5, rms: bool = False,
              sizes: Optional[Mapping[str, int]] = None, **axis_sizes: int) -> Tensor:
    """:func:`normlab.normalize` on tensors, differentiable (the custom op on CPU
    float32/float64, the composite elsewhere). Axis sizes come as keywords or, for an
    axis named like one of this function's own arguments, in the mapping ``sizes``.

    >>> x = torch.tensor([[4., 3., 2.], [3., 3., 2.], [2., 2., 2.]], dtype=torch.float64, requires_grad=True)
    >>> normalize(x, "[b] f")[:, 0].detach().round(decimals=4).tolist()
    [1.2247, 0.0, -1.2247]
    >>> torch.autograd.gradcheck(lambda t: normalize(t, "b [f]", eps=0.1), (x,))
    True
    """
    spec = Spec.build(pattern, params, rms, **merge_sizes(pattern, sizes, axis_sizes, x.shape))
    return _normalize(x, weight, bias, spec, eps, _choose_path(x, has_native=False))[0]


def _apply_stats(x: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float, shape) -> Tensor:
    """``(x − mean)·rstd·weight + bias`` with given statistics (evaluation mode), the
    statistics of ``shape`` broadcasting against ``x``; keeps x's memory format. The mean
    is subtracted first: ``x − mean`` is exact where x is near the mean, while the folded
    ``x·scale − mean·scale`` (torch's op) cancels, by about 6e-8·|mean|/std in float32."""
    compute = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    scale = torch.rsqrt(var.to(compute) + eps)
    if weight is not None:
        scale = scale * weight.to(compute)
    centered = x.to(compute) - mean.to(compute).reshape(shape)
    if bias is None:
        return (centered * scale.reshape(shape)).to(x.dtype)
    return torch.addcmul(bias.to(compute).reshape(shape), centered, scale.reshape(shape)).to(x.dtype)


# torch's batch norm op in evaluation folds the running statistics into y = x·α + β with
# β = bias − mean·α, which in float32 cancels by about 6e-8·|mean|/std (measured on CPU:
# 4e-6 at 64, 2.4e-4 at 4096, 0.06 at 1e6): it runs only where every channel's
# |mean| is within this many standard deviations (error below 1e-5), as in any trained
# network; past it, the kernels' pass or the subtract-first composite keeps the contract
FOLDED_MEAN_LIMIT = 128.0


def _fake(*tensors) -> bool:
    """True for shape propagation (``FakeTensorMode``, its fake tensors): every operation
    gives a fake tensor there, whose value cannot be read."""
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return True
    for t in tensors:  # (a loop, not any() over a generator: a batch norm's evaluation call runs this)
        if isinstance(t, FakeTensor):
            return True
    return False


def _folding_keeps_precision(module, x: Tensor, mean: Tensor, var: Tensor) -> bool:
    """True where torch's folded evaluation op keeps the numerics contract for float32 on
    the CPU (:data:`FOLDED_MEAN_LIMIT`); other dtypes and devices keep torch's op. The
    answer is kept per module while the buffers hold the values it was found for, compared
    byte for byte through NumPy views of their memory: writes that move no version counter
    (through ``.data``, NumPy, torch's own batch norm op in training) change them too."""
    if (x.dtype != torch.float32 or not x.is_cpu or mean is None or var is None or torch.compiler.is_compiling()
            or _fake(x, mean, var)):
        # (compiled, the op is decomposed into (x - mean)·rstd·w + b, which does not cancel;
        # the check's data-dependent answer would break the graph. Fake tensors have no values)
        return True
    key = (mean.data_ptr(), var.data_ptr(), module.eps)
    cache = module.__dict__.get("_normlab_folding")  # (module_cache's lookup, without its call after the first)
    if cache is None:
        cache = module_cache(module, "_normlab_folding")
    held = cache.get("checked")
    if held is not None and held[0] == key and held[2].tobytes() == held[4] and held[3].tobytes() == held[5]:
        return held[1]
    mean64, var64 = mean.detach().double(), var.detach().double()
    keeps = bool((mean64.abs() <= FOLDED_MEAN_LIMIT * torch.sqrt(var64 + module.eps)).all())  # (NaN: False)
    if all(type(t) is Tensor and t.dtype in _EVAL_DTYPES and t.is_contiguous() for t in (mean, var)):
        views = (param_view(mean), param_view(var))  # (the buffers' memory, whatever later writes it)
        cache["checked"] = (key, keeps, *views, views[0].tobytes(), views[1].tobytes())
    return keeps


def _torch_batch_norm(module, x: Tensor) -> Tensor:
    """torch.nn's batch norm forward; its error for an input whose channels (axis 1) are not
    the module's ("running_mean should contain 4 elements not 8", which names neither shape)
    goes on to say which shape the module expects and how to give it that."""
    try:
        return nn.modules.batchnorm._BatchNorm.forward(module, x)
    except RuntimeError as error:
        if type(error) is not RuntimeError or x.is_nested or x.dim() < 2 or x.shape[1] == module.num_features:
            raise  # (a nested tensor's ragged size is no channel count to build a module with)
        raise RuntimeError(_channels_message(module, x, str(error))) from None


def _torch_instance_norm(module, x: Tensor) -> Tensor:
    """torch.nn's instance norm forward; its RuntimeError for a batched input whose channels
    are not the module's running statistics' ("running_mean should contain 8 elements not
    16": the channels times the batch) goes on as :func:`_torch_batch_norm`'s."""
    try:
        return nn.modules.instancenorm._InstanceNorm.forward(module, x)
    except RuntimeError as error:
        if (type(error) is not RuntimeError or x.is_nested or x.dim() != module._get_no_batch_dim() + 1
                or x.shape[1] == module.num_features):
            raise
        raise RuntimeError(_channels_message(module, x, str(error))) from None


def _channels_message(module, x: Tensor, torch_message: str) -> str:
    """torch's message for an input of the wrong channel count, with the shape ``module``
    expects (the input's, with its channels on axis 1) and the input's, and how to fix it."""
    channels, shape = module.num_features, sizes(x.shape)
    expected = (shape[0], channels, *shape[2:])
    advice = f"pass {channels} channels on axis 1"
    if shape[-1] == channels:  # (channels last, as a linear layer or a channels_last permute leaves them)
        advice += f" (channels last, as this input seems to be: x.movedim(-1, 1))"
    return (f"{torch_message}: {type(module).__name__}({channels}) normalizes {channels} channels on axis 1, and "
            f"expected input of shape {expected}, but got input of shape {shape}; {advice}, or build "
            f"{type(module).__name__}({shape[1]}) for {shape[1]} channels")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _eval_kernel(x: Tensor, module, _recorded: bool = False) -> Optional[Tensor]:
    """Batch norm in evaluation as the kernels' one fused pass (no autograd), or None
    where only the torch operations fit (other dtypes or strides, tensor subclasses)."""
    if x.dtype not in _EVAL_DTYPES or type(x) is not Tensor or x.dim() < 2 or torch.compiler.is_compiling():
        return None
    if _profiler._is_profiler_enabled and not _recorded:  # (as _fast_rows)
        return profiled(module, _eval_kernel, x, module, True)
    dense, perm = _dense_perm(x)
    channels = x.shape[1]
    if perm is None:
        shape = (x.shape[0], channels, -1)
    elif perm[-1] == 1 and perm[:-1] == (0,) + tuple(range(2, x.dim())):
        shape = (-1, channels, 1)  # channels_last: (N, *spatial, C)
    else:
        return None
    y = _empty_like_dense(dense, perm)
    kernels.scale_shift_view(_engine_view(dense, perm).reshape(shape), _engine_view(y, perm).reshape(shape),
                             _folded(module, x.dtype))
    return y


_EVAL_DTYPES = (torch.float32, torch.float64)
# torch.jit.is_tracing() without its two Python frames: it is this where no TorchScript runs (as in
# the eager calls that read it here, after torch.compiler.is_compiling(), so that Dynamo never does)
_is_tracing = torch._C._is_tracing
_STRIDED = torch.strided  # (a module global: torch.strided is an attribute lookup on the torch module)
# Batch norm in evaluation is one scale and shift per channel, with no statistics to keep
# exact. Below this output size torch's own op is faster (measured on a 2-core AMD EPYC:
# 0.36-0.69x at 16K-6.4M float32 elements); above it, torch's fresh output is mapped
# from the operating system on every call and its page zeroing costs more than the
# pass itself (5.6x for normlab at 12.8M elements, whose output memory is recycled).
EVAL_NATIVE_BELOW_BYTES = 32 << 20


def _fast_rows(module, x: Tensor, eps: float, with_bias: bool = True, _recorded: bool = False) -> Optional[Tensor]:
    """A row norm's forward (layer, RMS, group norm) straight into the kernels: the plans,
    view and parameter layout are cached on the module per input shape and dtypes. With
    no gradient needed the autograd machinery is skipped (and the parameter tables kept
    between calls); with one, the cached backward plan runs too
    (:mod:`normlab.torch.row_autograd`). None where the full path must run (other dtypes,
    devices or paths, compilation, transforms, permuted layouts such as channels_last,
    whose output keeps its layout there); a strided view such as a slice of a packed
    projection stays here, and the kernels read it where it lies. Its Python is most of a
    small input's time, hence the inlined checks (those of ``_needs_torch_ops``)."""
    if (type(x) is not Tensor or _PathSwitch.path != "auto" or not x.is_cpu or torch.compiler.is_compiling()
            or _is_tracing() or _functorch_active() or forward_ad._current_level >= 0
            or x.layout is not _STRIDED or x.is_nested or x.is_neg()):
        return None
    if _profiler._is_profiler_enabled and not _recorded:  # (an attribute read when no profiler runs)
        return profiled(module, _fast_rows, module, x, eps, with_bias, True)
    weight, bias = affine_parameters(module, with_bias)
    grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))
    calls = module.__dict__.get("_normlab_fast")  # (module_cache's lookup, without its call after the first)
    if calls is None:
        calls = module_cache(module, "_normlab_fast")
    key = (x.shape, x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype) if grad \
        else (x.shape, x.dtype)
    call = calls.get(key, False)
    if call is False:
        if len(calls) >= 64:
            calls.clear()
        call = calls[key] = _build_grad_rows(module._spec, x, weight, bias) if grad else _FastRows.build(module._spec, x)
    if call is None or not 0.0 <= eps < math.inf:
        return None
    if x.is_contiguous():
        return call(x, weight, bias, eps) if grad else call.contiguous(x, weight, bias, eps)
    return call(x, weight, bias, eps) if _has_gaps(x) else None


def _build_grad_rows(spec: Spec, x: Tensor, weight, bias):
    if x.dtype not in _EVAL_DTYPES or any(t is not None and (t.dtype != x.dtype or t.device.type != "cpu")
                                          for t in (weight, bias)):
        return None  # (parameters of another dtype: the full path, where torch raises its error)
    try:
        plan = make_plan(spec.pattern, tuple(x.shape), spec.params, sizes=spec.size_dict)
    except ValueError:
        return None  # the full path raises torch's error for this shape
    dtypes = tuple(None if t is None else np.dtype(_NUMPY_OF[t.dtype]) for t in (weight, bias))
    forward = fast.fast_forward(plan, np.dtype(_NUMPY_OF[x.dtype]), spec.rms, dtypes)
    return None if forward is None else row_autograd.build(spec, forward, dtypes)


class _FastRows:
    """One input shape's forward: the kernel's :class:`~normlab.kernels.fast.FastForward` and
    the parameter tables of the last call (:class:`normlab.torch.row_autograd.ParamTables`).
    The output is a tensor torch allocates (resizable, as torch.nn's)."""

    __slots__ = ("forward", "params", "at_address", "strides", "itemsize", "size")

    def __init__(self, forward):
        self.forward = forward
        self.params = row_autograd.ParamTables(forward, same_dtype=True)
        self.at_address = forward.address_runner()
        self.strides, self.itemsize, self.size = row_autograd.addressed_facts(forward)

    @classmethod
    def build(cls, spec: Spec, x: Tensor) -> Optional["_FastRows"]:
        if x.dtype not in _EVAL_DTYPES:
            return None
        try:
            plan = make_plan(spec.pattern, tuple(x.shape), spec.params, sizes=spec.size_dict)
        except ValueError:
            return None  # the full path raises torch's error for this shape
        forward = fast.fast_forward(plan, np.dtype(_NUMPY_OF[x.dtype]), spec.rms, (None, None))
        return None if forward is None else cls(forward)

    def __call__(self, x: Tensor, weight, bias, eps: float) -> Optional[Tensor]:
        tables = self.params.of(weight, bias)
        if tables is None:
            return None
        return row_autograd.forward_tensor(self.forward, x, tables, eps, False)

    def contiguous(self, x: Tensor, weight, bias, eps: float) -> Optional[Tensor]:
        """:meth:`__call__` for a contiguous ``x`` (of the dtype it was built for): the
        addressed kernel where it takes x (:func:`normlab.torch.row_autograd.addressed_facts`)."""
        tables = self.params.of(weight, bias)
        if tables is None:
            return None
        address = x.data_ptr()
        if (address % self.itemsize or x.stride() != self.strides or self.size >= _serial_below(True)
                or address < LOWEST_ADDRESS):  # (freed storage, or x of its first elements: array_view tells)
            return row_autograd.forward_tensor(self.forward, x, tables, eps, False)
        y = _empty_like(x)
        self.at_address(address, y.data_ptr(), *tables, eps)
        return y


_empty_like = torch.empty_like
_serial_below = kernels.threads.serial_below


_NUMPY_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _folded(module, dtype) -> tuple:
    """The module's running statistics and parameters folded into one scale and shift per
    channel. Folded again on every call: the pass it feeds runs on 32 MiB and more, next
    to which C divisions cost nothing, and a kept copy would miss a write through
    ``tensor.data`` (which moves no version counter)."""
    tensors = (module.running_mean, module.running_var, module.weight, module.bias)
    arrays = [None if t is None else param_view(t.double()) for t in tensors]
    return kernels.fold_scale_shift(*arrays, module.eps, np.float32 if dtype == torch.float32 else np.float64)


# ---------------------------------------------------------------------------------------
# Running statistics


def _average_factor(module) -> float:
    """torch's exponential_average_factor; counts the batch (call once per training step)."""
    factor = 0.0 if module.momentum is None else module.momentum
    tracked = module._buffers.get("num_batches_tracked")
    if module.training and module.track_running_stats and tracked is not None:
        if (type(tracked) is Tensor and tracked.device.type == "cpu" and not tracked.requires_grad
                and not _functorch_active()  # (add_ raises torch's error there: a captured buffer changed)
                and not torch.jit.is_tracing()  # (torch.jit.trace records add_, not NumPy's increment)
                and (torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
                     or not tracked.is_inference())):  # (built in inference_mode: add_ raises torch's error)
            counter = tracked.numpy()
            counter += 1  # in place, through NumPy: a third of add_'s cost
            torch.autograd.graph.increment_version(tracked)
        else:
            tracked.add_(1)
        factor = 1.0 / float(tracked) if module.momentum is None else module.momentum
    return factor


def _statistics_update(*running: Optional[Tensor]):
    """The context of a running-statistics update: ``torch.no_grad()``, and none under
    ``torch.export``, which records the grad-mode switch as a ``wrap_with_set_grad_enabled``
    region whose saved program ``torch.export.load`` refuses ("SpecViolationError: Node.meta
    wrap_with_set_grad_enabled is missing val field"); the updates detach the batch
    statistics, so that no buffer takes a gradient there either.

    In eager mode the ``running`` buffers keep their version counters, as torch's batch norm
    op keeps them: its training call saves them for backward, so a bump by a later call of
    the same module (``mask=``, or the kernels after a bfloat16 or autocast call) would make
    that backward raise where torch.nn's runs."""
    if torch.compiler.is_exporting():
        return contextlib.nullcontext()
    if torch.compiler.is_compiling():
        return torch.no_grad()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    for buffer in running:
        if buffer is not None and not buffer.is_inference():  # (inference tensors have no version counter)
            stack.enter_context(torch.autograd._unsafe_preserve_version_counter(buffer))
    return stack


def _update_running(module, mean: Tensor, var: Tensor, count: int, factor: float, centered: bool = True) -> None:
    """``running = (1 − factor)·running + factor·batch``, with the unbiased variance; an
    empty batch (count 0) leaves them as they are, as torch does. ``centered=False`` (RMS:
    ``var`` is the mean square about 0, no mean was estimated) takes it as it is."""
    if count == 0:
        return
    if forward_ad._current_level >= 0:  # dual statistics: the buffers take their primal values, as torch.nn's do
        mean, var = forward_ad.unpack_dual(mean).primal, forward_ad.unpack_dual(var).primal
    mean, var = mean.detach(), var.detach()
    with _statistics_update(module.running_mean, module.running_var):
        unbiased = var * (count / (count - 1)) if centered else var
        module.running_mean.mul_(1 - factor).add_(mean.to(module.running_mean.dtype), alpha=factor)
        module.running_var.mul_(1 - factor).add_(unbiased.to(module.running_var.dtype), alpha=factor)


def _update_instance_running(module, mean: Tensor, var: Tensor, count: int, factor: float) -> None:
    """InstanceNorm's update, as torch does it: batch norm's on each instance's copy of the
    running statistics (none where the instances are empty, count 0), then their average
    over the batch (NaN for a batch of zero instances, as in torch). ``mean`` and ``var``
    are (batch, channels)."""
    mean, var = mean.detach(), var.detach()
    with _statistics_update():
        unbiased = var * (count / (count - 1)) if count else var
        for running, batch in ((module.running_mean, mean), (module.running_var, unbiased)):
            copies = running.expand(batch.shape)
            if count:
                copies = copies * (1 - factor) + batch.to(running.dtype) * factor
            running.copy_(copies.mean(0))


def _variance(rstd: Tensor, eps: float) -> Tensor:
    """The biased variance back from ``rstd = 1/sqrt(var + eps)`` (float64 statistics keep
    it exact to rounding)."""
    return (rstd.pow(-2) - eps).clamp_min(0)


def _batch_variance(x: Tensor, spec: Spec, rstd: Tensor, eps: float) -> Tensor:
    """The biased variance (mean square for RMS) of each group, for running statistics:
    from rstd where eps is one the engine takes; otherwise computed again, since
    ``rsqrt(var + eps)`` loses it where ``var + eps <= 0``."""
    if _engine_takes(eps):
        return _variance(rstd, eps)
    view = x.detach().reshape(spec.plan(x.shape).axis_sizes)
    axes = spec.plan(x.shape).reduced_axes
    if spec.rms:
        return view.square().mean(dim=axes, keepdim=True)
    return torch.var(view, dim=axes, keepdim=True, correction=0)


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _check_batch(x: Tensor, count: int) -> None:
    """torch's rule: one value per channel cannot train (zero values can: an empty output)."""
    if count == 1:
        raise InputError(f"expected more than 1 value per channel when training, got input size {tuple(x.shape)}; "
                         "use a larger batch or call .eval()")


def _values_per_channel(x: Tensor) -> int:
    """What torch checks in training: batch size times the positions per channel."""
    return x.shape[0] * math.prod(x.shape[2:])


def _small_eval(module, x: Tensor) -> Optional[Tensor]:
    """Evaluation below the crossover, where torch's own op is faster: straight to
    ``F.batch_norm`` with the module's buffers and parameters read where nn.Module keeps
    them (its ``__getattr__`` is slow), or None for the full path."""
    buffers = module._buffers
    mean, var = buffers.get("running_mean"), buffers.get("running_var")
    if (mean is None or var is None or x.dim() < 2 or x.shape[1] != module.num_features
            or not 0.0 < module.eps < math.inf or x.numel() * x.element_size() >= EVAL_NATIVE_BELOW_BYTES
            or not _folding_keeps_precision(module, x, mean, var)):
        return None
    return torch.nn.functional.batch_norm(x, mean, var, *affine_parameters(module), False, 0.0,
                                          module.eps)


def _params_misfit(module, shape: tuple, weight=None, bias=None) -> bool:
    """A weight or bias that is not of ``shape``, the one the kernels read (one set after
    construction): the twin then takes torch.nn's forward, which raises its own error (or
    computes, as a batch norm does with any shape of C elements). ``weight`` and ``bias``
    are the module's, read by :func:`affine_parameters` here unless given."""
    if weight is None and bias is None:
        weight, bias = affine_parameters(module)
    return (weight is not None and weight.shape != shape) or (bias is not None and bias.shape != shape)


def _dtypes_refused(x: Tensor, *params) -> bool:
    """True where torch's CPU norm kernels refuse these dtypes ("mixed dtype (CPU)"): they
    take parameters (and running statistics) of the input's dtype, or float32 ones beside
    a bfloat16 or float16 input. The twin then takes torch.nn's forward, which raises its
    own error, where the kernels would compute."""
    dtype = x.dtype
    for param in params:  # (a loop, not all() over a generator: this runs on every call)
        if param is not None and param.dtype != dtype:
            break
    else:
        return False
    if not x.is_cpu:
        return False
    return dtype not in _LOW_PRECISION or any(p is not None and p.dtype != torch.float32 for p in params)


def _batch_norm_forward(module, x: Tensor) -> Tensor:
    """BatchNorm{1,2,3}d's forward on the kernel or composite path (torch's semantics);
    torch's own forward where only torch's ops run, or where the input does not fit, so
    that torch raises its own error in its own words."""
    if not x.is_contiguous():  # (torch.nn's output layout: channels_last kept, other permutations copied)
        x = torch_layout(x, keeps_channels_last=True)
    if module.training:
        y = batch_train.repeat_step(module, x)
        if y is not None:
            return y
    elif (_PathSwitch.path == "auto" and type(x) is Tensor and not torch.compiler.is_compiling()
          and not _is_tracing() and not _functorch_active()):
        # (under torch.jit.trace sizes are traced tensors: its checks would warn; compiled or exported, the
        # size check would be a guard on the batch; under functorch's transforms the buffers may be batched,
        # with no memory to check; torch's forward runs there anyway)
        y = _small_eval(module, x)
        if y is not None:
            return y
    path = _choose_path(x, has_native=True)
    # read once where nn.Module keeps them (its __getattr__ costs half a microsecond a name)
    weight, bias = affine_parameters(module)
    running_mean, running_var = module_buffer(module, "running_mean"), module_buffer(module, "running_var")
    if (path == "native" or x.dim() < 2 or x.shape[1] != module.num_features
            or _params_misfit(module, (module.num_features,), weight, bias)
            or _dtypes_refused(x, weight, bias, running_mean, running_var)
            or (type(x) is not Tensor and module.training and not torch.compiler.is_compiling() and _fake(x))
            or _needs_grad(running_mean, running_var)):
        # (shape propagation in training, make_fx's: torch's op, whose fake kernel leaves the module's
        # real running statistics alone and counts the batch as torch.nn does; compiled, the op stays.
        # Running statistics that require grad, as functional_call may hand them in: torch's op
        # refuses them, "not differentiable with respect to argument 'running_mean'")
        return _torch_batch_norm(module, x)
    if not torch.compiler.is_compiling() and x.is_inference() and _needs_grad(x, weight, bias):
        # an inference tensor where autograd must save it: torch raises its error before
        # touching the running statistics (the kernels would update them first)
        return _torch_batch_norm(module, x)
    if not 0.0 < module.eps < math.inf or (running_mean is None) != (running_var is None):
        # torch's own op: it refuses eps <= 0 in training, takes eps = 0 in evaluation and
        # computes with an infinite or NaN eps, and these never need speed; it refuses half
        # a pair of running statistics
        return _torch_batch_norm(module, x)
    use_batch_stats = module.training or (running_mean is None and running_var is None)
    count = _values_per_channel(x) if use_batch_stats else 0
    if count == 1:  # (torch's rule wherever batch statistics are used: eval() without running ones too)
        # torch's forward counts the batch and raises its ValueError, in its words
        return _torch_batch_norm(module, x)
    factor = _average_factor(module)
    if not use_batch_stats:
        if (_PathSwitch.path == "auto" and (x.numel() * x.element_size() < EVAL_NATIVE_BELOW_BYTES
                                            or _needs_grad(x, weight, bias))
                and _folding_keeps_precision(module, x, running_mean, running_var)):
            return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0,
                                                  module.eps)
        if path == "kernel" and not _needs_grad(x, weight, bias):
            y = _eval_kernel(x, module)
            if y is not None:
                return y
        return _apply_stats(x, running_mean, running_var, weight, bias, module.eps, _channel_shape(x))
    if module.training:
        if path == "kernel":
            y = batch_train.forward(module, x, factor)
            if y is not None:
                return y
    y, mean, rstd = _normalize(x, weight, bias, module._spec, module.eps, path, module)
    if module.training and module.track_running_stats and running_mean is not None:
        channels = x.shape[1]
        _update_running(module, mean.reshape(channels), _variance(rstd.reshape(channels), module.eps), count, factor)
    return y
