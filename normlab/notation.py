"""Pattern text -> parsed pattern. Pure Python: no NumPy, no shapes.

A pattern lists the input's axes in order and brackets the ones that share statistics::

    "[b] c [h w]"        batch norm, channels first
    "b t [d]"            layer norm over each token
    "b (g [c]) [h w]"    group norm: channel axis split into g groups of c

Grammar (whitespace separates items)::

    pattern  := item+
    item     := name | "..." | "(" factor+ ")" | "[" inner+ "]"
    inner    := name | "..." | "(" name+ ")"
    factor   := name | "[" name+ "]"

Every element that differs from another only along bracketed axes shares its mean and
variance. Syntax is checked here; rank and sizes are checked against an input in
:mod:`normlab.plan`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from normlab.errors import PatternSyntaxError

__all__ = ["Axis", "Dim", "Pattern", "parse_pattern", "parse_params", "ELLIPSIS"]

ELLIPSIS = "..."
_TOKEN = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<ellipsis>\.\.\.)|(?P<punct>[()\[\]])")
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class Axis:
    """One named axis (a factor, after compositions are split)."""

    name: str
    reduced: bool
    position: int


@dataclass(frozen=True)
class Dim:
    """One axis of the input: a plain axis, a composition ``(g c)`` or the ellipsis."""

    factors: tuple[Axis, ...]
    position: int
    composed: bool = False
    is_ellipsis: bool = False

    @property
    def reduced(self) -> bool:
        """True when every factor is reduced (the ellipsis has one pseudo-factor)."""
        return all(axis.reduced for axis in self.factors)


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: the input's dims in order."""

    text: str
    dims: tuple[Dim, ...]

    @property
    def has_ellipsis(self) -> bool:
        return any(dim.is_ellipsis for dim in self.dims)

    @property
    def names(self) -> tuple[str, ...]:
        """Named axes in order, compositions split, the ellipsis left out."""
        return tuple(a.name for d in self.dims if not d.is_ellipsis for a in d.factors)

    @property
    def reduced_names(self) -> tuple[str, ...]:
        return tuple(a.name for d in self.dims if not d.is_ellipsis for a in d.factors if a.reduced)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    """``(kind, value, position)`` for each token. Linear in the text's length: each
    match starts where the last one ended, and nothing copies the rest of the text."""
    tokens = []
    pos = _SPACE.match(text).end()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            char = text[pos]
            before = re.search(r"[A-Za-z0-9_]+$", text[:pos])
            after = re.match(r"[A-Za-z0-9_]+", text[pos + 1:])
            if char == "." and before and after:  # "emb.dim": a dotted name, as in a module path
                left, right = before.group(0), after.group(0)
                rule = (f"axis names are letters, digits and _, without '.': write {left}_{right} for one axis, "
                        f"or '{left} {right}' for two")
            elif char == "\u2026" or char == ".":  # what word processors make of three dots, or two or four
                rule = "write the ellipsis as three dots, ..."
            elif char in ",;" and not text[pos + 1:].strip():  # a trailing one, as after a statement
                rule = f"remove the trailing {char!r}"
            elif char in ",;":  # a list's habit (TensorFlow's axes=[0, 1])
                rule = "separate axes with spaces"
            else:  # "ĉ" is an identifier to Python, but not a pattern's name
                rule = "axis names are ASCII identifiers (letters a-z and A-Z, digits and _, not first a digit)"
            raise PatternSyntaxError(
                text, pos, f"unexpected character {char!r}: {rule}; use ( ) to compose, [ ] to reduce and ... for "
                "any axes"
            )
        kind = match.lastgroup
        tokens.append((kind, match.group(kind), pos))
        pos = _SPACE.match(text, match.end()).end()
    return tokens


def parse_pattern(text: str) -> Pattern:
    """Parse a pattern once; the result is cached.

    >>> p = parse_pattern("b (g [c]) [h w]")
    >>> p.names, p.reduced_names
    (('b', 'g', 'c', 'h', 'w'), ('c', 'h', 'w'))
    >>> parse_pattern("b [c")
    Traceback (most recent call last):
    ...
    normlab.errors.PatternSyntaxError: '[' is never closed: add ']' after the reduced axes
        b [c
          ^
    """
    if not isinstance(text, str):
        raise PatternSyntaxError(str(text), 0, f"a pattern is a string such as 'b [d]', got {type(text).__name__}")
    return _parse_pattern(text)


@functools.lru_cache(maxsize=1024)
def _parse_pattern(text: str) -> Pattern:
    tokens = _tokenize(text)
    dims: list[Dim] = []
    seen: dict[str, int] = {}
    bracket_open: int | None = None  # position of the open '['
    bracket_level: int | None = None  # 0 outside parentheses, 1 inside
    bracket_items = 0
    paren_open: int | None = None
    paren_factors: list[Axis] = []
    ellipsis_at: int | None = None

    def add_name(name: str, pos: int) -> Axis:
        if name in seen:
            raise PatternSyntaxError(text, pos, f"axis {name!r} appears twice: give each axis its own name")
        seen[name] = pos
        return Axis(name, bracket_open is not None, pos)

    for kind, value, pos in tokens:
        if kind == "name":
            axis = add_name(value, pos)
            if bracket_open is not None:
                bracket_items += 1
            if paren_open is not None:
                paren_factors.append(axis)
            else:
                dims.append(Dim((axis,), pos))
        elif kind == "ellipsis":
            if paren_open is not None:
                raise PatternSyntaxError(text, pos, "'...' cannot stand inside ( ): compose named axes only")
            if ellipsis_at is not None:
                raise PatternSyntaxError(text, pos, "'...' appears twice: it may stand for any axes only once")
            ellipsis_at = pos
            if bracket_open is not None:
                bracket_items += 1
            dims.append(Dim((Axis(ELLIPSIS, bracket_open is not None, pos),), pos, is_ellipsis=True))
        elif value == "(":
            if paren_open is not None:
                raise PatternSyntaxError(text, pos, "( ) cannot nest: write one composition such as (g c)")
            paren_open, paren_factors = pos, []
        elif value == ")":
            if paren_open is None:
                raise PatternSyntaxError(text, pos, "')' closes nothing: remove it or add '(' before it")
            if bracket_open is not None and bracket_level == 1:
                raise PatternSyntaxError(text, pos, "'[' opened inside ( ) must close before ')'")
            if not paren_factors:
                raise PatternSyntaxError(text, paren_open, "empty ( ): a composition needs at least one axis")
            if bracket_open is not None:
                bracket_items += 1
            dims.append(Dim(tuple(paren_factors), paren_open, composed=True))
            paren_open = None
        elif value == "[":
            if bracket_open is not None:
                raise PatternSyntaxError(text, pos, "[ ] cannot nest: close the first ']' before opening another")
            bracket_open, bracket_level, bracket_items = pos, int(paren_open is not None), 0
        elif value == "]":
            if bracket_open is None:
                raise PatternSyntaxError(text, pos, "']' closes nothing: remove it or add '[' before the reduced axes")
            if bracket_level == 0 and paren_open is not None:
                raise PatternSyntaxError(text, pos, "']' cannot close inside ( ) a '[' opened outside it")
            if bracket_items == 0:
                raise PatternSyntaxError(text, bracket_open, "empty [ ]: put the axes that share statistics inside")
            bracket_open = None
    if paren_open is not None:
        raise PatternSyntaxError(text, paren_open, "'(' is never closed: add ')' after the composed axes")
    if bracket_open is not None:
        raise PatternSyntaxError(text, bracket_open, "'[' is never closed: add ']' after the reduced axes")
    if not dims:
        raise PatternSyntaxError(text, 0, "empty pattern: name the input's axes, e.g. 'b [d]'")
    if not any(axis.reduced for dim in dims for axis in dim.factors):
        named = _NORM_PATTERNS.get(_norm_named(text)) if len(dims) == 1 else None
        raise PatternSyntaxError(
            text, 0, f"{text.strip()!r} names a norm, not the input's axes: {named}; a pattern names each axis and "
                     "puts in [ ] those that share statistics" if named else
                     "no axis is reduced: put the axes that share statistics in [ ], e.g. 'b [d]'"
        )
    return Pattern(text, tuple(dims))


def _norm_named(text: str) -> str:
    """The kind of norm a layer's or function's name stands for: ``BatchNorm2d`` -> ``batch``;
    ConvNeXt's ``LayerNorm2d``, a norm over the channels, ``layer2d`` (not torch.nn.LayerNorm's)."""
    if re.fullmatch(r"layer_?norm_?2d(_?fp32)?", text.strip().lower()):
        return "layer2d"
    return re.sub(r"norm$", "", re.sub(r"[^a-z]", "", re.sub(r"\d+d$", "", text.strip().lower())))


# a norm's name given where its pattern belongs ("layer", "BatchNorm2d"): the pattern, for inputs of any rank
_NORM_PATTERNS = {
    "batch": "batch norm is '[b] c [...]' (channels-first)",
    "layer": "layer norm is '... [d]' (over the last axis)",
    "layer2d": "ConvNeXt's LayerNorm2d is 'b [c] ...' (each position over its channels)",
    "instance": "instance norm is 'b c [...]'",
    "group": "group norm is 'b (g [c]) [...]' with g= the number of groups",
    "rms": "RMS norm is '... [d]' with rms=True",
}


def parse_params(text: str) -> tuple[tuple[str, ...], ...]:
    """Parse the axes that ``weight`` and ``bias`` span, one tuple of names per array axis.

    >>> parse_params("c h w")
    (('c',), ('h',), ('w',))
    >>> parse_params("(g c)")
    (('g', 'c'),)
    """
    if not isinstance(text, str):
        raise PatternSyntaxError(str(text), 0, f"params is a string such as 'c' or 'c h w', got {type(text).__name__}",
                                 "params")
    return _parse_params(text)


def _params_syntax_error(text: str, position: int, message: str) -> PatternSyntaxError:
    """A fault in params text (the axes weight spans), named as params where it is reported."""
    return PatternSyntaxError(text, position, message, "params")


@functools.lru_cache(maxsize=1024)
def _parse_params(text: str) -> tuple[tuple[str, ...], ...]:
    items: list[tuple[str, ...]] = []
    group: list[str] | None = None
    group_at = 0
    seen: set[str] = set()
    for kind, value, pos in _tokenize(text):
        if kind == "name":
            if value in seen:
                raise _params_syntax_error(text, pos, f"axis {value!r} appears twice in params")
            seen.add(value)
            if group is None:
                items.append((value,))
            else:
                group.append(value)
        elif value == "(":
            if group is not None:
                raise _params_syntax_error(text, pos, "( ) cannot nest in params")
            group, group_at = [], pos
        elif value == ")":
            if group is None:
                raise _params_syntax_error(text, pos, "')' closes nothing")
            if not group:
                raise _params_syntax_error(text, group_at, "empty ( ) in params")
            items.append(tuple(group))
            group = None
        else:
            raise _params_syntax_error(
                text, pos, f"{value!r} has no meaning in params: name the axes weight spans, e.g. 'c' or '(g c)'"
            )
    if group is not None:
        raise _params_syntax_error(text, group_at, "'(' is never closed")
    if not items:
        raise _params_syntax_error(text, 0, "empty params: name the axes weight spans, e.g. 'c'")
    return tuple(items)
