"""What the explainer shows, computed by the library: groups, statistics, outputs, observations.

This module holds no normalization math. The grouping comes from
:meth:`normlab.plan.Plan.group_ids`, the numbers from
:func:`normlab.core.normalize_with_stats`; the observations only compare the numbers
the library produced, bit for bit.

>>> import numpy as np
>>> x = np.array([[4, 3, 2], [3, 3, 2], [2, 2, 2]], dtype=np.float32)
>>> view = explain_array(x, "[b] f")
>>> view.groups[:, 0].tolist(), view.describe_group(0)
([0, 0, 0], 'feature 0')
>>> print(observations(view)[0].text)
feature 0: [4, 3, 2], the middle value is the mean, so it becomes exactly 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from normlab.core import normalize_with_stats, read_array, reject_masked
from normlab.errors import NormlabError, ShapeError
from normlab.notation import ELLIPSIS, parse_pattern
from normlab.plan import Plan, make_plan

__all__ = [
    "Preset", "PRESETS", "NormView", "Observation", "resolve", "presets_for_rank", "explain_array",
    "observations", "format_value", "format_output", "format_stat", "AXIS_WORDS", "all_views", "parse_data",
    "parse_shape", "parse_sizes", "random_input", "default_groups", "float32_note",
]

# Readers know axes by what they hold, not by their letter.
AXIS_WORDS = {
    "b": "sample", "n": "sample", "f": "feature", "c": "channel", "t": "token", "d": "dim",
    "s": "position", "h": "row", "w": "column", "g": "group",
}

MAX_ELEMENTS = 4096  # the explainer draws every element; beyond this nobody can read it
EPS = 1e-5


@dataclass(frozen=True)
class Preset:
    """A named norm, spelled as a pattern for each rank it makes sense for."""

    key: str
    label: str
    patterns: dict  # rank -> pattern
    rms: bool = False
    needs_groups: bool = False  # the pattern has (g [c]) and needs g=


PRESETS = {
    "batch": Preset("batch", "batch norm", {1: "[b]", 2: "[b] f", 3: "[b] c [s]", 4: "[b] c [h w]"}),
    "layer-vision": Preset("layer-vision", "layer norm (vision)",
                           {1: "[d]", 2: "b [f]", 3: "b [c s]", 4: "b [c h w]"}),
    "layer": Preset("layer", "layer norm (NLP)", {1: "[d]", 2: "b [f]", 3: "b t [d]", 4: "b c h [w]"}),
    "instance": Preset("instance", "instance norm", {3: "b c [s]", 4: "b c [h w]"}),
    "group": Preset("group", "group norm", {3: "b (g [c]) [s]", 4: "b (g [c]) [h w]"}, needs_groups=True),
    "rms": Preset("rms", "RMS norm", {1: "[d]", 2: "b [f]", 3: "b t [d]", 4: "b c h [w]"}, rms=True),
}


def default_groups(channels: int) -> int:
    """Group norm's default ``g`` for ``channels``: groups of two channels when C is even,
    of the smallest factor otherwise, and one channel per group when C is prime (2, 3, 7):
    g = 1 would be layer norm again, so the group-norm button would show nothing new.

    >>> default_groups(6), default_groups(9), default_groups(2), default_groups(3), default_groups(7)
    (3, 3, 2, 3, 7)
    """
    for factor in range(2, channels):
        if channels % factor == 0:
            return channels // factor
    return channels


@dataclass(frozen=True)
class NormView:
    """One norm applied to one input: everything the views draw, straight from the library."""

    key: str
    label: str
    pattern: str
    rms: bool
    sizes: dict
    plan: Plan
    x: np.ndarray  # the input as given
    y: np.ndarray  # the library's output, the input's dtype
    groups: np.ndarray  # int group id per element, the input's shape (plan.group_ids())
    mean: np.ndarray | None  # float64 per group, flat (None for RMS)
    std: np.ndarray  # float64 per group, flat: sqrt(var), for RMS the root mean square
    counted: np.ndarray | None = None  # bool, the input's shape: the elements the statistics count (None: all)
    stats_shape: tuple | None = None  # with segments: the plan's, the segment axis of length num_segments
    segment_axis: int | None = None  # with segments: the expanded axis the ids run along

    @property
    def num_groups(self) -> int:
        return self.plan.num_groups if self.stats_shape is None else math.prod(self.stats_shape)

    def members(self, group: int) -> np.ndarray:
        """Flat (C-order) indices of the elements of ``group``, in order."""
        return np.flatnonzero(self.groups.ravel() == group)

    def counted_members(self, group: int) -> np.ndarray:
        """The members that count toward the statistics (all of them without a mask)."""
        members = self.members(group)
        return members if self.counted is None else members[self.counted.ravel()[members]]

    def stat_texts(self) -> tuple[list[str] | None, list[str]]:
        """Each group's mean (None for RMS) and std as the views write them; "–" for a group
        with nothing counted, whose statistics are set to 0 (its rstd too), not taken of values."""
        groups = self.groups.ravel() if self.counted is None else self.groups.ravel()[self.counted.ravel()]
        empty = np.bincount(groups, minlength=self.num_groups) == 0
        std = ["–" if empty[g] else format_stat(s) for g, s in enumerate(self.std)]
        if self.mean is None:
            return None, std
        return ["–" if empty[g] else self._mean_text(g, m) for g, m in enumerate(self.mean)], std

    def _mean_text(self, group: int, mean: float) -> str:
        """A mean that is one of its group's counted values is written as that value is
        (``1.0000002`` beside the claim that it is the mean, not ``1``), any other by format_stat."""
        values = self.x.ravel()[self.counted_members(group)]
        if np.any(values.astype(np.float64) == mean):
            return format_value(values.dtype.type(mean))
        return format_stat(mean)

    def describe_group(self, group: int) -> str:
        """Name a group by the kept axes that identify it, e.g. ``'sample 1, channel 0'``."""
        kept = self.plan.kept_axes
        if not kept and self.segment_axis is None:
            return "all elements"
        coords = np.unravel_index(group, self.plan.stats_shape if self.stats_shape is None else self.stats_shape)
        words = []
        for axis in kept:
            name = self.plan.axis_names[axis]
            if name.startswith(ELLIPSIS):  # '...0' is no word: name the input axis it stands for
                words.append(f"axis {self._input_axis(axis)} at {coords[axis]}")
            else:
                words.append(f"{AXIS_WORDS.get(name, name)} {coords[axis]}")
        if self.segment_axis is not None:
            words.append(f"segment {coords[self.segment_axis]}")
        return ", ".join(words)

    def _input_axis(self, axis: int) -> int:
        """The input axis of the expanded axis ``axis``, one that '...' stands for (it never
        stands inside a composition, so each such axis is one input axis)."""
        dims = parse_pattern(self.pattern).dims
        before = next(k for k, dim in enumerate(dims) if dim.is_ellipsis)
        first = sum(len(dim.factors) for dim in dims[:before])  # expanded axes before '...'
        return before + axis - first


def presets_for_rank(rank: int) -> list[str]:
    """The preset names that have a pattern for inputs of ``rank`` axes, in display order."""
    return [key for key, preset in PRESETS.items() if rank in preset.patterns]


def preset_meant(name: str) -> str | None:
    """The preset a name that is none stands for: a layer's name (``BatchNorm``,
    ``group_norm``, ``RMSNorm``) or a near miss (``instnace``); None where none is close.

    >>> preset_meant("BatchNorm2d"), preset_meant("layer_norm"), preset_meant("instnace"), preset_meant("conv")
    ('batch', 'layer', 'instance', None)
    """
    import difflib
    import re

    key = re.sub(r"norm(ali[sz]ation)?$", "", re.sub(r"[^a-z]", "", name.lower()))
    by_letters = {re.sub(r"[^a-z]", "", preset): preset for preset in PRESETS}
    if key in by_letters:
        return by_letters[key]
    close = difflib.get_close_matches(key, list(by_letters), n=1)
    return by_letters[close[0]] if close else None


def _guess(name: str) -> str:
    """What the refusal of a name that is neither preset nor pattern asks: ConvNeXt's
    ``LayerNorm2d`` (each pixel over its channels) by its pattern, as no preset computes it
    (the 'layer' preset's 4-D pattern is torch.nn.LayerNorm's, 'b c h [w]'); another layer's
    name or a near miss by :func:`preset_meant`; nothing where none is close.

    >>> _guess("LayerNorm2d")
    "did you mean the pattern 'b [c] h w' (ConvNeXt's LayerNorm2d: each pixel over its channels)? "
    """
    from normlab.notation import _norm_named

    if _norm_named(name) == "layer2d":  # (the names normalize(x, "LayerNorm2d") is told the same of)
        return "did you mean the pattern 'b [c] h w' (ConvNeXt's LayerNorm2d: each pixel over its channels)? "
    meant = preset_meant(name)
    return f"did you mean the preset {meant!r}? " if meant else ""


def resolve(name_or_pattern: str, shape: tuple[int, ...], sizes: dict | None = None):
    """Turn a preset name or a pattern into ``(key, label, pattern, rms, sizes)`` for ``shape``.

    >>> resolve("batch", (2, 3, 4))[2], resolve("group", (2, 6, 4))[4]
    ('[b] c [s]', {'g': 3})
    >>> resolve("b [d]", (2, 3))[:3]
    ('custom', 'your pattern', 'b [d]')
    """
    sizes = dict(sizes or {})
    rank = len(shape)
    preset = PRESETS.get(name_or_pattern)
    if preset is None and "[" not in name_or_pattern:
        raise NormlabError(f"{name_or_pattern!r} is neither a preset ({', '.join(PRESETS)}) nor a pattern: "
                           + _guess(name_or_pattern) + "a pattern brackets the axes that share statistics, e.g. '[b] f'")
    if preset is None:
        return "custom", "your pattern", name_or_pattern, False, sizes
    if rank not in preset.patterns:
        ranks = ", ".join(f"{r}-D" for r in sorted(preset.patterns))
        raise ShapeError(f"preset {preset.key!r} needs {ranks} data, got shape {tuple(shape)}; "
                         "reshape the data or write a pattern")
    if preset.needs_groups and "g" not in sizes:
        sizes["g"] = default_groups(shape[1])
    label = preset.label
    if preset.key in ("layer", "layer-vision") and rank <= 2:
        label = "layer norm"  # vision and NLP layer norm agree on rows: one sample, all its features
    return preset.key, label, preset.patterns[rank], preset.rms, sizes


def as_input(x, where: str = "explain") -> np.ndarray:
    """Check that ``x`` is something the explainer can draw (1 to 4 axes, a few thousand elements);
    ``where`` opens the message of an input that is not an array."""
    # as normalize reads it: a ragged list is an InputError, a masked array with masked elements refused
    reject_masked(x, "x", where)
    x = read_array(x, "x", where)
    check_drawable(x.shape)
    return x


def check_drawable(shape: tuple[int, ...], option: str | None = None) -> None:
    """:func:`as_input`'s checks on a shape alone, so that a huge ``--shape`` is refused before
    anything of its size is allocated; ``option`` names the command-line option that gave it."""
    shape, size = tuple(shape), math.prod(shape)
    if len(shape) < 1:
        raise ShapeError(f"explain draws tensors of 1 to 4 axes, got shape {shape}; pass nested lists such as [[4, 3, 2], [3, 3, 2]]")
    if len(shape) > 4:  # say a 5-D video batch (N, C, D, H, W): its positions drawn as one axis
        merged = shape[:3] + (math.prod(shape[3:]),)
        # (--data and the Python API have no --shape to change: the shape their values take)
        target = f"--shape {','.join(map(str, merged))}" if option == "--shape" else f"shape {merged}"
        raise ShapeError(f"explain draws tensors of 1 to 4 axes, got shape {shape}; merge the trailing axes into "
                         f"one, as in {target} (batch and instance norm group the same elements)")
    if size == 0:
        raise ShapeError(f"explain needs at least one element, got shape {shape}")
    if size > MAX_ELEMENTS:
        raise ShapeError(f"explain draws every element, so it takes at most {MAX_ELEMENTS}; got shape {shape} "
                         f"({size} elements): pass a smaller tensor")


def explain_array(x, name_or_pattern: str, sizes: dict | None = None, rms: bool = False, mask=None,
                  segments=None) -> NormView:
    """Normalize ``x`` with a preset or pattern (``rms=True``: without the mean; ``mask``:
    only the True elements count toward the statistics; ``segments``: ids along the first
    bracketed axis, each id its own group) and collect what the views draw."""
    x = as_input(x, f"explain {name_or_pattern!r}")
    counted = None
    if mask is not None:
        try:
            counted = np.broadcast_to(np.asarray(mask, dtype=bool), x.shape).copy()
        except ValueError:
            raise ShapeError(f"--mask of shape {np.shape(mask)} does not broadcast to the data's shape {x.shape}; "
                             "give it the data's shape or size-1 axes" + _mask_fitted(mask, x.shape)) from None
    key, label, pattern, preset_rms, sizes = resolve(name_or_pattern, x.shape, sizes)
    if rms and not preset_rms:
        key, label = "custom", f"{label}, RMS" if key != "custom" else "your pattern, RMS"
    rms = rms or preset_rms
    plan = make_plan(pattern, x.shape, sizes=sizes)
    if isinstance(mask, np.ma.MaskedArray):  # (np.asarray above read the values under its mask)
        from normlab.masked import refuse_masked_mask

        refuse_masked_mask(mask, plan)  # as normalize does
    extra = {} if counted is None else {"mask": counted}
    groups, stats_shape, segment_axis = plan.group_ids(), None, None
    if segments is not None:
        from normlab.masked import make_grouping

        # checks the ids (np.ma ones too), or says why not, calling them segments as the caller does
        grouping = make_grouping(plan, segment_ids=segments, ids_name="segments")
        extra["segment_ids"] = grouping.segment_ids
        groups = grouping.group_index().reshape(x.shape)
        stats_shape, segment_axis = grouping.stats_shape, grouping.segment_axis
    y, stats = normalize_with_stats(x, pattern, rms=rms, eps=EPS, **extra, sizes=sizes)
    mean = None if stats.mean is None else stats.mean.ravel()
    return NormView(key, label, pattern, rms, sizes, plan, x, y, groups, mean,
                    np.sqrt(stats.var).ravel(), counted, stats_shape, segment_axis)


def all_views(x, chosen: NormView | None = None) -> list[NormView]:
    """Every preset that fits ``x``'s rank (and ``chosen`` first when it is a custom pattern)."""
    views = [chosen] if chosen is not None and chosen.key == "custom" else []
    # on rows vision and NLP layer norm are one grouping: one button, the chosen one's if either
    layer = chosen.key if chosen is not None and chosen.key in ("layer", "layer-vision") else "layer"
    for key in presets_for_rank(np.ndim(x)):
        if key in ("layer", "layer-vision") and key != layer and np.ndim(x) <= 2:
            continue
        if chosen is not None and chosen.key == key:
            views.append(chosen)
        else:
            views.append(explain_array(x, key, mask=None if chosen is None else chosen.counted))
    return views


def format_value(value) -> str:
    """An input value as one writes it by hand: ``4``, ``0.5``, ``-1.25``; with as many
    digits as it takes to read back as the same float32 (``1000001``, not ``1e+06``), so
    that distinct values never look equal.

    float64 values are computed ones (the gated input h = x · φ(z)), shown to six digits.

    >>> format_value(4.0), format_value(-0.5), format_value(np.float32(1000001)), format_value(np.float32(0.1))
    ('4', '-0.5', '1000001', '0.1')
    >>> format_value(np.float32(1e-40)), format_value(np.float32(1.4e-45))
    ('1e-40', '1e-45')
    """
    computed = isinstance(value, np.float64)
    value = float(value)
    if computed or not math.isfinite(value):
        return f"{value:g}"
    target = np.float32(value)
    # a subnormal holds fewer digits: six would write float32's 1e-40 as 9.99995e-41
    fewest = 1 if abs(target) < np.finfo(np.float32).tiny else 6
    for digits in range(fewest, 9):  # nine significant digits tell every two float32 apart
        text = f"{value:.{digits}g}"
        if np.float32(text) == target:
            return text
    return f"{value:.9g}"


def format_output(value) -> str:
    """An output value, with exact zeros written as a plain ``0`` so they stand out."""
    value = float(value)
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.4f}"


def format_stat(value) -> str:
    """A group's mean or std: four significant digits, and every digit before the point, so
    that a mean equal to an input value reads as that value (``1000002``, not ``1e+06``);
    past nine digits before the point an exponent with four (``2.776e+38``, not
    ``2.77608834e+38``). :meth:`NormView.stat_texts` writes a mean that is one of its
    group's values as the values are written (``1.0000002``, ``1e+20``).

    >>> format_stat(11 / 3), format_stat(1000002.0), format_stat(1000002.5), format_stat(2.333e-4)
    ('3.667', '1000002', '1000002.5', '0.0002333')
    >>> format_stat(123456792.0), format_stat(2.776088e38)
    ('123456792', '2.776e+38')
    """
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    whole = math.floor(math.log10(abs(value))) + 1  # digits before the point
    return f"{value:.{min(max(4, whole + 1), 9) if whole <= 9 else 4}g}"  # (past nine digits an exponent, as the values')


@dataclass(frozen=True)
class Observation:
    """A claim about the output, in the spirit of a hand-worked solution, and whether the output's bits bear it out."""

    group: int
    text: str
    holds: bool
    indices: tuple[int, ...]  # flat indices of the elements the claim is about


_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def _list(values, most: int = 8) -> str:
    """Values as one lists them by hand, ``[4, 3, 2]``; long groups are cut short."""
    shown = [format_value(v) for v in values[:most]]
    if len(values) > most:
        shown.append(f"… {len(values) - most} more")
    return "[" + ", ".join(shown) + "]"


def _position(view: NormView, flat: int) -> str:
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, view.x.shape)) + "]"


def _same_bits(values: np.ndarray) -> bool:
    """True when every value has the first one's exact bit pattern."""
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), -1)
    return bool((raw == raw[0]).all())


def observations(view: NormView) -> list[Observation]:
    """What anyone can see in the data before normalizing, checked against the output.

    For each group: all values equal → all outputs exactly 0; a value equal to the
    group's mean → exactly 0; equal values → bit-identical outputs; two values mirrored
    around the mean → outputs that are exact opposites (the hand-worked x1 and -x1). RMS norm has no mean, so
    only the equal-values claim applies to it. With a mask, only the counted elements.
    """
    x = view.x.ravel()
    y = view.y.ravel()
    found: list[Observation] = []
    for group in range(view.num_groups):
        members = view.counted_members(group)
        values, outputs = x[members], y[members]
        where = view.describe_group(group)
        if len(members) < 2 or not np.all(np.isfinite(values)):
            continue
        if not view.rms and np.all(values == values[0]):
            found.append(Observation(group, f"{where}: {_list(values)}, all values are equal, so they all become 0",
                                     bool(np.all(outputs == 0)), tuple(members.tolist())))
            continue
        if not view.rms:
            mean = view.mean[group]
            at_mean = np.flatnonzero(values.astype(np.float64) == mean)
            if len(at_mean):
                middle = len(values) % 2 == 1 and at_mean.tolist() == [len(values) // 2]
                if middle:
                    what = "the middle value is the mean"
                elif len(at_mean) == 1:
                    what = f"the {format_value(values[at_mean[0]])} at {_position(view, members[at_mean[0]])} is the mean"
                else:
                    what = f"the {_COUNT_WORDS.get(len(at_mean), len(at_mean))} {format_value(values[at_mean[0]])}s are the mean"
                found.append(Observation(group, f"{where}: {_list(values)}, {what}, so it becomes exactly 0"
                                         if len(at_mean) == 1 else f"{where}: {_list(values)}, {what}, so they become exactly 0",
                                         bool(np.all(outputs[at_mean] == 0)), tuple(members[at_mean].tolist())))
        for value in np.unique(values):
            same = np.flatnonzero(values == value)
            if len(same) < 2:
                continue
            drawn = [format_value(values[i]) for i in same]  # -0 equals 0 but is drawn apart
            count = _COUNT_WORDS.get(len(same), len(same))
            if len(same) == 2 or len(set(drawn)) > 1 and len(same) <= 4:  # each as drawn
                who = ", ".join(drawn[:-1]) + " and " + drawn[-1]
            elif len(set(drawn)) > 1:
                who = f"the {count} 0s and -0s"
            else:
                who = f"the {count} {drawn[0]}s"
            spots = [_position(view, members[i]) for i in same[:4]]
            if len(same) > 4:
                spots.append(f"{len(same) - 4} more")
            where_each = ", ".join(spots[:-1]) + " and " + spots[-1]
            found.append(Observation(
                group, f"{where}: {who} share a group, so their outputs are equal "
                f"({format_output(outputs[same[0]])} at {where_each})", _same_bits(outputs[same]),
                tuple(members[same].tolist())))
        # mirrored values give exact opposites where the mean is a value of the input's dtype:
        # float32 rows and columns subtract it as float32(mean) and a remainder, whose rounding
        # need not be symmetric (0.1 and 0.7 around 0.4 miss by a bit), so no claim there
        if not view.rms and view.x.dtype.type(view.mean[group]) == view.mean[group]:
            deviations = values.astype(np.float64) - view.mean[group]
            pair = _mirrored_pair(deviations)
            if pair is not None:
                i, j = pair
                found.append(Observation(
                    group, f"{where}: {format_value(values[i])} and {format_value(values[j])} mirror each other "
                    f"around the mean, so their outputs are opposites ({format_output(outputs[i])}, "
                    f"{format_output(outputs[j])})", bool(outputs[i] == -outputs[j]),
                    (int(members[i]), int(members[j]))))
    return found


def _mirrored_pair(deviations: np.ndarray):
    """The first two positions whose deviations from the mean are exact negatives (nonzero)."""
    for i, d in enumerate(deviations):
        if d == 0 or not np.isfinite(d):
            continue
        partners = np.flatnonzero(deviations[i + 1:] == -d)
        if len(partners):
            return i, i + 1 + int(partners[0])
    return None


def parse_data(text: str, option: str = "--data") -> np.ndarray:
    """``--data`` (or ``option``): nested JSON lists of numbers, as float32 (the demo's dtype).

    >>> parse_data("[[4, 3, 2], [3, 3, 2]]").shape
    (2, 3)
    """
    import json

    def number(literal: str) -> float:
        # past float64 itself 1e400 reads as inf, 1e-400 as 0 and a 400-digit integer fails
        # to convert: refused here as float32's range refuses 1e300 below
        try:
            value = float(literal)
        except OverflowError:
            value = math.inf
        if math.isinf(value) or value == 0 and any(d in "123456789" for d in literal.lower().split("e")[0]):
            shown = literal if len(literal) <= 12 else f"{literal[:8]}… ({len(literal)} characters)"
            raise _beyond_float32(option, shown)
        return value

    try:
        data = _read_json(text, option, parse_float=number, parse_int=number)
    except json.JSONDecodeError as err:
        raise NormlabError(f"{option} is not valid JSON ({err.msg} at character {err.pos + 1}); "
                           "pass nested lists such as '[[4, 3, 2], [3, 3, 2]]'") from None
    try:
        array = np.array(data, dtype=np.float64)
    except (ValueError, TypeError):
        raise NormlabError(f"{option} must be nested lists of numbers of equal lengths (a rectangular tensor), "
                           "such as '[[4, 3, 2], [3, 3, 2]]'") from None
    as_input(array)
    with np.errstate(over="ignore"):
        values = array.astype(np.float32)
    # float32 would turn a finite value into inf, or a nonzero one into 0: the drawing and
    # its claims would be of other data than the user's
    lost = (np.isinf(values) & np.isfinite(array)) | ((values == 0) & (array != 0))
    if lost.any():
        raise _beyond_float32(option, _typed(array[lost][0]))  # (1e-320 as typed, not 9.99989e-321)
    return values


def _beyond_float32(option: str, shown: str) -> NormlabError:
    return NormlabError(f"{option} holds {shown}, which float32 (explain computes in it, as the demo does) cannot "
                        f"hold: its magnitudes run from {_FLOAT32_SMALLEST:.2g} to {_FLOAT32_LARGEST:.2g}; scale the "
                        "data into that range")


def float32_note(text: str, held: np.ndarray) -> str | None:
    """A sentence for data that float32 holds as other values (``16777217`` as ``16777216``,
    ``0.123456789`` as ``0.12345679``), or None: the drawing and its claims are of float32's
    values, and two numbers typed apart may be drawn, and claimed, equal.

    >>> float32_note("[[16777217, 1, 0.5]]", parse_data("[[16777217, 1, 0.5]]"))
    'float32 (explain computes in it, as the demo does) holds 16777217 as 16777216; the drawing shows its values'
    >>> float32_note("[[0.1, 0.25]]", parse_data("[[0.1, 0.25]]")) is None
    True
    >>> "holds 9007199254740993 as" in float32_note("[[9007199254740993, 1]]", parse_data("[[9007199254740993, 1]]"))
    True
    """
    import json

    # the literals as typed: float64 holds 9007199254740993 as 9007199254740992
    literals = np.array(json.loads(text, parse_float=str, parse_int=str), dtype=object).ravel()
    given = np.array([float(v) for v in literals])  # (true and false read as 1 and 0)
    held = held.ravel()
    # 0.1 reads back as 0.1 from float32's shortest digits: only values drawn otherwise count
    changed = [k for k in range(given.size) if np.isfinite(given[k]) and float(format_value(held[k])) != given[k]]
    if not changed:
        return None
    first = changed[0]
    more = f", and {len(changed) - 1} more value{'s' * (len(changed) > 2)} likewise" if len(changed) > 1 else ""
    typed = literals[first] if isinstance(literals[first], str) else _typed(given[first])
    return (f"float32 (explain computes in it, as the demo does) holds {typed} as "
            f"{format_value(held[first])}{more}; the drawing shows its values")


def _typed(value: float) -> str:
    """A number as one types it: 16777217, not 16777217.0."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)


_FLOAT32_SMALLEST = float(np.finfo(np.float32).smallest_subnormal)
_FLOAT32_LARGEST = float(np.finfo(np.float32).max)


def _read_json(text: str, option: str, **hooks):
    """``json.loads(text)``, where lists nested past Python's recursion limit (JSON's decoder
    recurses once per level) become a NormlabError that names ``option``."""
    import json

    try:
        return json.loads(text, **hooks)
    except RecursionError:
        raise NormlabError(f"{option} nests its lists too deeply to read; explain draws tensors of 1 to 4 axes: "
                           "pass nested lists such as '[[4, 3, 2], [3, 3, 2]]'") from None


def _mask_fitted(mask, shape) -> str:
    """The ``--mask`` that fits, for a mask of some of the data's axes (a ``(batch, time)``
    mask beside ``(batch, time, features)`` data): its values with size-1 axes where it lacks
    them, as a clause for the message; "" where none fits."""
    import json

    from normlab.masked import missing_axes_index

    index = missing_axes_index(np.shape(mask), shape)
    if index is None:
        return ""
    fitted = json.dumps(np.asarray(mask, dtype=bool)[index].astype(int).tolist(), separators=(",", ":"))
    return f": --mask '{fitted}' (size-1 axes for those it lacks)"


def parse_mask(text: str) -> np.ndarray:
    """``--mask``: nested JSON lists of 0/1 or true/false (shaped like the data, or broadcastable).

    >>> parse_mask("[[1, 0, true]]").tolist()
    [[True, False, True]]
    """
    import json

    try:
        data = _read_json(text, "--mask")
        array = np.array(data)
    except (json.JSONDecodeError, ValueError):
        raise NormlabError("--mask must be nested JSON lists of 0/1 or true/false, such as '[[1, 1, 0], [1, 0, 0]]'") from None
    if array.dtype != bool and not (array.dtype.kind in "iu" and np.isin(array, (0, 1)).all()):
        raise NormlabError("--mask must be nested lists of 0/1 or true/false, such as '[[1, 1, 0], [1, 0, 0]]'")
    return array.astype(bool)


def parse_segments(text: str) -> np.ndarray:
    """``--segments``: a JSON list of non-negative integer ids, one per position of the first bracketed axis.

    >>> parse_segments("[0, 0, 1]").tolist()
    [0, 0, 1]
    """
    import json

    try:
        values = _read_json(text, "--segments")
        array = np.array(values)
    except (json.JSONDecodeError, ValueError):
        values = array = None
    if isinstance(values, list) and values and all(type(v) is int for v in values) and max(values) > np.iinfo(np.int64).max:
        # (NumPy would read such an id as a float, or wrap it)
        raise NormlabError(f"--segments holds the id {max(values)}, too large for a segment id: number the segments "
                           "from 0 without gaps, such as '[0, 0, 1, 1]'")
    if array is None or array.ndim != 1 or array.dtype.kind not in "iu" or (array < 0).any():
        raise NormlabError("--segments must be a JSON list of non-negative integer ids, one per position of the "
                           "first bracketed axis, such as '[0, 0, 1, 1]'")
    return array.astype(np.int64)


def parse_shape(text: str) -> tuple[int, ...]:
    """``--shape``: sizes separated by commas (or x).

    >>> parse_shape("2,3,4"), parse_shape("2x3")
    ((2, 3, 4), (2, 3))
    """
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise NormlabError(f"--shape {text!r} is not a list of sizes; write it as 2,3,4") from None
    if any(s < 1 for s in shape):
        raise NormlabError(f"--shape {text!r} has a size below 1; every size must be at least 1")
    return shape


def random_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Small integers like the demo's, so that equal values (and their claims) turn up."""
    check_drawable(shape, "--shape")
    rng = np.random.default_rng(seed)
    return as_input(rng.integers(0, 10, size=shape).astype(np.float32))


def parse_sizes(items: list[str]) -> dict:
    """``name=size`` arguments, e.g. ``g=2``.

    >>> parse_sizes(["g=2"])
    {'g': 2}
    """
    sizes = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            size = int(value)
        except ValueError:
            size = None
        if not sep or not name.isidentifier() or size is None or size < 1:
            hint = "; quote a pattern that has spaces, e.g. 'b [d]'" if any(ch in item for ch in "[]()") else ""
            raise NormlabError(f"{item!r} is not name=size; write an axis size such as g=2{hint}")
        if name in sizes:  # the last would silently win, as normalize refuses an axis sized twice
            raise NormlabError(f"{name} is sized twice ({name}={sizes[name]} and {name}={size}); give each axis "
                               "one size")
        sizes[name] = size
    return sizes
