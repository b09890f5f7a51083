"""The public engine: :func:`normalize` and :func:`normalize_backward` for any pattern.

This module checks and prepares the arguments, builds the plan and hands the arrays to a
backend. It holds no math. Backends:

* ``"numba"``: the fused kernels of :mod:`normlab.kernels` (input cast to float32 for
  float16, to float64 for integers; float16 results are written in float64 and rounded
  once, as the reference rounds them); a plan with no canonical view goes to the reference.
* ``"numpy"``: :mod:`normlab.reference`, always.
* ``"auto"`` (the default, also ``None``): ``"numba"`` for float16/32/64 input when Numba
  imports, otherwise ``"numpy"``.

bfloat16 input (ml_dtypes', recognized by name: it is never imported here) is read as float32
(:func:`computable`) by either backend, and the result rounded to bfloat16 through float32
(as ml_dtypes and torch round), so within half a bfloat16 unit in the last place of the
float64 value, give or take float32's own rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from normlab import fused, reference
from normlab.errors import InputError, ParamsError, ShapeError
from normlab.notation import parse_params, parse_pattern
from normlab.plan import Plan, make_plan, merge_sizes

__all__ = ["normalize", "normalize_backward", "BACKENDS"]

BACKENDS = ("auto", "numba", "numpy")
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_FLOAT_MAX = float(np.finfo(np.float64).max)  # a Python float: it compares with any int exactly


@dataclass(frozen=True)
class Prepared:
    """Checked arguments: the plan, the input in its expanded view and the result dtype."""

    plan: Plan
    x: np.ndarray  # expanded view
    dtype: np.dtype
    weight: np.ndarray | None  # expanded to broadcast against x
    bias: np.ndarray | None


def _describe(plan_or_pattern, shape) -> str:
    pattern = plan_or_pattern.pattern if isinstance(plan_or_pattern, Plan) else plan_or_pattern
    return f"pattern {pattern!r}, input shape {tuple(shape)}"


def native(array: np.ndarray) -> np.ndarray:
    """``array`` in the machine's byte order (data read from files may be big-endian, which
    NumPy computes with; the kernels and the result take the native order, as np.mean does)."""
    return array if array.dtype.isnative else array.astype(native_dtype(array.dtype))


def native_dtype(dtype: np.dtype) -> np.dtype:
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def is_bfloat16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16 (what JAX hands around), known by its name:
    normlab does not import ml_dtypes, which registers the dtype with NumPy."""
    return dtype.kind == "V" and dtype.name == "bfloat16"


def is_float(dtype: np.dtype) -> bool:
    """A float dtype normlab takes: float16, bfloat16, float32 or float64 (any byte order)."""
    return dtype.kind == "f" or is_bfloat16(dtype)


def gradient_dtype(param, dtype: np.dtype) -> np.dtype:
    """The dtype of a parameter's gradient: the parameter's own (in the machine's byte order),
    where it is a float array, else ``dtype`` (the result's: a list takes the input's dtype,
    as in the forward)."""
    if isinstance(param, (np.ndarray, np.generic)) and is_float(param.dtype):
        return native_dtype(param.dtype)
    return dtype


def computable(array: np.ndarray) -> np.ndarray:
    """``array`` as the engine reads it: in the machine's byte order (:func:`native`), and
    bfloat16 as float32, which holds each of its values exactly (NumPy has no bfloat16
    arithmetic of its own; torch computes bfloat16 in float32 too)."""
    return array.astype(np.float32) if is_bfloat16(array.dtype) else native(array)


def promoted(a: np.dtype, b: np.dtype) -> np.dtype:
    """The result dtype of two float dtypes, as torch promotes them: ``np.result_type``,
    except that bfloat16 with float16 (which NumPy cannot promote) gives float32."""
    if a == b or not (is_bfloat16(a) or is_bfloat16(b)):
        return np.result_type(a, b)
    other = b if is_bfloat16(a) else a
    return np.dtype(np.float32) if other == np.float16 else other


def readable_dtype(dtype: np.dtype) -> bool:
    """Whether normlab reads arrays of ``dtype``, x and everything beside it alike: float16,
    bfloat16, float32 and float64, and integers and bools (as float64); not long double
    (rounding it to float64 would drop what it holds beyond), complex, dates or text."""
    return native_dtype(dtype) in _FLOATS or is_bfloat16(dtype) or dtype.kind in "iub"


def result_dtype(x: np.ndarray, pattern: str, name: str = "input") -> np.dtype:
    """The output dtype: the input's float dtype (in the native byte order; bfloat16 stays
    bfloat16); integers and bools become float64."""
    dtype = native_dtype(x.dtype)
    if dtype in _FLOATS or is_bfloat16(dtype):
        return dtype
    if x.dtype.kind in "iub":
        return np.dtype(np.float64)
    cast = "x" if name == "input" else name  # (the fix casts the array at fault, grad_y as well as x)
    raise InputError(
        f"{_describe(pattern, x.shape)}: {name} dtype {x.dtype} is not supported; "
        f"normlab takes float16, bfloat16, float32 or float64 (cast with {cast}.astype(np.float32))"
    )


def as_array(value, name: str, pattern: str, shape=None, dtype=None) -> np.ndarray:
    """``np.asarray(value)``, where NumPy's refusal (a ragged list, a string where numbers
    belong) or torch's (a tensor that requires grad) becomes an InputError that names the
    argument and the pattern."""
    return read_array(value, name, f"pattern {pattern!r}" if shape is None else _describe(pattern, shape), dtype)


def read_array(value, name: str, where: str, dtype=None) -> np.ndarray:
    """:func:`as_array` with the message's opening (``where``) given as it is."""
    try:
        return np.asarray(value, dtype=dtype)
    except (ValueError, TypeError, RuntimeError) as err:
        if type(value).__module__.partition(".")[0] == "torch":  # one that requires grad, or on a GPU
            # NumPy has no bfloat16 (nor float8): such a tensor's .numpy() refuses too, where
            # float32 holds its values exactly, as the NumPy API reads a bfloat16 array
            dtype_name = str(getattr(value, "dtype", ""))
            upcast = ".float()" if dtype_name == "torch.bfloat16" or dtype_name.startswith("torch.float8") else ""
            fix = ("normlab.torch.normalize takes tensors, with autograd and on any device (the NumPy API "
                   f"takes {name}.detach().cpu(){upcast}.numpy())")
        else:
            fix = "pass a NumPy array, or nested lists whose rows all have the same length"
        raise InputError(f"{where}: {name} cannot be read as an array ({err}); {fix}") from None


def _param_array(value, name: str, plan: Plan) -> np.ndarray:
    array = as_array(value, name, plan.pattern, plan.shape)
    if array.dtype not in _FLOATS and not readable_dtype(array.dtype):  # (the common dtypes: no call)
        raise ParamsError(f"{_describe(plan, plan.shape)}: {name} has dtype {array.dtype}; pass a float16, bfloat16, "
                          f"float32 or float64 array of shape {plan.param_shape} (cast with {name}.astype(np.float32))")
    if array.shape != plan.param_shape:
        # (a weight per group, as ONNX GroupNormalization-18 takes it, is params='g', not '(g c)')
        spans = " or ".join(f"params={found}" for found in _matching_params(plan, array.shape))
        raise ParamsError(
            f"{name} has shape {array.shape}, but params={plan.params!r} spans shape {plan.param_shape} "
            f"({_describe(plan, plan.shape)}): pass a {name} of shape {plan.param_shape} or "
            + (f"change params to the axes it spans, {spans}" if spans else "change params")
        )
    return plan.expand_params(array.astype(np.float64, copy=False))


def _matching_params(plan: Plan, shape: tuple[int, ...]) -> list[str]:
    """The params (quoted) that name runs of axes of ``plan`` whose sizes match a weight of
    ``shape``; a 1-D weight may also span factors of one of the pattern's compositions, ``'(g c)'``."""
    names = [n for n in plan.axis_names if not n.startswith("...")]
    sizes = dict(zip(plan.axis_names, plan.axis_sizes))
    runs = [names[start:stop] for start in range(len(names)) for stop in range(start + 1, len(names) + 1)]
    found = [repr(" ".join(run)) for run in runs if tuple(sizes[n] for n in run) == tuple(shape)]
    if len(shape) == 1:
        for dim in parse_pattern(plan.pattern).dims:
            factors = [axis.name for axis in dim.factors] if dim.composed else []
            found += [repr(f"({' '.join(factors[start:stop])})") for start in range(len(factors))
                      for stop in range(start + 2, len(factors) + 1)
                      if math.prod(sizes[n] for n in factors[start:stop]) == shape[0]]
    return found[:3]


def _suggest_params(plan: Plan, shape: tuple[int, ...]) -> str:
    """Name the runs of axes of ``plan`` whose sizes match a weight of ``shape``."""
    found = _matching_params(plan, shape)
    if not found:
        return "params='c', the names of the axes weight spans, in order"
    return " or ".join(f"params={f}" for f in found)


def check_gradient_shape(given, array: np.ndarray, name: str, plan: Plan) -> None:
    """Refuse a gradient (``grad_y``, or ``grad_sum`` of the fused blocks) whose shape is not
    x's, saying what to pass; ``given`` is the argument as passed, ``array`` as read."""
    if array.shape == plan.shape:
        return
    got = f"{name} is None" if given is None else f"{name} has shape {array.shape}"
    of, summed = (("the returned x + residual", "(x + residual)") if name == "grad_sum" else
                  ("y, the output of normalize", "y"))
    raise ShapeError(f"{_describe(plan, plan.shape)}: {got}; pass the gradient of {of}, an array of x's shape "
                     f"{plan.shape} (np.ones_like(x) for that of {summed}.sum())")


def reject_masked(value, name: str, context: str) -> None:
    """Refuse a masked array with masked elements: ``np.asarray`` would drop its mask
    silently and the masked values would enter the statistics. ``context`` opens the
    message (the pattern and the input shape)."""
    if isinstance(value, np.ma.MaskedArray) and np.ma.getmask(value) is not np.ma.nomask and value.mask.any():
        statistics_only = (f"to leave the masked elements out of the statistics, pass np.ma.getdata({name}) with "
                           f"mask=~np.ma.getmaskarray({name}); ") if name == "x" else ""
        raise InputError(
            f"{context}: {name} is a masked array with masked elements, and normlab does not read np.ma masks; "
            f"{statistics_only}pass {name}.filled(value) to normalize with the masked elements set to a value, "
            f"or np.asarray({name}) to normalize every element as it is"
        )


def prepare(x, pattern: str, weight, bias, params, sizes: dict) -> Prepared:
    """Check the arguments of :func:`normalize` and lay them out on the expanded view."""
    for value, name in ((x, "x"), (weight, "weight"), (bias, "bias")):
        if isinstance(value, np.ma.MaskedArray):  # the message is built only when needed
            reject_masked(value, name, _describe(pattern, np.shape(x)))
    x = as_array(x, "x", pattern)
    dtype = result_dtype(x, pattern)
    x = computable(x)
    if (weight is not None or bias is not None) and params is None:
        given = np.shape(weight if weight is not None else bias)
        plan = make_plan(pattern, x.shape, sizes=sizes)
        raise ParamsError(
            f"{_describe(plan, x.shape)}: a weight or bias needs params, the axes it spans; "
            f"got one of shape {given}. Pass e.g. {_suggest_params(plan, given)}"
        )
    plan = make_plan(pattern, x.shape, params, sizes=sizes)
    weight_b = None if weight is None else _param_array(weight, "weight", plan)
    bias_b = None if bias is None else _param_array(bias, "bias", plan)
    return Prepared(plan, x.reshape(plan.axis_sizes), dtype, weight_b, bias_b)


def _check_eps(eps, plan: Plan) -> float:
    # float() would parse a string, and take a NumPy complex (not Python's) by dropping its imaginary
    # part with only a warning; neither is a real number
    if isinstance(eps, (str, bytes, complex, np.complexfloating)):
        raise InputError(f"eps must be a real number, got {eps!r} ({_describe(plan, plan.shape)}); "
                         "pass a small finite number >= 0 such as 1e-5")
    try:
        eps = float(eps)
    except OverflowError as err:  # an int beyond float's range, such as 10**400
        shown = repr(eps) if len(repr(eps)) <= 24 else f"{repr(eps)[:12]}... ({len(str(eps))} digits)"
        raise InputError(f"eps={shown} is too large for a float ({_describe(plan, plan.shape)}); "
                         "pass a small finite number >= 0 such as 1e-5") from err
    except (TypeError, ValueError) as err:
        raise InputError(f"eps must be a real number, got {eps!r} ({_describe(plan, plan.shape)}); "
                         "pass a small finite number >= 0 such as 1e-5") from err
    if not eps >= 0 or eps == np.inf:
        raise InputError(f"eps must be a finite number >= 0, got {eps} ({_describe(plan, plan.shape)})")
    return eps


def _check_flag(value, name: str, plan: Plan) -> bool:
    """``value`` as a Python bool. The kernels compile once per argument type, so a flag
    must reach them as ``bool`` whatever the caller passed (``np.True_``, ``1``)."""
    return _flag(value, name, _describe(plan, plan.shape))


def _flag(value, name: str, context: str) -> bool:
    """:func:`_check_flag` with ``context`` (the pattern and the input shape) for the message."""
    if isinstance(value, bool):
        return value
    array = np.asarray(value) if isinstance(value, (np.generic, np.ndarray, int)) else None
    if array is None or array.shape != () or array.dtype.kind not in "biu" or array not in (0, 1):
        shown = f"an array of shape {array.shape}" if array is not None and array.shape != () else repr(value)
        raise InputError(f"{name} must be True or False, got {shown} ({context}); "
                         f"pass {name}=True or {name}=False")
    return bool(array)


def refuse_mean_with_rms(mean, rms: bool, context: str) -> None:
    """RMS norm subtracts no mean, so a ``mean`` given with ``rms=True`` would be ignored
    without a word; refuse it. ``context`` opens the message (the pattern and the input shape)."""
    if rms and mean is not None:
        raise InputError(f"{context}: mean was given with rms=True, but RMS norm subtracts no mean, so it would be "
                         "ignored; drop mean= (rms=True takes rstd alone), or pass rms=False to subtract it")


def _given_stats(value, name: str, plan: Plan) -> np.ndarray:
    """Given statistics laid out in ``plan.stats_shape``. Taken as they are: arrays that
    broadcast to the statistics' shape, or the kept axes alone in order (the statistics'
    shape without its size-1 reduced axes, say ``(C,)`` for batch norm). Any other shape
    is an error, even when the number of values fits: a reshape would reorder them."""
    return stats_in_shape(value, name, plan, plan.stats_shape, tuple(plan.axis_sizes[a] for a in plan.kept_axes),
                          "the kept axes, in order")


def stats_in_shape(value, name: str, plan: Plan, shape: tuple, listed: tuple, listed_text: str) -> np.ndarray:
    """``value`` as float64 statistics of ``shape``: that shape, ``listed`` (the same
    values without the size-1 axes, reshaped), or an array that broadcasts to it; any
    other shape is a ShapeError that names both and ``listed_text``, what ``listed`` is."""
    if isinstance(value, np.ma.MaskedArray):
        reject_masked(value, name, _describe(plan, plan.shape))
    array = as_array(value, name, plan.pattern, plan.shape)
    # a cast would take complex, dates, text, or round long double (the common dtypes: no call)
    if array.dtype not in _FLOATS and not readable_dtype(array.dtype):
        raise InputError(f"{_describe(plan, plan.shape)}: {name} has dtype {array.dtype}, and statistics are real "
                         "numbers of float64 at most; pass the float64 arrays that return_stats=True gives (or a "
                         f"float16, bfloat16, float32, int or bool array; cast with {name}.astype(np.float64))")
    array = array.astype(np.float64, copy=False)
    if array.shape == shape:
        return array
    if array.shape == listed:
        return array.reshape(shape)
    try:
        return np.broadcast_to(array, shape)
    except ValueError:
        raise ShapeError(
            f"{_describe(plan, plan.shape)}: {name} has shape {array.shape}, which does not broadcast to the "
            f"statistics' shape {shape}; pass an array of shape {shape} (what return_stats=True "
            f"gives) or {listed} ({listed_text})"
        ) from None


def _check_out(out, prepared: Prepared) -> np.ndarray:
    """``out`` as the plain ndarray to write into (an ndarray view of a subclass such as
    ``np.matrix``, whose own reshape refuses other ranks; the caller returns ``out``)."""
    plan = prepared.plan
    if not isinstance(out, np.ndarray):
        raise InputError(f"{_describe(plan, plan.shape)}: out must be a NumPy array, got {type(out).__name__}; "
                         "pass np.empty_like(x) or leave out=None")
    if isinstance(out, np.ma.MaskedArray):
        raise InputError(f"{_describe(plan, plan.shape)}: out is a masked array, and normlab does not honour "
                         "masks; pass a plain array (np.empty_like(x)) and mask the result afterwards")
    if out.shape != plan.shape or native_dtype(out.dtype) != prepared.dtype:
        raise InputError(
            f"{_describe(plan, plan.shape)}: out has shape {out.shape} and dtype {out.dtype}; "
            f"pass an array of shape {plan.shape} and dtype {prepared.dtype}"
        )
    if not out.flags.writeable:
        raise InputError(f"{_describe(plan, plan.shape)}: out is read-only; pass a writeable array")
    return out if type(out) is np.ndarray else out.view(np.ndarray)


def overlaps_inputs(out: np.ndarray, prepared: Prepared, *arrays) -> bool:
    """True when ``out`` may share memory with an input other than as ``x`` itself.

    Every backend reads each group's input before it writes that group's output, so
    ``out`` laid exactly over ``x`` is safe; a shifted or reordered view of the same
    memory is not, and is computed into a temporary first, as NumPy's ufuncs do."""
    x = prepared.x
    if np.may_share_memory(out, x):
        exact = (out.dtype == x.dtype and out.size == x.size
                 and out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
                 and out.reshape(x.shape).strides == x.strides)
        if not exact:
            return True
    inputs = (prepared.weight, prepared.bias) + arrays
    return any(a is not None and np.may_share_memory(out, a) for a in inputs)


def _resolve_backend(backend: str | None, plan: Plan, *dtypes: np.dtype) -> str:
    """``"numba"`` or ``"numpy"``: which engine runs ``plan``, for inputs of ``dtypes``."""
    if backend is None or isinstance(backend, str) and backend == "auto":  # (an array compares elementwise)
        if all(d in _FLOATS for d in dtypes) and _kernels_available():
            return "numba"
        return "numpy"
    if not isinstance(backend, str) or backend not in BACKENDS:
        shown = repr(backend) if len(repr(backend)) <= 40 else f"a value of type {type(backend).__name__}"
        raise InputError(f"{_describe(plan, plan.shape)}: backend must be one of {', '.join(BACKENDS)}, "
                         f"got {shown}")
    if backend == "numba" and not _kernels_available():
        raise InputError(f"{_describe(plan, plan.shape)}: backend='numba' needs Numba, which does not import here; "
                         "install numba or pass backend='numpy'")
    return backend


def _kernels_available() -> bool:
    from normlab import kernels

    return kernels.available()


def forward(prepared: Prepared, eps: float, rms: bool, mean=None, rstd=None, out=None, backend=None):
    """Run the forward pass on prepared arguments; returns ``(y, stats)`` (``y`` in the
    input's shape, ``stats`` as :class:`normlab.reference.Stats`)."""
    plan = prepared.plan
    if _resolve_backend(backend, plan, prepared.x.dtype) == "numba":
        from normlab import kernels

        result = kernels.forward(prepared, eps, rms, mean, rstd, out)
        if result is not None:
            return result
    out_view = None if out is None else out.reshape(plan.axis_sizes) if out.flags.c_contiguous else None
    if rstd is not None:
        stats = reference.Stats(None if rms else mean, None, rstd)
        y = reference.apply_stats(prepared.x, stats.mean, rstd, prepared.weight, prepared.bias,
                                  prepared.dtype, out_view)
    else:
        y, stats = reference.forward(prepared.x, plan, eps, rms, prepared.weight, prepared.bias,
                                     prepared.dtype, out_view)
    if out is not None:
        if out_view is None:
            np.copyto(out, y.reshape(plan.shape))
        return out, stats
    return y.reshape(plan.shape), stats


def normalize(x, pattern: str, *, weight=None, bias=None, params: str | None = None, eps: float = 1e-5,
              rms: bool = False, return_stats: bool = False, out=None, mean=None, rstd=None,
              backend: str | None = None, residual=None, gate=None, gate_activation: str = "silu",
              norm_before_gate: bool = True, weight_offset: float = 0.0, scale=None, shift=None,
              modulation: str | None = None, mask=None, segment_ids=None, num_segments: int | None = None,
              segment_axis: str | None = None, sizes=None, **axis_sizes: int):
    """Standardize ``x`` over the bracketed axes of ``pattern``.

    ``y = (x − mean)·rstd·weight + bias`` where each group of elements that differ only
    along bracketed axes shares ``mean`` and ``rstd = 1/sqrt(var + eps)`` (biased
    variance). ``rms=True`` drops the mean. ``weight``/``bias`` span the axes named in
    ``params``. Passing ``mean`` and ``rstd`` (of the statistics' shape) applies those
    statistics instead of computing them, as batch norm does in evaluation.

    Fused blocks (:mod:`normlab.fused` has their formulas): ``residual=r`` normalizes
    ``x + r`` and returns ``(y, x + r)``; ``gate=z`` multiplies by ``gate_activation(z)``
    after the norm (``norm_before_gate=True``) or before it; ``weight_offset=1.0`` is
    Gemma's ``1 + weight``; ``scale``/``shift`` spanning the ``modulation`` axes give
    ``y = x̂·w·(1 + scale) + shift + bias``.

    Sizes of composed axes come as keywords (``g=32``) or in the mapping ``sizes``, which
    also sizes axes named like this function's own keywords (``sizes={"x": 3}`` for
    ``"b (x [c])"``); the two combine, and an axis sized both ways is an error.

    >>> normalize(np.arange(6.).reshape(1, 6), "b (x [c])", sizes={"x": 3}, eps=0.0).tolist()
    [[-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]]

    ``out`` may be ``x`` itself (in place) or any other writeable array of the result's
    shape and dtype; one that overlaps ``x`` otherwise gets what a separate array would,
    as with NumPy's ufuncs. ``mean``/``rstd`` must broadcast to the statistics' shape
    (``return_stats`` gives it) or list the kept axes in order (``(C,)`` for batch norm).

    Returns ``y`` (the input's dtype, bfloat16 included; integers become float64), or
    ``(y, mean, rstd)`` with ``return_stats=True``: float64 arrays with the pattern's axes,
    compositions split and reduced axes of size 1 (``mean`` is None for ``rms``); given
    statistics come back so too, as new arrays the caller may write and keep.

    ``mask`` (boolean, broadcasts to x) marks the elements that count toward their group's
    statistics; every element is normalized with them, and a group with none counted gives
    exactly ``bias`` (mean and rstd 0). ``segment_ids`` (integers along one bracketed axis,
    ``segment_axis``, by default the first) split groups further: statistics come back with
    that axis of length ``num_segments`` (default ``max(ids) + 1``). See :mod:`normlab.masked`.

    The demo's 2-D example: batch norm standardizes each feature across the batch.

    >>> import numpy as np
    >>> x = np.array([[4., 3., 2.], [3., 3., 2.], [2., 2., 2.]])
    >>> y = normalize(x, "[b] f")
    >>> float(y[1, 0]), bool(y[0, 1] == y[1, 1]), y[:, 2].tolist()
    (0.0, True, [0.0, 0.0, 0.0])
    >>> normalize(x, "b [f]")[0].round(4).tolist()
    [1.2247, 0.0, -1.2247]
    """
    try:
        sizes = axis_sizes if sizes is None else merge_sizes(pattern, sizes, axis_sizes, _shape_of(x))
        key = None
        if (type(x) is np.ndarray and out is None and mean is None and rstd is None and mask is None
                and segment_ids is None and num_segments is None and segment_axis is None and residual is None
                and gate is None and scale is None and shift is None and modulation is None
                and (type(weight_offset) is float and weight_offset == 0.0 or fused._no_offset(weight_offset))
                and type(gate_activation) is str and gate_activation == "silu" and norm_before_gate is True
                and (rms is True or rms is False) and (return_stats is True or return_stats is False)):
            # the fast path: everything the checks and the plan decide depends on this key alone
            # (a check that looks at values must make the fast call return None)
            key = (pattern, x.shape, x.dtype, params, rms, backend, None if weight is None else _dtype_of(weight),
                   None if bias is None else _dtype_of(bias), _sizes_key(sizes) if sizes else ())
            try:
                call = _FAST_CALLS.get(key)
            except TypeError:  # an unhashable argument: the full checks will explain
                call = key = None
            # an int eps beyond float's range takes the full checks, which explain it; NumPy's float64
            # (an eps read from an array or a config) is a float subclass with float's values
            if call is not None and (type(eps) is float or type(eps) is np.float64
                                     or type(eps) is int and -_FLOAT_MAX <= eps <= _FLOAT_MAX):
                result = call(x, weight, bias, eps, return_stats)
                if result is not None:
                    return result
        # "False" is truthy: a flag of any other type would return the statistics unasked
        return_stats = _flag(return_stats, "return_stats", _describe(pattern, _shape_of(x)))
        if not fused.default_gate_options(gate_activation, norm_before_gate):  # (no message to build)
            fused.check_gate_options(gate_activation, norm_before_gate, _describe(pattern, _shape_of(x)))
        grouped = _grouped(x, pattern, mask, segment_ids, num_segments, segment_axis, residual, gate, weight_offset,
                           scale, shift, modulation)  # normalize_with_stats hands masks and segments on
        if not grouped and fused.wants_fused(residual, gate, weight_offset, scale, shift, modulation):
            return fused.normalize(x, pattern, weight=weight, bias=bias, params=params, eps=eps, rms=rms,
                                   return_stats=return_stats, out=out, mean=mean, rstd=rstd, backend=backend,
                                   residual=residual, gate=gate, gate_activation=gate_activation,
                                   norm_before_gate=norm_before_gate, weight_offset=weight_offset, scale=scale,
                                   shift=shift, modulation=modulation, sizes=sizes)
        y, stats = normalize_with_stats(x, pattern, weight=weight, bias=bias, params=params, eps=eps, rms=rms,
                                        out=out, mean=mean, rstd=rstd, backend=backend, mask=mask,
                                        segment_ids=segment_ids, num_segments=num_segments,
                                        segment_axis=segment_axis, sizes=sizes)
        if key is not None and key not in _FAST_CALLS:
            _FAST_CALLS[key] = _build_fast_call(x, pattern, params, rms, backend, sizes, key)
        if return_stats:
            if mean is not None or rstd is not None:  # (given: the caller's memory, or a read-only broadcast of it)
                return y, kept_statistic(stats.mean), kept_statistic(stats.rstd)
            return y, stats.mean, stats.rstd
        return y
    except MemoryError as error:
        raise MemoryError(out_of_memory(pattern, _shape_of(x), error, 'normalize', params,
                                        _given(mask=mask, residual=residual, gate=gate))) from error


def kept_statistic(statistic):
    """A statistic the caller gave, handed back by ``return_stats=True`` as the computed
    ones are: a fresh, writable float64 array of the statistics' shape, never the caller's
    own object nor a view of its memory (a later write to either would change the other)."""
    return None if statistic is None else np.array(statistic, dtype=np.float64, order="C")


def out_of_memory(pattern: str, shape: tuple, error: MemoryError, function: str = "normalize",
                  params=None, elementwise: tuple = ()) -> str:
    """A MemoryError's message with the pattern, the input's shape and how to fit: call
    ``function`` on parts of the input along an axis outside the brackets (no group of
    statistics spans it, so the parts give the whole's result), or, where every axis shares
    statistics, normalize in parts with statistics computed first. An axis that ``params``
    does not span is preferred; one it spans is split in the parameters too, and the
    ``elementwise`` arguments given (``mask``, ``residual``, ``gate``) as x.

    >>> print(out_of_memory("b t [d]", (10**6, 512, 4096), MemoryError("Unable to allocate 15.6 TiB")))
    pattern 'b t [d]', input shape (1000000, 512, 4096): Unable to allocate 15.6 TiB; call normalize on parts of \
it along axis 'b', outside the brackets (no group of statistics spans it, so the parts give the whole's \
result): [normalize(part, ...) for part in np.array_split(x, 100, axis=0)], then np.concatenate(..., axis=0)
    """
    told = f"{_describe(pattern, shape)}: {error}"
    try:
        dims = parse_pattern(pattern).dims
    except ValueError:
        return told
    names = [dim.factors[0].name for dim in dims]
    ellipsis = names.index("...") if "..." in names else len(dims)
    outside = [(index if index < ellipsis else index - len(dims), f"axis {name!r}")  # (after "...": from the end)
               for index, (name, dim) in enumerate(zip(names, dims))
               if name != "..." and not any(factor.reduced for factor in dim.factors)]
    if ellipsis < len(dims) and not dims[ellipsis].factors[0].reduced and len(shape) >= len(dims):
        outside.append((ellipsis, "the first axis of '...'"))  # ("..." stands for at least one axis here)
    if not outside:
        return (f"{told}; no axis outside the brackets to split it along: compute the statistics in parts "
                "(float64 sums of x and x² over the bracketed axes, one part at a time), then normalize each part "
                "with mean= and rstd=")
    spanned = _param_axis_of(params, names, ellipsis)  # the axes the parameters span: their axis in the weight
    axis, name = min(outside, key=lambda entry: entry[0] in spanned)  # (stable: the first one they do not span)
    # (a mask, residual or gate may broadcast to x: broadcast_to gives its parts without a copy)
    alike = "".join(f"; split {argument} with it as np.array_split(np.broadcast_to({argument}, x.shape), 100, "
                    f"axis={axis}) and pass each part its slice" for argument in elementwise)
    if axis in spanned:  # (batch norm's "[b] c [h w]", params="c": its channels are the only axis outside)
        at = spanned[axis]
        parts = (f"split x and grad_y with np.array_split(..., 100, axis={axis}) and weight with "
                 f"np.array_split(weight, 100, axis={at}), call {function} on each part, then np.concatenate the "
                 f"input gradients on axis {axis} and the weight and bias gradients on axis {at}"
                 if function == "normalize_backward" else
                 f"[normalize(part, ..., weight=w, bias=b) for part, w, b in zip(np.array_split(x, 100, axis={axis}), "
                 f"np.array_split(weight, 100, axis={at}), np.array_split(bias, 100, axis={at}))], then "
                 f"np.concatenate(..., axis={axis})")
        return (f"{told}; call {function} on parts of it along {name}, outside the brackets, with the weight and "
                f"bias split along it too, as params={params!r} spans it (no group of statistics spans it, so the "
                f"parts give the whole's result): {parts}{alike}")
    parts = (f"split x and grad_y with np.array_split(..., 100, axis={axis}), call {function} on each pair, then "
             f"np.concatenate the input gradients on axis {axis} and sum the weight and bias gradients"
             if function == "normalize_backward" else
             f"[normalize(part, ...) for part in np.array_split(x, 100, axis={axis})], then "
             f"np.concatenate(..., axis={axis})")
    return (f"{told}; call {function} on parts of it along {name}, outside the brackets (no group of "
            f"statistics spans it, so the parts give the whole's result): {parts}{alike}")


def _param_axis_of(params, pattern_names: list, ellipsis: int) -> dict:
    """``{axis of x: axis of the weight}`` for the pattern's axes (``pattern_names``, each
    axis's first factor; ``...`` at ``ellipsis``) outside "..." that ``params`` spans (the
    indices :func:`out_of_memory` writes; {} where params is no pattern of names)."""
    try:
        names = [group[0] for group in parse_params(params)] if isinstance(params, str) else []
    except ValueError:
        return {}
    return {(index if index < ellipsis else index - len(pattern_names)): names.index(name)
            for index, name in enumerate(pattern_names) if name != "..." and name in names}


def _shape_of(x) -> tuple:
    try:
        return np.shape(x)
    except ValueError:  # a ragged list: the checks that read it explain
        return ()


def _grouped(x, pattern, mask, segment_ids, num_segments, segment_axis, *fused_options) -> bool:
    """Whether masks or segments are asked for (they do not combine with the fused options yet)."""
    if mask is None and segment_ids is None and num_segments is None and segment_axis is None:
        return False
    if fused.wants_fused(*fused_options):
        raise InputError(f"{_describe(pattern, _shape_of(x))}: mask= and segment_ids= do not combine "
                         "with residual, gate, weight_offset or modulation yet; apply the mask or segments in a "
                         "separate normalize call")
    return True


_FAST_CALLS: dict = {}  # key of normalize's arguments -> kernels.fast.FastForward, or None: no fast path
_FAST_CALLS_MAX = 4096


def _sizes_key(sizes: dict) -> tuple:
    """The sizes with their types: ``g=4.0`` and ``g=True`` equal ``g=4`` and ``g=1`` as
    keys, but the full checks refuse them (not integers), so they must not find the
    fast call that ``g=4`` left."""
    return tuple((name, type(value), value) for name, value in sizes.items())


def _dtype_of(param):
    if param is None:
        return None
    return param.dtype if type(param) is np.ndarray else False


def _build_fast_call(x, pattern, params, rms, backend, sizes, key):
    """The fast call for arguments that just took the full path successfully, or None."""
    if len(_FAST_CALLS) >= _FAST_CALLS_MAX:
        _FAST_CALLS.clear()
    weight_dtype, bias_dtype = key[6], key[7]
    if weight_dtype is False or bias_dtype is False or (params is None and (weight_dtype or bias_dtype)):
        return None
    plan = make_plan(pattern, x.shape, params, sizes=sizes)
    if _resolve_backend(backend, plan, x.dtype) != "numba":
        return None
    from normlab.kernels import fast

    return fast.fast_forward(plan, x.dtype, rms, (weight_dtype, bias_dtype))


def normalize_with_stats(x, pattern: str, *, weight=None, bias=None, params=None, eps=1e-5, rms=False,
                         out=None, mean=None, rstd=None, backend=None, mask=None, segment_ids=None,
                         num_segments=None, segment_axis=None, sizes=None, **axis_sizes):
    """:func:`normalize`, returning ``(y, stats)`` with the full :class:`~normlab.reference.Stats`
    (the variance too, which running statistics need); with a mask or segments,
    :class:`~normlab.masked.MaskedStats` (the counts too); given statistics come back as read,
    the caller's own arrays or read-only views of them (:func:`normalize` copies them)."""
    sizes = merge_sizes(pattern, sizes, axis_sizes, _shape_of(x))
    if mask is not None or segment_ids is not None or num_segments is not None or segment_axis is not None:
        from normlab import grouped

        return grouped.normalize_with_stats(
            x, pattern, weight=weight, bias=bias, params=params, eps=eps, rms=rms, out=out, mean=mean, rstd=rstd,
            backend=backend, mask=mask, segment_ids=segment_ids, num_segments=num_segments,
            segment_axis=segment_axis, sizes=sizes)
    prepared = prepare(x, pattern, weight, bias, params, sizes)
    plan = prepared.plan
    eps = _check_eps(eps, plan)
    rms = _check_flag(rms, "rms", plan)
    refuse_mean_with_rms(mean, rms, _describe(plan, plan.shape))
    if rstd is not None or mean is not None:
        if rstd is None or (mean is None and not rms):
            raise InputError(f"{_describe(plan, plan.shape)}: pass both mean and rstd (rstd alone with rms=True)")
        rstd = _given_stats(rstd, "rstd", plan)
        mean = None if rms else _given_stats(mean, "mean", plan)
    if out is None:
        return forward(prepared, eps, rms, mean, rstd, None, backend)
    target = _check_out(out, prepared)
    if not target.dtype.isnative or overlaps_inputs(target, prepared, mean, rstd):
        y, stats = forward(prepared, eps, rms, mean, rstd, None, backend)
        np.copyto(target, y)
        return out, stats
    _, stats = forward(prepared, eps, rms, mean, rstd, target, backend)
    return out, stats


def normalize_backward(grad_y, x, pattern: str, *, weight=None, params: str | None = None, eps: float = 1e-5,
                       rms: bool = False, mean=None, rstd=None, backend: str | None = None, residual=None,
                       gate=None, gate_activation: str = "silu", norm_before_gate: bool = True,
                       weight_offset: float = 0.0, scale=None, shift=None, modulation: str | None = None,
                       bias=None, grad_sum=None, mask=None, segment_ids=None, num_segments: int | None = None,
                       segment_axis: str | None = None, sizes=None, **axis_sizes: int):
    """Gradients of :func:`normalize` with respect to ``x``, ``weight`` and ``bias``.

    Returns ``(grad_x, grad_weight, grad_bias)``. ``grad_weight`` is None when no
    ``weight`` is given and ``grad_bias`` is None when no ``params`` is given (a bias
    gradient does not depend on the bias, only on the axes it spans). Pass the ``mean``
    and ``rstd`` that ``normalize(..., return_stats=True)`` returned to skip recomputing them.

    >>> import numpy as np
    >>> x = np.array([[1., 2., 4.]])
    >>> gx, gw, gb = normalize_backward(np.ones_like(x), x, "b [f]", weight=np.ones(3), params="f")
    >>> bool(np.abs(gx).max() < 1e-12), gb.tolist()   # a shift of the output has no x-gradient
    (True, [1.0, 1.0, 1.0])

    With any fused option of :func:`normalize` it returns a
    :class:`normlab.fused.FusedGradients` record (x, residual, gate, weight, bias, scale,
    shift); ``grad_sum`` is the gradient of the returned ``x + residual``, and ``bias`` is
    needed when a gate comes after the norm.

    ``mask``, the segment arguments and ``sizes`` are :func:`normalize`'s; the gradients are
    exactly those of its definition, masked-out outputs included.
    """
    try:
        sizes = merge_sizes(pattern, sizes, axis_sizes, _shape_of(x))
        if grad_sum is not None and residual is None:  # there is no x + residual for it to be the gradient of
            raise InputError(f"{_describe(pattern, _shape_of(x))}: grad_sum is the gradient of the returned x + "
                             "residual, and no residual was given; pass residual= (as to normalize), or leave "
                             "grad_sum out")
        if not fused.default_gate_options(gate_activation, norm_before_gate):  # (no message to build)
            fused.check_gate_options(gate_activation, norm_before_gate, _describe(pattern, _shape_of(x)))
        if _grouped(x, pattern, mask, segment_ids, num_segments, segment_axis, residual, gate, weight_offset, scale,
                    shift, modulation):
            from normlab import grouped

            return grouped.normalize_backward(
                grad_y, x, pattern, weight=weight, params=params, eps=eps, rms=rms, mean=mean, rstd=rstd,
                backend=backend, mask=mask, segment_ids=segment_ids, num_segments=num_segments,
                segment_axis=segment_axis, sizes=sizes)
        if fused.wants_fused(residual, gate, weight_offset, scale, shift, modulation):
            return fused.normalize_backward(grad_y, x, pattern, weight=weight, params=params, eps=eps, rms=rms,
                                            mean=mean, rstd=rstd, backend=backend, residual=residual, gate=gate,
                                            gate_activation=gate_activation, norm_before_gate=norm_before_gate,
                                            weight_offset=weight_offset, scale=scale, shift=shift,
                                            modulation=modulation, bias=bias, grad_sum=grad_sum, sizes=sizes)
        if isinstance(grad_y, np.ma.MaskedArray):
            reject_masked(grad_y, "grad_y", _describe(pattern, np.shape(x)))
        prepared = prepare(x, pattern, weight, None, params, sizes)
        plan = prepared.plan
        eps = _check_eps(eps, plan)
        rms = _check_flag(rms, "rms", plan)
        given_grad_y, grad_y = grad_y, as_array(grad_y, "grad_y", pattern, plan.shape)
        check_gradient_shape(given_grad_y, grad_y, "grad_y", plan)
        result_dtype(grad_y, pattern, "grad_y")
        grad_y = computable(grad_y)
        use_kernels = _resolve_backend(backend, plan, prepared.x.dtype, grad_y.dtype) == "numba"
        refuse_mean_with_rms(mean, rms, _describe(plan, plan.shape))
        if mean is not None and rstd is None:  # silently recomputing would ignore the given mean
            raise InputError(f"{_describe(plan, plan.shape)}: mean was given without rstd; pass both (or neither)")
        if rstd is not None:
            rstd = _given_stats(rstd, "rstd", plan)
            if not rms:
                if mean is None:
                    raise InputError(f"{_describe(plan, plan.shape)}: rstd was given without mean; pass both")
                mean = _given_stats(mean, "mean", plan)
            else:
                mean = None
        result = None
        if use_kernels:
            from normlab import kernels

            result = kernels.backward(prepared, grad_y, eps, rms, mean, rstd,
                                      need_params=weight is not None or params is not None)
        if result is not None:
            grad_x, grad_w, grad_b = result
            grad_w = grad_w if weight is not None else None
            grad_b = grad_b if params is not None else None
        else:
            grad_x, grad_w, grad_b = _reference_backward(grad_y, prepared, eps, rms, mean, rstd, weight, params)
        return _finish_backward(prepared, grad_x, grad_w, grad_b, weight)
    except MemoryError as error:
        raise MemoryError(out_of_memory(pattern, _shape_of(x), error, 'normalize_backward', params,
                                        _given(mask=mask, residual=residual, gate=gate))) from error


def _given(**arguments) -> tuple:
    """The names of the arguments given (not None), in order."""
    return tuple(name for name, value in arguments.items() if value is not None)


def _reference_backward(grad_y, prepared: Prepared, eps, rms, mean, rstd, weight, params):
    plan = prepared.plan
    if rstd is None:
        stats = reference.compute_stats(prepared.x, plan, eps, rms)
        mean, rstd = stats.mean, stats.rstd
    return reference.backward(
        grad_y.reshape(plan.axis_sizes), prepared.x, plan, mean, rstd, prepared.weight,
        need_weight=weight is not None, need_bias=params is not None,
    )


def _finish_backward(prepared: Prepared, grad_x, grad_w, grad_b, weight):
    """Cast the gradients to their dtypes and lay them out as x and the parameters."""
    plan = prepared.plan
    grad_x = reference.rounded(grad_x, prepared.dtype).reshape(plan.shape)
    param_dtype = gradient_dtype(weight, prepared.dtype)
    if grad_w is not None:
        grad_w = reference.rounded(plan.collapse_params(grad_w), param_dtype)
    if grad_b is not None:
        grad_b = reference.rounded(plan.collapse_params(grad_b), param_dtype)
    return grad_x, grad_w, grad_b
