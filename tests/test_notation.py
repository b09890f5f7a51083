"""The parser on its own: no tensors, no NumPy."""

import re

import pytest

from normlab.errors import NormlabError, PatternSyntaxError
from normlab.notation import parse_params, parse_pattern


@pytest.mark.parametrize(
    "pattern, names, reduced",
    [
        ("[b] f", ("b", "f"), ("b",)),
        ("[b] c [h w]", ("b", "c", "h", "w"), ("b", "h", "w")),
        ("[b h w] c", ("b", "h", "w", "c"), ("b", "h", "w")),
        ("b t [d]", ("b", "t", "d"), ("d",)),
        ("b [c h w]", ("b", "c", "h", "w"), ("c", "h", "w")),
        ("b (g [c]) [h w]", ("b", "g", "c", "h", "w"), ("c", "h", "w")),
        ("b [(g c)] h", ("b", "g", "c", "h"), ("g", "c")),
        ("  b   [ d ]  ", ("b", "d"), ("d",)),
        ("batch_1 [Feature2]", ("batch_1", "Feature2"), ("Feature2",)),
    ],
)
def test_valid_patterns_name_their_axes_and_reduced_axes(pattern, names, reduced):
    parsed = parse_pattern(pattern)
    assert parsed.names == names
    assert parsed.reduced_names == reduced


def test_ellipsis_may_be_kept_or_reduced():
    kept = parse_pattern("... [d]")
    reduced = parse_pattern("[...] c")
    assert kept.has_ellipsis and not kept.dims[0].reduced
    assert reduced.has_ellipsis and reduced.dims[0].reduced
    assert kept.names == ("d",)


def test_a_composition_is_one_input_dim():
    parsed = parse_pattern("b (g [c]) [h w]")
    assert len(parsed.dims) == 4
    assert parsed.dims[1].composed and [a.name for a in parsed.dims[1].factors] == ["g", "c"]


def test_parsing_is_cached():
    assert parse_pattern("b (g [c]) [h w]") is parse_pattern("b (g [c]) [h w]")


@pytest.mark.parametrize(
    "pattern, caret",
    [
        ("b [c", 2),          # unclosed [
        ("b (g c", 2),        # unclosed (
        ("b c]", 3),          # ] closes nothing
        ("b c)", 3),          # ) closes nothing
        ("b [[c]]", 3),       # nested [
        ("b ((g c))", 3),     # nested (
        ("b [] c", 2),        # empty []
        ("b () [c]", 2),      # empty ()
        ("b [c] c", 6),       # duplicate name, caret at the second
        ("... [c] ...", 8),   # two ellipses
        ("b (... [c])", 3),   # ellipsis in a composition
        ("b [c-d]", 4),       # bad character
        ("b (g [c) [h]", 7),  # [ opened in ( ) closes after )
        ("[b (g] c)", 5),     # ] inside ( ) closes a [ opened outside
        ("b c", 0),           # nothing reduced
        ("", 0),              # empty
    ],
)
def test_syntax_errors_point_a_caret_at_the_fault(pattern, caret):
    with pytest.raises(PatternSyntaxError) as info:
        parse_pattern(pattern)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, NormlabError)
    assert err.position == caret
    *_, shown, marker = str(err).splitlines()
    assert shown == "    " + pattern
    assert marker == "    " + " " * caret + "^"


@pytest.mark.parametrize("pattern", ["b\t[c", "b\n  (g [c) [h]", "b\u3000\u3000[c", "b\r\n[[c]]"],
                         ids=["tab", "newline", "wide spaces", "crlf"])
def test_the_caret_stands_under_the_fault_in_a_pattern_with_tabs_newlines_or_wide_spaces(pattern):
    # a terminal draws a tab to the next 8th column and a wide space two columns wide, so the
    # line above the caret may hold plain spaces only, one column per character of the pattern
    with pytest.raises(PatternSyntaxError) as info:
        parse_pattern(pattern)
    err = info.value
    *_, shown, marker = str(err).splitlines()
    assert shown.split() == pattern.split() and all(c == " " or not c.isspace() for c in shown)
    assert shown[marker.index("^")] == pattern[err.position]


@pytest.mark.parametrize("pattern, caret, says", [("b [ĉ]", 3, "ASCII identifiers"), ("b [ℎ]", 3, "ASCII identifiers"),
                                                   ("\u2026 [d]", 0, "three dots, ...")],
                         ids=["accent", "math letter", "ellipsis"])
def test_a_non_ascii_character_is_refused_with_the_rule_it_breaks(pattern, caret, says):
    # "ĉ".isidentifier() is True, so "axis names are identifiers" did not say what was wrong
    with pytest.raises(PatternSyntaxError, match=says) as info:
        parse_pattern(pattern)
    assert info.value.position == caret


@pytest.mark.parametrize("pattern, caret, says, fixed", [
    ("b .. [d]", 2, "three dots, ...", "b ... [d]"), ("b .... [d]", 5, "three dots, ...", "b ... [d]"),
    ("b, t, [d]", 1, "separate axes with spaces", "b t [d]"), ("b; [d]", 1, "separate axes with spaces", "b [d]"),
], ids=["two dots", "four dots", "commas", "semicolon"])
def test_dots_that_are_no_ellipsis_and_commas_between_axes_are_refused_with_the_fix(pattern, caret, says, fixed):
    # they were told "axis names are ASCII identifiers (letters a-z and A-Z, ...)", which they are
    with pytest.raises(PatternSyntaxError, match=says) as info:
        parse_pattern(pattern)
    assert info.value.position == caret and "ASCII identifiers" not in str(info.value)
    parse_pattern(fixed)


@pytest.mark.parametrize("pattern, caret, says, fixed", [
    ("b.t [d]", 1, "write b_t for one axis, or 'b t' for two", "b_t [d]"),
    ("b t [emb.dim]", 8, "write emb_dim for one axis, or 'emb dim' for two", "b t [emb dim]"),
    ("b t [d];", 7, "remove the trailing ';'", "b t [d]"), ("b t [d], ", 7, "remove the trailing ','", "b t [d]"),
], ids=["dotted name", "dotted reduced name", "trailing semicolon", "trailing comma"])
def test_a_dot_inside_a_name_and_a_trailing_separator_are_refused_with_their_own_fix(pattern, caret, says, fixed):
    # "b.t" was told to write the ellipsis as three dots, and a trailing ";" to separate axes with spaces
    with pytest.raises(PatternSyntaxError, match=re.escape(says)) as info:
        parse_pattern(pattern)
    assert info.value.position == caret and "ellipsis" not in str(info.value).split(";")[0]
    assert "separate axes" not in str(info.value)
    parse_pattern(fixed)


def test_a_non_string_pattern_is_a_clear_error():
    with pytest.raises(PatternSyntaxError, match="a pattern is a string"):
        parse_pattern(["b", "[d]"])


@pytest.mark.parametrize(
    "params, items",
    [("c", (("c",),)), ("c h w", (("c",), ("h",), ("w",))), ("(g c)", (("g", "c"),)), ("d (g c)", (("d",), ("g", "c")))],
)
def test_params_name_one_tuple_per_weight_axis(params, items):
    assert parse_params(params) == items


@pytest.mark.parametrize("params", ["", "[c]", "c c", "(g c", "c)", "()", "..."])
def test_bad_params_are_syntax_errors(params):
    with pytest.raises(PatternSyntaxError):
        parse_params(params)


class _CountingText(str):
    """A pattern that counts the characters its slices copy."""

    copied = 0

    def __getitem__(self, key):
        piece = str.__getitem__(self, key)
        type(self).copied += len(piece)
        return piece


def test_the_tokenizer_reads_a_long_pattern_without_copying_its_tail():
    # quadratic work came from copying the rest of the text at every token
    text = _CountingText(" ".join(f"axis{i}" for i in range(5000)) + "  [d]")
    _CountingText.copied = 0
    parsed = parse_pattern(text)
    assert len(parsed.names) == 5001
    assert _CountingText.copied <= len(text)


def test_a_pattern_of_two_megabytes_parses():
    long_names = [f"{'n' * 2000}{i}" for i in range(1000)]
    text = "   ".join(long_names) + " " * 300_000 + "[d]"
    assert len(text) > 2_300_000
    parsed = parse_pattern(text)
    assert parsed.reduced_names == ("d",) and len(parsed.names) == 1001


def test_a_bad_character_far_into_a_long_pattern_is_pointed_at():
    text = "b " * 50_000 + "[d] %"
    with pytest.raises(PatternSyntaxError) as info:
        parse_pattern(text)
    assert info.value.position == len(text) - 1
