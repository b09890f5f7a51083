"""Fused norm blocks as torch modules: residual add, gated and modulated norms.

Each block is one :func:`fused_normalize` call: on CPU float32/float64 tensors an
``autograd.Function`` runs the fused kernels of :mod:`normlab.kernels.fused` forward and
backward (one pass over memory each way), and so it does on large CPU bfloat16 RMS blocks
with the ``"llama"`` and ``"gemma"`` recipes, through the kernels' bfloat16 builds
(:mod:`normlab.kernels.fused_half`, which round where the recipe rounds); elsewhere
(float16, other devices, small bfloat16 inputs, bfloat16 layer norms) the same block is
written in torch operations with the module's **casting recipe**, from the pieces of
:mod:`normlab.torch.casting` (the one implementation of the recipes):

* ``"llama"``: statistics and ``x̂`` in float32, ``x̂`` cast to the input dtype, then the
  weight and everything after it in that dtype (LlamaRMSNorm; also torch's own norms
  followed by a modulation, as diffusers' AdaLN-Zero);
* ``"gemma"``: everything in float32, cast once at the end (GemmaRMSNorm, mamba_ssm's
  gated norm); Gemma's ``1 + weight`` is ``weight_offset=1.0``, a separate option;
* ``"none"``: everything in the input dtype;
* ``"qwen3_next"``: as ``"llama"`` up to the weight, everything after it (the gate above
  all) in float32, cast once at the end (Qwen3-Next's gated norm).

(``"t5"``, ``"input_dtype"``, ``"imagegpt"``, ``"mochi"`` and ``"gemma3n"`` are RMSNorm recipes only.)
On the float32/float64 kernel path the recipes coincide: the math runs in float64 and rounds once.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from normlab import fused
from normlab.kernels import pool
from normlab.plan import make_plan
from normlab.torch import casting as recipes
from normlab.torch.compute import _dtypes_refused
from normlab.torch.ops import _grads_of, _needs_torch_backward
from normlab.torch.paths import PLAIN_PARAMETERS as _EAGER_TYPES
from normlab.torch.paths import (_exporting_to_onnx, _holds_expanded_weights, _needs_torch_ops, _small_forward_fits,
                                 expanded_weights_refusal, _profiler, profiled, profiled_backward, profiled_torch_ops,
                                 warn_if_fx_quantizing)
from normlab.torch.spec import (TorchOutputs, Unscriptable, array_view, owned_tensor, param_view,
                                parametrizations_computed, refuse_non_tensor, rms_default_eps)
from normlab.torch.thread_warnings import ignored_in_this_thread

__all__ = ["CASTINGS", "fused_normalize", "FusedAddRMSNorm", "FusedAddLayerNorm", "GatedRMSNorm", "AdaLayerNorm"]

_RMS_NORM_ONLY = ("t5", "input_dtype", "imagegpt", "mochi", "gemma3n")
CASTINGS = (*(c for c in recipes.CASTINGS if c not in _RMS_NORM_ONLY), "qwen3_next")  # what a block takes
_CAST_AT_THE_END = ("gemma", "qwen3_next")  # the recipes whose steps after the weight run in float32
_KERNEL_DTYPES = (torch.float32, torch.float64)
_Proxy = torch.fx.Proxy


@dataclass(frozen=True)
class Block:
    """The fixed part of a fused call: the pattern and every option but the tensors."""

    pattern: str
    params: Optional[str] = None
    modulation: Optional[str] = None
    sizes: tuple = ()
    eps: Optional[float] = 1e-5  # (None in a module's block: torch.nn.RMSNorm's, resolved per dtype by _block_of)
    rms: bool = False
    gate_activation: str = "silu"
    norm_before_gate: bool = True
    weight_offset: float = 0.0
    casting: str = "gemma"
    # a layer norm on half input under the llama recipe: torch's kernel on the input cast to
    # float32, cast back (diffusers' FP32LayerNorm), rather than on the half input (nn.LayerNorm)
    norm_in_float32: bool = False
    # the input and the modulation broadcast against each other (AdaLayerNorm's emb of batch 1
    # against x's batch, or x's batch 1 against emb's): the composite takes the plan-free view
    # (_traced_view), whose arithmetic broadcasts as the code the block replaces does
    broadcasts: bool = False

    def __post_init__(self):
        if self.casting not in CASTINGS:
            raise ValueError(f"casting must be one of {', '.join(CASTINGS)}, got {self.casting!r}")
        if self.gate_activation not in fused.GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation must be one of {', '.join(fused.GATE_ACTIVATIONS)}, "
                             f"got {self.gate_activation!r}")

    @property
    def _profile_name(self) -> str:
        """What torch's profiler lists the block's kernels as (paths.profiled): its norm's op as
        torch.nn's, under normlab's name (normlab::rms_norm beside aten::rms_norm)."""
        return "normlab::rms_norm" if self.rms else "normlab::layer_norm"

    def keywords(self) -> dict:
        return dict(params=self.params, modulation=self.modulation, eps=self.eps, rms=self.rms,
                    gate_activation=self.gate_activation, norm_before_gate=self.norm_before_gate,
                    weight_offset=self.weight_offset, sizes=dict(self.sizes))


def _numpy(t: Optional[Tensor]):
    """A tensor's memory as an array, its storage left resizable
    (:func:`~normlab.torch.spec.array_view`): bfloat16 as its 16-bit patterns (``uint16``),
    which is how the half kernels read it."""
    if t is not None and t.dtype == torch.bfloat16:
        return array_view(t.detach().view(torch.int16)).view(np.uint16)
    return array_view(t)


_param_numpy = _numpy  # (the parameters' call sites)


def _from_rows(a: np.ndarray, shape, dtype: torch.dtype) -> Tensor:
    """A kernel's output rows as a tensor of ``shape`` (``uint16`` rows as bfloat16)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(a.reshape(shape).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a.reshape(shape))


_empty = torch.empty


def _tensor(a) -> Optional[Tensor]:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


class _FusedFunction(torch.autograd.Function):
    """Forward and backward through :mod:`normlab.fused` (the fused kernels)."""

    @staticmethod
    def forward(ctx, x, residual, gate, weight, bias, scale, shift, block: Block):
        outputs = TorchOutputs()  # (y and x + r in memory torch allocates, below the size the pool recycles)
        with pool.fresh_memory_from(outputs):
            result = fused.normalize(_numpy(x), block.pattern, weight=_param_numpy(weight), bias=_param_numpy(bias),
                                     residual=_numpy(residual), gate=_numpy(gate), scale=_numpy(scale),
                                     shift=_numpy(shift), return_stats=True, **block.keywords())
        if residual is not None:
            y, total, mean, rstd = result
            total = outputs.tensor(np.ascontiguousarray(total))
        else:
            (y, mean, rstd), total = result, x
        ctx.block = block
        ctx.has = tuple(t is not None for t in (residual, gate, weight, bias, scale, shift))
        ctx.set_materialize_grads(False)  # (see _sum_only_backward)
        # the sum, not x and residual: what the code the block replaces saves (its norm's
        # input), so that in-place changes of x or residual afterwards stay legal, and one
        # tensor of the input's size is held instead of two
        ctx.save_for_backward(total, gate, weight, bias, scale, shift, _tensor(rstd),
                              _tensor(mean) if mean is not None else None)
        y = outputs.tensor(np.ascontiguousarray(y))
        if residual is not None:
            _sum_needs_no_gradient(ctx, total)
            return y, total
        return y

    @staticmethod
    def backward(ctx, grad_y, grad_total=None, _recorded=False):
        if grad_y is None:
            return _sum_only_backward(ctx, grad_total)
        total, gate, weight, bias, scale, shift, rstd, mean = ctx.saved_tensors
        block = ctx.block
        if grad_total is None and ctx.has[0]:
            grad_total = torch.zeros_like(grad_y)
        if torch.compiler.is_dynamo_compiling():  # (first: Dynamo cannot trace the batched check)
            return _traced_backward(block, (total, gate, weight, bias, scale, shift), ctx, grad_y, grad_total)
        if _profiler._is_profiler_enabled and not _recorded:  # (an attribute read when no profiler runs)
            return profiled_backward(ctx, _FusedFunction.backward, grad_y, grad_total)
        if _backward_in_torch(grad_y, grad_total):
            return _composite_backward(block, (total, gate, weight, bias, scale, shift), ctx, grad_y, grad_total)
        has_residual, _, _, has_bias, _, _ = ctx.has
        outputs = TorchOutputs()  # (as the forward's)
        with pool.fresh_memory_from(outputs):
            grads = fused.normalize_backward(
                _numpy(grad_y), _numpy(total), block.pattern, weight=_param_numpy(weight), bias=_param_numpy(bias),
                gate=_numpy(gate), scale=_numpy(scale), shift=_numpy(shift),
                grad_sum=_numpy(grad_total) if has_residual else None, mean=_numpy(mean), rstd=_numpy(rstd),
                **dict(block.keywords(), params=block.params if (weight is not None or has_bias) else None))
        grad_x = outputs.tensor(np.ascontiguousarray(grads.x))
        grad_gate = None if grads.gate is None else outputs.tensor(np.ascontiguousarray(grads.gate))
        return (grad_x, None if grad_total is None else grad_x, grad_gate, owned_tensor(grads.weight),
                owned_tensor(grads.bias) if has_bias else None, owned_tensor(grads.scale), owned_tensor(grads.shift),
                None)


def _sum_needs_no_gradient(ctx, total: Tensor) -> None:
    """Marks the returned ``x + residual`` as needing no gradient where neither x nor the
    residual needs one, as torch's ``x + residual`` is then (an autograd.Function's outputs
    otherwise all require one when any input does, the weight alone included)."""
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        ctx.mark_non_differentiable(total)


def _sum_only_backward(ctx, grad_total) -> tuple:
    """The backward where only ``x + residual`` was used: ``y``'s gradient is None, as the
    Functions keep autograd from making zeros of it, so that the sum's gradient goes to x and
    the residual and none to the gate or the parameters, as torch's ``x + residual`` gives
    (``autograd.grad(total, weight, allow_unused=True)`` is None; a ``.grad`` stays unset)."""
    needs = ctx.needs_input_grad
    return (grad_total if needs[0] else None, grad_total if needs[1] else None, *(None,) * 6)


def _backward_in_torch(grad_y, grad_total) -> bool:
    """Whether the backward must run as the composite's autograd (see
    :func:`~normlab.torch.ops._needs_torch_backward`), asked of both gradients: where only
    ``x + residual`` is used, ``grad_y`` is autograd's unbatched zeros beside a batched
    ``grad_total`` (``is_grads_batched=True``)."""
    return _needs_torch_backward(grad_y) or (grad_total is not None and _needs_torch_backward(grad_total))


def _composite_backward(block: Block, inputs: tuple, ctx, grad_y, grad_total) -> tuple:
    """The gradients by torch's autograd of :func:`_composite`, where the kernels cannot
    take the backward pass (create_graph=True, batched gradients). ``inputs``: the saved
    ``(total, gate, weight, bias, scale, shift)``, ``total`` being ``x + residual`` (or ``x``);
    x and residual both get the gradient of the sum (``grad_total`` is None without a residual)."""
    needs = ctx.needs_input_grad
    # (with a residual the saved sum is this node's own output: _grads_of differentiates at
    # an alias of it, so that torch's engine does not go back through this node)
    grads = _grads_of(lambda total, *others: _composite(total, None, *others, block), inputs,
                      (needs[0] or needs[1], *needs[2:7]), grad_y)
    grad_sum = grads[0]
    if grad_sum is not None and grad_total is not None:
        grad_sum = grad_sum + grad_total
    return (grad_sum if needs[0] else None, grad_sum if needs[1] else None, *grads[1:], None)


def _traced_backward(block: Block, inputs: tuple, ctx, grad_y, grad_total) -> tuple:
    """:func:`_composite_backward` for a backward that Dynamo traces (compiled autograd over
    an eager call): the kernels' NumPy calls would break its graph, which ``fullgraph=True``
    (torch's own ``maybe_enable_compiled_autograd``) refuses, and Dynamo traces
    ``torch.func.vjp`` where it refuses ``torch.autograd.grad``."""
    needs = ctx.needs_input_grad
    wanted = [i for i, (t, need) in enumerate(zip(inputs, (needs[0] or needs[1], *needs[2:7])))
              if t is not None and need]
    grads = [None] * len(inputs)
    if wanted:
        def forward(*differentiated):
            full = list(inputs)
            for i, t in zip(wanted, differentiated):
                full[i] = t
            return _composite(full[0], None, *full[1:], block)

        _, vjp = torch.func.vjp(forward, *(inputs[i] for i in wanted))
        for i, grad in zip(wanted, vjp(grad_y)):
            grads[i] = grad
    grad_sum = grads[0]
    if grad_sum is not None and grad_total is not None:
        grad_sum = grad_sum + grad_total
    return (grad_sum if needs[0] else None, grad_sum if needs[1] else None, *grads[1:], None)


def _numpy_readable(tensors) -> bool:
    """Every tensor present is a plain CPU tensor (or Parameter) whose memory NumPy reads as
    it is. A tensor subclass (a user's __torch_function__ class, DTensor) takes the
    composite, whose torch operations hand it each step, as the code the block replaces
    would. (Call it after the compile check: Dynamo cannot trace is_neg.)"""
    return all(type(t) in _EAGER_TYPES and t.device.type == "cpu" and t.layout is torch.strided and not t.is_neg()
               for t in tensors if t is not None)


def _use_kernels(*tensors) -> bool:
    present = [t for t in tensors if t is not None]
    return (not torch.compiler.is_compiling() and _numpy_readable(present)
            and all(t.dtype in _KERNEL_DTYPES for t in present)
            and len({t.dtype for t in present[:3]}) == 1
            and not _needs_torch_ops(tensors[0]))  # (functorch transforms, forward-mode AD: torch operations)


# bfloat16 RMS blocks run the half kernels from these sizes (elements), measured with
# benchmarks/fused_half_crossover.py on a 2-core AMD EPYC: below them the recipe's torch
# operations were as fast or faster (torch's bfloat16 kernels keep up while their
# temporaries stay in cache; a forward alone at 2^19-2^20 ran at 0.4-0.6x of them), above
# them the kernels were faster, forward+backward 1.0-2.4x from 2^19 and both 4-9x from
# 2^23, where torch's temporaries outgrow glibc's reuse of freed memory
HALF_KERNELS_FROM = 1 << 19  # when autograd records the call
HALF_FORWARD_KERNELS_FROM = 1 << 21  # a forward alone (no_grad, inference_mode, no input needing a gradient)
# layer norms stay on torch's operations in bfloat16: torch's layer norm kernel reads
# bfloat16 directly, and a half kernel was slower than it (AdaLN-Zero forward 8 against 5.6 ms)


def _half_recipe(block: Block, tensors) -> int:
    """The rounding recipe of the half kernels (:mod:`normlab.kernels.fused_half`) for a
    bfloat16 RMS block on CPU, or 0 where the composite runs: small inputs, layer norms,
    the ``"none"`` and ``"qwen3_next"`` recipes, parameters whose promotion changes the
    output's dtype, and whatever :func:`_use_kernels` sends to torch's operations."""
    x, residual, gate, weight, bias, scale, shift = tensors
    if torch.compiler.is_compiling():  # (first: Dynamo cannot trace is_inference_mode_enabled, nor is_neg)
        return 0
    if x.dtype != torch.bfloat16 or not block.rms or block.casting not in ("llama", "gemma"):
        return 0
    records = _records_autograd(tensors)
    if x.numel() < (HALF_KERNELS_FROM if records else HALF_FORWARD_KERNELS_FROM):
        return 0
    if any(t is not None and t.dtype != torch.bfloat16 for t in (residual, gate)):
        return 0
    # llama weighs in the input's dtype (a float32 parameter would promote the output to
    # float32); gemma computes in float32 and casts once
    allowed = (torch.bfloat16,) if block.casting == "llama" else (torch.bfloat16, torch.float32)
    if any(t is not None and t.dtype not in allowed for t in (weight, bias, scale, shift)):
        return 0
    if not _numpy_readable(tensors) or _needs_torch_ops(x):
        return 0
    if records and any(t is not None and t.is_inference() for t in tensors):
        # an input made in inference_mode cannot be saved for backward; the recipe casts it
        # to float32 first, a normal tensor, so the replaced classes train on it, as the composite does
        return 0
    return _ROUND_STEPS if block.casting == "llama" else _ROUND_ONCE


_ROUND_ONCE, _ROUND_STEPS = 1, 2  # normlab.kernels.fused_half's recipes (importing it imports Numba)


def _recipe_parameters(block: Block, recipe: int, weight, bias, scale, shift) -> tuple:
    """``(w + o, b, 1 + scale, shift)`` computed as the recipe computes them (in bfloat16
    for llama, in float32 for gemma), as float64 arrays."""
    work = torch.bfloat16 if recipe == _ROUND_STEPS else torch.float32
    with torch.no_grad():
        weight = None if weight is None else recipes._scale(weight.to(work), block.weight_offset)
        scale = None if scale is None else 1 + scale.to(work)
        return tuple(None if t is None else param_view(t.to(torch.float64)) for t in (weight, bias, scale, shift))


_ACTIVATIONS = {"silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid, "gelu": torch.nn.functional.gelu}


def _broadcast(param: Tensor, plan, axes_plan) -> Tensor:
    """A parameter of ``axes_plan.param_shape`` laid out against the expanded view."""
    split = param.reshape(tuple(plan.axis_sizes[i] for i in axes_plan.param_axes))
    order = sorted(range(len(axes_plan.param_axes)), key=lambda k: axes_plan.param_axes[k])
    return split.permute(order).reshape(axes_plan.param_broadcast_shape)


@dataclass(frozen=True)
class _View:
    """How the composite lays the input and the parameters out: through the plan (any
    pattern), or, for the modules' own blocks under torch.compile and torch.jit.trace, from
    the block alone (the plan's shape arithmetic breaks a full graph, and a plan would fix
    the shape)."""

    axes: tuple  # the reduced axes of the view
    plan: object = None
    mod_plan: object = None
    group: Optional[int] = None  # without a plan: the last axis split into groups of this size
    # without a plan: the reduced trailing axes' sizes, as the block names them (traced sizes
    # are tensors, which torch's layer norm takes, but the TorchScript ONNX exporter refuses)
    trailing: Optional[tuple] = None

    def of(self, t: Tensor) -> Tensor:
        if self.plan is not None:
            return t.reshape(self.plan.axis_sizes)
        if not self.group:
            return t
        # (a reshape, as Mamba2's gated norm views its groups: the TorchScript ONNX exporter
        # takes it at every opset, where unflatten needs opset 13; a nested tensor has no one shape).
        # The group count is named, not -1, which an input of no elements leaves undecided
        if t.is_nested:
            return t.unflatten(-1, (-1, self.group))
        return t.reshape(t.shape[:-1] + (t.shape[-1] // self.group, self.group))

    def back(self, y: Tensor, x: Tensor) -> Tensor:
        """``y``, laid out as :meth:`of` lays out ``x``, in ``x``'s shape."""
        if self.plan is not None:
            return y.reshape(x.shape)
        return y.flatten(-2) if self.group else y

    def param(self, p: Tensor) -> Tensor:
        if self.plan is not None:
            return _broadcast(p, self.plan, self.plan)
        return p.reshape(-1, self.group) if self.group else p  # the trailing axes' own shape

    def modulation(self, p: Tensor) -> Tensor:
        return _broadcast(p, self.plan, self.mod_plan) if self.plan is not None else p.unsqueeze(1)  # "b d"


def _traced_view(block: Block) -> Optional[_View]:
    """The plan-free :class:`_View` of the modules' blocks ("... [n0 ...]" with its own
    parameters, "... (g [c])", "b t [d]" modulated per "b d", with AdaLayerNorm's leading
    axes "a0 a1 ..." before it), or None."""
    pattern, params, modulation = block.pattern, block.params, block.modulation
    if pattern.startswith("... [") and pattern.endswith("]") and modulation is None:
        names = pattern[5:-1].split()
        if names and all(n.isidentifier() for n in names) and params in (None, " ".join(names)):
            return _View(axes=tuple(range(-len(names), 0)), trailing=_sized(block, names))
    if pattern == "... (g [c])" and params in (None, "(g c)") and modulation is None:
        sizes = dict(block.sizes)  # (one group: the row itself, without the view of it that ONNX would export)
        return _View(axes=(-1,), group=None if sizes.get("g") == 1 else sizes["c"])
    leading = pattern[:-len("b t [d]")].split()
    if (pattern.endswith("b t [d]") and leading == [f"a{i}" for i in range(len(leading))] and params is None
            and modulation == "b d"):
        return _View(axes=(-1,), trailing=_sized(block, ["d"]))
    return None


def _sized(block: Block, names) -> Optional[tuple]:
    """The sizes ``block`` gives the axes ``names``, or None where it leaves one unsized."""
    sizes = dict(block.sizes)
    return tuple(sizes[n] for n in names) if all(n in sizes for n in names) else None


def _view_of(block: Block, x: Tensor) -> _View:
    # (torch.jit.trace, and so the TorchScript ONNX exporter, would record a plan's sizes as
    # constants: the traced graph would then refuse another batch size; a nested tensor's
    # rows have no one shape to plan)
    view = (_traced_view(block) if torch.compiler.is_compiling() or torch.jit.is_tracing() or x.is_nested
            or block.broadcasts else None)
    if view is not None:
        return view
    shape = tuple(x.shape)
    plan = make_plan(block.pattern, shape, block.params, sizes=dict(block.sizes))
    mod_plan = None if block.modulation is None else make_plan(block.pattern, shape, block.modulation,
                                                               sizes=dict(block.sizes))
    return _View(plan.reduced_axes, plan, mod_plan)


def _composite(x, residual, gate, weight, bias, scale, shift, block: Block):
    """The block in torch operations, following ``block.casting``."""
    total = x + residual if residual is not None else x
    dtype = total.dtype  # the norm's input is the sum: a bfloat16 x plus a float32 residual is float32
    compute, work = recipes.recipe_dtypes(dtype, block.casting)
    layout = _view_of(block, x)
    axes = layout.axes
    phi = _ACTIVATIONS[block.gate_activation](gate.to(compute)) if gate is not None else None
    gated_first = gate is not None and not block.norm_before_gate
    trailing = layout.trailing or _trailing_shape(layout.of(total), axes)
    if (not block.rms and trailing is not None and gate is None and scale is None and shift is None
            and not block.weight_offset and _params_span(layout, trailing, weight, bias)
            and (((dtype in _HALF_DTYPES or total.is_nested) and block.casting == "gemma"
                  and all(p is None or p.dtype in (dtype, torch.float32) for p in (weight, bias)))
                 or ((_onnx_layer_norm(dtype) or (total.is_nested and dtype in _KERNEL_DTYPES))
                     and all(p is None or p.dtype == dtype for p in (weight, bias))))):
        # nn.LayerNorm on half input, as FusedAddLayerNorm replaces it: torch's kernel applies
        # the weight and bias in float32 and rounds once, the gemma recipe (float32 parameters
        # too, as a half model keeps its norms in float32: its outputs and its parameters'
        # gradients, which torch's kernel accumulates in the input's dtype); and exported to
        # ONNX, nn.LayerNorm on float32 and float64 input too (see _onnx_layer_norm). A nested
        # tensor takes it too: nn.LayerNorm normalizes its rows, and nested tensors lack var_mean
        # (float32 and float64 ones in every casting, which agree there: the strided layout
        # multiplies no plain tensor by a nested one, as the recipes' weight would)
        w, b = (None if p is None else layout.param(p).reshape(trailing) for p in (weight, bias))
        y = layout.back(torch.nn.functional.layer_norm(layout.of(total), trailing, w, b, block.eps), x)
        return (y, total) if residual is not None else y
    if (not block.rms and trailing is not None and dtype in _HALF_DTYPES and compute == torch.float32
            and block.casting == "llama" and not gated_first):
        # torch's layer norm kernel on the half input, as the code the block replaces calls
        # it (nn.LayerNorm, diffusers' norms): it normalizes in float32 and rounds x̂ once to
        # the input's dtype, which is where the llama recipe rounds it; several times faster
        # than the operations below, whose float32 temporaries are twice the input's size.
        # FP32LayerNorm casts the input to float32 first and back after: the same x̂, but its
        # backward takes the gradient, rounded to the input's dtype by the modulation, through
        # torch's float32 kernel, whose input gradient differs from the half kernel's in the
        # last bit here and there
        if block.norm_in_float32:
            h_hat = torch.nn.functional.layer_norm(layout.of(total).float(), trailing, eps=block.eps).to(dtype)
        else:
            h_hat = torch.nn.functional.layer_norm(layout.of(total), trailing, eps=block.eps)
    else:
        h = total.to(compute)
        if gated_first:
            h = h * phi
        h_hat = _normalized(layout.of(h), axes, trailing, block, dtype, compute)
        del h  # (each temporary goes once read, as in the code the block replaces, whose one
        # name is rebound: a held float32 copy raised the peak by twice a bfloat16 input)
    w = None if weight is None else layout.param(weight)
    y = recipes.weigh(h_hat, w, block.casting, dtype, block.weight_offset)
    del h_hat
    # the modulation as the code it replaces applies it (diffusers' norm(x)·(1 + scale) + shift):
    # in the recipe's working dtype for gemma, by torch's promotion otherwise (a float32 scale
    # on bfloat16 input gives float32)
    in_work = block.casting in _CAST_AT_THE_END
    if scale is not None:
        scale = layout.modulation(scale)
        y = y * (1 + (scale.to(work) if in_work else scale))
    if shift is not None:
        shift = layout.modulation(shift)
        y = y + (shift.to(work) if in_work else shift)
    if bias is not None:
        y = y + layout.param(bias).to(work)
    if gate is not None and block.norm_before_gate:
        y = y * layout.of(phi).to(work)
    # gemma and qwen3_next round once at the end; llama and none keep the dtype the weight's product promotes
    # to (a float32 weight on bfloat16 input gives float32, as LlamaRMSNorm's weight * x̂ does)
    y = layout.back(y, x).to(dtype) if block.casting in _CAST_AT_THE_END else layout.back(y, x)
    return (y, total) if residual is not None else y


_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _normalized(view: Tensor, axes, trailing, block: Block, dtype: torch.dtype, compute: torch.dtype) -> Tensor:
    """x̂ of ``view`` (in ``compute``) over ``axes``."""
    if block.rms:
        return recipes.rms_normalize(view, axes, block.eps)
    if trailing is not None and ((dtype in _HALF_DTYPES and compute == torch.float32) or _onnx_layer_norm(dtype)
                                 or view.is_nested):
        # torch's float32 kernel, one pass: its folded x·rstd − mean·rstd errs by about
        # 6e-8·|mean|/std, far below the half rounding that x̂ or the output meets after it
        # (nested tensors: the one layer norm they have)
        return torch.nn.functional.layer_norm(view, trailing, eps=block.eps)
    var, mean = torch.var_mean(view, dim=axes, keepdim=True, correction=0)
    return (view - mean) * torch.rsqrt(var + block.eps)


def _params_span(layout: _View, trailing: tuple, weight, bias) -> bool:
    """Whether the weight and bias span the trailing reduced axes, all of them and nothing
    else, as nn.LayerNorm's do, so that torch's layer norm takes them (the plan-free views'
    parameters always do; a group norm's per-channel ones, over a kept axis too, do not, nor
    does a weight over "d" alone in "b [t d]")."""
    if layout.plan is None or (weight is None and bias is None):
        return True
    shape = layout.plan.param_broadcast_shape
    return tuple(shape) == (1,) * (len(shape) - len(trailing)) + tuple(trailing)


def _onnx_layer_norm(dtype: torch.dtype) -> bool:
    """Whether a layer norm over trailing axes of float32 or float64 input (which every
    recipe computes in its own dtype) runs as torch's layer norm: under ONNX export, which
    writes that as ONNX's one ``LayerNormalization``, as it writes ``nn.LayerNorm`` and the
    code the blocks replace (the statistics' operations would each be an ONNX op)."""
    return dtype in _KERNEL_DTYPES and _exporting_to_onnx()


def _trailing_shape(view: Tensor, axes) -> Optional[tuple]:
    """The shape of the reduced axes when they are the view's trailing ones (what torch's
    layer norm takes as ``normalized_shape``), else None."""
    ndim = view.dim()
    reduced = sorted(a % ndim for a in axes)
    if reduced != list(range(ndim - len(reduced), ndim)):
        return None
    return tuple(view.size(a) for a in reduced)  # (size(): a strided nested tensor has no shape)


def _records_autograd(tensors) -> bool:
    return (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            and any(t is not None and t.requires_grad for t in tensors))


def fused_normalize(x: Tensor, block: Block, *, residual=None, gate=None, weight=None, bias=None, scale=None,
                    shift=None):
    """The fused block ``block`` on tensors, differentiable: the fused kernels on CPU
    float32/float64, the composite with the block's casting recipe elsewhere.
    Returns ``y``, or ``(y, x + residual)`` with a residual.

    >>> x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    >>> y, total = fused_normalize(x, Block("b [d]", rms=True, eps=0.0), residual=torch.zeros(1, 2))
    >>> [round(v, 4) for v in y[0].tolist()], total.tolist()
    ([0.8485, 1.1314], [[3.0, 4.0]])
    """
    tensors = (x, residual, gate, weight, bias, scale, shift)
    # (compile first: Dynamo cannot trace is_inference_mode_enabled nor is_inference; asked once
    # a call, and a list, not a generator, which a small call would feel)
    compiling = torch.compiler.is_compiling()
    records = not compiling and _records_autograd(tensors)
    if records and any([t is not None and t.is_inference() for t in tensors]):
        # a tensor made in inference_mode, which autograd cannot save where the kernels' backward
        # would (x + residual, or x alone, the gate, the parameters): the composite saves what its
        # operations make of it, normal tensors, as the code the block replaces does
        # (norm(x + residual), x * silu(gate), diffusers' norm(x) * (1 + scale) + shift)
        return _composite(*tensors, block)
    if _use_kernels(*tensors):
        call = _cached_call(block, tensors)
        if call is not None:
            return _run_cached(call, tensors, records)
        if _profiler._is_profiler_enabled:  # (an attribute read when no profiler runs; _use_kernels: not compiling)
            return profiled(block, _FusedFunction.apply, *tensors, block)
        return _FusedFunction.apply(*tensors, block)
    if _half_recipe(block, tensors):
        call = _cached_call(block, tensors)
        if call is not None:
            return _run_cached(call, tensors, records)
    if not compiling and _profiler._is_profiler_enabled and not torch.jit.is_tracing():
        # the casting recipe's torch operations (half precision, other devices) as one range too,
        # named as on the kernels (the flag read only outside compilation: see paths.profiled)
        return profiled_torch_ops(block, _composite, *tensors, block)
    return _composite(*tensors, block)


def _run_cached(call, tensors, records: bool, _recorded: bool = False):
    """The cached call's outputs: through autograd where it ``records`` the call, else straight
    from the kernels (an autograd.Function costs a small call a sixth of its time). Eager calls
    only (compilation takes the composite), so the profiler's flag is read here."""
    if _profiler._is_profiler_enabled and not _recorded:  # (an attribute read when no profiler runs)
        return profiled(call.block, _run_cached, call, tensors, records, True)
    if records:
        return _CachedFusedFunction.apply(*tensors, call)
    y, total = call.forward(*tensors)[:2]
    return (y, total) if tensors[1] is not None else y


# ---------------------------------------------------------------------------------------
# Repeated calls of one shape


@dataclass(frozen=True)
class _Call:
    """A block's kernel layout for one input shape, dtype and set of inputs, built once:
    a call then lays out the parameters and runs the kernels, with no argument parsing."""

    block: Block
    plan: object
    mod_plan: object
    layout: object  # kernels.fused.Layout

    def forward(self, x, residual, gate, weight, bias, scale, shift) -> tuple:
        """``(y, total, tables, mean, rstd)``: the kernels' forward as tensors of x's shape
        (``total`` None without a residual), the parameter tables it read and the statistics.
        Below the size whose outputs the pool recycles (``pool.MULTI_OUTPUT_MIN_BYTES``, read
        now, as pool.empty reads it), torch allocates them, as torch.nn's outputs: their
        storage resizes, which a ``torch.from_numpy`` tensor's never does."""
        block = self.block
        tables = self.tables(weight, bias, scale, shift)
        if x.numel() * x.element_size() < pool.MULTI_OUTPUT_MIN_BYTES or not pool.enabled():
            shape = self.layout.shape
            y = _empty(x.shape, dtype=x.dtype)
            total = None if residual is None else _empty(x.shape, dtype=x.dtype)
            _, _, mean, _, rstd = self.layout.forward(
                tables, _numpy(x), _numpy(residual), _numpy(gate), block.eps, block.rms,
                outputs=(_numpy(y).reshape(shape), None if total is None else _numpy(total).reshape(shape)))
            return y, total, tables, mean, rstd
        y, total, mean, _, rstd = self.layout.forward(tables, _numpy(x), _numpy(residual), _numpy(gate), block.eps,
                                                      block.rms)
        return (_from_rows(y, x.shape, x.dtype), None if residual is None else _from_rows(total, x.shape, x.dtype),
                tables, mean, rstd)

    def tables(self, weight, bias, scale, shift):
        recipe = getattr(self.layout, "recipe", 0)  # (bfloat16 rows: the parameters as the recipe rounds them)
        params = (_recipe_parameters(self.block, recipe, weight, bias, scale, shift) if recipe
                  else [param_view(t) for t in (weight, bias, scale, shift)])
        plans = (self.plan, self.plan, self.mod_plan, self.mod_plan)
        return self.layout.tables(*(None if p is None else plan.expand_params(p.astype(np.float64, copy=False))
                                    for p, plan in zip(params, plans)), as_given=bool(recipe))


_CALLS: dict = {}


def _cached_call(block: Block, tensors) -> Optional[_Call]:
    """The :class:`_Call` for these tensors (built on first use), or None where the
    general path must run: tensor subclasses, strides, shapes that need its checks."""
    if any(type(t) not in _EAGER_TYPES for t in tensors) or not tensors[0].is_contiguous():
        return None
    key = (block,) + tuple(None if t is None else (t.shape, t.dtype) for t in tensors)
    call = _CALLS.get(key, False)
    if call is False:
        if len(_CALLS) >= 256:
            _CALLS.clear()
        call = _CALLS[key] = _build_call(block, tensors)
    return call


def _build_call(block: Block, tensors) -> Optional[_Call]:
    from normlab.kernels.fused import Layout
    from normlab.kernels.fused_half import HalfLayout

    x, residual, gate, weight, bias, scale, shift = tensors
    try:
        plan = make_plan(block.pattern, tuple(x.shape), block.params, sizes=dict(block.sizes))
        mod_plan = None if block.modulation is None else make_plan(block.pattern, tuple(x.shape), block.modulation,
                                                                   sizes=dict(block.sizes))
    except ValueError:
        return None  # the general path raises the error
    if any(t is not None and tuple(t.shape) != plan.param_shape for t in (weight, bias)) or any(
            t is not None and (mod_plan is None or tuple(t.shape) != mod_plan.param_shape) for t in (scale, shift)):
        return None
    if any(t is not None and t.shape != x.shape for t in (residual, gate)):
        return None
    epilogue = fused.Epilogue(residual is not None, block.gate_activation if gate is not None else None,
                              block.norm_before_gate, float(block.weight_offset), block.modulation,
                              scale is not None, shift is not None)
    if x.dtype == torch.bfloat16:
        layout = HalfLayout(plan, mod_plan, epilogue, _half_recipe(block, tensors))
    else:
        layout = Layout(plan, mod_plan, epilogue, _numpy_dtype(x.dtype))
    if not layout.ok:
        return None
    call = _Call(block, plan, mod_plan, layout)
    # (a parameter repeating inside a row, as a group norm's weight over each channel's
    # positions, has no kernel table: the general path takes it, through the reference)
    return call if call.tables(weight, bias, scale, shift) is not None else None


def _addresses(*tensors) -> tuple:
    return tuple(None if t is None else t.data_ptr() for t in tensors)


_ACCUMULATE_GRAD = getattr(getattr(torch._C, "_functions", None), "AccumulateGrad", ())


def _accumulates_a_leaf(node) -> bool:
    """Whether this backward pass (``node``: the block's backward node) hands the gradient of
    x or the residual to a leaf's ``.grad``. There, one tensor handed to both, as torch's
    ``x + r`` hands it, is copied by torch's engine first (AccumulateGrad takes a tensor
    only where nothing else holds it), into memory fresh from the system from 32 MiB on
    (``pool.FRESH_PAGES_FROM``): the kernel then writes a second array from cache instead
    (fused add + RMS norm forward+backward on (8, 512, 4096) bfloat16 leaves: 1.24x faster,
    one thread, 2-core AMD EPYC). Elsewhere the second write costs 8% and saves nothing:
    ``autograd.grad`` returns the inputs' gradients as they are, and a model's activations
    add theirs in place; below 32 MiB glibc recycles the copy's memory."""
    try:
        return any(isinstance(next_node, _ACCUMULATE_GRAD) and torch._C._will_engine_execute_node(next_node)
                   for next_node, _ in node.next_functions[:2] if next_node is not None)
    except (RuntimeError, AttributeError):  # (autograd.grad: refused for a leaf, whose gradient it returns)
        return False


class _CachedFusedFunction(torch.autograd.Function):
    """:class:`_FusedFunction` through a cached :class:`_Call`: the same kernels, forward
    and backward, without the NumPy API's checks and layout search on every call."""

    @staticmethod
    def forward(ctx, x, residual, gate, weight, bias, scale, shift, call: _Call):
        y, total, tables, mean, rstd = call.forward(x, residual, gate, weight, bias, scale, shift)
        ctx.call, ctx.tables = call, tables
        ctx.addresses = _addresses(weight, bias, scale, shift)
        ctx.has_residual = residual is not None
        ctx.set_materialize_grads(False)  # (see _sum_only_backward)
        total = x if total is None else total
        # (the sum: see _FusedFunction.) The statistics are saved with it, as torch's norms save
        # theirs: a checkpoint that recomputes the forward in backward (use_reentrant=False) then
        # hands over the recomputed sum with its own statistics, where the recomputation may
        # differ (dropout before the block, preserve_rng_state=False)
        ctx.save_for_backward(total, gate, weight, bias, scale, shift, torch.from_numpy(rstd),
                              None if mean is None else torch.from_numpy(mean))
        if residual is None:
            return y
        _sum_needs_no_gradient(ctx, total)
        return y, total

    @staticmethod
    def backward(ctx, grad_y, grad_total=None, _recorded=False):
        if grad_y is None:
            return _sum_only_backward(ctx, grad_total)
        total, gate, weight, bias, scale, shift, rstd, mean = ctx.saved_tensors
        call = ctx.call
        if grad_total is None and ctx.has_residual:
            grad_total = torch.zeros_like(grad_y)
        if torch.compiler.is_dynamo_compiling():  # (first: Dynamo cannot trace the batched check)
            return _traced_backward(call.block, (total, gate, weight, bias, scale, shift), ctx, grad_y, grad_total)
        if _profiler._is_profiler_enabled and not _recorded:  # (an attribute read when no profiler runs)
            return profiled_backward(ctx, _CachedFusedFunction.backward, grad_y, grad_total)
        if _backward_in_torch(grad_y, grad_total):
            return _composite_backward(call.block, (total, gate, weight, bias, scale, shift), ctx, grad_y, grad_total)
        tables = ctx.tables
        if _addresses(weight, bias, scale, shift) != ctx.addresses:
            # the saved parameters are not the forward's memory, which the tables may read: copies
            # that allow_mutation_on_saved_tensors kept before an in-place change, or that a
            # saved-tensor hook gave back; their values are the forward's
            tables = call.tables(weight, bias, scale, shift)
        needs = ctx.needs_input_grad  # (parameters that need none, frozen ones: no sums for them)
        need_mod = (scale is not None or shift is not None) and (needs[5] or needs[6])
        # (grad_total: None without a residual, whose block has one output)
        nbytes = total.numel() * total.element_size()
        two_grads = (grad_total is not None and needs[0] and needs[1]
                     and nbytes >= pool.FRESH_PAGES_FROM and _accumulates_a_leaf(ctx))
        torch_grads = None
        if nbytes < pool.MULTI_OUTPUT_MIN_BYTES or not pool.enabled():  # (torch's memory, as the forward's)
            torch_grads = (_empty(total.shape, dtype=total.dtype),
                           None if gate is None else _empty(total.shape, dtype=total.dtype))
        grad_x, grad_gate, grad_w, grad_b, grad_scale, grad_shift, grad_r = call.layout.backward(
            tables, _numpy(grad_y), _numpy(grad_total), _numpy(total),
            None, _numpy(gate), call.block.eps, call.block.rms, None if mean is None else mean.numpy(), rstd.numpy(),
            weight is not None and needs[3], bias is not None and needs[4], need_mod, two_grads,
            None if torch_grads is None else tuple(None if t is None else _numpy(t).reshape(call.layout.shape)
                                                   for t in torch_grads))

        def param_grad(table, param, mod: bool):
            if table is None or param is None:  # (scale without shift, or shift alone: one table for nothing)
                return None
            plan = call.mod_plan if mod else call.plan
            grad = plan.collapse_params(call.layout.collapse(table, mod))
            # (rounded by torch into a tensor it allocates, whose storage resizes as torch.nn's
            # parameter gradients' do; a float64 one copied: torch.from_numpy's never resizes)
            return torch.from_numpy(np.ascontiguousarray(grad)).to(param.dtype, copy=True)

        if torch_grads is not None:
            grad_x, grad_gate = torch_grads
        else:
            grad_x = _from_rows(grad_x, total.shape, total.dtype)
            grad_gate = None if grad_gate is None else _from_rows(grad_gate, total.shape, total.dtype)
        return (grad_x, None if grad_total is None else _from_rows(grad_r, total.shape, total.dtype) if two_grads
                else grad_x,
                grad_gate,
                param_grad(grad_w, weight, False), param_grad(grad_b, bias, False),
                param_grad(grad_scale, scale, True), param_grad(grad_shift, shift, True), None)


_NUMPY_DTYPES = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
                 torch.float64: np.dtype(np.float64)}


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return _NUMPY_DTYPES.get(dtype) or torch.empty((), dtype=dtype).numpy().dtype


# ---------------------------------------------------------------------------------------
# Modules


def _trailing(normalized_shape) -> tuple[str, str, tuple]:
    """Pattern, params and sizes normalizing the trailing ``normalized_shape``."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    names = [f"n{i}" for i in range(len(shape))]
    # (a size of 0, as nn.LayerNorm(0) takes, is left to the input: a plan's given sizes start at 1)
    sizes = tuple((name, int(size)) for name, size in zip(names, shape) if int(size) != 0)
    return "... [" + " ".join(names) + "]", " ".join(names), sizes


def _block_of(module: nn.Module, dtype: torch.dtype, shape) -> Block:
    """``module._block``, built again where ``eps``, a recipe attribute (``casting``,
    ``weight_offset``, ``group_size``, ``norm_before_gate``, ``gate_activation``) or the
    normalized ``shape`` the module reads now (its ``normalized_shape``, its weight's shape,
    its ``hidden_size``: structured pruning narrows them together) was set after
    construction: torch.nn's norms read them on every call, and so do these blocks.
    ``eps=None`` is torch.nn.RMSNorm's: the machine epsilon of the dtype that ``dtype``
    (the normalized tensor's) computes in."""
    block, group_size = module._block, getattr(module, "group_size", None)
    if (block.eps != module.eps or block.casting != module.casting or shape != module._block_shape
            or block.weight_offset != getattr(module, "weight_offset", 0.0)
            or block.norm_before_gate != getattr(module, "norm_before_gate", True)
            or block.gate_activation != getattr(module, "gate_activation", "silu")
            or (group_size is not None and dict(block.sizes).get("c", 0) != group_size)):
        module._init_block()
    block = module._block
    if block.eps is None:
        if torch.compiler.is_compiling():
            # (the eager calls' cache neither read nor written: a graph would guard on what they last left
            # in it, and one that wrote it would fail the next call's guards; both compile again)
            return replace(block, eps=rms_default_eps(dtype))
        # (kept until the next dtype or block: a replace() a call cost six Python calls)
        resolved = module.__dict__.get("_block_for_dtype")
        if resolved is None or resolved[0] is not block or resolved[1] != dtype:
            resolved = module._block_for_dtype = (block, dtype, replace(block, eps=rms_default_eps(dtype)))
        return resolved[2]
    return block


def _float_or_none(eps) -> Optional[float]:
    return None if eps is None else float(eps)


def _check_input(module: nn.Module, x: Tensor, normalized_shape, **others: Optional[Tensor]) -> None:
    """torch's RuntimeError, in torch's words, for an input whose trailing axes are not
    ``normalized_shape`` or a companion tensor (residual, gate) not shaped like it."""
    if torch.jit.is_tracing():  # (traced sizes: a check would warn and fix the shape; torch's ops check them)
        return
    normalized_shape = tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(normalized_shape):]) != normalized_shape or x.dim() < len(normalized_shape):
        raise RuntimeError(f"{type(module).__name__}: Given normalized_shape={list(normalized_shape)}, expected "
                           f"input with shape [*, {', '.join(map(str, normalized_shape))}], but got input of size"
                           f"{list(x.shape)}")
    for name, other in others.items():
        if other is not None and other.shape != x.shape:
            raise RuntimeError(f"{type(module).__name__}: {name} has size {list(other.shape)}, but the input has "
                               f"size {list(x.shape)}; pass a {name} of the input's shape")


def _fx_leaf(module: nn.Module, *args, **kwargs) -> Optional["torch.fx.Proxy"]:
    """Under ``torch.fx.symbolic_trace`` (an argument is a ``Proxy``): one ``call_module``
    leaf with the arguments given, whose output unpacks as the block's tuple does; the
    traced graph then runs the block as it is (its checks read sizes, the kernels need
    tensors). The root module cannot call itself: a TypeError says what traces it.
    Otherwise None."""
    proxies = [a for a in (*args, *kwargs.values()) if isinstance(a, _Proxy)]
    if not proxies:
        return None
    proxy = proxies[0]
    path = proxy.tracer.path_of_module(module)
    if not path:
        raise TypeError(f"torch.fx traces {type(module).__name__} inside a model, not as the root module: trace a "
                        "model that holds it, e.g. one whose forward calls it (or use torch.export, which traces it "
                        "alone)")
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    warn_if_fx_quantizing(module, proxy.tracer)
    return proxy.tracer.create_proxy("call_module", path, args, kwargs)


def _with_companion(module: nn.Module, x: Tensor, other: Optional[Tensor], normalized_shape,
                    name: str = "residual", formula: str = "x + residual"):
    """``x`` and ``other`` (the residual, or the gate) expanded to the shape of ``formula``
    (each broadcasts to the other, as the composite ``norm(x + residual)`` or
    ``x * silu(gate)`` does), after torch's checks of that shape: the norm's input has it,
    so its trailing axes must be ``normalized_shape``. Expanded views: autograd sums the
    gradient of a broadcast input over the axes it was repeated on."""
    if x.is_nested or (other is not None and other.is_nested):
        return x, other  # (rows of several lengths, no one shape to check: torch's operations check them)
    if other is None or not _shapes_differ(x.shape, other.shape):
        _check_input(module, x, normalized_shape, **{name: other})
        return x, other
    try:
        shape = torch.broadcast_shapes(x.shape, other.shape)
    except RuntimeError:
        raise RuntimeError(f"{type(module).__name__}: {name} has size {list(other.shape)}, which does not "
                           f"broadcast with the input's size {list(x.shape)} (as in {formula}); pass a {name} "
                           f"of the input's shape or one that broadcasts to it") from None
    _check_input(module, torch.empty(shape, device="meta"), normalized_shape)
    return x.expand(shape), other.expand(shape)


def _shapes_differ(shape, other) -> bool:
    """``tuple(shape) != tuple(other)``; under torch.jit.trace, whose sizes are tensors,
    without a TracerWarning for each size compared: the trace keeps the branch taken (the
    input expanded, or not), as it keeps torch's own broadcasting of these shapes."""
    if not torch.jit.is_tracing():
        return tuple(shape) != tuple(other)
    with ignored_in_this_thread(torch.jit.TracerWarning):
        return tuple(shape) != tuple(other)


def _untraced_shape(t: Tensor) -> torch.Size:
    """``t.shape`` as ints under torch.jit.trace (a parameter's: the trace keeps it fixed)."""
    with ignored_in_this_thread(torch.jit.TracerWarning):
        return torch.Size(int(size) for size in t.shape)


_SMALL_FORWARD_CASTINGS = ("llama", "gemma", "none")


def _small_add_rms_norm(module, x, residual):
    """``FusedAddRMSNorm``'s ``(y, x + residual)``, or ``y`` without a residual, in torch
    operations for a small input that autograd does not record, or None: float32 and
    float64 through torch's ``rms_norm`` (the recipes coincide there, and an RMS norm has
    no mean to cancel), bfloat16 and float16 through the casting recipe's operations, bit
    for bit."""
    weight = module.weight
    if residual is not None and (type(residual) is not Tensor or x.dtype != residual.dtype
                                 or residual.requires_grad and torch.is_grad_enabled()):
        return None
    if (module.casting not in _SMALL_FORWARD_CASTINGS
            or not _small_forward_fits(x, weight, HALF_FORWARD_KERNELS_FROM if x.dtype in _HALF_DTYPES else None)
            or residual is not None and x.shape != residual.shape):  # (after the fit: never under jit.trace,
        return None                                                 # whose sizes would warn as bools)
    total = x + residual if residual is not None else x
    offset = module.weight_offset
    if x.dtype in _HALF_DTYPES:
        eps = module.eps if module.eps is not None else rms_default_eps(total.dtype)
        if _profiler._is_profiler_enabled:  # (an attribute read when no profiler runs; past the fit: not compiling)
            y = profiled(module._block, recipes.rms_norm_recipe, total, weight, eps, module.casting, offset,
                         weight.dim())
        else:
            y = recipes.rms_norm_recipe(total, weight, eps, module.casting, offset, weight.dim())
    else:
        y = torch.rms_norm(total, weight.shape, weight + offset if offset else weight, module.eps)
    return (y, total) if residual is not None else y


class FusedAddRMSNorm(recipes.TransformersEpsName, Unscriptable, nn.Module):
    """Residual add and RMS norm in one pass: ``forward(x, residual) -> (norm(x + residual), x + residual)``
    (``forward(x)`` alone is a plain RMS norm), as vLLM's and Liger's fused RMS norms.
    ``x`` and ``residual`` broadcast against each other as in ``x + residual`` (those kernels
    take equal shapes only); the sum and the output then have the broadcast shape.

    ``casting`` picks the recipe (see the module docstring); Gemma is
    ``casting="gemma", weight_offset=1.0`` with the weight initialized to zeros.

    >>> m = FusedAddRMSNorm(2, eps=0.0)
    >>> y, total = m(torch.tensor([[1., 4.]]), torch.tensor([[2., 0.]]))
    >>> [round(v, 4) for v in y[0].tolist()], total.tolist()
    ([0.8485, 1.1314], [[3.0, 4.0]])
    """

    _block_shape = None  # (the normalized shape of the block's last build: see _block_of)

    def __init__(self, hidden_size, eps: float = 1e-6, casting: str = "llama", weight_offset: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.casting = casting
        self.weight_offset = recipes.check_weight_offset(weight_offset)
        shape = (hidden_size,) if isinstance(hidden_size, int) else tuple(hidden_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()
        self._init_block()

    def reset_parameters(self) -> None:
        """The weight at its initial value (what a model built on the meta device calls
        after ``to_empty``, as for torch.nn's norms)."""
        (nn.init.zeros_ if self.weight_offset else nn.init.ones_)(self.weight)

    def _init_block(self) -> None:
        self._block_shape = self.weight.shape
        pattern, params, sizes = _trailing(self._block_shape)
        self._block = Block(pattern, params, sizes=sizes, eps=_float_or_none(self.eps), rms=True, casting=self.casting,
                            weight_offset=self.weight_offset)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        traced = _fx_leaf(self, x, residual)
        if traced is not None:
            return traced
        stand_in = parametrizations_computed(self)
        if stand_in is not None:  # (each parametrized tensor computed once, as norm(x + residual) does)
            return stand_in.forward(x, residual)
        try:
            refuse_non_tensor(self, x, "x", 1)
            refuse_non_tensor(self, residual, "residual", 2)
            small = _small_add_rms_norm(self, x, residual)
            if small is not None:
                return small
            weight = self.weight
            # (weight.shape: structured pruning narrows it; under torch.jit.trace its sizes are
            # traced tensors, which the block's checks would turn into bools with a warning)
            shape = weight.shape
            if shape and shape[0].__class__ is Tensor:  # (traced sizes: an attribute, where a call would cost)
                shape = _untraced_shape(weight)
            x, residual = _with_companion(self, x, residual, shape)
            # (the sum's; promote_types only where the dtypes differ: an export records each call as a node)
            dtype = (x.dtype if residual is None or residual.dtype == x.dtype
                     else torch.promote_types(x.dtype, residual.dtype))
            return fused_normalize(x, _block_of(self, dtype, shape), residual=residual, weight=weight)
        except RuntimeError as error:
            if _holds_expanded_weights(self):
                raise expanded_weights_refusal(self) from None
            _advise_on_sum(self, x, residual, error)  # torch's refusal goes on with the dtypes and the fix
            raise

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, casting={self.casting!r}" + (
            f", weight_offset={self.weight_offset}" if self.weight_offset else "")


class FusedAddLayerNorm(Unscriptable, nn.LayerNorm):
    """``torch.nn.LayerNorm`` with a fused residual add: ``forward(x, residual) ->
    (layer_norm(x + residual), x + residual)``, broadcasting as ``x + residual`` does;
    ``forward(x)`` is the plain layer norm.
    Same constructor, parameters and ``state_dict`` as ``torch.nn.LayerNorm``.

    >>> m = FusedAddLayerNorm(3)
    >>> y, total = m(torch.tensor([[3., 3., 3.]]), torch.tensor([[1., 0., -1.]]))
    >>> [round(v, 4) for v in y[0].tolist()], total.tolist()
    ([1.2247, 0.0, -1.2247], [[4.0, 3.0, 2.0]])
    """

    _block_shape = None  # (the normalized shape of the block's last build: see _block_of)

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, casting: str = "gemma"):
        # (torch.nn.LayerNorm's signature spelled out: tools read it, as skip_init reads device)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.casting = casting
        self._init_block()

    def _init_block(self) -> None:
        self._block_shape = self.normalized_shape
        pattern, params, sizes = _trailing(self._block_shape)
        self._block = Block(pattern, params, sizes=sizes, eps=_float_or_none(self.eps), casting=self.casting)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        traced = _fx_leaf(self, x, residual)
        if traced is not None:
            return traced
        stand_in = parametrizations_computed(self)
        if stand_in is not None:  # (each parametrized tensor computed once, as norm(x + residual) does)
            return stand_in.forward(x, residual)
        try:
            refuse_non_tensor(self, x, "x", 1)
            refuse_non_tensor(self, residual, "residual", 2)
            x, residual = _with_companion(self, x, residual, self.normalized_shape)
            total_like = x if residual is None or residual.dtype == x.dtype else torch.empty(
                (), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
            if self.eps is None or (self.casting == "gemma" and _dtypes_refused(total_like, self.weight, self.bias)):
                # parameters of a dtype torch's CPU layer norm refuses beside the sum's, or eps=None
                # (nn.LayerNorm has no default for it): the code the default recipe replaces,
                # nn.LayerNorm(x + residual), which raises "mixed dtype (CPU)" or its TypeError
                return _layer_norm_of_sum(self, x, residual)
            return fused_normalize(x, _block_of(self, x.dtype, self.normalized_shape), residual=residual,
                                   weight=self.weight, bias=self.bias)
        except RuntimeError as error:
            if not _holds_expanded_weights(self):
                _advise_on_sum(self, x, residual, error)  # torch's refusal goes on with the dtypes and the fix
                raise
            return _layer_norm_of_sum(self, x, residual)  # (whose per-sample gradients ExpandedWeights know)


def _advise_on_sum(module: nn.Module, x, residual, error: Exception) -> None:
    """:func:`~normlab.torch.advice.advise` for a fused block's refusal of ``x + residual``
    (its dtype and shape, read off a meta tensor: nothing is computed on the error path)."""
    from normlab.torch.advice import advise

    if not isinstance(x, Tensor) or torch.compiler.is_compiling():  # (Dynamo sets no exception's args)
        return
    if not isinstance(residual, Tensor):
        advise(module, x, error, "x")
        return
    try:
        shape = torch.broadcast_shapes(x.shape, residual.shape)
    except RuntimeError:
        return
    total = torch.empty(shape, dtype=torch.promote_types(x.dtype, residual.dtype), device="meta")
    advise(module, total, error, "x + residual")


def _layer_norm_of_sum(module: FusedAddLayerNorm, x: Tensor, residual: Optional[Tensor]):
    """What :class:`FusedAddLayerNorm` replaces: ``F.layer_norm(x + residual)``, and the sum."""
    total = x if residual is None else x + residual
    y = nn.functional.layer_norm(total, module.normalized_shape, module.weight, module.bias, module.eps)
    return y if residual is None else (y, total)


def _positive_int(group_size) -> int:
    """``group_size`` as an int (a NumPy integer too), or a ValueError at construction."""
    try:
        size = operator.index(group_size) if not isinstance(group_size, bool) else 0
    except TypeError:
        size = 0
    if size < 1:
        raise ValueError(f"group_size must be a positive int (the channels that share one root mean square), "
                         f"got {group_size!r}")
    return size


class GatedRMSNorm(recipes.TransformersEpsName, nn.Module):
    """Gated RMS norm of Mamba2 and GatedDeltaNet with mamba_ssm's ``RMSNormGated``
    semantics: ``norm(x)·w·silu(z)`` (``norm_before_gate=True``) or ``norm(x·silu(z))·w``
    (``False``), each group of ``group_size`` channels with its own statistics
    (``"... (g [c])"``; the groups are never collapsed into one). ``forward(x, z=None)``;
    ``x`` and ``z`` broadcast against each other as in transformers' ``x * silu(z)``.

    >>> m = GatedRMSNorm(4, group_size=2, eps=0.0)
    >>> [round(v, 4) for v in m(torch.tensor([[3., 4., 1., 1.]]))[0].tolist()]
    [0.8485, 1.1314, 1.0, 1.0]
    """

    _block_shape = None  # (the normalized shape of the block's last build: see _block_of)
    # (constants of a scripted module: TorchScript drops the recipe's branches on them, so its
    # graph, and its optimized backward, is the one it makes of the originals' straight code)
    __constants__ = ["group_size", "norm_before_gate", "gate_activation", "casting"]

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = True, gate_activation: str = "silu", casting: str = "gemma", device=None,
                 dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.group_size = hidden_size if group_size is None else _positive_int(group_size)
        if self.group_size and hidden_size % self.group_size:  # (a width of 0, as FalconH1RMSNormGated(0) takes)
            raise ValueError(f"group_size={self.group_size} must divide hidden_size={hidden_size}")
        self.norm_before_gate = norm_before_gate
        self.gate_activation = gate_activation
        self.casting = casting
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()
        self._init_block()

    def _init_block(self) -> None:
        self._block_shape = self.hidden_size
        groups = self.hidden_size // self.group_size if self.group_size else 1
        # (a size of 0 is left to the input, as in _trailing)
        sizes = tuple((name, size) for name, size in (("g", groups), ("c", self.group_size)) if size)
        self._block = Block("... (g [c])", "(g c)", sizes=sizes, eps=_float_or_none(self.eps),
                            rms=True, gate_activation=self.gate_activation, norm_before_gate=self.norm_before_gate,
                            casting=self.casting)

    def reset_parameters(self) -> None:
        """The weight at its initial value, ones (as torch.nn.RMSNorm's)."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, z: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():  # the composite's torch operations, as TorchScript compiles the originals
            if gate is not None:
                if z is not None:
                    raise TypeError("GatedRMSNorm.forward takes the gate once: as z or as gate, not both")
                z = gate
            eps = self.eps
            if eps is None:  # (torch.nn.RMSNorm's: the machine epsilon of the dtype it computes in)
                eps = 2.0 ** -52 if x.dtype == torch.float64 else 2.0 ** -23  # (torch.finfo does not script)
            return recipes.gated_rms_norm_recipe(x, z, self.weight, eps, self.group_size, self.norm_before_gate,
                                                 self.gate_activation, self.casting)
        return self._eager_forward(x, z, gate)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor, z: Optional[Tensor], gate: Optional[Tensor]) -> Tensor:
        traced = _fx_leaf(self, x, z, gate=gate)
        if traced is not None:
            return traced
        stand_in = parametrizations_computed(self)
        if stand_in is not None:
            return stand_in.forward(x, z, gate)
        try:
            for position, (name, value) in enumerate((("x", x), ("z", z), ("gate", gate)), start=1):
                refuse_non_tensor(self, value, name, position)
            if gate is not None:  # transformers' gated norms name it gate
                if z is not None:
                    raise TypeError("GatedRMSNorm.forward takes the gate once: as z or as gate, not both")
                z = gate
            x, z = _with_companion(self, x, z, (self.hidden_size,), "z", f"x * {self.gate_activation}(z)")
            return fused_normalize(x, _block_of(self, x.dtype, self.hidden_size), gate=z, weight=self.weight)
        except RuntimeError as error:
            if _holds_expanded_weights(self):
                raise expanded_weights_refusal(self) from None
            if not torch.compiler.is_compiling():  # (Dynamo sets no exception's args)
                # torch's refusal of an integer x or gate goes on with the dtypes and the fix
                from normlab.torch.advice import advise

                refused = [(name, value) for name, value in (("x", x), ("gate" if gate is not None else "z", z))
                           if isinstance(value, Tensor) and not value.is_floating_point() and not value.is_complex()]
                if refused:
                    advise(self, refused[0][1], error, " and ".join(name for name, _ in refused))
            raise

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")


class AdaLayerNorm(Unscriptable, nn.Module):
    """DiT's AdaLN-Zero, as diffusers' ``AdaLayerNormZero`` (same ``linear`` parameters and
    ``state_dict`` keys, same outputs): ``emb`` gives six chunks through ``linear(silu(emb))``;
    the input is layer-normalized (no affine, ``eps=1e-6``) and modulated in one pass,
    ``norm(x)·(1 + scale_msa) + shift_msa``. Returns ``(x, gate_msa, shift_mlp, scale_mlp, gate_mlp)``.
    As diffusers' ``norm(x) * (1 + scale[:, None]) + shift[:, None]``, an ``emb`` of batch 1
    serves every sample of ``x`` (and an ``x`` of batch 1 every row of ``emb``): the output has
    the broadcast shape, the chunks keep ``emb``'s batch.

    Only ``num_embeddings=None`` (the embedding comes in as ``emb``) is supported.

    >>> m = AdaLayerNorm(4)
    >>> out = m(torch.randn(2, 3, 4), emb=torch.randn(2, 4))
    >>> [tuple(t.shape) for t in out]
    [(2, 3, 4), (2, 4), (2, 4), (2, 4), (2, 4)]
    """

    def __init__(self, embedding_dim: int, num_embeddings: Optional[int] = None, norm_type: str = "layer_norm",
                 bias: bool = True, casting: str = "llama"):
        super().__init__()
        if num_embeddings is not None:
            raise ValueError("AdaLayerNorm computes from a given emb; num_embeddings (diffusers' timestep and "
                             "label embedding) is not supported: pass num_embeddings=None and emb=")
        if norm_type not in ("layer_norm", "fp32_layer_norm"):
            raise ValueError(f"Unsupported `norm_type` ({norm_type}) provided. Supported ones are: 'layer_norm', "
                             "'fp32_layer_norm'.")
        self.emb = None
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim, bias=bias)
        self.embedding_dim = embedding_dim
        # diffusers' FP32LayerNorm normalizes in float32 and rounds to the input's dtype before
        # the modulation, as nn.LayerNorm's kernel does for half input: one recipe for both, the
        # norm's kernel run on the float32 input for FP32LayerNorm, whose backward is float32's
        # (an embedding_dim of 0 is left to the input, as in _trailing)
        self._block = Block("b t [d]", modulation="b d", sizes=(("d", embedding_dim),) if embedding_dim else (),
                            eps=1e-6 if norm_type == "layer_norm" else 1e-5, casting=casting,
                            norm_in_float32=norm_type == "fp32_layer_norm")

    def forward(self, x: Tensor, timestep=None, class_labels=None, hidden_dtype=None, emb: Optional[Tensor] = None):
        traced = _fx_leaf(self, x, timestep, class_labels, hidden_dtype, emb=emb)
        if traced is not None:
            return traced
        if emb is None:
            raise ValueError("AdaLayerNorm needs emb= (the conditioning embedding, shape (batch, embedding_dim))")
        refuse_non_tensor(self, x, "x", 1)
        refuse_non_tensor(self, emb, "emb", 5)
        linear = self.linear
        if linear.out_features != 6 * self.embedding_dim and linear.out_features % 6 == 0:
            self._follow_pruned_linear(linear.out_features // 6)
        _check_input(self, x, (self.embedding_dim,))
        if emb.dim() != 2:
            raise RuntimeError(f"AdaLayerNorm takes emb of shape (batch, {self.embedding_dim}); got emb of size "
                               f"{list(emb.shape)} (with x of size {list(x.shape)})")
        # diffusers' norm(x) * (1 + scale[:, None]) + shift[:, None] broadcasts: emb's batch
        # (axis -3 of the output) may be 1 against x's, x's may be 1 against emb's, and x may
        # have fewer or more axes; the output has the broadcast shape
        try:
            shape = torch.broadcast_shapes(tuple(x.shape), (emb.shape[0], 1, self.embedding_dim))
        except RuntimeError:
            raise RuntimeError(f"AdaLayerNorm: x of size {list(x.shape)} and emb of size {list(emb.shape)} do not "
                               f"broadcast as norm(x) * (1 + scale[:, None]): axis -3 of x (its batch) must equal "
                               f"emb's batch, or one of them be 1") from None
        try:
            emb = linear(self.silu(emb))
        except RuntimeError as error:  # (only a refused call: torch's words, then the dtypes and the fix)
            if isinstance(emb, Tensor) and not torch.compiler.is_compiling():  # (Dynamo sets no exception's args)
                from normlab.torch.advice import advise

                advise(self, emb, error, "emb", linear)
            raise
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        block = self._block_for(len(shape))
        x_broadcasts = _shapes_differ(shape, x.shape)
        emb_broadcasts = _shapes_differ(shape[-3:-2], scale_msa.shape[:1])
        if ((x_broadcasts or emb_broadcasts) and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and not _use_kernels(x, None, None, None, None, scale_msa, shift_msa)):
            # torch's operations (half precision): diffusers' broadcasting as it is, so that
            # autograd sums a broadcast gradient once, in the input's dtype, where it sums it (the
            # modulation's over x's batch before the linear, x's over emb's before the norm);
            # expanded views would round each batch's part first, and sum the rounded parts
            y = fused_normalize(x, replace(block, broadcasts=True), scale=scale_msa, shift=shift_msa)
            return y, gate_msa, shift_mlp, scale_mlp, gate_mlp
        if x_broadcasts:  # (expanded views: autograd sums the gradients of a broadcast input;
            x = x.expand(shape)             # only where one broadcasts, so that a traced graph keeps its sizes)
        if emb_broadcasts:
            scale_msa, shift_msa = (t.expand(shape[-3], self.embedding_dim) for t in (scale_msa, shift_msa))
        y = fused_normalize(x, block, scale=scale_msa, shift=shift_msa)
        return y, gate_msa, shift_mlp, scale_mlp, gate_mlp

    def _follow_pruned_linear(self, width: int) -> None:
        """Structured pruning narrows the modulation's ``linear`` (its six chunks, one width
        each) and the input with it, as in diffusers' ``AdaLayerNormZero``, whose forward
        reads no width of its own (its layer norm's ``normalized_shape``, which the pruner sets
        there, has no counterpart here): the width becomes ``linear``'s, and the block is built
        for it."""
        self.embedding_dim = width
        self._block = replace(self._block, sizes=(("d", width),) if width else ())

    def _block_for(self, ndim: int) -> Block:
        """The block for an output of ``ndim`` axes: "b t [d]", or leading axes before it."""
        if ndim == 3:
            return self._block
        return replace(self._block, pattern=" ".join(f"a{i}" for i in range(ndim - 3)) + " b t [d]")
