"""The custom ops ``torch.ops.normlab.normalize`` and its backward: the engine behind
``torch.library``, with fake kernels and an autograd formula."""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from normlab import core
from normlab.kernels import pool
from normlab.plan import make_plan
from normlab.torch.spec import (TorchOutputs, _dense_perm, _empty_like_dense, _engine_view, _inverse, _layout,
                                _sizes_dict, owned_tensor, param_view)


def _normalize_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pattern: str,
                  params: Optional[str], sizes: str, eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)``: y like x (same strides); mean and rstd float64 of the plan's
    stats_shape (mean is zeros for RMS)."""
    x, perm = _dense_perm(x, keep_gaps=True)  # a strided view goes to the engine as it is
    layout = _layout(pattern, perm, x.dim())
    y = _empty_like_dense(x, perm)
    _, stats = core.normalize_with_stats(
        _engine_view(x, perm), layout.pattern, params=params, eps=eps, rms=rms, out=_engine_view(y, perm),
        weight=param_view(weight), bias=param_view(bias), sizes=_sizes_dict(sizes))
    rstd = stats.rstd if perm is None else stats.rstd.transpose(layout.stats_order)
    if rms:
        mean = np.zeros(rstd.shape)
    else:
        mean = stats.mean if perm is None else stats.mean.transpose(layout.stats_order)
    return y, torch.from_numpy(np.ascontiguousarray(mean)), torch.from_numpy(np.ascontiguousarray(rstd))


_normalize_op = torch.library.custom_op("normlab::normalize", mutates_args=())(_normalize_impl)


@_normalize_op.register_fake
def _normalize_fake(x, weight, bias, pattern, params, sizes, eps, rms):
    stats_shape = make_plan(pattern, tuple(x.shape), params, sizes=_sizes_dict(sizes)).stats_shape
    return (torch.empty_like(x), x.new_empty(stats_shape, dtype=torch.float64),
            x.new_empty(stats_shape, dtype=torch.float64))


def _normalize_backward_impl(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                           pattern: str, params: Optional[str], sizes: str, eps: float, rms: bool,
                           need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)``; a gradient not asked for is an empty tensor."""
    x, perm = _dense_perm(x, keep_gaps=True)
    layout = _layout(pattern, perm, x.dim())
    if grad_y.stride() != x.stride() and (perm is not None or x.is_contiguous()):
        # give grad_y x's layout, so both share one permutation (a strided x has none to share)
        grad_y = torch.empty_like(x).copy_(grad_y)
    mean_np, rstd_np = mean.numpy(), rstd.numpy()
    if perm is not None:
        mean_np, rstd_np = mean_np.transpose(layout.expanded_order), rstd_np.transpose(layout.expanded_order)
    outputs = TorchOutputs()  # (grad_x in memory torch allocates, below the recycled pool's size)
    with pool.fresh_memory_from(outputs):
        grad_x, grad_w, grad_b = core.normalize_backward(
            _engine_view(grad_y, perm), _engine_view(x, perm), layout.pattern,
            weight=param_view(weight),
            params=params if (weight is not None or need_bias) else None, eps=eps, rms=rms,
            mean=None if rms else mean_np, rstd=rstd_np, sizes=_sizes_dict(sizes))
    grad_x = outputs.tensor(grad_x)
    if perm is not None:
        grad_x = grad_x.permute(_inverse(perm))
    empty = x.new_empty(0, dtype=x.dtype if weight is None else weight.dtype)  # as the fake kernel
    # (copies torch allocates: a torch.from_numpy tensor's storage never resizes, and the
    # engine may hand both parameter gradients back as views of one buffer)
    return (grad_x,
            empty if grad_w is None or weight is None else owned_tensor(grad_w),
            owned_tensor(grad_b) if need_bias and grad_b is not None else empty.clone())


def _normalize_backward_laid_out(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                                 pattern: str, params: Optional[str], sizes: str, eps: float, rms: bool,
                                 need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_normalize_backward_impl` with the gradients laid out as the fake kernel gives
    them, grad_x as ``torch.empty_like(x)`` and the parameters' contiguous: the engine hands
    them back in its own order where that is another (a "b [c] h w" reduced in channels-last
    order, a transposed x, params="w h"), and Inductor asserts the fake's strides on the op's
    outputs. (The eager Function keeps the engine's order: autograd takes any.)"""
    grad_x, grad_w, grad_b = _normalize_backward_impl(grad_y, x, weight, mean, rstd, pattern, params, sizes, eps,
                                                      rms, need_bias)
    # (empty_like keeps the strides of a dense x, as a contiguous or channels_last one is: no
    # tensor needs allocating to compare against where the engine already gave x's)
    if grad_x.stride() != x.stride() or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        laid_out = torch.empty_like(x)
        if grad_x.stride() != laid_out.stride():
            grad_x = laid_out.copy_(grad_x)
    return grad_x, grad_w.contiguous(), grad_b.contiguous()


_normalize_backward_op = torch.library.custom_op("normlab::normalize_backward",
                                                 mutates_args=())(_normalize_backward_laid_out)


@_normalize_backward_op.register_fake
def _normalize_backward_fake(grad_y, x, weight, mean, rstd, pattern, params, sizes, eps, rms, need_bias):
    param_shape = make_plan(pattern, tuple(x.shape), params, sizes=_sizes_dict(sizes)).param_shape
    param_dtype = x.dtype if weight is None else weight.dtype  # as normlab.normalize_backward returns
    return (torch.empty_like(x),
            x.new_empty(param_shape if weight is not None else (0,), dtype=param_dtype),
            x.new_empty(param_shape if need_bias else (0,), dtype=param_dtype))


def _normalize_setup_context(ctx, inputs, output):
    x, weight, bias, pattern, params, sizes, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, _bias_to_save(ctx, bias, _is_layer_norm(_spec_of(pattern, params, sizes, rms))),
                          mean, rstd)
    ctx.arguments = (pattern, params, sizes, eps, rms)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _normalize_autograd(ctx, grad_y, _grad_mean, _grad_rstd, backward=_normalize_backward_op):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    pattern, params, sizes, eps, rms = ctx.arguments
    if torch.compiler.is_dynamo_compiling():  # (first: Dynamo cannot trace _needs_torch_backward's batched check)
        # traced by Dynamo (compiled autograd traces an eager call's backward too): the registered
        # op, which it keeps as one opaque call, where the NumPy calls would break the graph
        backward = _normalize_backward_op
    elif _needs_torch_backward(grad_y) and not torch.compiler.is_compiling():
        return _differentiable_backward(ctx, grad_y, x, weight, _saved_bias(ctx, bias))
    grad_x, grad_w, grad_b = backward(grad_y, x, weight, mean, rstd, pattern, params, sizes, eps, rms,
                                      ctx.has_bias)
    return (grad_x, grad_w if weight is not None else None, grad_b if ctx.has_bias else None,
            None, None, None, None, None)


def _bias_to_save(ctx, bias: Optional[Tensor], layer_norm: bool) -> Optional[Tensor]:
    """The bias as a backward saves it, as torch's ops do: a layer norm's (``layer_norm``,
    :func:`_is_layer_norm`: LayerNorm, LayerNorm2d), which autograd then keeps
    from changing in place before backward; no other (torch's group, batch and instance
    norms keep none, and an optimizer step on the bias alone, as in bias-only fine-tuning,
    may come between forward and backward). No gradient depends on the bias's values:
    :func:`_saved_bias` stands in for one not saved."""
    if layer_norm:  # the bias itself is saved (if any): no stand-in to describe
        ctx.bias_like = None
        return bias
    ctx.bias_like = None if bias is None else (bias.shape, bias.dtype, bias.device)
    return None


def _saved_bias(ctx, saved: Optional[Tensor]) -> Optional[Tensor]:
    """The saved bias, or zeros of its shape standing in for one not saved (for the
    composite of a differentiable backward, whose gradients do not depend on it)."""
    if saved is not None or ctx.bias_like is None:
        return saved
    shape, dtype, device = ctx.bias_like
    return torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)


@functools.lru_cache(maxsize=256)
def _is_layer_norm(spec) -> bool:
    """Whether the parameters span exactly the normalized axes, as in a layer norm."""
    if any(dim.is_ellipsis and dim.reduced[0] for dim in spec.dims):
        return False
    reduced = {name for dim in spec.dims for name, is_reduced in zip(dim.names, dim.reduced) if is_reduced}
    return reduced == {name for item in spec.param_items for name in item}


@functools.lru_cache(maxsize=256)
def _spec_of(pattern: str, params: Optional[str], sizes: str, rms: bool):
    from normlab.torch.spec import Spec, _sizes_dict

    return Spec.build(pattern, params, rms, **_sizes_dict(sizes))


def _needs_torch_backward(grad_y: Tensor) -> bool:
    """True where a backward pass must run in torch operations, not the NumPy kernels:
    under ``create_graph=True`` (a gradient penalty, gradgradcheck, a hessian) the gradient
    must itself be differentiable; and a batched gradient has no memory NumPy can read:
    ``torch.autograd.grad(..., is_grads_batched=True)`` (the vectorized jacobian and hessian
    of ``torch.autograd.functional``) and ``torch.func.vmap`` over a backward pass."""
    return (torch.is_grad_enabled() or _functorch_active()
            or torch._C._functorch.is_legacy_batchedtensor(grad_y))


_functorch_active = torch._C._are_functorch_transforms_active


def _vmapping() -> bool:
    """True inside ``torch.func.vmap`` (at any depth), where tensors are batched: no Python
    ``if`` can read their values, and they answer ``is_contiguous`` for the default format only."""
    if not _functorch_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(interpreter.key() == TransformType.Vmap for interpreter in retrieve_all_functorch_interpreters())


def _vmapped(t: Tensor) -> bool:
    """True where ``torch.func.vmap`` batches ``t`` itself (at any depth): its values cannot
    be read into Python (``int``, ``.item()``), where an unbatched tensor's can, under vmap too."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _grads_of(forward, inputs, needs_input_grad, grad_outputs) -> list:
    """The gradients of ``forward(*inputs)`` (torch operations) by torch's autograd, for
    the inputs that need one (zeros where unused, None elsewhere): recomputed from the saved
    inputs, so that under ``create_graph=True`` the result carries a graph and a second
    derivative is exact."""
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs_input_grad[i]]
    grads = [None] * len(inputs)
    if wanted:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():  # (off in a first-order backward with batched gradients)
            # each wanted input through an alias of its own, and the gradients taken at the
            # aliases: the partial derivatives of this forward alone. Taken at the saved tensors
            # themselves they are total derivatives, since torch's engine goes on up an input's
            # history wherever it reaches another input (a weight shared with an earlier call
            # of the same module; a saved output of this very node, which the engine would
            # re-enter), and that gradient then reaches those inputs twice.
            aliases = list(inputs)
            for i in wanted:
                aliases[i] = inputs[i].view_as(inputs[i])
            outputs = forward(*aliases)
        found = torch.autograd.grad(outputs, [aliases[i] for i in wanted], grad_outputs, create_graph=create_graph,
                                    allow_unused=True)
        for i, grad in zip(wanted, found):
            grads[i] = torch.zeros_like(inputs[i]) if grad is None else grad
    return grads


def _differentiable_backward(ctx, grad_y, x, weight, bias):
    """The backward pass as torch's autograd of the composite forward (the engine's math in
    torch operations); see :func:`_needs_torch_backward` for where it runs."""
    from normlab.torch.compute import _composite_normalize  # compute imports this module

    pattern, params, sizes, eps, rms = ctx.arguments
    spec = _spec_of(pattern, params, sizes, rms)
    grads = _grads_of(lambda *inputs: _composite_normalize(*inputs, spec, eps)[0], (x, weight, bias),
                      ctx.needs_input_grad, grad_y)
    return (*grads, None, None, None, None, None)


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
    def backward(ctx, grad_y, grad_mean, grad_rstd, _recorded=False):
        # (compiled autograd's check first: a traced backward that read the profiler's flag would be compiled
        # again when a profiler starts)
        if not _recorded and not torch.compiler.is_dynamo_compiling() and torch.autograd.profiler._is_profiler_enabled:
            from normlab.torch.paths import profiled_backward  # (paths imports this module)

            return profiled_backward(ctx, _EagerNormalize.backward, grad_y, grad_mean, grad_rstd)
        return _normalize_autograd(ctx, grad_y, grad_mean, grad_rstd, backward=_normalize_backward_impl)


def _is_eager(*tensors) -> bool:
    return not torch.compiler.is_compiling() and all(t is None or type(t) in (Tensor, nn.Parameter) for t in tensors)
