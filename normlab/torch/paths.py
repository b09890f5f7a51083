"""Which path a forward takes: the kernels, torch's own op, or the composite in torch ops."""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.autograd import profiler as _profiler

from normlab.errors import InputError

# the module of the flag torch.onnx.is_in_onnx_export() reads for the dynamo exporter (see _exporting_to_onnx)
_ONNX_FLAGS = "torch.onnx._internal.exporter._flags"

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

    >>> from normlab.torch import LayerNorm
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


def _needs_torch_ops(x) -> bool:
    """True where the NumPy kernels cannot run and torch's own operations must: an fx
    ``Proxy``, ``torch.jit.trace`` (and the TorchScript ONNX exporter), ``torch.compile``
    and ``torch.export`` (Inductor then fuses torch's decomposition with its neighbours, and
    the ONNX exporter finds its standard ops), functorch transforms (``vmap``, ``grad``,
    ``jacrev``, ``jvp``, ``jacfwd``), forward-mode AD (dual tensors), layouts other than
    strided (sparse, MKL-DNN), which have no memory for NumPy to see, nested tensors of the
    strided layout (rows of several shapes in one buffer: no one shape to plan), and lazily
    negated views (``z.conj().imag``), which NumPy would read unnegated, and DTensors
    (tensor parallelism's ``SequenceParallel`` shards a norm's input and replicates its
    weights), whose ops need a sharding rule that normlab's custom op has not: torch then
    computes what it supports (an MKL-DNN batch norm, a negated view, a nested tensor's
    layer norm, a sharded one) and raises its own error otherwise."""
    return (not isinstance(x, Tensor) or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
            or x.layout is not torch.strided or x.is_nested
            or x.is_neg()  # (Dynamo cannot trace is_neg: after is_compiling)
            or (type(x) is not Tensor and _is_dtensor(x)))


def _is_dtensor(x: Tensor) -> bool:
    distributed = sys.modules.get("torch.distributed.tensor")  # (not imported: no DTensor exists, and no import costs)
    return distributed is not None and isinstance(x, distributed.DTensor)


# where torch keeps ExpandedWeight (imported with Dynamo: by torch.compile and DDP's constructor)
EXPANDED_WEIGHTS_MODULE = "torch.nn.utils._expanded_weights.expanded_weights_impl"
# a parameter (or an input) that is no tensor subclass, or absent: the kernels' paths read these
# through NumPy; a subclass (a __torch_function__ class, DTensor, ExpandedWeight) takes torch's
# ops. A twin whose weight and bias are of these looks for ExpandedWeights no further
PLAIN_PARAMETERS = (torch.nn.Parameter, Tensor, type(None))


def _holds_expanded_weights(module) -> bool:
    """True where a parameter of ``module`` is an ``ExpandedWeight``: torch's per-sample
    gradients (``call_for_per_sample_grads``, Opacus' ``grad_sample_mode="ew"``) put these in
    through ``functional_call``, and they take torch's own functions that they compute
    per-sample gradients for (``F.layer_norm``, ``group_norm``, ``instance_norm``) and raise
    on any other, a read of ``requires_grad`` included: the twin runs torch.nn's forward."""
    impl = sys.modules.get(EXPANDED_WEIGHTS_MODULE)
    return impl is not None and any(type(t) is impl.ExpandedWeight for t in module._parameters.values())


def expanded_weights_refusal(module, inputs: str = "") -> RuntimeError:
    """The error for ``module`` (called with ``inputs``, as " with mask=") under torch's
    ExpandedWeights, whose own error names a function inside normlab that the user never called."""
    name = type(module).__name__
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):  # (Opacus' validator refuses it in every mode)
        advice = ("A batch norm's outputs mix the samples of a batch, so no mode gives it per-sample gradients: "
                  "Opacus' ModuleValidator.fix(model) replaces it (by GroupNorm)")
    else:
        advice = ("Use Opacus' grad_sample_mode=\"hooks\" (its default), \"functorch\" or \"ghost\", where normlab "
                  f"gives Opacus per-sample gradients for {name}")
    return RuntimeError(
        f"{name}{inputs} cannot run under torch's ExpandedWeights (call_for_per_sample_grads, Opacus' "
        'grad_sample_mode="ew"): they compute per-sample gradients only for the torch functions they know '
        f"(F.layer_norm, F.group_norm and F.instance_norm among the norms). {advice}")


def _exporting_to_onnx() -> bool:
    """``torch.onnx.is_in_onnx_export()``, also where the dynamo exporter captures the model
    with ``torch.export.export(strict=True)`` (which it tries after the non-strict capture
    raised): Dynamo reads that function as False, and the flag it returns as it is. False
    while ``torch.onnx`` is not imported: no export can run, and ``import normlab.torch``
    leaves it out (0.2 s)."""
    onnx = sys.modules.get("torch.onnx")
    if onnx is None:
        return False
    return onnx.is_in_onnx_export() or bool(getattr(sys.modules.get(_ONNX_FLAGS), "_is_onnx_exporting", False))


# Dynamo calls it while tracing and keeps the answer, with no guard: traced into, its reads of
# sys.modules guarded the module count, so any import between two calls (the first backward's
# own) recompiled the frame. What torch.compiler.assume_constant_result sets, without importing Dynamo.
_exporting_to_onnx._dynamo_marked_constant = True


def _choose_path(x: Tensor, has_native: bool) -> str:
    forced = _PathSwitch.path
    if _needs_torch_ops(x) and not (forced == "kernel" and torch.compiler.is_compiling() and not _exporting_to_onnx()):
        # a forced kernel under compile stays the registered custom op, which has a fake kernel
        # (not exported to ONNX, which has no normlab op: torch's ops, as the TorchScript exporter records)
        if forward_ad._current_level >= 0 and forced != "native":
            # forward-mode AD: torch's layer_norm and batch_norm give the right tangent, but a
            # backward through that tangent is wrong (pytorch#196700); the composite's is right
            return "composite"
        return "native" if has_native and forced != "composite" else "composite"
    if forced == "kernel" and x.device.type == "cpu":
        return "kernel"
    if forced == "composite" or (forced == "native" and not has_native):
        return "composite"
    if forced == "native":
        return "native"
    if has_native and x.numel() == 0:
        return "native"  # nothing to compute: torch's op says what an empty input gives
    if x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES:
        return "kernel"
    return "native" if has_native else "composite"


# A forward alone of FusedAddRMSNorm below this many float32/float64 elements (a decoding
# step's token, a small batch) runs as torch's ``rms_norm``: there a kernel call's Python
# (about 40 µs: autograd, the tables, Numba's dispatch) outweighs the work. Measured on a 2-core AMD
# EPYC, rows of 1024: torch's operations took 0.37-0.52x the kernel path's time from 2^10
# to 2^17 elements, 3.2x from 2^18, where their temporaries fault pages in.
SMALL_FORWARD_BELOW = 1 << 18
# torch reduces one row of fewer elements on one thread (its grain size); a longer one it
# splits among threads, whose count would then change the bits
_ONE_THREAD_ROW = 1 << 15


def _small_forward_fits(x, weight, below: Optional[int] = None) -> bool:
    """Whether an RMS norm of ``x`` over ``weight``'s shape is a small call that autograd
    does not record, on CPU with the weight's dtype, which torch's operations run faster
    than a kernel call (``below``: the size limit, :data:`SMALL_FORWARD_BELOW` by default)."""
    # (torch's operations first: compiled or exported, the size check would be a guard on the
    # batch, which a dynamic batch fails, and a graph per side of the limit)
    return (type(x) is Tensor and weight is not None and not _needs_torch_ops(x) and weight.dtype == x.dtype
            and x.device.type == "cpu" and x.numel() < (SMALL_FORWARD_BELOW if below is None else below)
            and weight.numel() < _ONE_THREAD_ROW
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and x.shape[x.dim() - weight.dim():] == weight.shape)


def profiled(module, run, *args):
    """``run(*args)`` inside one ``record_function`` range named as torch.nn's op is
    (``normlab::layer_norm`` beside ``aten::layer_norm``; the module's ``_profile_name``), so
    that the kernels' time shows in ``prof.key_averages()``, also on the no-grad paths, which
    call no torch op. The kernel paths call it where ``_profiler._is_profiler_enabled`` (an
    attribute read, no call) is set, past their checks for tracing and compilation: a compiled
    graph that read the flag would be compiled again whenever a profiler starts. The
    Function's backward (:func:`profiled_backward`) takes the name with ``_backward``."""
    name = getattr(module, "_profile_name", None) or getattr(_naming, "name", None) or "normlab::normalize"
    with torch.autograd.profiler.record_function(name):
        output = run(*args)
    # the backward of normlab's autograd Functions is one range too, named after this one's
    # (normlab::layer_norm_backward beside torch.nn's aten::native_layer_norm_backward): their
    # node is the Function's context, which reads the name there only while a profiler runs
    node = (output[0] if type(output) is tuple else output).grad_fn if output is not None else None
    if node is not None and getattr(type(node), "_forward_cls", object).__module__.startswith("normlab."):
        node.profile_name = name + "_backward"
    return output


class _BackwardRange:
    """The ``record_function`` range of a backward in torch operations (a casting recipe's):
    entered by a hook on the nodes of the recipe's outputs, the first of its backward to run,
    left by :class:`_ExitBackwardRange` on its inputs, the last."""

    __slots__ = ("name", "handle")

    def __init__(self, name: str) -> None:
        self.name, self.handle = name, None  # (a handle dropped unexited, as by a failed backward, ends its range)

    def enter(self, grad_outputs) -> None:
        if self.handle is None and not torch.compiler.is_dynamo_compiling():  # (compiled autograd traces no range)
            self.handle = torch.ops.profiler._record_function_enter_new(self.name, None)


class _ExitBackwardRange(torch.autograd.Function):
    """Identity on the recipe's inputs, whose backward (run once all their gradients are in:
    the last of the recipe's) leaves the range."""

    @staticmethod
    def forward(ctx, span, *inputs):
        ctx.span = span
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in inputs)

    @staticmethod
    def backward(ctx, *grads):
        span = ctx.span
        if span.handle is not None:
            torch.ops.profiler._record_function_exit._RecordFunction(span.handle)
            span.handle = None
        return (None, *grads)


def _bracketable(args) -> list:
    """The positions in ``args`` of the tensors whose gradients a backward range ends at, or
    an empty list where the call records no backward, or where an identity Function would
    change what the recipe's torch operations do: functorch transforms and forward-mode AD
    (which a Function needs rules for), tensor subclasses (DTensor, ExpandedWeight)."""
    if not torch.is_grad_enabled() or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return []
    tensors = [i for i, t in enumerate(args) if isinstance(t, Tensor)]
    if any(type(args[i]) not in PLAIN_PARAMETERS for i in tensors):
        return []
    return [i for i in tensors if args[i].requires_grad]


def profiled_torch_ops(module, run, *args):
    """:func:`profiled` of ``run(*args)``, torch operations whose backward is torch's autograd
    steps (``PowBackward0``, ``MeanBackward1``, ...): that backward is one range too, named
    as the kernels' Function's (``normlab::rms_norm_backward``): from a hook on the outputs'
    nodes to an identity Function on the tensors of ``args`` that require gradients (every
    tensor ``run`` differentiates must be among them). Called only while a profiler runs,
    outside compilation and tracing."""
    positions = _bracketable(args)
    if not positions:
        return profiled(module, run, *args)
    name = getattr(module, "_profile_name", None) or getattr(_naming, "name", None) or "normlab::normalize"
    span = _BackwardRange(name + "_backward")
    args = list(args)
    for i, t in zip(positions, _ExitBackwardRange.apply(span, *(args[i] for i in positions))):
        args[i] = t
    output = profiled(module, run, *args)
    # (a hook, not a Function: its outputs would be views, which a user may not change in place)
    for node in {t.grad_fn for t in (output if type(output) is tuple else (output,)) if isinstance(t, Tensor)}:
        if node is not None:
            node.register_prehook(span.enter)
    return output


def profiled_recipe(module, recipe, *args):
    """``recipe(*args)``, a model family's torch operations (a casting recipe: ``aten::pow``,
    ``aten::mean``, ``aten::rsqrt``, ... and no norm op), inside :func:`profiled`'s one range
    (``normlab::rms_norm`` for a converted ``LlamaRMSNorm``, beside torch.nn.RMSNorm's
    ``aten::rms_norm``), so that the call shows under one name in ``prof.key_averages()``,
    as on the kernels. The recipe twins call it where ``_profiler._is_profiler_enabled`` is
    set, read after ``torch.compiler.is_dynamo_compiling()`` (one call, which Dynamo reads
    as True: a compiled graph that read the flag would be compiled again whenever a
    profiler starts); compiled, exported or traced, the recipe runs alone."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return recipe(*args)
    return profiled_torch_ops(module, recipe, *args)


_naming = threading.local()  # the name profile_name gives the functional calls of a twin that is not _Twin


@contextlib.contextmanager
def profile_name(name: str):
    """Name :func:`profiled`'s ranges of the functional calls (``normalize``,
    ``normalize_masked``, which take no module) inside: the PyG twins call those, and show as
    ``normlab::layer_norm`` rather than ``normlab::normalize``. Entered only while a profiler runs."""
    previous, _naming.name = getattr(_naming, "name", None), name
    try:
        yield
    finally:
        _naming.name = previous


def profiled_backward(ctx, backward, *grads):
    """``backward(ctx, *grads, True)`` inside one ``record_function`` range named as the
    forward's with ``_backward`` (``normlab::layer_norm_backward``), which :func:`profiled`
    left on ``ctx``; ``normlab::normalize_backward`` where the forward ran with no profiler.
    The backward of normlab's autograd Functions calls it where a profiler runs, past its
    check for compiled autograd."""
    with torch.autograd.profiler.record_function(getattr(ctx, "profile_name", "normlab::normalize_backward")):
        return backward(ctx, *grads, True)


def warn_if_fx_quantizing(module, tracer, proxy=None) -> None:
    """Warn where ``tracer`` is FX graph mode quantization's (``prepare_fx``, ``prepare_qat_fx``),
    or torch.fx's own tracer called by ``fuse_fx``: each matches torch.nn's exact classes and
    leaves ``module``, a twin, unfused (unobserved and in float). Also where
    ``torch.fx.experimental.optimization.fuse`` traces a batch norm twin whose input
    (``proxy``) is a convolution's or linear layer's output, which it would have folded."""
    if type(tracer).__module__.startswith("torch.ao.quantization."):
        tool = "prepare_fx or prepare_qat_fx"
    elif _on_stack("torch.ao.quantization.quantize_fx", "fuse_fx"):
        tool = "fuse_fx"
    else:
        if _on_stack("torch.fx.experimental.optimization", "fuse") and _folded_by_fx_fuse(module, tracer, proxy):
            warnings.warn(f"torch.fx.experimental.optimization.fuse leaves normlab's {type(module).__name__} unfused, "
                          "as it matches torch.nn's exact classes: fuse with torch.ao.quantization.fuse_modules, "
                          "which folds normlab's batch norms, or call normlab.torch.unconvert(model) first, which "
                          "gives back torch.nn's classes", UserWarning, stacklevel=2)
        return
    warnings.warn(f"FX graph mode quantization leaves normlab's {type(module).__name__} unfused and in float, as "
                  f"it matches torch.nn's exact classes: call normlab.torch.unconvert(model) before {tool}, "
                  "which gives back torch.nn's classes", UserWarning, stacklevel=2)


def _on_stack(module_name: str, function_name: str) -> bool:
    """Whether the function (of a module already imported) is on the stack: the fx fusers
    trace with ``torch.fx.symbolic_trace``, whose tracer says nothing of who called it."""
    code = getattr(getattr(sys.modules.get(module_name), function_name, None), "__code__", None)
    frame = sys._getframe(1)
    while code is not None and frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _folded_by_fx_fuse(module, tracer, proxy) -> bool:
    """Whether ``torch.fx.experimental.optimization.fuse`` folds a torch.nn batch norm in
    ``module``'s place: its input is the output of a ``Conv1d``/``2d``/``3d`` or ``Linear``."""
    from torch import nn

    node = getattr(proxy, "node", None)
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or node is None or node.op != "call_module":
        return False
    try:
        producer = tracer.root.get_submodule(node.target)
    except AttributeError:
        return False
    return type(producer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
