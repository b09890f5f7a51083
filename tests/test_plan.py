"""Patterns resolved against shapes: sizes, statistics shapes, grouping and shape errors."""

import numpy as np
import pytest

from normlab.errors import ParamsError, ShapeError
from normlab.plan import make_plan


def test_group_norm_splits_the_channel_axis_into_groups():
    plan = make_plan("b (g [c]) [h w]", (2, 6, 4, 5), g=3)
    assert plan.axis_sizes == (2, 3, 2, 4, 5)
    assert plan.stats_shape == (2, 3, 1, 1, 1)
    assert plan.group_size == 40 and plan.num_groups == 6


def test_one_factor_of_a_composition_is_inferred_from_the_other():
    assert make_plan("b (g [c])", (2, 12), c=4).axis_sizes == (2, 3, 4)


def test_the_ellipsis_expands_to_the_remaining_axes():
    plan = make_plan("... [d]", (2, 3, 4, 5))
    assert plan.axis_sizes == (2, 3, 4, 5)
    assert plan.stats_shape == (2, 3, 4, 1)
    assert make_plan("... [d]", (7,)).stats_shape == (1,)


def test_stats_shape_is_onnx_layer_normalization_shape():
    assert make_plan("a0 a1 [a2 a3]", (2, 3, 4, 5)).stats_shape == (2, 3, 1, 1)


def test_group_ids_follow_the_note_for_batch_and_layer_norm():
    batch = make_plan("[b] f", (3, 3)).group_ids()
    layer = make_plan("b [f]", (3, 3)).group_ids()
    assert (batch == batch[0]).all() and len(set(batch[0])) == 3
    assert (layer.T == layer.T[0]).all() and len(set(layer[:, 0])) == 3


def test_group_ids_of_group_norm_cover_consecutive_channels():
    ids = make_plan("b (g [c]) [h]", (2, 4, 3), g=2).group_ids()
    assert ids.shape == (2, 4, 3)
    assert len(np.unique(ids)) == 4
    assert (ids[0, 0] == ids[0, 1]).all() and (ids[0, 1] != ids[0, 2]).all() and (ids[0, 0] != ids[1, 0]).all()


def test_runs_merge_adjacent_axes_of_one_kind():
    plan = make_plan("[b] c [h w]", (8, 4, 1, 5))
    assert [(r.size, r.reduced) for r in plan.runs] == [(8, True), (4, False), (5, True)]


@pytest.mark.parametrize(
    "pattern, shape, sizes, message",
    [
        ("b [d]", (2, 3, 4), {}, "names 2 axes, the input has 3"),
        ("b c [h w]", (2, 3), {}, "names 4 axes, the input has 2"),
        ("b ... [h w]", (2, 3), {}, "at least 3 axes"),
        ("b (g [c])", (2, 10), {"g": 3}, "not divisible by 3"),
        ("b (g [c])", (2, 10), {}, "2 factors of unknown size"),
        ("b (g [c])", (2, 10), {"g": 2, "c": 4}, "multiplies to 8"),
        ("b [d]", (2, 10), {"d": 5}, "axis d has size 10, not 5"),
        ("b [d]", (2, 10), {"q": 5}, "q=5 names no axis"),
        ("b (g [c])", (2, 10), {"g": 0}, "not a positive integer"),
    ],
)
def test_shape_errors_name_the_pattern_the_shape_and_the_rule(pattern, shape, sizes, message):
    with pytest.raises(ShapeError) as info:
        make_plan(pattern, shape, **sizes)
    text = str(info.value)
    assert message in text and repr(pattern) in text and str(shape) in text


@pytest.mark.parametrize("shape, message", [
    ((2, -3), "a size is negative"),
    ((-1,), "a size is negative"),
    ("ab", "shape must be a sequence of ints"),
    (("2", "x"), "shape must be a sequence of ints"),
    ((2.5, 3), "shape must be a sequence of ints"),
], ids=["negative size", "negative under an ellipsis", "text", "a word among the sizes", "a fraction"])
def test_a_shape_no_array_has_is_a_shape_error_naming_the_pattern_and_the_fix(shape, message):
    # a negative size made a plan (group_size -3, stats_shape (2, 1)), text raised int()'s bare
    # ValueError, "invalid literal for int() with base 10", and a fraction was cut to an int
    pattern = "b [d]" if len(shape) == 2 else "[...]"
    with pytest.raises(ShapeError) as info:
        make_plan(pattern, shape)
    text = str(info.value)
    assert message in text and repr(pattern) in text and "x.shape" in text


def test_params_naming_an_unknown_axis_is_an_error():
    with pytest.raises(ParamsError, match="names axis 'q'"):
        make_plan("b [d]", (2, 3), params="q")


def test_params_shape_is_the_product_of_each_item():
    plan = make_plan("b (g [c]) [h w]", (2, 6, 4, 5), params="(g c)", g=3)
    assert plan.param_shape == (6,)
    assert make_plan("b [c h w]", (2, 3, 4, 5), params="c h w").param_shape == (3, 4, 5)


def test_params_in_another_order_than_the_pattern_round_trip():
    plan = make_plan("b [c h w]", (2, 3, 4, 5), params="w c")
    weight = np.arange(15.0).reshape(5, 3)
    expanded = plan.expand_params(weight)
    assert expanded.shape == (1, 3, 1, 5)
    assert expanded[0, 2, 0, 4] == weight[4, 2]
    np.testing.assert_array_equal(plan.collapse_params(expanded), weight)


@pytest.mark.parametrize("keyword, value", [("momentum", 0.1), ("q", 0)])
def test_a_size_that_names_no_axis_is_told_so_before_its_value_is_judged(keyword, value):
    """A keyword normalize does not take (momentum=) lands among the sizes: the fix to offer
    is its name, not an integer value (epsilon=: see test_user_paths_more; ONNX's axis=,
    axes=, num_groups=: test_onnx_operators)."""
    with pytest.raises(ShapeError) as info:
        make_plan("b [d]", (2, 3), **{keyword: value})
    text = str(info.value)
    assert f"{keyword}={value!r} names no axis" in text and "use one of b, d" in text
    assert "positive integer" not in text
