"""Parsed pattern + input shape + sizes -> a frozen, cached plan.

The plan is everything the math needs to know about *which* elements share statistics:
the input viewed with compositions split and the ellipsis expanded (the *expanded view*),
which of those axes are reduced, the shape of the statistics, and how ``weight`` and
``bias`` line up with the axes. It holds no data.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from normlab.errors import ParamsError, PatternSyntaxError, ShapeError
from normlab.notation import ELLIPSIS, Pattern, parse_params, parse_pattern

__all__ = ["Plan", "Run", "make_plan", "merge_sizes"]


@dataclass(frozen=True)
class Run:
    """A maximal stretch of adjacent expanded axes (size-1 axes dropped) that are all
    reduced or all kept; kernels see the input as one axis per run."""

    size: int
    reduced: bool
    axes: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """Which elements of an input of ``shape`` share a mean and a variance.

    >>> p = make_plan("b (g [c]) [h w]", (2, 6, 4, 4), g=3)
    >>> p.axis_names, p.axis_sizes, p.stats_shape
    (('b', 'g', 'c', 'h', 'w'), (2, 3, 2, 4, 4), (2, 3, 1, 1, 1))
    >>> p.group_size, p.num_groups
    (32, 6)
    """

    pattern: str
    shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    axis_sizes: tuple[int, ...]
    reduced: tuple[bool, ...]
    params: str | None = None
    param_axes: tuple[int, ...] = ()  # expanded axes that weight spans, in params order
    param_shape: tuple[int, ...] = ()  # the shape weight and bias must have

    @property
    def ndim(self) -> int:
        return len(self.axis_sizes)

    @property
    def reduced_axes(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.reduced) if r)

    @property
    def kept_axes(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.reduced) if not r)

    @property
    def stats_shape(self) -> tuple[int, ...]:
        """The expanded shape with reduced axes of size 1: the shape of mean and rstd."""
        return tuple(1 if r else s for s, r in zip(self.axis_sizes, self.reduced))

    @property
    def group_size(self) -> int:
        """How many elements share one mean and variance."""
        return math.prod(self.axis_sizes[i] for i in self.reduced_axes)

    @property
    def num_groups(self) -> int:
        return math.prod(self.stats_shape)

    @property
    def param_broadcast_shape(self) -> tuple[int, ...]:
        """The expanded shape with axes outside ``params`` of size 1."""
        spanned = set(self.param_axes)
        return tuple(s if i in spanned else 1 for i, s in enumerate(self.axis_sizes))

    @property
    def runs(self) -> tuple[Run, ...]:
        """Adjacent expanded axes merged into runs of like kind, size-1 axes dropped."""
        runs: list[Run] = []
        for i, (size, red) in enumerate(zip(self.axis_sizes, self.reduced)):
            if size == 1:
                continue
            if runs and runs[-1].reduced == red:
                last = runs[-1]
                runs[-1] = Run(last.size * size, red, last.axes + (i,))
            else:
                runs.append(Run(size, red, (i,)))
        return tuple(runs)

    def expand_params(self, array):
        """Lay out a ``weight`` or ``bias`` of ``param_shape`` to broadcast against the
        expanded view (axes in pattern order, size 1 elsewhere)."""
        split = array.reshape(tuple(self.axis_sizes[i] for i in self.param_axes))
        order = sorted(range(len(self.param_axes)), key=lambda k: self.param_axes[k])
        return split.transpose(order).reshape(self.param_broadcast_shape)

    def collapse_params(self, array):
        """Inverse of :meth:`expand_params`: an array of ``param_broadcast_shape`` back to
        ``param_shape`` (used for the weight and bias gradients)."""
        in_pattern_order = sorted(self.param_axes)
        squeezed = array.reshape(tuple(self.axis_sizes[i] for i in in_pattern_order))
        order = [in_pattern_order.index(a) for a in self.param_axes]
        return squeezed.transpose(order).reshape(self.param_shape)

    def group_ids(self):
        """An integer array of the input's shape: which group each element belongs to.

        >>> make_plan("[b] f", (3, 3)).group_ids()
        array([[0, 1, 2],
               [0, 1, 2],
               [0, 1, 2]])
        """
        import numpy as np

        ids = np.arange(self.num_groups).reshape(self.stats_shape)
        return np.broadcast_to(ids, self.axis_sizes).reshape(self.shape)


_MAX_ELEMENTS = sys.maxsize // 8  # the most float64 values an array may address (NumPy's bound)


@functools.lru_cache(maxsize=1)
def max_axes() -> int:
    """The most axes a NumPy array may have here: 64 from NumPy 2.0 on, 32 before."""
    import numpy as np

    return 64 if int(np.__version__.split(".")[0]) >= 2 else 32


def _fail(pattern: str, shape: tuple[int, ...], rule: str, fix: str) -> ShapeError:
    return ShapeError(f"pattern {pattern!r} does not fit input shape {shape}: {rule}; {fix}")


def _sizes_error(pattern: str, sizes, keywords: dict, shape) -> ShapeError:
    """What is wrong with a ``sizes=`` that :func:`merge_sizes` refuses. Built only on
    failure: under torch.compile the shape holds symbolic sizes, whose text Dynamo cannot
    build."""
    where = f"pattern {pattern!r}" + ("" if shape is None else f", input shape {tuple(shape)}")
    example = "sizes={'x': 3} for an axis named x"
    if not isinstance(sizes, Mapping):
        return ShapeError(f"{where}: sizes must be a mapping of axis names to sizes, got "
                          f"{type(sizes).__name__} {sizes!r}; pass e.g. {example}")
    for name in sizes:
        if not isinstance(name, str):
            return ShapeError(f"{where}: sizes maps axis names to sizes, and {name!r} is not a name; "
                              f"pass e.g. {example}")
    both = [name for name in sizes if name in keywords]
    return ShapeError(f"{where}: the size of {', '.join(both)} is given both in sizes= and as a "
                      f"keyword ({', '.join(f'{n}={keywords[n]!r}' for n in both)}); give each axis size once")


def merge_sizes(pattern: str, sizes, keywords: dict, shape=None) -> dict:
    """The axis sizes given as the mapping ``sizes`` and as keyword arguments, in a new dict.

    The mapping sizes axes named like a keyword of the function itself (``x``, ``eps``,
    ``scale``, ``shape``), which keyword arguments cannot. An axis given both ways is an
    error, as a keyword given twice is in Python.

    >>> merge_sizes("b (x [c])", {"x": 3}, {"c": 2})
    {'x': 3, 'c': 2}
    """
    if sizes is None:
        return dict(keywords)
    if not isinstance(sizes, Mapping) or any(not isinstance(name, str) or name in keywords for name in sizes):
        raise _sizes_error(pattern, sizes, keywords, shape)
    return {**sizes, **keywords}


def make_plan(pattern: str, shape, params: str | None = None, *, sizes=None, **axis_sizes: int) -> Plan:
    """Resolve ``pattern`` against an input shape (cached on all arguments). Sizes come as
    keywords (``g=32``) or, for axes named like this function's arguments, in the mapping
    ``sizes`` (:func:`merge_sizes`).

    >>> make_plan("b (g [c])", (2, 6), sizes={"g": 3}).stats_shape
    (2, 3, 1)
    """
    sizes = merge_sizes(pattern, sizes, axis_sizes, shape)
    try:
        shape = tuple(map(operator.index, shape))  # (ints, NumPy's and torch's; int() would truncate 2.5)
    except TypeError as err:
        raise ShapeError(f"pattern {pattern!r}: shape must be a sequence of ints, got {shape!r}; pass the "
                         "input's shape, x.shape") from err
    try:
        parsed = parse_pattern(pattern)  # syntax (and type) errors first, before anything is hashed
    except PatternSyntaxError as err:
        raise err.on_input(f"pattern {err.pattern!r}, input shape {shape}") from None
    if params is not None:
        try:
            parse_params(params)
        except PatternSyntaxError as err:
            raise err.on_input(f"params {err.pattern!r}, pattern {pattern!r}, input shape {shape}") from None
    for name, value in sizes.items():
        try:
            sizes[name] = operator.index(value)  # ints and NumPy integers; not floats
        except TypeError:
            sizes[name] = -1
        if isinstance(value, bool) or sizes[name] < 1:
            _refuse_unknown_size(pattern, shape, parsed, name, value)  # (a misspelt keyword, epsilon=1e-3, first)
            raise _fail(pattern, shape, f"{name}={value!r} is not a positive integer", f"pass {name} as an int >= 1")
    return _make_plan(pattern, shape, params, tuple(sorted(sizes.items())))


def _refuse_unknown_size(pattern: str, shape: tuple, parsed: Pattern, name: str, value) -> None:
    """A size that names no axis of the pattern is told so, not asked for an int."""
    if name not in parsed.names:
        raise _fail(pattern, shape, f"{size_given_as(name, value)} names no axis of the pattern",
                    epsilon_fix(name, value) or onnx_fix(parsed, name, value)
                    or _NUMPY_FIXES.get(name, "") + f"use one of {', '.join(parsed.names)}, or drop it")


def size_given_as(name: str, value) -> str:
    """``name=value`` as a message quotes a keyword that landed among the axis sizes; an
    array or tensor (NumPy's out= or where=, a mask) by its shape, as its repr runs for lines.

    >>> size_given_as("q", 5), size_given_as("where", [[True] * 30] * 2)
    ('q=5', 'where, a list,')
    """
    given = f"{name}={value!r}"
    if len(given) > 60 or "\n" in given:
        value_shape = getattr(value, "shape", None)
        given = (f"{name}, an array of shape {tuple(value_shape)}," if isinstance(value_shape, tuple)
                 else f"{name}, a {type(value).__name__},")
    return given


# NumPy's keywords that land among the axis sizes (normalize's own out= does not)
_NUMPY_FIXES = {"where": "NumPy's where= (the elements that count) is normlab's mask=; ",
                "out": "normalize_backward returns new arrays and takes no out=; "}


# other frameworks' names for a norm's epsilon (ONNX's, Keras' and Flax's, transformers'):
# passed to normalize or Norm, they land among the axis sizes, and dropping one changes eps
_EPSILON_NAMES = frozenset({"epsilon", "variance_epsilon"})


def epsilon_fix(name: str, value) -> str | None:
    """The fix for a size named as other frameworks name the epsilon; None for any other name.

    >>> epsilon_fix("epsilon", 1e-3)
    "normlab's epsilon is eps: pass eps=0.001"
    """
    return f"normlab's epsilon is eps: pass eps={value!r}" if name in _EPSILON_NAMES else None


def onnx_fix(parsed: Pattern, name: str, value) -> str | None:
    """The fix for a size named as an ONNX normalization's attribute; None for any other name.
    axis and axes are the pattern's brackets, num_groups the size of its group factor.

    >>> onnx_fix(parse_pattern("b c h [w]"), "axis", 1)
    "ONNX's axis is written with [ ], not passed: pass the pattern 'b [c h w]' (the axes from 1 on) and drop axis="
    >>> onnx_fix(parse_pattern("b (g [c]) [h w]"), "num_groups", 32)
    'the number of groups is the size of the factor beside [c]: pass g=32'
    >>> onnx_fix(parse_pattern("b ([g] c) [h w]"), "num_groups", 32)  # doctest: +NORMALIZE_WHITESPACE
    "ONNX's num_groups splits the channels into runs of adjacent ones, the group factor first and its channels
    bracketed: write ([g] c) as (g [c]) and pass g=32"
    >>> onnx_fix(parse_pattern("b (a [g] c) [h w]"), "num_groups", 32)  # doctest: +NORMALIZE_WHITESPACE
    "ONNX's num_groups splits the channels into runs of adjacent ones, the group factor first and its channels
    bracketed: write (a [g] c) as (a [g c]) and pass a=32"
    """
    if name == "num_groups":
        groups = [(factor.name, dim) for dim in parsed.dims if dim.composed and any(a.reduced for a in dim.factors)
                  for factor in dim.factors if not factor.reduced]
        if groups:
            group, dim = groups[0]
            if any(factor.reduced and not after.reduced for factor, after in zip(dim.factors, dim.factors[1:])):
                # ("([g] c)", "(a [g] c)": a bracketed factor before a free one, so channel k shares statistics
                # with k + c, k + 2c, ...; ONNX's and torch's groups are runs of adjacent channels, the outer
                # factor counting them)
                names = [a.name for a in dim.factors]
                return (f"ONNX's num_groups splits the channels into runs of adjacent ones, the group factor "
                        f"first and its channels bracketed: write {_composed(dim)} as ({names[0]} "
                        f"[{' '.join(names[1:])}]) and pass {names[0]}={value!r}")
            beside = " ".join(a.name for a in dim.factors if a.reduced)
            return f"the number of groups is the size of the factor beside [{beside}]: pass {group}={value!r}"
        return f"groups are a composed axis: write the channels as (g [c]) and pass g={value!r}"
    if name == "axis":
        written = _bracketed(parsed, lambda index, rank: index >= value % rank, value, int)
        return ("ONNX's axis is written with [ ], not passed: "
                + (f"pass the pattern {written!r} (the axes from {value} on) and drop axis=" if written
                   else "bracket the axes from that axis on ('b t [d]' for axis=-1, 'b [c h w]' for axis=1) and drop axis="))
    if name == "axes":
        written = _bracketed(parsed, lambda index, rank: index in {a % rank for a in value}, value, (list, tuple))
        return ("ONNX's axes are written with [ ], not passed: "
                + (f"pass the pattern {written!r} (axes {value}) and drop axes=" if written
                   else "bracket those axes ('[b] c [h w]' for axes=[0, 2, 3]) and drop axes="))
    if name == "stash_type":
        # (float32 rows apply the statistics in float32: only the statistics are float64 throughout)
        return ("normlab gathers the statistics in float64 whatever the input's dtype (the NumPy API, and the "
                "torch twins' CPU kernels) and returns the input's dtype: drop it")
    return None


def _composed(dim) -> str:
    """A composed axis as written, its reduced factors bracketed: ``([g] c)``."""
    words = []
    for factor in dim.factors:
        words.append(f"[{factor.name}]" if factor.reduced else factor.name)
    return "(" + " ".join(words).replace("] [", " ") + ")"


def _bracketed(parsed: Pattern, reduced, value, kind) -> str | None:
    """The pattern's axes, brackets removed, with those that ``reduced(index, rank)`` picks
    bracketed; None where the pattern has ``...`` or ``value`` is no index of its axes."""
    rank = len(parsed.dims)
    indices = value if isinstance(value, (list, tuple)) else [value]
    if (parsed.has_ellipsis or not isinstance(value, kind) or not indices
            or not all(isinstance(i, int) and not isinstance(i, bool) and -rank <= i < rank for i in indices)):
        return None
    words = []
    for index, dim in enumerate(parsed.dims):
        text = dim.factors[0].name if not dim.composed else "(" + " ".join(a.name for a in dim.factors) + ")"
        words.append(f"[{text}]" if reduced(index, rank) else text)
    return " ".join(words).replace("] [", " ")


# normlab.torch's Norm takes these keywords besides normalize's (named here: plan.py does not import torch);
# sizes= works in every API, so a name in both sets is always asked for there
_TORCH_KEYWORDS = frozenset({"affine", "momentum", "track_running_stats", "running_axes", "device", "dtype"})


def _size_given(name: str, size) -> str:
    """How a caller of normalize gives axis ``name`` its size: ``g=4``, or ``sizes={'eps': 4}`` for an
    axis named like one of normalize's (or normlab.torch.Norm's) own keywords, which a keyword
    argument would set instead."""
    import inspect

    from normlab import core

    keywords = {parameter for function in (core.normalize, core.normalize_backward)
                for parameter, kind in inspect.signature(function).parameters.items()
                if kind.kind is not inspect.Parameter.VAR_KEYWORD} | _TORCH_KEYWORDS
    return f"sizes={{{name!r}: {size}}}" if name in keywords else f"{name}={size}"


@functools.lru_cache(maxsize=4096)
def _make_plan(text: str, shape: tuple[int, ...], params: str | None, sizes_items) -> Plan:
    parsed: Pattern = parse_pattern(text)
    if any(size < 0 for size in shape):  # (checked once per cached plan)
        raise _fail(text, shape, "a size is negative", "pass the input's shape, x.shape")
    sizes = dict(sizes_items)
    for name, value in sizes.items():
        _refuse_unknown_size(text, shape, parsed, name, value)

    ndims = len(parsed.dims)
    if parsed.has_ellipsis:
        if len(shape) < ndims - 1:
            raise _fail(text, shape, f"the pattern needs at least {ndims - 1} axes, the input has {len(shape)}",
                        "pass an input of higher rank or name fewer axes")
        ellipsis_rank = len(shape) - (ndims - 1)
    elif len(shape) != ndims:
        raise _fail(text, shape, f"the pattern names {ndims} axes, the input has {len(shape)}",
                    "name one axis per input dimension, or use '...' for any number")
    else:
        ellipsis_rank = 0

    names: list[str] = []
    axis_sizes: list[int] = []
    reduced: list[bool] = []
    index = 0
    for dim in parsed.dims:
        if dim.is_ellipsis:
            for k in range(ellipsis_rank):
                names.append(f"{ELLIPSIS}{k}")
                axis_sizes.append(shape[index])
                reduced.append(dim.reduced)
                index += 1
            continue
        size = shape[index]
        index += 1
        known = [sizes.get(a.name) for a in dim.factors]
        missing = [a.name for a, s in zip(dim.factors, known) if s is None]
        if len(dim.factors) == 1:
            if known[0] is not None and known[0] != size:
                raise _fail(text, shape, f"axis {dim.factors[0].name} has size {size}, not {known[0]}",
                            f"pass {_size_given(dim.factors[0].name, size)} or leave it out")
            factor_sizes = [size]
        else:
            product = math.prod(s for s in known if s is not None)
            group = "(" + " ".join(a.name for a in dim.factors) + ")"
            if len(missing) > 1:
                raise _fail(text, shape, f"{group} has {len(missing)} factors of unknown size ({', '.join(missing)})",
                            f"give all but one their sizes, e.g. {_size_given(missing[0], '...')}")
            if len(missing) == 1:
                if size % product:
                    raise _fail(text, shape, f"the axis {group} of size {size} is not divisible by {product}",
                                "choose factor sizes that divide it")
                inferred = size // product
            elif product != size:
                raise _fail(text, shape, f"{group} multiplies to {product}, but that axis has size {size}",
                            "make the factor sizes multiply to the axis size")
            factor_sizes = [s if s is not None else inferred for s in known]
        for axis, factor_size in zip(dim.factors, factor_sizes):
            names.append(axis.name)
            axis_sizes.append(factor_size)
            reduced.append(axis.reduced)

    if len(names) > max_axes():
        raise _fail(text, shape, f"its expanded view (compositions split, '...' expanded) has {len(names)} axes, "
                    f"more than the {max_axes()} a NumPy array may have",
                    "name fewer axes: reshape the input so that axes sharing a role become one, or compose fewer "
                    "factors")
    # a factor of an empty axis may be given any size (the other factor is then 0), but the
    # statistics keep it: past what a float64 array can address, NumPy would fail inside
    if math.prod(s for s in axis_sizes if s) > _MAX_ELEMENTS:
        raise _fail(text, shape, f"its expanded view has axes of sizes {tuple(axis_sizes)}, more elements (the "
                    "empty axes aside) than a float64 array can hold",
                    "give the factors of an empty axis sizes that fit, or leave one factor out to infer it")

    param_axes: tuple[int, ...] = ()
    param_shape: tuple[int, ...] = ()
    if params is not None:
        items = parse_params(params)
        lookup = {name: i for i, name in enumerate(names)}
        for item in items:
            for name in item:
                if name not in lookup:
                    raise ParamsError(
                        f"params {params!r} names axis {name!r}, which pattern {text!r} does not have "
                        f"(input shape {shape}): name axes from {', '.join(parsed.names)}"
                    )
        param_axes = tuple(lookup[name] for item in items for name in item)
        param_shape = tuple(math.prod(axis_sizes[lookup[n]] for n in item) for item in items)

    return Plan(text, shape, tuple(names), tuple(axis_sizes), tuple(reduced), params, param_axes, param_shape)
