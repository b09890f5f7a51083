r"""Fused norm blocks: residual add, gate, modulation and Gemma's weight offset around a norm.

The NumPy math of the epilogues, and the entry points that :func:`normlab.normalize` and
:func:`normlab.normalize_backward` hand over to when one of these options is given. For
one group (all in float64, after the input has been read in its own dtype):

.. math::

    s = x + r\ \text{(rounded to the dtype of x + r: the sum the model carries on)},\qquad
    h = s\cdot\phi(z)\ \text{if the gate comes first, else}\ h = s

    \hat h = (h-\mu)\,\rho,\qquad
    y_0 = \hat h\,(w + o)\,(1 + \text{scale}) + \text{shift} + b,\qquad
    y = y_0\cdot\phi(z)\ \text{if the gate comes last, else}\ y = y_0

with ``μ``, ``ρ`` the statistics of ``h`` as :mod:`normlab.reference` computes them
(shifted two-pass float64, ``rms`` drops ``μ``), ``o`` the ``weight_offset`` (Gemma's
``1 + weight`` is ``o = 1``), ``φ`` the gate activation (``silu``, ``sigmoid`` or
``gelu`` in its erf form) and ``scale``/``shift`` spanning the ``modulation`` axes (the
per-sample ``"b d"`` of AdaLN). ``norm_before_gate=True`` is the gate last, as mamba_ssm's
``RMSNormGated`` defaults to; ``False`` gates ``s`` before the statistics, as Mamba2's block does.

Backward, with ``g`` the gradient of ``y`` and ``g_s`` that of the returned sum:

.. math::

    g_0 = g\,\phi(z),\quad \partial z = g\,y_0\,\phi'(z)\ \text{(gate last)};\qquad
    \gamma = g_0\,(w+o)(1+\text{scale})

    \partial h = \rho\big(\gamma - \overline{\gamma} - \hat h\,\overline{\gamma\hat h}\big),\qquad
    \partial s = \partial h\,\phi(z),\quad \partial z = \partial h\, s\,\phi'(z)\ \text{(gate first)}

    \partial x = \partial r = \partial s + g_s,\quad
    \partial w = \textstyle\sum g_0\hat h(1+\text{scale}),\quad \partial b = \sum g_0,\quad
    \partial\,\text{scale} = \sum g_0\hat h(w+o),\quad \partial\,\text{shift} = \sum g_0

(``rms`` drops :math:`\overline{\gamma}`; each parameter sums over the axes it does not span).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from normlab import reference
from normlab.errors import InputError, NormlabError, ParamsError, PatternSyntaxError, ShapeError
from normlab.plan import Plan, make_plan, merge_sizes

__all__ = ["GATE_ACTIVATIONS", "Epilogue", "FusedGradients", "normalize", "normalize_backward", "activation"]

GATE_ACTIVATIONS = ("silu", "sigmoid", "gelu")


@dataclass(frozen=True)
class Epilogue:
    """What surrounds the norm: which of residual, gate and modulation are present."""

    residual: bool = False
    gate: str | None = None  # the activation's name, None without a gate
    norm_before_gate: bool = True
    weight_offset: float = 0.0
    modulation: str | None = None  # the axes scale and shift span
    has_scale: bool = False
    has_shift: bool = False

    @property
    def gate_first(self) -> bool:
        return self.gate is not None and not self.norm_before_gate

    @property
    def gate_last(self) -> bool:
        return self.gate is not None and self.norm_before_gate


@dataclass(frozen=True)
class FusedGradients:
    """Gradients of a fused :func:`normlab.normalize`, each None where that input was not given,
    except ``bias``: given ``params``, its gradient is there whether or not the bias was passed
    (``normlab.normalize_backward`` needs the bias itself only under a gate after the norm). As in torch
    autograd, each input's gradient has that input's float dtype (the bias's the weight's), else the result's.

    ``x`` and ``residual`` get the sum's gradient unchanged: of one dtype they are the same
    array; of two, each is the sum's gradient rounded to its own.
    """

    x: np.ndarray
    residual: np.ndarray | None = None
    gate: np.ndarray | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None


@dataclass(frozen=True)
class Inputs:
    """Checked fused arguments on the expanded view; parameters in float64 broadcast form."""

    plan: Plan
    mod_plan: Plan | None
    epilogue: Epilogue
    dtype: np.dtype
    x: np.ndarray
    residual: np.ndarray | None
    gate: np.ndarray | None
    weight: np.ndarray | None
    bias: np.ndarray | None
    scale: np.ndarray | None
    shift: np.ndarray | None
    # the dtypes their gradients take, as torch autograd's: each input's own float dtype
    x_dtype: np.dtype | None = None
    residual_dtype: np.dtype | None = None
    gate_dtype: np.dtype | None = None


def wants_fused(residual, gate, weight_offset, scale, shift, modulation) -> bool:
    """True when any fused option is given (core hands the call over to this module)."""
    return (residual is not None or gate is not None or scale is not None or shift is not None
            or modulation is not None or not _no_offset(weight_offset))


def check_gate_options(gate_activation, norm_before_gate, context: str) -> bool:
    """The gate's options checked with or without a gate, so that a typo says so on every
    path (without a gate they change nothing, as ``gate=None`` in the gated norms of
    transformers); ``norm_before_gate`` as a bool. ``context`` opens the message."""
    from normlab import core

    # (an array is no name: `in` would compare it elementwise and ask for its truth value)
    if not isinstance(gate_activation, str) or gate_activation not in GATE_ACTIVATIONS:
        shown = (f"an array of shape {np.shape(gate_activation)}" if isinstance(gate_activation, np.ndarray)
                 else repr(gate_activation))
        raise InputError(f"{context}: gate_activation must be one of {', '.join(GATE_ACTIVATIONS)}, "
                         f"got {shown}; pass one of these names as a str")
    return core._flag(norm_before_gate, "norm_before_gate", context)


def default_gate_options(gate_activation, norm_before_gate) -> bool:
    """Whether the gate's options are their defaults, ``"silu"`` and True, which need no check
    (any other value, an array too, goes to :func:`check_gate_options`)."""
    return norm_before_gate is True and type(gate_activation) is str and gate_activation == "silu"


def _no_offset(weight_offset) -> bool:
    """True for no weight offset: None or a number that is zero (anything else, an array or
    a string too, goes to :func:`prepare`, whose checks explain what is wrong with it)."""
    return weight_offset is None or (isinstance(weight_offset, (int, float, np.integer, np.floating, np.bool_))
                                       and weight_offset == 0)


# ---------------------------------------------------------------------------------------
# Gate activations, float64


def _erf(values: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(values)


def activation(name: str, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(φ(z), φ'(z))`` in float64 for a gate activation.

    >>> phi, dphi = activation("silu", np.array([0.0, 1.0]))
    >>> phi.round(4).tolist(), dphi.round(4).tolist()
    ([0.0, 0.7311], [0.5, 0.9277])
    """
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if name in ("silu", "sigmoid"):
            sig = 1.0 / (1.0 + np.exp(-z))
            if name == "sigmoid":
                return sig, sig * (1.0 - sig)
            return z * sig, sig * (1.0 + z * (1.0 - sig))
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return z * cdf, cdf + z * pdf


# ---------------------------------------------------------------------------------------
# Checking the arguments


def _same_shape(value, name: str, plan: Plan, pattern: str) -> np.ndarray:
    from normlab.core import reject_masked

    from normlab.core import as_array, computable, readable_dtype

    reject_masked(value, name, f"pattern {pattern!r}, input shape {plan.shape}")
    array = computable(as_array(value, name, pattern, plan.shape))
    if not readable_dtype(array.dtype):
        raise InputError(f"pattern {pattern!r}, input shape {plan.shape}: {name} has dtype {array.dtype}; pass a "
                         f"float16, bfloat16, float32 or float64 array of x's shape (cast with {name}.astype(np.float32))")
    if array.shape != plan.shape:
        raise ShapeError(f"pattern {pattern!r}, input shape {plan.shape}: {name} has shape {array.shape}; "
                         f"it must have x's shape {plan.shape}")
    return array.reshape(plan.axis_sizes)


def _weight_offset(value, pattern, plan: Plan) -> float:
    """``weight_offset`` as a finite float: one number added to every weight (a per-element
    offset belongs in the weight itself)."""
    fix = "pass one finite number such as 1.0 (Gemma's 1 + weight), or 0.0 for none"
    # (float() would take a NumPy complex by dropping its imaginary part with only a warning)
    if isinstance(value, (str, bytes, complex, np.complexfloating)) or np.ndim(value) != 0:
        shown = f"an array of shape {np.shape(value)}" if np.ndim(value) else repr(value)
        raise InputError(f"pattern {pattern!r}, input shape {plan.shape}: weight_offset must be a number, got "
                         f"{shown}; {fix}")
    try:
        offset = float(value or 0.0)
    except (TypeError, ValueError) as err:
        raise InputError(f"pattern {pattern!r}, input shape {plan.shape}: weight_offset must be a number, got "
                         f"{value!r}; {fix}") from err
    except OverflowError as err:  # an int beyond float's range, such as 10**400
        shown = f"{str(value)[:12]}... ({len(str(value))} characters)"
        raise InputError(f"pattern {pattern!r}, input shape {plan.shape}: weight_offset={shown} is too large for a "
                         f"float; {fix}") from err
    if not math.isfinite(offset):
        raise InputError(f"pattern {pattern!r}, input shape {plan.shape}: weight_offset={offset} would make "
                         f"every output NaN; {fix}")
    return offset


def _modulation_plan(pattern, plan: Plan, modulation, sizes) -> Plan:
    """The plan with ``modulation`` as its params; its errors speak of modulation, which is
    what the caller wrote (the parser knows the argument only as params)."""
    try:
        return make_plan(pattern, plan.shape, modulation, sizes=sizes)
    except NormlabError as err:
        def reworded(text):
            return text.replace("params", "modulation").replace("weight spans", "scale and shift span")
        if isinstance(err, PatternSyntaxError):
            message = reworded(str(err).split("\n")[0])
            # (make_plan named the input); a fault in the pattern itself stays the pattern's
            subject = "modulation" if err.subject == "params" else err.subject
            raise PatternSyntaxError(err.pattern, err.position, message, subject) from None
        raise type(err)(reworded(str(err))) from None


def _axes_of_shape(plan: Plan, shape: tuple) -> str:
    """Names of ``plan``'s axes, in order, whose sizes are ``shape`` (what params or modulation
    would name for an array of that shape), the trailing ones where several fit (a weight's
    ``d`` in ``"b t [d]"``); ``""`` where none do."""
    names = [n for n in plan.axis_names if not n.startswith("...")]
    sizes = dict(zip(plan.axis_names, plan.axis_sizes))
    found = [chosen for chosen in itertools.combinations(names, len(shape))
             if tuple(sizes[n] for n in chosen) == tuple(shape)]
    return " ".join(found[-1]) if found else ""


def _modulation_array(value, name: str, mod_plan: Plan) -> np.ndarray:
    from normlab.core import as_array, readable_dtype, reject_masked

    reject_masked(value, name, f"pattern {mod_plan.pattern!r}, input shape {mod_plan.shape}")
    array = as_array(value, name, mod_plan.pattern, mod_plan.shape)
    if not readable_dtype(array.dtype):
        raise ParamsError(f"pattern {mod_plan.pattern!r}, input shape {mod_plan.shape}: {name} has dtype "
                          f"{array.dtype}; pass a float16, bfloat16, float32 or float64 array of shape {mod_plan.param_shape} "
                          f"(cast with {name}.astype(np.float32))")
    if array.shape != mod_plan.param_shape:
        raise ParamsError(
            f"{name} has shape {array.shape}, but modulation={mod_plan.params!r} spans shape "
            f"{mod_plan.param_shape} (pattern {mod_plan.pattern!r}, input shape {mod_plan.shape}): pass a {name} "
            f"of shape {mod_plan.param_shape} or change modulation")
    return mod_plan.expand_params(array.astype(np.float64, copy=False))


def prepare(x, pattern, weight, bias, params, sizes, residual=None, gate=None, gate_activation="silu",
            norm_before_gate=True, weight_offset=0.0, scale=None, shift=None, modulation=None) -> Inputs:
    """Check every fused argument against the pattern and lay it out on the expanded view."""
    from normlab import core

    prepared = core.prepare(x, pattern, weight, bias, params, sizes)
    plan = prepared.plan
    if not default_gate_options(gate_activation, norm_before_gate):  # (the defaults: no message to build)
        norm_before_gate = check_gate_options(gate_activation, norm_before_gate, core._describe(plan, plan.shape))
    offset = _weight_offset(weight_offset, pattern, plan)
    if offset != 0.0 and weight is None:
        raise ParamsError(f"pattern {pattern!r}, input shape {plan.shape}: weight_offset={offset} shifts a "
                          "weight, but no weight was given; pass weight= (Gemma stores it as zeros)")
    if (scale is not None or shift is not None) and modulation is None:
        given = np.shape(scale if scale is not None else shift)
        spans = _axes_of_shape(plan, given)
        fix = (f"with params={spans!r}; to modulate, pass modulation={spans!r}" if spans else
               f"with params; to modulate, pass modulation (each names the axes its array spans, in order, "
               f"from {', '.join(n for n in plan.axis_names if not n.startswith('...'))})")
        # Flax and ONNX name a norm's own weight "scale": taken as modulation it would give x̂·(1 + scale)
        raise ParamsError(f"pattern {pattern!r}, input shape {plan.shape}: scale and shift need modulation, "
                          f"the axes they span; got one of shape {given}. They modulate as AdaLN does, "
                          "y = x̂·w·(1 + scale) + shift + bias; a norm's own scale (ONNX's Scale, Flax's scale, "
                          f"Keras' gamma) is weight=, its offset bias=, {fix}")
    mod_plan = None
    if modulation is not None:
        mod_plan = _modulation_plan(pattern, plan, modulation, sizes)
        if scale is None and shift is None:  # (a forgotten argument would give a plain norm)
            raise InputError(f"pattern {pattern!r}, input shape {plan.shape}: modulation={modulation!r} names the "
                             "axes of scale and shift, and neither was given; pass scale= and/or shift= of shape "
                             f"{mod_plan.param_shape}, or drop modulation=")
    epilogue = Epilogue(residual is not None, gate_activation if gate is not None else None, norm_before_gate,
                        offset, modulation, scale is not None, shift is not None)
    dtype = prepared.dtype
    residual_v = residual_dtype = gate_v = gate_dtype = None
    if residual is not None:  # the sum's dtype, from the residual as given (bfloat16 is read as float32)
        residual_v = _same_shape(residual, "residual", plan, pattern)
        residual_dtype = core.result_dtype(core.as_array(residual, "residual", pattern), pattern)
        dtype = core.promoted(dtype, residual_dtype)
    if gate is not None:
        gate_v = _same_shape(gate, "gate", plan, pattern)
        gate_dtype = core.result_dtype(core.as_array(gate, "gate", pattern), pattern)
    return Inputs(
        plan, mod_plan, epilogue, dtype, prepared.x, residual_v, gate_v, prepared.weight, prepared.bias,
        None if scale is None else _modulation_array(scale, "scale", mod_plan),
        None if shift is None else _modulation_array(shift, "shift", mod_plan),
        prepared.dtype, residual_dtype, gate_dtype)


# ---------------------------------------------------------------------------------------
# The reference math


def residual_sum(inputs: Inputs) -> np.ndarray:
    """``x + r`` rounded to the result dtype (what the model carries on), expanded view."""
    if inputs.residual is None:
        return inputs.x
    with np.errstate(over="ignore"):  # a sum past the dtype's range is ±inf, as in torch
        return np.add(inputs.x, inputs.residual, dtype=inputs.dtype)


def _normalized_input(inputs: Inputs, summed: np.ndarray):
    """``(h, φ(z), φ'(z))``: what the statistics see (the gated sum when the gate comes first)."""
    ep = inputs.epilogue
    phi = dphi = None
    if ep.gate is not None:
        phi, dphi = activation(ep.gate, inputs.gate)
    h = summed.astype(np.float64)
    if ep.gate_first:
        with np.errstate(invalid="ignore", over="ignore"):
            h = h * phi
    return h, phi, dphi


def _effective_weight(inputs: Inputs):
    if inputs.weight is None:
        return None
    return inputs.weight + inputs.epilogue.weight_offset if inputs.epilogue.weight_offset else inputs.weight


def _pre_gate(inputs: Inputs, h_hat: np.ndarray) -> np.ndarray:
    """``y_0 = ĥ·(w + o)·(1 + scale) + shift + b`` in float64."""
    y0 = h_hat.copy()
    w_eff = _effective_weight(inputs)
    if w_eff is not None:
        y0 *= w_eff
    if inputs.scale is not None:
        y0 *= 1.0 + inputs.scale
    if inputs.shift is not None:
        y0 += inputs.shift
    if inputs.bias is not None:
        y0 += inputs.bias
    return y0


def reference_forward(inputs: Inputs, eps: float, rms: bool, mean=None, rstd=None):
    """``(y, sum, stats)`` in the expanded view: y in the result dtype, the sum as the model
    carries it (None without a residual), stats of ``h`` in float64."""
    summed = residual_sum(inputs)
    h, phi, _ = _normalized_input(inputs, summed)
    if rstd is None:
        stats = reference.compute_stats(h, inputs.plan, eps, rms)
    else:
        stats = reference.Stats(mean, None, rstd)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        h_hat = (h - stats.mean if stats.mean is not None else h) * stats.rstd
        y = _pre_gate(inputs, h_hat)
        if inputs.epilogue.gate_last:
            y *= phi
    return reference.rounded(y, inputs.dtype), (summed if inputs.residual is not None else None), stats


def _sum_outside(values, axes_kept: tuple[int, ...], ndim: int):
    outside = tuple(i for i in range(ndim) if i not in set(axes_kept))
    return values.sum(axis=outside, keepdims=True)


def reference_backward(inputs: Inputs, grad_y, grad_sum, eps: float, rms: bool, mean=None, rstd=None,
                       need_bias=False):
    """Every gradient of :func:`reference_forward`, float64 in broadcast layouts (see
    :class:`Gradients64`)."""
    plan = inputs.plan
    ep = inputs.epilogue
    summed = residual_sum(inputs)
    h, phi, dphi = _normalized_input(inputs, summed)
    if rstd is None:
        stats = reference.compute_stats(h, plan, eps, rms)
        mean, rstd = stats.mean, stats.rstd
    axes = plan.reduced_axes
    n = plan.group_size
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        g = np.asarray(grad_y, dtype=np.float64).reshape(plan.axis_sizes)
        h_hat = (h - mean if mean is not None else h) * rstd
        grad_gate = None
        if ep.gate_last:
            grad_gate = g * _pre_gate(inputs, h_hat) * dphi
            g = g * phi
        w_eff = _effective_weight(inputs)
        modulated = 1.0 + inputs.scale if inputs.scale is not None else None
        gamma = g if w_eff is None else g * w_eff
        if modulated is not None:
            gamma = gamma * modulated
        if n == 0:
            grad_h = np.zeros_like(h_hat)
        else:
            grad_h = gamma - h_hat * ((gamma * h_hat).sum(axis=axes, keepdims=True) / n)
            if mean is not None:
                grad_h -= gamma.sum(axis=axes, keepdims=True) / n
            grad_h *= rstd
        if ep.gate_first:
            grad_gate = grad_h * summed * dphi
            grad_h = grad_h * phi
        if grad_sum is not None:
            grad_h = grad_h + np.asarray(grad_sum, dtype=np.float64).reshape(plan.axis_sizes)
        ndim = plan.ndim
        g_hat = g * h_hat
        grad_weight = grad_bias = grad_scale = grad_shift = None
        if inputs.weight is not None:
            grad_weight = _sum_outside(g_hat * modulated if modulated is not None else g_hat, plan.param_axes, ndim)
        if need_bias:
            grad_bias = _sum_outside(g, plan.param_axes, ndim)
        if ep.has_scale:
            grad_scale = _sum_outside(g_hat * w_eff if w_eff is not None else g_hat, inputs.mod_plan.param_axes,
                                      ndim)
        if ep.has_shift:
            grad_shift = _sum_outside(g, inputs.mod_plan.param_axes, ndim)
    return Gradients64(grad_h, grad_gate, grad_weight, grad_bias, grad_scale, grad_shift)


@dataclass(frozen=True)
class Gradients64:
    """Backend output: float64 (or the kernel dtype) gradients, expanded/broadcast layouts."""

    x: np.ndarray
    gate: np.ndarray | None
    weight: np.ndarray | None
    bias: np.ndarray | None
    scale: np.ndarray | None
    shift: np.ndarray | None


# ---------------------------------------------------------------------------------------
# Entry points (called by normlab.core)


def _use_kernels(inputs: Inputs, backend, *extra) -> bool:
    from normlab import core

    if inputs.residual is not None and inputs.dtype != inputs.x.dtype:
        # bfloat16 arrives as float32, and the kernels would normalize the float32 sum; the
        # model carries (and normalizes) the sum rounded to bfloat16, as the reference does
        return False
    dtypes = [inputs.x.dtype] + [a.dtype for a in (inputs.residual, inputs.gate, *extra) if a is not None]
    return core._resolve_backend(backend, inputs.plan, *dtypes) == "numba"


def normalize(x, pattern, *, weight=None, bias=None, params=None, eps=1e-5, rms=False, return_stats=False,
              out=None, mean=None, rstd=None, backend=None, residual=None, gate=None, gate_activation="silu",
              norm_before_gate=True, weight_offset=0.0, scale=None, shift=None, modulation=None, sizes=None,
              **axis_sizes):
    """:func:`normlab.normalize` with a residual, a gate, a modulation or a weight offset.

    Returns ``y``, or ``(y, x + residual)`` with a residual; ``return_stats=True`` appends
    ``mean`` and ``rstd`` (of the gated sum when the gate comes first).

    >>> x = np.array([[1.0, 2.0, 6.0]])
    >>> y, total = normalize(x, "b [d]", residual=np.array([[1.0, 0.0, 2.0]]), rms=True, eps=0.0)
    >>> total.tolist(), float((y * y).mean().round(12))
    ([[2.0, 2.0, 8.0]], 1.0)
    """
    from normlab import core

    sizes = merge_sizes(pattern, sizes, axis_sizes, core._shape_of(x))
    inputs = prepare(x, pattern, weight, bias, params, sizes, residual, gate, gate_activation, norm_before_gate,
                     weight_offset, scale, shift, modulation)
    plan = inputs.plan
    eps = core._check_eps(eps, plan)
    rms = core._check_flag(rms, "rms", plan)
    core.refuse_mean_with_rms(mean, rms, f"pattern {pattern!r}, input shape {plan.shape}")
    if mean is not None or rstd is not None:
        if rstd is None or (mean is None and not rms):
            raise InputError(f"pattern {pattern!r}, input shape {plan.shape}: pass both mean and rstd "
                             "(rstd alone with rms=True)")
        rstd = core._given_stats(rstd, "rstd", plan)
        mean = None if rms else core._given_stats(mean, "mean", plan)
    if out is not None:  # a wrong out= fails before any work, as in the unfused path
        core._check_out(out, core.Prepared(plan, inputs.x, inputs.dtype, None, None))
    result = None
    if _use_kernels(inputs, backend):
        from normlab.kernels import fused as fused_kernels

        result = fused_kernels.forward(inputs, eps, rms, mean, rstd)
    if result is None:
        result = reference_forward(inputs, eps, rms, mean, rstd)
    y, summed, stats = result
    y = reference.rounded(np.asarray(y), inputs.dtype).reshape(plan.shape)
    if out is not None:
        np.copyto(out, y, casting="unsafe")
        y = out
    outputs = (y,)
    if inputs.residual is not None:
        outputs += (reference.rounded(np.asarray(summed), inputs.dtype).reshape(plan.shape),)
    if return_stats:
        statistics = (None if rms else stats.mean, stats.rstd)
        if mean is not None or rstd is not None:  # (see core.kept_statistic)
            statistics = tuple(map(core.kept_statistic, statistics))
        outputs += statistics
    return outputs[0] if len(outputs) == 1 else outputs


def normalize_backward(grad_y, x, pattern, *, weight=None, params=None, eps=1e-5, rms=False, mean=None, rstd=None,
                       backend=None, residual=None, gate=None, gate_activation="silu", norm_before_gate=True,
                       weight_offset=0.0, scale=None, shift=None, modulation=None, bias=None, grad_sum=None,
                       sizes=None, **axis_sizes) -> FusedGradients:
    """Gradients of a fused :func:`normlab.normalize` with respect to every input given.

    ``grad_sum`` is the gradient of the returned ``x + residual`` (the residual stream
    carries on, so it has one); ``bias`` is needed only when a gate comes last (the gate
    multiplies it too). ``mean``/``rstd`` are those ``return_stats=True`` returned.

    >>> x, r = np.array([[1.0, 2.0, 6.0]]), np.array([[0.5, 0.0, 1.0]])
    >>> grads = normalize_backward(np.ones_like(x), x, "b [d]", residual=r, grad_sum=np.ones_like(x))
    >>> grads.x.round(12).tolist(), grads.residual is grads.x   # a shift of y has no x-gradient
    ([[1.0, 1.0, 1.0]], True)
    """
    from normlab import core

    sizes = merge_sizes(pattern, sizes, axis_sizes, core._shape_of(x))
    inputs = prepare(x, pattern, weight, bias, params, sizes, residual, gate, gate_activation, norm_before_gate,
                     weight_offset, scale, shift, modulation)
    plan = inputs.plan
    eps = core._check_eps(eps, plan)
    rms = core._check_flag(rms, "rms", plan)
    for name, value in (("grad_y", grad_y), ("grad_sum", grad_sum)):
        core.reject_masked(value, name, f"pattern {pattern!r}, input shape {plan.shape}")
    given_grad_y, grad_y = grad_y, core.as_array(grad_y, "grad_y", pattern, plan.shape)
    core.check_gradient_shape(given_grad_y, grad_y, "grad_y", plan)
    if grad_sum is not None:
        grad_sum = core.as_array(grad_sum, "grad_sum", pattern, plan.shape)
        core.check_gradient_shape(grad_sum, grad_sum, "grad_sum", plan)
    for name, value in (("grad_y", grad_y), ("grad_sum", grad_sum)):
        if value is not None:
            core.result_dtype(value, pattern, name)  # refuses complex, object, ... with how to fix it
    grad_y = core.computable(grad_y)
    if grad_sum is not None:
        grad_sum = core.computable(grad_sum)
    core.refuse_mean_with_rms(mean, rms, f"pattern {pattern!r}, input shape {plan.shape}")
    if mean is not None and rstd is None:  # silently recomputing would ignore the given mean
        raise InputError(f"pattern {pattern!r}, input shape {plan.shape}: mean was given without rstd; pass both "
                         "(or neither)")
    if rstd is not None:
        rstd = core._given_stats(rstd, "rstd", plan)
        if not rms:
            if mean is None:
                raise InputError(f"pattern {pattern!r}, input shape {plan.shape}: rstd was given without mean")
            mean = core._given_stats(mean, "mean", plan)
        else:
            mean = None
    need_bias = params is not None
    result = None
    if _use_kernels(inputs, backend, grad_y, grad_sum):
        from normlab.kernels import fused as fused_kernels

        result = fused_kernels.backward(inputs, grad_y, grad_sum, eps, rms, mean, rstd, need_bias)
    if result is None:
        result = reference_backward(inputs, grad_y, grad_sum, eps, rms, mean, rstd, need_bias)
    return _finish(inputs, result, weight, need_bias, scale, shift)


def _finish(inputs: Inputs, result: Gradients64, weight, need_bias: bool, scale, shift) -> FusedGradients:
    plan = inputs.plan
    dtype = inputs.dtype
    # the sum's gradient in the sum's dtype, then in x's and the residual's, as torch's add
    # hands it back (no copy where a dtype agrees: x and residual of one dtype share one array)
    grad_sum = reference.rounded(np.asarray(result.x), dtype).reshape(plan.shape)
    grad_x = reference.rounded(grad_sum, inputs.x_dtype)
    grad_residual = None if inputs.residual is None else reference.rounded(grad_sum, inputs.residual_dtype)
    from normlab.core import gradient_dtype

    def params_of(value, which_plan, param):
        # (the bias's takes the weight's dtype, as without a fused option, where no bias is passed)
        if value is None:
            return None
        return reference.rounded(which_plan.collapse_params(value), gradient_dtype(param, dtype))

    grad_gate = None
    if result.gate is not None:
        grad_gate = reference.rounded(np.asarray(result.gate), inputs.gate_dtype).reshape(plan.shape)
    return FusedGradients(
        grad_x, grad_residual, grad_gate,
        params_of(result.weight, plan, weight), params_of(result.bias, plan, weight) if need_bias else None,
        params_of(result.scale, inputs.mod_plan, scale), params_of(result.shift, inputs.mod_plan, shift))
