r"""Statistics decided by data: masks and segments. The math of :func:`normlab.normalize`'s
``mask=`` and ``segment_ids=`` arguments, in NumPy (the kernels' twin).

A **mask** ``m`` (boolean, broadcast to x's shape) marks the elements that *count* toward
their group's statistics. A **segment id** array ``s`` along one bracketed axis splits each
group further: elements whose ids differ fall in different groups, and the statistics come
back with that axis of length ``num_segments``. For a group with counted elements
:math:`C` (``n = |C|``) and all its elements :math:`G`:

.. math::

    \mu = \frac1n\sum_{i\in C} x_i,\qquad \sigma^2 = \frac1n\sum_{i\in C}(x_i-\mu)^2,\qquad
    r = 1/\sqrt{\sigma^2+\varepsilon},\qquad y_i = (x_i-\mu)\,r\,w_i + b_i\quad (i\in G)

Every element is normalized with its group's statistics, counted or not, as Flax's
``mask=`` does. A group with no counted element has ``mean = rstd = 0`` and gives exactly
``0`` (exactly ``bias``). Backward, with :math:`\hat x_i=(x_i-\mu)r`, :math:`g_i=\partial
L/\partial y_i\,w_i` and :math:`m_i` the mask:

.. math::

    \frac{\partial L}{\partial x_i} = r\Big(g_i - \frac{m_i}{n}\sum_{j\in G} g_j
    - \frac{m_i\hat x_i}{n}\sum_{j\in G} g_j\hat x_j\Big)

(the sums run over *every* element: a masked-out output still depends on the counted
inputs through the statistics, save one whose :math:`\hat x_i` is NaN or ±Inf, garbage in
the padding, which stays in its own output and gradient: its term would be NaN however
small its gradient, where the counted elements alone give finite ones; the weight's
gradient leaves it out too). The numerical choices are the reference's: float64,
shifted two-pass variance, with each group shifted by its first *counted* element.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from normlab.errors import InputError, ShapeError
from normlab.plan import Plan

__all__ = ["Grouping", "make_grouping", "MaskedStats", "compute_stats", "forward", "backward", "group_counts"]


@dataclass(frozen=True)
class MaskedStats:
    """Statistics per group, of ``grouping.stats_shape`` (float64), with the counts that
    running statistics need; ``mean`` is None for RMS, ``var`` and ``count`` for given statistics."""

    mean: np.ndarray | None
    var: np.ndarray
    rstd: np.ndarray
    count: np.ndarray  # int64: counted elements per group


@dataclass(frozen=True)
class Grouping:
    """Which elements share statistics beyond the plan's axes: a mask and segment ids.

    ``counted`` is the mask on the expanded view (None: every element counts);
    ``segment_axis`` an expanded axis (reduced) or None; ``segment_ids`` int64 along it.
    """

    plan: Plan
    counted: np.ndarray | None
    segment_axis: int | None = None
    segment_ids: np.ndarray | None = None
    num_segments: int = 1

    @property
    def stats_shape(self) -> tuple[int, ...]:
        """The plan's statistics shape, with the segment axis of length ``num_segments``."""
        shape = list(self.plan.stats_shape)
        if self.segment_axis is not None:
            shape[self.segment_axis] = self.num_segments
        return tuple(shape)

    @property
    def ids_sorted(self) -> bool:
        ids = self.segment_ids
        return ids is None or bool(np.all(ids[1:] >= ids[:-1]))

    def group_index(self) -> np.ndarray:
        """Flat index into ``stats_shape`` of every element (expanded view, read-only view)."""
        ids = np.arange(math.prod(self.stats_shape)).reshape(self.stats_shape)
        if self.segment_axis is not None:
            ids = np.take(ids, self.segment_ids, axis=self.segment_axis)
        return np.broadcast_to(ids, self.plan.axis_sizes)

    def counted_view(self) -> np.ndarray:
        """The mask broadcast to the expanded view (all True without a mask)."""
        if self.counted is None:
            return np.broadcast_to(np.True_, self.plan.axis_sizes)
        return self.counted


def _describe(plan: Plan) -> str:
    return f"pattern {plan.pattern!r}, input shape {plan.shape}"


def _refuse_masked_elements(value: np.ma.MaskedArray, name: str, plan: Plan, fix: str) -> None:
    """An np.ma array with masked elements as ``mask`` or ``segment_ids``: NumPy would read the
    values under its mask as they are, which the caller meant to leave out. ``fix`` says how."""
    if np.ma.getmaskarray(value).any():
        raise InputError(f"{_describe(plan)}: {name} is a masked array with masked elements, and normlab does not "
                         f"read np.ma masks; decide what the masked positions are: pass {fix}")


def refuse_masked_mask(mask: np.ma.MaskedArray, plan: Plan) -> None:
    """An np.ma array with masked elements as ``mask``: refused, with the two ways to decide."""
    _refuse_masked_elements(mask, "mask", plan, "mask.filled(False) to leave them out of the statistics, or "
                            "mask.filled(True) to count them")


def _mask_view(mask, plan: Plan) -> np.ndarray:
    from normlab.core import as_array

    if isinstance(mask, np.ma.MaskedArray):  # (a plain array, as the torch twins pass, skips the call)
        refuse_masked_mask(mask, plan)
    mask = as_array(mask, "mask", plan.pattern, plan.shape)
    if mask.dtype != np.bool_:
        raise InputError(f"{_describe(plan)}: mask has dtype {mask.dtype}; pass a boolean array "
                         "(True where an element counts toward its group's statistics), e.g. mask != 0")
    try:
        full = np.broadcast_to(mask, plan.shape)
    except ValueError:
        raise ShapeError(f"{_describe(plan)}: mask of shape {mask.shape} does not broadcast to the input; "
                         f"pass a mask of shape {plan.shape} or one with size-1 axes that broadcast"
                         + missing_axes_fix(mask.shape, plan.shape)) from None
    return full.reshape(plan.axis_sizes)


def missing_axes_index(mask_shape: tuple, shape: tuple) -> tuple | None:
    """The index that gives a mask of some of the input's axes (a padded batch's ``(batch,
    time)`` mask beside ``(batch, time, features)``) size-1 axes for the others; None where
    its sizes are no subsequence of the input's. Each of the mask's axes goes on the first
    input axis of its size after the last one placed.

    >>> missing_axes_index((2, 5), (2, 5, 8)), missing_axes_index((2, 5), (2, 3, 5)), missing_axes_index((4,), (2, 3))
    ((Ellipsis, None), (slice(None, None, None), None, slice(None, None, None)), None)
    """
    mask_shape, shape = tuple(map(int, mask_shape)), tuple(map(int, shape))
    if len(mask_shape) >= len(shape):
        return None
    picked, start = [], 0
    for size in mask_shape:
        found = next((i for i in range(start, len(shape)) if shape[i] == size), None)
        if found is None:
            return None
        picked.append(found)
        start = found + 1
    if picked == list(range(len(mask_shape))):
        return (Ellipsis,) + (None,) * (len(shape) - len(mask_shape))
    return tuple(slice(None) if i in picked else None for i in range(len(shape)))


def missing_axes_fix(mask_shape: tuple, shape: tuple) -> str:
    """:func:`missing_axes_index` as a clause for a message, written as Python indexes; "" where none fits.

    >>> missing_axes_fix((2, 5), (2, 5, 8)) + missing_axes_fix((2, 5), (2, 3, 5))
    ': mask[..., None] (size-1 axes for those it lacks): mask[:, None, :] (size-1 axes for those it lacks)'
    """
    index = missing_axes_index(mask_shape, shape)
    if index is None:
        return ""
    written = ", ".join("..." if i is Ellipsis else "None" if i is None else ":" for i in index)
    return f": mask[{written}] (size-1 axes for those it lacks)"


def _segment_axis(plan: Plan, segment_axis, ids_name: str = "segment_ids") -> int:
    reduced = [plan.axis_names[i] for i in plan.reduced_axes if not plan.axis_names[i].startswith("...")]
    if segment_axis is None:
        if not reduced:
            raise ShapeError(f"{_describe(plan)}: {ids_name} run along a bracketed axis, and this pattern "
                             "brackets none by name; bracket the axis the ids run along")
        segment_axis = reduced[0]
    if not isinstance(segment_axis, str):  # (an array would be compared elementwise by `in`)
        shown = (f"an array of shape {np.shape(segment_axis)}" if isinstance(segment_axis, np.ndarray)
                 else repr(segment_axis))
        raise InputError(f"{_describe(plan)}: segment_axis must name a bracketed axis as a str, got {shown}; "
                         f"pass one of {', '.join(map(repr, reduced))}")
    if segment_axis not in reduced:
        raise ShapeError(f"{_describe(plan)}: segment_axis={segment_axis!r} is not a bracketed axis; "
                         f"pass one of {', '.join(map(repr, reduced))}")
    return plan.axis_names.index(segment_axis)


def make_grouping(plan: Plan, mask=None, segment_ids=None, num_segments=None, segment_axis=None,
                  ids_name: str = "segment_ids") -> Grouping:
    """Check ``mask`` and the segment arguments against ``plan`` (errors call the ids
    ``ids_name``, the name the caller gave them).

    >>> from normlab.plan import make_plan
    >>> g = make_grouping(make_plan("[n] c", (5, 2)), segment_ids=np.array([0, 0, 1, 1, 1]))
    >>> g.stats_shape, g.num_segments
    ((2, 2), 2)
    """
    # a 0-d True mask counts every element: the same as none
    counted = None if mask is None or mask is np.True_ else _mask_view(mask, plan)
    if segment_ids is None:
        if num_segments is not None or segment_axis is not None:
            raise InputError(f"{_describe(plan)}: num_segments and segment_axis need segment_ids")
        return Grouping(plan, counted)
    axis = _segment_axis(plan, segment_axis, ids_name)
    from normlab.core import as_array

    if isinstance(segment_ids, np.ma.MaskedArray):
        _refuse_masked_elements(segment_ids, ids_name, plan, f"{ids_name}.filled(id) with the id they belong to")
    ids = as_array(segment_ids, ids_name, plan.pattern, plan.shape)
    length = plan.axis_sizes[axis]
    integers, fits = ids.dtype.kind in "iu", ids.shape == (length,)
    # (each fault said alone: ids of the right dtype are not told their dtype, nor the reverse)
    if not (integers or fits):
        rule, got = f"be integers of shape ({length},)", f"dtype {ids.dtype} and shape {ids.shape}"
        if isinstance(segment_ids, str):  # (one text value, not one id per character)
            fix = (f"; pass the ids as an integer array, not a str (np.array(list({ids_name}), np.int64) reads "
                   "one id per digit)")
        else:
            fix = f"; pass an integer array of {length} ids, one for each element along that axis"
    elif not integers:
        rule, got = "be integers", f"dtype {ids.dtype}"
        fix = f"; pass integer ids ({ids_name}.astype(np.int64) where they are whole numbers)"
    elif not fits:
        rule, got = f"have shape ({length},)", f"shape {ids.shape}"
        fix = f"; pass {ids_name}.reshape(-1)" if ids.size == length else ""
    if not (integers and fits):
        raise ShapeError(f"{_describe(plan)}: {ids_name} must {rule}, one per element along axis "
                         f"{plan.axis_names[axis]!r}; got {got}{fix}")
    if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
        # beyond int64 the cast below would wrap the id to a negative one and misreport it
        check_segment_count(plan, int(ids.max()), int(ids.max()) + 1, given=False, ids_name=ids_name)  # refuses: no input is that big
    ids = ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < 0:
        raise ShapeError(f"{_describe(plan)}: {ids_name} hold a negative id ({ids.min()}); ids count from 0")
    given = num_segments is not None
    if num_segments is None:
        num_segments = int(ids.max()) + 1 if ids.size else 0
    else:
        try:
            if isinstance(num_segments, (bool, np.bool_)):  # (a flag is no count: True would be 1)
                raise TypeError
            num_segments = operator.index(num_segments)
        except TypeError:
            raise InputError(f"{_describe(plan)}: num_segments must be an int, got {num_segments!r}; pass "
                             f"int(num_segments), or leave it out for max({ids_name}) + 1") from None
        if num_segments < 0:  # (said apart: with no ids there is no max to report)
            raise ShapeError(f"{_describe(plan)}: num_segments={num_segments} is negative; pass a count >= 0, "
                             f"or leave it out for max({ids_name}) + 1")
        if ids.size and ids.max() >= num_segments:
            raise ShapeError(f"{_describe(plan)}: num_segments={num_segments} but {ids_name} reach {ids.max()}; "
                             f"pass num_segments > max({ids_name}), or leave it out")
    check_segment_count(plan, int(ids.max()) if ids.size else None, num_segments, given, ids_name=ids_name)
    return Grouping(plan, counted, axis, ids, num_segments)


# Statistics are kept for every segment id up to the largest, used or not; more of them than
# this many per input element (beyond a floor that any small input may use) is a mistake,
# such as raw node or file ids, and would exhaust memory or hang before any error
_SEGMENT_VALUES_PER_ELEMENT = 64
_SEGMENT_VALUES_FLOOR = 1 << 20


def check_segment_count(plan: Plan, largest: int | None, num_segments: int, given: bool,
                        unique: str = "np.unique", ids_name: str = "segment_ids") -> None:
    """Refuse, before anything is allocated, segments whose statistics would dwarf the input
    (``largest``: the largest id, None for no ids; ``given``: whether the caller chose
    ``num_segments``, else it is ``largest + 1``; ``unique``: the function that compacts ids)."""
    values = num_segments * math.prod(plan.stats_shape)  # the segment axis is reduced: size 1 there
    limit = max(_SEGMENT_VALUES_FLOOR, _SEGMENT_VALUES_PER_ELEMENT * math.prod(plan.shape))
    if values <= limit:
        return
    compact = f"compact the ids with {unique}({ids_name}, return_inverse=True)[1]"
    if given:
        asked = f"num_segments={num_segments}"
        fix = (f"pass num_segments=max({ids_name}) + 1 ({largest + 1})" if largest is not None
               else "pass a smaller num_segments") + f", or {compact}"
    else:
        asked = f"the largest segment id, {largest}, asks for {num_segments} segments"
        fix = f"{compact} (num_segments is then the number of distinct ids)"
    raise ShapeError(
        f"{_describe(plan)}: {asked}, whose statistics would hold {values} values for an input of "
        f"{math.prod(plan.shape)} elements (at most {limit}); statistics are kept for every id up to the "
        f"largest, so number the segments from 0 without gaps: {fix}")


def group_counts(grouping: Grouping) -> np.ndarray:
    """Counted elements per group, int64 of ``stats_shape``."""
    index = grouping.group_index()
    size = math.prod(grouping.stats_shape)
    counted = grouping.counted_view()
    flat = np.broadcast_to(index, counted.shape)[counted] if grouping.counted is not None else index.reshape(-1)
    return np.bincount(flat.reshape(-1), minlength=size).reshape(grouping.stats_shape)


def compute_stats(x: np.ndarray, grouping: Grouping, eps: float, rms: bool = False) -> MaskedStats:
    """Statistics of ``x`` (expanded view) per group of counted elements.

    >>> from normlab.plan import make_plan
    >>> x = np.array([[4.0, 3.0, 2.0, 100.0]])
    >>> s = compute_stats(x, make_grouping(make_plan("b [f]", x.shape), mask=np.array([1, 1, 1, 0], bool)), 0.0)
    >>> s.mean, s.var, s.count
    (array([[3.]]), array([[0.66666667]]), array([[3]]))
    """
    size = math.prod(grouping.stats_shape)
    index = grouping.group_index().reshape(-1)
    values = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
    counted = grouping.counted_view().reshape(-1)
    index_c, values_c = index[counted], values[counted]
    count = np.bincount(index_c, minlength=size)
    some = count > 0
    safe = np.maximum(count, 1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if rms:
            var = np.bincount(index_c, values_c * values_c, minlength=size) / safe
            mean = None
        else:
            shift = np.zeros(size)
            groups, first = np.unique(index_c, return_index=True)  # first counted element of each group
            shift[groups] = values_c[first]
            deviation = values_c - shift[index_c]
            mean_shifted = np.bincount(index_c, deviation, minlength=size) / safe
            centered = deviation - mean_shifted[index_c]
            var = np.bincount(index_c, centered * centered, minlength=size) / safe
            mean = np.where(some, shift + mean_shifted, 0.0)
        var = np.where(some, var, 0.0)
        rstd = np.where(some, 1.0 / np.sqrt(var + eps), 0.0)
        rstd[var == np.inf] = np.nan  # an overflowed variance: NaN, never silent zeros (see normlab.reference)
    shape = grouping.stats_shape
    return MaskedStats(None if mean is None else mean.reshape(shape), var.reshape(shape), rstd.reshape(shape),
                       count.reshape(shape))


def _normalized(x, grouping: Grouping, mean, rstd) -> np.ndarray:
    """x̂ = (x − mean)·rstd per element, exactly 0 in a group whose rstd is 0 (no counted element)."""
    index = grouping.group_index()
    rstd_e = rstd.reshape(-1)[index]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        x_hat = np.array(x, dtype=np.float64, order="C")
        if mean is not None:
            x_hat -= mean.reshape(-1)[index]
        x_hat *= rstd_e
    x_hat[rstd_e == 0.0] = 0.0
    return x_hat


def forward(x, grouping: Grouping, eps: float, rms=False, weight=None, bias=None, dtype=None, mean=None, rstd=None):
    """``(y, stats)`` for ``x`` in the expanded view; given ``mean``/``rstd`` (of
    ``stats_shape``) are applied instead of computed (``stats`` is then None)."""
    stats = None
    if rstd is None:
        stats = compute_stats(x, grouping, eps, rms)
        mean, rstd = stats.mean, stats.rstd
    y = _normalized(x, grouping, mean, rstd)
    with np.errstate(invalid="ignore", over="ignore"):
        if weight is not None:
            y *= weight
        if bias is not None:
            y += bias
        return y.astype(dtype or x.dtype, copy=False), stats


def backward(grad_y, x, grouping: Grouping, mean, rstd, count, weight=None, need_weight=False, need_bias=False):
    """Gradients of :func:`forward` w.r.t. x, weight and bias (expanded views, float64),
    as the module docstring writes them; parameter gradients in ``param_broadcast_shape``."""
    plan = grouping.plan
    size = math.prod(grouping.stats_shape)
    index = grouping.group_index()
    flat_index = index.reshape(-1)
    counted = grouping.counted_view()
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        g = np.ascontiguousarray(grad_y, dtype=np.float64)
        x_hat = _normalized(x, grouping, mean, rstd)
        # an uncounted NaN or Inf (garbage in the padding) feeds no sum: 0·NaN would poison its group
        x_hat_summed = np.where(counted | np.isfinite(x_hat), x_hat, 0.0)
        g_scaled = g * weight if weight is not None else g
        safe = np.maximum(count.reshape(-1), 1).astype(np.float64)
        proj = np.bincount(flat_index, (g_scaled * x_hat_summed).reshape(-1), minlength=size) / safe
        grad_x = g_scaled - np.where(counted, x_hat * proj[index], 0.0)
        if mean is not None:
            mean_g = np.bincount(flat_index, g_scaled.reshape(-1), minlength=size) / safe
            grad_x -= np.where(counted, mean_g[index], 0.0)
        grad_x *= rstd.reshape(-1)[index]
        outside = tuple(i for i in range(plan.ndim) if i not in set(plan.param_axes))
        grad_weight = (g * x_hat_summed).sum(axis=outside, keepdims=True) if need_weight else None
        grad_bias = g.sum(axis=outside, keepdims=True) if need_bias else None
    return grad_x, grad_weight, grad_bias
