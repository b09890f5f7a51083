"""The explainer at unit level: groups and numbers come from the library, observations are
true of the note's data and checked against the output's bits, the views render as promised."""

import dataclasses
import io
import json
import pickle
import re

import numpy as np
import pytest

import normlab
from normlab.errors import NormlabError, ShapeError
from normlab.explain import html as page
from normlab.explain.cli import one_line
from normlab.explain.demo import NOTE_2D, NOTE_3D
from normlab.explain.model import (
    EPS, all_views, default_groups, explain_array, float32_note, observations, parse_data, parse_shape, parse_sizes,
    presets_for_rank, random_input, resolve,
)
from normlab.explain.terminal import make_console, render_view
from normlab.plan import make_plan


def texts(view):
    return {o.text: o.holds for o in observations(view)}


@pytest.mark.parametrize("shape, pattern", [((3, 3), "[b] f"), ((2, 2, 3), "[b] c [s]"), ((2, 3, 4, 4), "[b] c [h w]")])
def test_batch_preset_is_spelled_for_the_rank_of_the_data(shape, pattern):
    assert resolve("batch", shape)[2] == pattern


def test_group_preset_picks_a_group_count_that_divides_the_channels():
    for channels in range(1, 13):
        g = resolve("group", (2, channels, 3))[4]["g"]
        assert channels % g == 0
        assert g > 1 or channels == 1  # g = 1 is layer norm: the group-norm button would repeat it
    assert default_groups(4) == 2


def test_a_preset_without_a_pattern_for_the_rank_raises_a_shape_error():
    with pytest.raises(ShapeError, match="instance"):
        resolve("instance", (3, 3))


@pytest.mark.parametrize("shape", [(3, 3), (2, 4, 3), (2, 4, 2, 3)])
def test_every_preset_groups_elements_as_the_plan_does(shape):
    x = random_input(shape, seed=3)
    for key in presets_for_rank(len(shape)):
        view = explain_array(x, key)
        expected = make_plan(view.pattern, shape, **view.sizes).group_ids()
        np.testing.assert_array_equal(view.groups, expected)


def test_mean_std_and_output_are_the_libraries_own():
    view = explain_array(NOTE_3D, "layer-vision")
    y, mean, rstd = normlab.normalize(NOTE_3D, view.pattern, return_stats=True)
    np.testing.assert_array_equal(view.y, y)
    np.testing.assert_array_equal(view.mean, mean.ravel())
    np.testing.assert_allclose(view.std, np.sqrt(1 / rstd.ravel() ** 2 - EPS), rtol=1e-9)


def test_batch_norm_on_the_note_2d_example_makes_the_notes_three_claims():
    found = texts(explain_array(NOTE_2D, "batch"))
    assert found["feature 0: [4, 3, 2], the middle value is the mean, so it becomes exactly 0"] is True
    assert found["feature 1: 3 and 3 share a group, so their outputs are equal (+0.7071 at [0, 1] and [1, 1])"] is True
    assert found["feature 2: [2, 2, 2], all values are equal, so they all become 0"] is True


def test_the_notes_x1_and_minus_x1_are_exact_opposites():
    found = texts(explain_array(NOTE_2D, "batch"))
    claim = "feature 0: 4 and 2 mirror each other around the mean, so their outputs are opposites (+1.2247, -1.2247)"
    assert found[claim] is True


def test_batch_norm_on_the_note_3d_example_gives_the_two_ones_and_the_two_twos_equal_outputs():
    found = [o for o in observations(explain_array(NOTE_3D, "batch")) if "share a group" in o.text]
    assert [(o.text.split(":")[0], o.indices, o.holds) for o in found] == [
        ("channel 0", (0, 6), True),   # the two 1s at [0, 0, 0] and [1, 0, 0]
        ("channel 1", (4, 9), True),   # the two 2s at [0, 1, 1] and [1, 1, 0]
    ]


def test_every_observation_on_the_notes_data_holds():
    for x in (NOTE_2D, NOTE_3D):
        for key in presets_for_rank(x.ndim):
            assert all(o.holds for o in observations(explain_array(x, key))), key


def test_an_observation_fails_when_the_output_bits_disagree():
    view = explain_array(NOTE_2D, "batch")
    tampered = view.y.copy()
    tampered[1, 0] = np.float32(1e-30)  # the middle of feature 0 is no longer exactly 0
    tampered[0, 1] = np.nextafter(tampered[0, 1], np.float32(2))  # the two 3s differ by one ulp
    found = texts(dataclasses.replace(view, y=tampered))
    assert found["feature 0: [4, 3, 2], the middle value is the mean, so it becomes exactly 0"] is False
    assert [holds for text, holds in found.items() if text.startswith("feature 1: 3 and 3")] == [False]


def test_rms_norm_has_no_mean_so_only_equal_values_are_claimed():
    x = np.array([[2.0, 2.0, 2.0], [1.0, 1.0, 3.0]], np.float32)
    found = observations(explain_array(x, "rms"))
    assert [(o.text.split(" share")[0], o.holds) for o in found] == [
        ("sample 0: the three 2s", True), ("sample 1: 1 and 1", True)]


def render(view, **console_options):
    buffer = io.StringIO()
    console = make_console(file=buffer, width=120, **console_options)
    render_view(console, view)
    return buffer.getvalue()


def test_terminal_view_lays_out_input_groups_and_output_side_by_side():
    out = render(explain_array(NOTE_2D, "batch"), no_color=True)
    first = [line for line in out.splitlines() if line.startswith("[[4, 3, 2]")][0]
    assert re.fullmatch(r"\[\[4, 3, 2\],\s+\[\[A, B, C\],\s+\[\[\+1\.2247, \+0\.7071,\s+0\],\s*", first)


def test_legend_gives_each_groups_members_mean_and_std():
    out = render(explain_array(NOTE_2D, "batch"), no_color=True)
    assert re.search(r"A\s+feature 0\s+4 3 2\s+3\s+0\.8165", out)
    assert re.search(r"C\s+feature 2\s+2 2 2\s+2\s+0\b", out)


def test_terminal_colours_each_group_when_colour_is_on():
    out = render(explain_array(NOTE_2D, "batch"), force_terminal=True, color_system="standard")
    assert "\x1b[" in out


def test_no_color_gives_plain_text_even_on_a_terminal():
    out = render(explain_array(NOTE_2D, "batch"), no_color=True, force_terminal=True)
    assert "\x1b" not in out and "✓ feature 0" in out


def test_the_no_color_environment_variable_gives_plain_text(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    out = render(explain_array(NOTE_2D, "batch"), force_terminal=True)
    assert "\x1b" not in out


@pytest.mark.parametrize("text, message", [
    ("[[4, 3", "not valid JSON"), ("[[1, 2], [3]]", "rectangular"), ('["a"]', "numbers"), ("7", "1 to 4 axes"),
    # past float64 itself: JSON reads 1e400 as inf and 1e-400 as 0, and a 400-digit integer does not convert
    ("[[1e400, 1]]", "holds 1e400, which float32 .* cannot hold"), ("[[1e-400, 1]]", "holds 1e-400, which float32"),
    ("[[1" + "0" * 400 + ", 1]]", r"holds 10000000… \(401 characters\), which float32"),
    # inside float64, past float32: named as typed (float64's subnormals were written 9.99989e-321, 4.94066e-324)
    ("[[1e-320, 1]]", "holds 1e-320, which"), ("[[5e-324, 1]]", "holds 5e-324, which"),
    ("[[1e300, 1]]", r"holds 1e\+300, which"),
])
def test_bad_data_raises_a_normlab_error(text, message):
    with pytest.raises(NormlabError, match=message):
        parse_data(text)


def test_the_float32_note_names_a_number_as_typed_where_float64_holds_another():
    # (it wrote the float64 read of the literal, 9007199254740992, a number the user did not type)
    text = "[[9007199254740993, 1, 2], [1, true, 0.123456789]]"
    note = float32_note(text, parse_data(text))
    assert "holds 9007199254740993 as 9.007199e+15, and 1 more value likewise" in note


def test_shape_and_sizes_parse_and_reject_what_they_cannot_read():
    assert parse_shape("2,3,4") == (2, 3, 4)
    assert parse_sizes(["g=2", "c=3"]) == {"g": 2, "c": 3}
    for bad in ("2,,3", "2,0", "a"):
        with pytest.raises(NormlabError):
            parse_shape(bad)
    for bad in ("g", "g=two", "g=0", "=2"):
        with pytest.raises(NormlabError):
            parse_sizes([bad])


def test_an_axis_sized_twice_is_refused_naming_both_sizes_not_settled_by_the_last():
    with pytest.raises(NormlabError, match=r"g is sized twice \(g=3 and g=2\)"):
        parse_sizes(["g=3", "c=2", "g=2"])


def test_a_pattern_error_becomes_one_line_that_names_the_character():
    with pytest.raises(normlab.PatternSyntaxError) as caught:
        make_plan("b (g [c) [h w]", (2, 4, 3, 3))
    line = one_line(caught.value)
    assert "\n" not in line and "at character 8" in line and "'[' opened inside ( )" in line


def test_a_params_error_on_one_line_names_params_and_survives_a_pickle():
    with pytest.raises(normlab.PatternSyntaxError) as caught:
        make_plan("b [d]", (2, 3), "d (")
    assert "(in params 'd (' at character 3: '(')" in one_line(caught.value)
    assert "(in params 'd (' at" in one_line(pickle.loads(pickle.dumps(caught.value)))


def page_cells(markup):
    return re.findall(r'<g class="cell" data-index="(\d+)" data-pos="([\d,]+)" data-group="(\d+)"', markup)


@pytest.mark.parametrize("x", [NOTE_2D, NOTE_3D, random_input((2, 4, 2, 3), seed=1)], ids=["2d", "3d", "4d"])
def test_page_has_one_cell_per_element_grouped_as_the_plan_says(x):
    views = all_views(x)
    markup = page.build_page(views, "batch")
    cells = page_cells(markup)
    assert [int(i) for i, _, _ in cells] == list(range(x.size))
    expected = make_plan(views[0].pattern, x.shape).group_ids().ravel()
    assert [int(g) for _, _, g in cells] == expected.tolist()


def test_page_embeds_every_norms_grouping_and_results_from_the_library():
    markup = page.build_page(all_views(NOTE_3D), "batch")
    data = json.loads(re.search(r'id="normlab-data">(.*?)</script>', markup, re.S).group(1))
    assert [n["key"] for n in data["norms"]] == ["batch", "layer-vision", "layer", "instance", "group", "rms"]
    for norm in data["norms"]:
        plan = make_plan(norm["pattern"], NOTE_3D.shape, **norm["sizes"])
        assert norm["groups"] == plan.group_ids().ravel().tolist()
        y = normlab.normalize(NOTE_3D, norm["pattern"], rms=norm["rms"], **norm["sizes"])
        assert norm["output"] == y.ravel().astype(float).tolist()


def test_page_loads_nothing_from_the_network():
    markup = page.build_page(all_views(NOTE_3D), "batch")
    assert not re.search(r"https?://|<link|@import|@font-face|\bsrc=", markup)


def test_cube_page_labels_the_n_c_and_hw_axes_and_grid_page_does_not_draw_a_cube():
    cube = page.build_page(all_views(NOTE_3D))
    assert "N · batch" in cube and "C · channels" in cube and "H·W · positions" in cube
    assert "H × W" in page.build_page(all_views(random_input((2, 2, 2, 2))))
    grid = page.build_page(all_views(NOTE_2D))
    assert "F · features" in grid and 'class="outline"' not in grid


def test_a_custom_pattern_comes_first_on_the_page_with_the_presets_after_it():
    view = explain_array(NOTE_3D, "b [c] s")
    keys = [v.key for v in all_views(NOTE_3D, view)]
    assert keys[0] == "custom" and "batch" in keys


def test_the_cube_names_tokens_and_features_in_the_nlp_and_rms_views_of_3d_data():
    from normlab.explain.html import cube_geometry

    three = cube_geometry((2, 3, 4)).decorations
    assert 'data-nlp="T · tokens" data-vision="C · channels"' in three
    assert 'data-nlp="D · features" data-vision="H·W · positions"' in three
    assert "data-nlp" not in cube_geometry((2, 3, 2, 2)).decorations  # 4-D: the NLP views keep channels


@pytest.mark.parametrize("row", [[1000001, 1000002, 1000003], [0.1234567, 0.1234568, 0.5], [16777218, 16777220, 1]],
                         ids=["millions", "seventh digit", "past 2**24"])
def test_distinct_values_are_drawn_distinct_and_read_back_as_themselves(row):
    # six significant digits drew 1000001, 1000002 and 1000003 all as 1e+06, under the claim
    # "the middle value is the mean" of what looked like a constant group
    from normlab.explain.model import format_value

    x = np.array([row], np.float32)
    view = explain_array(x, "layer")
    texts = [format_value(v) for v in view.x.ravel()]
    assert len(set(texts)) == len(set(x.ravel().tolist()))
    assert [np.float32(t) for t in texts] == x.ravel().tolist()
    console = make_console(no_color=True, file=io.StringIO(), width=200)
    render_view(console, view, limit=12)
    drawn = console.file.getvalue()
    assert all(t in drawn for t in texts)


def test_an_equal_pair_of_minus_zero_and_zero_is_named_as_drawn():
    # -0 == 0, so they share outputs; the claim named the pair "-0 and -0" beside cells drawn -0 and 0
    view = explain_array(np.array([[-0.0, 0.0, 1.0]], np.float32), "layer")
    texts = [o.text for o in observations(view) if "share a group" in o.text]
    assert len(texts) == 1 and "-0 and 0 share a group" in texts[0]


def test_a_large_mean_reads_as_the_input_value_it_equals_in_the_legend_and_on_the_page():
    x = np.array([[1000001, 1000002, 1000003], [1, 2, 4]], np.float32)
    view = explain_array(x, "layer")
    assert re.search(r"A\s+sample 0\s+1000001 1000002 1000003\s+1000002\s+0\.8165\s", render(view, no_color=True))
    norm = page.page_data([view], "layer")["norms"][0]
    assert norm["meanText"] == ["1000002", "2.333"] and norm["stdText"] == ["0.8165", "1.247"]


def test_a_mean_equal_to_an_input_value_reads_as_that_value_with_many_digits_or_an_exponent():
    # (four significant digits gave 1 beside the claim that 1.0000002 is the mean, and nine
    # gave 1.00000002e+20 beside three values drawn 1e+20)
    x = np.array([[1.0000001, 1.0000002, 1.0000004], [1e20, 1e20, 1e20], [3e15, 1, 2]], np.float32)
    view = explain_array(x, "layer")
    text = render(view, no_color=True)
    assert re.search(r"A\s+sample 0\s+1.0000001 1.0000002 1.0000004\s+1.0000002\s", text)
    assert re.search(r"B\s+sample 1\s+1e\+20 1e\+20 1e\+20\s+1e\+20\s+0\s", text)
    norm = page.page_data([view], "layer")["norms"][0]
    assert norm["meanText"][1:] == ["1e+20", "1e+15"] and norm["stdText"][1:] == ["0", "1.414e+15"]
    # a std, or a mean that is none of the values, keeps four digits, float32's own or not
    assert explain_array(np.array([[1.1234568, 2]], np.float32), "layer").stat_texts() == (["1.562"], ["0.4383"])


def test_the_axes_of_an_ellipsis_are_named_by_the_input_axis_they_stand_for():
    x = random_input((4, 2, 3), seed=0)
    assert explain_array(x, "... [d]").describe_group(3) == "axis 0 at 1, axis 1 at 1"
    assert explain_array(x, "(b g) ... [d]", {"g": 2}).describe_group(3) == "sample 0, group 1, axis 1 at 1"
    assert all("..." not in o.text for o in observations(explain_array(x, "... [d]")))


@pytest.mark.parametrize("x, width", [(NOTE_3D, 60), (random_input((3, 40), seed=0), 110)])
def test_tensors_wider_than_the_terminal_go_one_under_another_with_rows_folded_between_elements(x, width):
    view = explain_array(x, "batch")
    buffer = io.StringIO()
    render_view(make_console(file=buffer, width=width, no_color=True), view, legend=False, show_observations=False)
    lines = buffer.getvalue().splitlines()[1:]  # below the heading
    assert all(len(line) <= width for line in lines)
    blocks = "\n".join(lines).split("\ngroup\n")
    output_lines = blocks[1].split("normalized\n")[1].split("\n")
    # each line holds whole elements: the output read back line by line is the library's, in order
    read = [float(v) for line in output_lines for v in re.findall(r"[-+]?\d+\.\d+|\b0\b", line)]
    np.testing.assert_array_equal(np.round(read, 4), np.round(view.y.ravel().astype(np.float64), 4))


@pytest.mark.parametrize("row, who", [
    ([-0.0, 0.0, 0.0, 1.0], "-0, 0 and 0"), ([0.0, -0.0, 0.0, -0.0, 0.0, 1.0], "the five 0s and -0s"),
    ([-0.0, -0.0, -0.0, 1.0], "the three -0s"), ([0.0, 0.0, 0.0, 1.0], "the three 0s"),
])
def test_equal_zeros_drawn_as_minus_zero_and_zero_are_named_as_drawn(row, who):
    view = explain_array(np.array([row], np.float32), "layer")
    texts = [o.text for o in observations(view) if "share a group" in o.text]
    assert texts == [f"sample 0: {who} share a group, so their outputs are equal" + texts[0].split("equal")[1]]


@pytest.mark.parametrize("chosen", ["layer", "layer-vision", "batch", None])
def test_rows_get_one_layer_norm_button_whichever_layer_preset_was_asked_for(chosen):
    views = all_views(NOTE_2D, None if chosen is None else explain_array(NOTE_2D, chosen))
    assert [v.label for v in views] == ["batch norm", "layer norm", "RMS norm"]
    if chosen is not None:
        assert chosen in [v.key for v in views]


@pytest.mark.parametrize("row", [[0.1, 0.7], [-0.1, 0.7, 0.3], [0.0, 1.4e-45]])
def test_no_mirror_claim_fails_where_float32_cannot_hold_the_mean(row):
    # 0.1 and 0.7 mirror around a mean that float32 rounds: the kernels' outputs miss opposites by a bit
    for key in ("layer", "batch"):
        found = observations(explain_array(np.array([row], np.float32), key))
        assert all(o.holds for o in found), [o.text for o in found if not o.holds]


def test_mirror_pairs_around_a_float32_mean_are_still_claimed_and_hold():
    found = observations(explain_array(np.array([[0.25, 0.75, 0.5]], np.float32), "layer"))
    assert [o.holds for o in found if "mirror" in o.text] == [True]


def test_a_subnormal_input_is_drawn_with_the_digits_it_was_typed_with():
    view = explain_array(parse_data("[[1e-40, 3e-40, 2e-40]]"), "layer")
    assert page.page_data([view], "layer")["valueText"] == ["1e-40", "3e-40", "2e-40"]


def test_five_axes_are_refused_with_the_trailing_axes_merged_as_the_fix():
    # a BatchNorm3d input (N, C, D, H, W): the message says which 4-D shape to draw instead
    with pytest.raises(ShapeError, match=r"\(2, 3, 2, 2, 2\); merge the trailing axes into one, as in --shape 2,3,2,4"):
        random_input((2, 3, 2, 2, 2))
    x = random_input((2, 3, 2, 4), seed=1)
    assert explain_array(x, "batch").pattern == "[b] c [h w]"
    # --data and the Python API have no --shape to change (it told them to pass one)
    for refuse in (lambda: parse_data("[[[[[1, 2], [3, 4]]]]]"),
                   lambda: explain_array(np.ones((1, 1, 1, 2, 2)), "batch")):
        with pytest.raises(ShapeError, match=r"merge the trailing axes into one, as in shape \(1, 1, 1, 4\) \(batch"):
            refuse()


@pytest.mark.parametrize("data, says", [
    ([[1, 2], [3]], "x cannot be read as an array"),
    (np.ma.array(np.ones((2, 3)), mask=[[1, 0, 0], [0, 0, 0]]), "masked array with masked elements"),
], ids=["ragged", "masked"])
def test_explain_array_refuses_what_normalize_refuses_with_a_normlab_error(data, says):
    """A ragged list escaped as NumPy's bare ValueError, and a masked array was drawn with its
    masked values counted, where normalize refuses both."""
    with pytest.raises(NormlabError, match=says) as info:
        explain_array(data, "b [f]")
    assert "explain 'b [f]'" in str(info.value)
