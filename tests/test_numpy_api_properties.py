"""Properties of the NumPy API under hypothesis: any pattern text, shape, size keyword and
array either computes or fails with a :class:`normlab.NormlabError` (a ``ValueError``) whose
message repeats the pattern and the input shape, and never modifies its input."""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab
from normlab.errors import NormlabError

# names include normalize's own keywords, which only the sizes= mapping can size
NAMES = ("a", "b", "c", "g", "h", "w", "x", "eps", "rms", "sizes", "weight", "mean", "pattern", "_", "A0")
# sizes a user may pass by mistake, huge ones among them (a factor of an empty axis takes any size)
ODD_SIZES = (0, -1, 2.0, True, np.int64(2), 2**40, 2**62, 2**63, 10**30)


@st.composite
def pattern_and_shape(draw):
    """A pattern drawn from the grammar (repeated names, '...' anywhere, compositions with
    brackets inside) with a shape that mostly fits it, and sizes for its factors."""
    used, items, shape, sizes = [], [], [], {}

    def name():
        if used and draw(st.integers(0, 9)) == 0:
            return draw(st.sampled_from(used))  # a repeated name
        used.append(draw(st.sampled_from(NAMES)))
        return used[-1]

    def composition(reduced_inner):
        factors = [name() for _ in range(draw(st.integers(1, 3)))]
        sizes_drawn = [draw(st.integers(0, 4)) for _ in factors]
        shape.append(math.prod(sizes_drawn))
        if shape[-1] == 0 and draw(st.booleans()):  # an empty axis: its other factors may take any size
            sizes_drawn = [draw(st.sampled_from(ODD_SIZES)) if s else s for s in sizes_drawn]
        sizes.update({f: s for f, s in zip(factors[1:], sizes_drawn[1:])})
        if reduced_inner:
            return "(" + factors[0] + " [" + " ".join(factors[1:]) + "])"
        return "(" + " ".join(factors) + ")"

    def item(inside_brackets):
        kind = draw(st.sampled_from(["name", "name", "...", "()", "[]", "([])"] if not inside_brackets
                                    else ["name", "...", "()"]))
        if kind == "name":
            shape.append(draw(st.integers(0, 5)))
            return name()
        if kind == "...":
            shape.extend(draw(st.lists(st.integers(0, 4), max_size=3)))
            return "..."
        if kind == "()":
            return composition(False)
        if kind == "([])":
            return composition(True)
        return "[" + " ".join(item(True) for _ in range(draw(st.integers(0, 3)))) + "]"

    text = " ".join(item(False) for _ in range(draw(st.integers(1, 5))))
    if draw(st.integers(0, 4)) == 0:
        shape = draw(st.lists(st.integers(0, 6), max_size=6))
    for used_name in used:
        if draw(st.integers(0, 5)) == 0:
            sizes[used_name] = draw(st.sampled_from(ODD_SIZES))
    return text, tuple(shape), sizes


CALLS = {
    "forward": lambda x, p, s: normlab.normalize(x, p, sizes=s, return_stats=True),
    "numpy": lambda x, p, s: normlab.normalize(x, p, sizes=s, backend="numpy", rms=True, return_stats=True),
    "backward": lambda x, p, s: normlab.normalize_backward(np.ones(x.shape, np.float32), x, p, sizes=s),
    "mask": lambda x, p, s: normlab.normalize(x, p, sizes=s, mask=np.arange(x.size).reshape(x.shape) % 3 > 0),
    "segments": lambda x, p, s: normlab.normalize(x, p, sizes=s, segment_ids=np.arange(64) % 2),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@settings(max_examples=150, deadline=None)
@given(case=pattern_and_shape())
def test_any_pattern_computes_or_fails_with_a_normlab_error_naming_pattern_and_shape(call, case):
    text, shape, sizes = case
    x = (np.arange(math.prod(shape)) % 7).reshape(shape).astype(np.float32)
    before = x.tobytes()
    try:
        CALLS[call](x, text, sizes)
    except NormlabError as err:
        message = str(err)
        shown = re.sub(r"\s", " ", text)
        assert repr(text) in message or shown in message, message
        assert str(shape) in message, message
    assert x.tobytes() == before
