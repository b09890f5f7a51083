"""``mask=`` in the forward of every ``normlab.torch`` module (and ``segment_ids=`` in
:class:`~normlab.torch.Norm`): statistics, and running statistics, from the counted
elements alone; every element normalized. Evaluation with running statistics ignores the
mask (the statistics are given)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from normlab.masked import missing_axes_fix
from normlab.torch.compute import _channels_message, _fake, _statistics_update
from normlab.plan import merge_sizes
from normlab.torch.masked import SEGMENTS_DO_NOT_EXPORT, _run_masked
from normlab.torch.ops import _vmapping
from normlab.torch.paths import _exporting_to_onnx, _holds_expanded_weights, expanded_weights_refusal
from normlab.torch.spec import Spec, elementwise_layout, rms_default_eps, sizes
from normlab.torch.thread_warnings import ignored_in_this_thread

__all__ = ["masked_forward"]


def _variance(rstd: Tensor, eps: float) -> Tensor:
    """The biased variance back from rstd (float64), 0 for a group with nothing counted."""
    return torch.where(rstd > 0, rstd.pow(-2) - eps, 0).clamp_min(0)


def _unbiased(rstd: Tensor, count: Tensor, eps: float) -> Tensor:
    """``n/(n − 1)·var`` with each group's count (``n − 1`` at least 1)."""
    return _variance(rstd, eps) * count / (count - 1).clamp_min(1)


def _check_counts(module, x: Tensor, count: Tensor, allow_empty: bool = False,
                  more: str = "count more elements in the mask") -> None:
    """torch's rule, counted: more than one value per channel when training. With
    ``allow_empty`` (batch norm, as SyncBatchNorm) a channel with nothing counted is no
    error: it gives exactly ``bias`` and keeps its running statistics."""
    if torch.compiler.is_compiling() or _vmapping() or _fake(count):
        # a data-dependent branch: export and vmap cannot take it, compile would break, and
        # shape propagation (FakeTensorMode) has no values to read
        return
    refused = count == 1 if allow_empty else count <= 1
    if count.numel() and bool(refused.any()):
        raise ValueError(f"{type(module).__name__}: expected more than 1 counted value per channel when training, "
                         f"got input size {tuple(x.shape)} with {int(count[refused].min())} counted in a channel; "
                         + (f"{more} or call .eval()" if module.training and module.running_mean is not None else
                            f"{more} (without running statistics eval() normalizes with the batch's own)"))


def _update(module, mean: Tensor, var: Tensor, factor: float, counted: Optional[Tensor] = None) -> None:
    """The momentum update; entries where ``counted`` is False keep their running statistics."""
    with _statistics_update(module.running_mean, module.running_var):
        for running, batch in ((module.running_mean, mean), (module.running_var, var)):
            updated = running * (1 - factor) + batch.detach().to(running.dtype) * factor
            running.copy_(updated if counted is None else torch.where(counted, updated, running))


def _check_mask(module, x: Tensor, mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{type(module).__name__}: mask must be a bool tensor that broadcasts to the input "
                        f"{sizes(x.shape)}, got {getattr(mask, 'dtype', type(mask).__name__)}; pass mask.bool()")
    # (a mask may not add axes or widen them; compared size by size, not by torch.broadcast_shapes,
    # whose error a strict torch.export raises as its own where this one's message belongs)
    if torch._C._get_tracing_state() is None:
        fits = mask.dim() <= x.dim()
        for m, n in zip(mask.shape[::-1], x.shape[::-1]):
            if m != 1 and m != n:
                fits = False
    else:  # (torch.jit.trace: sizes are traced tensors, each comparison a TracerWarning; checked on their values)
        with ignored_in_this_thread(torch.jit.TracerWarning):
            fits = mask.dim() <= x.dim() and all(int(m) in (1, int(n)) for m, n in zip(mask.shape[::-1],
                                                                                   x.shape[::-1]))
    if not fits:
        from normlab.torch.modules import PatternShapeError  # (modules imports this module)

        spec = getattr(module, "_spec", None)
        pattern = f"pattern {spec.pattern!r}, " if spec is not None else ""
        # (one f-string: compiled with dynamic shapes, Dynamo cannot add a formatted string to another)
        shape, mask_shape = sizes(x.shape), sizes(mask.shape)
        raise PatternShapeError(f"{type(module).__name__} ({pattern}input shape {shape}): mask of shape {mask_shape} "
                                "does not broadcast to the input; give it the input's shape or size-1 axes"
                                f"{missing_axes_fix(mask_shape, shape)}")
    if mask.device != x.device:
        raise RuntimeError(f"{type(module).__name__}: mask is on {mask.device}, the input on {x.device}; "
                           "put them on the same device")
    return mask


def _refused_mix(module, x: Tensor) -> bool:
    """An input dtype or a mix that torch.nn's CPU kernels refuse: an integer, bool or
    complex input ("not implemented for 'Long'"; the masked math would compute one),
    parameters or running statistics in a dtype beside the input's ("mixed dtype"), or
    running statistics that require grad, as functional_call may hand them in (torch's
    batch norm op is not differentiable in them); torch.nn.RMSNorm computes any mix of
    floating dtypes, as its twin does."""
    from normlab.torch.compute import _dtypes_refused, _needs_grad

    if not isinstance(module, _TORCH_NORMS + (nn.RMSNorm,)):
        return False
    if not x.is_floating_point():
        return True
    if isinstance(module, nn.RMSNorm):
        return False
    running = (getattr(module, "running_mean", None), getattr(module, "running_var", None))
    return (_dtypes_refused(x, getattr(module, "weight", None), getattr(module, "bias", None), *running)
            # (layer and group norm have no running statistics: no call for them on every step)
            or (running[0] is not None or running[1] is not None) and _needs_grad(*running))


def _refuse_misfit(module, x: Tensor, mask: Tensor) -> Optional[Tensor]:
    """Raise, as a RuntimeError (and ValueError) that gives torch.nn's words for the input
    first and then names the shape the module expects, the input's and the fix, where
    torch.nn's module refuses the input's shape: a batch or instance norm's channels on axis
    1 other than its ``num_features`` (where it has a weight or running statistics of that
    size), a group norm's other than its ``num_channels`` (where it has parameters, or its
    groups do not divide them), a layer or RMS norm's trailing axes other than its
    ``normalized_shape``. The masked statistics would fail later, naming the pattern's inner
    axes and arguments the module does not take (``pass n0=4``, ``change params``). An empty
    input has nothing to count: it gets the unmasked forward's output (torch.nn's output, state
    and error for it: a batch norm's takes any channels, as torch's op returns before it reads
    them; an instance norm's running statistics average over no samples), returned; None otherwise."""
    if torch._C._get_tracing_state() is not None:  # (sizes are traced tensors: torch's ops check them)
        return None
    if (not torch.compiler.is_compiling() and x.numel() == 0
            and isinstance(module, _TORCH_NORMS + (nn.RMSNorm,))):
        return module.forward(x)
    name = type(module).__name__
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        module._check_input_dim(x)  # (torch.nn's ValueError for the wrong number of axes)
        instance = isinstance(module, nn.modules.instancenorm._InstanceNorm)
        channel_axis = x.dim() - module._get_no_batch_dim() if instance else 1  # (0: an unbatched instance norm)
        sized = (module.weight is not None or module.bias is not None or module.running_mean is not None
                 or module.running_var is not None)
        if sized and channel_axis == 1 and x.shape[1] != module.num_features:
            # (torch.nn's forward, which gives its words, counts a batch norm's batch before its op refuses the
            # channels, as torch.nn's call does eagerly; compiled, neither counts it)
            lead = f"{name} with mask= of shape {sizes(mask.shape)}"
            raise _misfit(_channels_message(module, x, lead), _torch_refusal(module, x))
        if sized and channel_axis == 0 and x.shape[0] != module.num_features:
            channels = module.num_features
            raise _misfit(f"{name}({channels}) with mask= normalizes {channels} channels on axis 0 of an unbatched "
                          f"input: expected input of shape {(channels, *sizes(x.shape)[1:])}, but got input of shape "
                          f"{sizes(x.shape)}; pass {channels} channels on axis 0", _torch_refusal(module, x))
    elif isinstance(module, nn.GroupNorm) and (x.dim() < 2 or x.shape[1] != module.num_channels and (
            # (without parameters torch.nn's group norm takes any channels its groups divide)
            module.weight is not None or module.bias is not None or x.shape[1] % module.num_groups)):
        groups, channels = module.num_groups, module.num_channels
        fix = f"pass {channels} channels on axis 1"
        if x.dim() >= 2 and x.shape[1] % groups == 0:
            got = sizes(x.shape)[1]
            fix += f", or build GroupNorm({groups}, {got}) for {got} channels"
        raise _misfit(f"{name}({groups}, {channels}) with mask= of shape {sizes(mask.shape)} normalizes {channels} "
                      f"channels on axis 1: expected input of shape (N, {channels}, *), but got input of shape "
                      f"{sizes(x.shape)}; {fix}", _torch_refusal(module, x))
    elif (isinstance(module, (nn.LayerNorm, nn.RMSNorm))
          # (LayerNorm2d and its kin are torch.nn.LayerNorms over axis 1: their forward checks that)
          and getattr(getattr(module, "_spec", None), "pattern", "").endswith("]")):
        shape = tuple(module.normalized_shape)
        if tuple(x.shape[max(x.dim() - len(shape), 0):]) != shape:
            given = ", ".join(map(str, shape))
            raise _misfit(
                f"{name} with mask= of shape {sizes(mask.shape)}: given normalized_shape={list(shape)}, expected "
                f"input with shape [*, {given}], but got input of size {list(sizes(x.shape))}; give the input "
                f"{shape} as its last {'axis' if len(shape) == 1 else f'{len(shape)} axes'}, or build the module "
                f"with normalized_shape={sizes(x.shape)[-len(shape):] if x.dim() >= len(shape) else '...'}",
                _torch_refusal(module, x))


def _torch_refusal(module, x: Tensor) -> Optional[str]:
    """torch.nn's words for refusing ``x``: its forward, without a mask, run on the error path
    alone (a batch norm's counts the batch there, as torch.nn's does before its op refuses),
    or None where it takes ``x``. Compiled, where that forward would break the graph, the
    words come from :func:`_torch_words` at trace time, and no batch is counted, as compiled
    torch.nn counts none."""
    forward = getattr(module, "_torch_forward", None)
    if forward is None:
        return None
    if torch.compiler.is_compiling():
        return _torch_words(module, sizes(x.shape), x.dtype, x.device)
    try:
        forward(x)
    except (RuntimeError, ValueError) as error:
        return str(error)
    return None


def _torch_words(module, shape: tuple, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """torch.nn's words for refusing an input of ``shape``, ``dtype`` and ``device``: its
    forward run on a stand-in of the module holding copies of its parameters and buffers
    (nothing of the module's changes, a batch norm's count included) and on zeros of that
    shape, one element expanded (no copy of the input's size). None where it takes such an
    input."""
    stand_in = type(module).__new__(type(module))
    stand_in.__dict__.update(module.__dict__)
    stand_in._parameters = {k: None if p is None else p.detach().clone() for k, p in module._parameters.items()}
    stand_in._buffers = {k: None if b is None else b.detach().clone() for k, b in module._buffers.items()}
    try:
        with torch.no_grad():
            stand_in._torch_forward(torch.zeros((), dtype=dtype, device=device).expand(shape))
    except (RuntimeError, ValueError) as error:
        return str(error)
    return None


# Dynamo calls it while tracing, with the module and the sizes as they are, and keeps its answer:
# the message, built from the shapes, joins the graph as a constant (traced into, torch.nn's
# forward broke the graph). What torch.compiler.assume_constant_result sets, without importing Dynamo.
_torch_words._dynamo_marked_constant = True


def _misfit(message: str, torch_words: Optional[str] = None) -> Exception:
    from normlab.torch.modules import PatternShapeError  # (a RuntimeError and a ValueError; imports this module)

    if torch_words:  # (torch's words first, as users match them)
        message = f"{torch_words}{' ' if torch_words.endswith('.') else ': '}{message}"
    return PatternShapeError(message)


_TORCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm)


def masked_forward(module, x: Tensor, mask: Optional[Tensor], segment_ids: Optional[Tensor] = None,
                   num_segments: Optional[int] = None, segment_axis: Optional[str] = None) -> Tensor:
    """The module's forward with a mask (and, for ``Norm``, segments)."""
    from normlab.torch import modules

    try:
        if mask is not None:
            mask = _check_mask(module, x, mask)
        if _refused_mix(module, x):  # the unmasked forward hands it to torch.nn's, which raises its error
            return module.forward(x)
        if mask is not None:
            taken = _refuse_misfit(module, x, mask)
            if taken is not None:  # (an empty input: torch.nn's output for it)
                return taken
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return _unmasked_layout(module, x, _batch_norm(module, x, mask))
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            return _unmasked_layout(module, x, _instance_norm(module, x, mask))
        if isinstance(module, modules.Norm):
            return _norm(module, x, mask, segment_ids, num_segments, segment_axis)
        spec = module._spec
        eps = module.eps
        if isinstance(module, nn.RMSNorm) and eps is None:
            eps = rms_default_eps(x.dtype)
        casting = getattr(module, "casting", None) if isinstance(module, nn.RMSNorm) else None
        if casting is not None:  # x̂ in float32, then the recipe's casts and weight, as its kernel path does
            from normlab.torch.casting import apply_recipe_scale, compute_dtype

            normalized = _masked(module, x.to(compute_dtype(x.dtype)), spec.pattern, None, None, None, eps, True,
                                 mask, spec.size_dict).y
            weight = module.weight
            if (weight is None or mask is None
                    or not (weight.requires_grad and torch.is_grad_enabled()) and not _capturing()):
                return _unmasked_layout(module, x, apply_recipe_scale(x, normalized, weight, casting,
                                                                      module.weight_offset))
            # an uncounted x̂ that is NaN or ±Inf (garbage in the padding) is weighed by the detached
            # weight: its 0·NaN would make the weight's gradient NaN (normlab.masked). Where no
            # gradient can reach the weight, the one product above has the same bits. (That is a
            # property of the graph, which torch.compile guards, unlike the padding's values; a
            # jit.trace or torch.export records the graph for later training, whatever the grad
            # mode it ran in.)
            kept = torch.isfinite(normalized).logical_or_(mask)
            counted = apply_recipe_scale(x, torch.where(kept, normalized, 0), weight, casting, module.weight_offset)
            confined = apply_recipe_scale(x, normalized, weight.detach(), casting, module.weight_offset)
            return _unmasked_layout(module, x, torch.where(kept, counted, confined))
        weight = module.weight
        if weight is not None and getattr(module, "weight_offset", 0.0):
            weight = weight + module.weight_offset
        # torch.nn's layer norms read their bias as an attribute: del norm.bias raises there, and
        # so here, as the twins' calls without mask= do (torch.nn's RMSNorm has none, Norm its own rule)
        # (an RMS norm's bias, BiasedRMSNorm's, is added by its own forward after the norm)
        bias = (module.bias if isinstance(module, nn.LayerNorm) else None if isinstance(module, nn.RMSNorm)
                else getattr(module, "bias", None))
        y = _masked(module, x, spec.pattern, weight, bias, spec.params, eps, spec.rms, mask, spec.size_dict).y
        return _unmasked_layout(module, x, y)

    except RuntimeError:
        if _holds_expanded_weights(module):
            raise expanded_weights_refusal(module, " with mask=" if segment_ids is None else
                                           " with mask= or segment_ids=") from None
        raise


def _capturing() -> bool:
    """True while ``torch.jit.trace`` or ``torch.export`` records a graph, which may train later
    whatever grad mode it was recorded in."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def _unmasked_layout(module, x: Tensor, y: Tensor) -> Tensor:
    """``y`` laid out as the module's unmasked forward lays out its output for ``x``, so
    that mask= and eval() do not change it: ``Norm`` keeps any dense permutation of x (a
    transpose, channels_last); the twins do as torch.nn does: batch, group and RMS norm keep
    channels_last input so, every other permuted input gives a contiguous output
    (normalize_masked's is contiguous, the running statistics' follows x's);
    ChannelsFirstLayerNorm keeps x's order of strides, as its originals' elementwise
    operations do (:func:`~normlab.torch.spec.elementwise_layout`); LayerNorm2d's is
    channels_last for any input, as its originals' permutes make it."""
    channels_last_output, contiguous = getattr(module, "_channels_last_output", False), x.is_contiguous()
    if contiguous and not channels_last_output:  # (first: the common call ends here, in two calls)
        return y
    if torch._C._are_functorch_transforms_active():  # (see spec.torch_layout)
        return y
    if channels_last_output and x.dim() == 4:
        return y.contiguous(memory_format=torch.channels_last)
    if contiguous:
        return y
    from normlab.torch.modules import ChannelsFirstLayerNorm, LayerNorm2d, Norm

    if isinstance(module, Norm):  # (empty_like keeps a dense x's strides; sorting them breaks torch.compile)
        return torch.empty_like(x, dtype=y.dtype).copy_(y)
    if isinstance(module, ChannelsFirstLayerNorm) and not torch.compiler.is_compiling():
        return elementwise_layout(y, x)
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    keeps = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.RMSNorm, LayerNorm2d,
                                ChannelsFirstLayerNorm))  # (the last one compiled)
    if keeps and channels_last is not None and x.is_contiguous(memory_format=channels_last):
        return y.contiguous(memory_format=channels_last)
    return y.contiguous()


def _masked(module, x: Tensor, pattern: str, weight, bias, params, eps: float, rms: bool, mask: Tensor, sizes=None):
    """``normalize_masked(x, pattern, ...)`` as the twin ``module``'s call, which torch's profiler
    lists under its name (``normlab::layer_norm``), as its calls without ``mask=``."""
    spec = Spec.build(pattern, params, rms, **merge_sizes(pattern, sizes, {}, x.shape))
    return _run_masked(x, spec, weight, bias, eps, mask, module=module)


def _batch_norm(module, x: Tensor, mask: Tensor) -> Tensor:
    from normlab.torch.compute import _apply_stats, _average_factor, _channel_shape

    module._check_input_dim(x)
    factor = _average_factor(module)
    if not (module.training or (module.running_mean is None and module.running_var is None)):
        return _apply_stats(x, module.running_mean, module.running_var, module.weight, module.bias, module.eps,
                            _channel_shape(x))
    channels = x.shape[1]

    def update(mean: Tensor, rstd: Tensor, count: Tensor) -> None:
        _check_counts(module, x, count, allow_empty=True)  # (wherever batch statistics are used, eval() included)
        if module.training and module.track_running_stats and module.running_mean is not None:
            _update(module, mean.reshape(channels), _unbiased(rstd, count, module.eps).reshape(channels), factor,
                    counted=count.reshape(channels) > 0)

    spec = Spec.build("[b] c [...]", None if module.weight is None else "c")
    return _run_masked(x, spec, module.weight, module.bias, module.eps, mask, then=update, module=module).y


def _instance_norm(module, x: Tensor, mask: Tensor) -> Tensor:
    from normlab.torch.compute import _apply_stats, _channel_shape

    module._check_input_dim(x)
    unbatched = x.dim() == module._get_no_batch_dim()
    if unbatched:
        x = x.unsqueeze(0)
        mask = mask.unsqueeze(0) if mask.dim() == x.dim() else mask
    if module.training or not module.track_running_stats:
        batch, channels = x.shape[:2]
        y, mean, rstd, count = _masked(module, x, "b c [...]", module.weight, module.bias,
                                       None if module.weight is None else "c", module.eps, False, mask)
        # torch's rule on each sample with its padding removed: more than one spatial element
        # (an all-padding sample has no statistics, as in batch norm)
        _check_counts(module, x, count, allow_empty=True, more="count more than one position of each sample")
        if module.running_mean is not None:  # (in evaluation too: torch's instance_norm updates any it is given)
            # (after the op, as torch's instance_norm copies its statistics back after its batch_norm
            # saves for backward: a checkpoint's recomputation that stops there skips the update in both)
            factor = 0.0 if module.momentum is None else module.momentum
            # the mean over the samples with something counted: an all-padding sample has no statistics
            counted = (count > 0).reshape(batch, channels)
            samples = counted.sum(0)
            average = [torch.where(counted, stat.reshape(batch, channels), 0).sum(0) / samples.clamp_min(1)
                       for stat in (mean, _unbiased(rstd, count, module.eps))]
            _update(module, *average, factor, counted=samples > 0)
    else:
        y = _apply_stats(x, module.running_mean, module.running_var, module.weight, module.bias, module.eps,
                         _channel_shape(x))
    return y.squeeze(0) if unbatched else y


def _norm(module, x: Tensor, mask, segment_ids, num_segments, segment_axis) -> Tensor:
    from normlab.torch.compute import _average_factor

    spec = module._spec
    if not (module.training or not module.track_running_stats):
        return module.forward(x)  # running statistics are given: the mask changes nothing (and exports)
    if segment_ids is not None and _exporting_to_onnx():
        raise RuntimeError(f"{type(module).__name__}({spec.pattern!r}): " + SEGMENTS_DO_NOT_EXPORT)
    factor = _average_factor(module) if module.track_running_stats else 0.0

    def update(mean: Tensor, rstd: Tensor, count: Tensor) -> None:
        if not (module.training and module.track_running_stats):
            return
        # a group with nothing counted (an empty graph slot of a batch, an all-padding
        # sequence) has no statistics: it gives bias and stays out of the running average
        _check_counts(module, x, count, allow_empty=True,
                      more=("count more elements in the mask" if segment_ids is None else
                            "give every non-empty segment more than one counted element"))
        plan = spec.plan(x.shape)
        # average over every statistics axis the running statistics do not span (segments too)
        other = tuple(i for i, name in enumerate(plan.axis_names) if name not in module._running_names)
        # (RMS: a mean square about 0 estimates E[x²] as it is; no mean was estimated)
        var = _variance(rstd, module.eps) if spec.rms else _unbiased(rstd, count, module.eps)
        counted = count > 0
        if other:
            groups = counted.sum(dim=other, keepdim=True)
            mean, var = ((torch.where(counted, stat, 0).sum(dim=other, keepdim=True) / groups.clamp_min(1))
                         for stat in (mean, var))
            counted = groups > 0
        _update(module, mean.reshape(module.running_mean.shape), var.reshape(module.running_var.shape), factor,
                counted=counted.reshape(module.running_mean.shape))

    y = _run_masked(x, spec, module.weight, module.bias, module.eps, mask, segment_ids, num_segments, segment_axis,
                    then=update, module=module).y
    return _unmasked_layout(module, x, y)
