"""``normlab explain --mask``: excluded elements drawn apart (terminal and page), and the
observations made on the counted elements only, checked against a float64 definition."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

import normlab
from normlab.cli import main
from normlab.explain.html import page_data
from normlab.explain.model import EPS, all_views, explain_array, observations

DATA = [[4, 3, 2], [3, 3, 2], [2, 2, 2], [9, 7, 5]]
MASK = [[1], [1], [1], [0]]  # the last sample is padding


@pytest.fixture
def explain(capsys):
    def run(*args):
        code = main(["explain", *args, "--no-color"])
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return run


def test_terminal_shows_the_masked_out_elements_in_parentheses_and_only_those(explain):
    result = explain("batch", "--data", json.dumps(DATA), "--mask", json.dumps(MASK))
    assert result.returncode == 0, result.stderr
    input_column = result.stdout.split("(…) = masked out")[0]
    assert re.search(r"\(9\),\s+\(7\),\s+\(5\)", input_column)
    assert not re.search(r"\(4\)|\(3\)|\(2\)", input_column)
    assert "9 of 12 counted" in result.stdout


def test_a_mask_that_does_not_broadcast_to_the_data_is_refused_with_both_shapes(explain):
    result = explain("batch", "--data", json.dumps(DATA), "--mask", "[[1, 0]]")
    assert result.returncode == 2
    assert "(1, 2)" in result.stderr and "(4, 3)" in result.stderr


@pytest.mark.parametrize("preset, mask, fitted", [
    ("layer", [[1, 1, 0], [1, 0, 0]], [[[1], [1], [0]], [[1], [0], [0]]]),  # (batch, tokens) beside (b, t, d)
    ("instance", [[1, 1, 0, 0], [1, 1, 1, 0]], [[[1, 1, 0, 0]], [[1, 1, 1, 0]]]),  # (batch, time) beside (b, c, t)
])
def test_a_batch_by_time_mask_is_refused_with_the_mask_that_fits_which_normalizes_each_sequence_alone(explain, preset,
                                                                                                      mask, fitted):
    # it was told "give it the data's shape or size-1 axes", not which
    data = np.random.default_rng(4).integers(0, 10, (2, 3, 4)).astype(np.float32)
    result = explain(preset, "--data", json.dumps(data.tolist()), "--mask", json.dumps(mask))
    assert result.returncode == 2
    told = re.search(r"--mask '([^']*)' \(size-1 axes for those it lacks\)", result.stderr).group(1)
    assert json.loads(told) == fitted
    assert explain(preset, "--data", json.dumps(data.tolist()), "--mask", told).returncode == 0
    view = explain_array(data, preset, mask=np.array(fitted, dtype=bool))
    torch = pytest.importorskip("torch")
    x = torch.tensor(data, dtype=torch.float64)
    for b, lengths in enumerate(mask):
        n = sum(lengths)
        want = (torch.nn.functional.layer_norm(x[b, :n], (4,)) if preset == "layer"
                else torch.nn.functional.instance_norm(x[b:b + 1, :, :n])[0])
        got = view.y[b, :n] if preset == "layer" else view.y[b, :, :n]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_page_data_marks_the_masked_out_elements_for_every_norm():
    x = np.array(DATA, dtype=np.float32)
    mask = np.broadcast_to(np.array(MASK, dtype=bool), x.shape)
    view = explain_array(x, "batch", mask=mask)
    data = page_data(all_views(x, view), view.key)
    assert len(data["norms"]) > 1
    for norm in data["norms"]:
        assert norm["counted"] == mask.ravel().tolist()



def test_the_page_says_in_words_that_grey_cells_are_masked_out_and_how_many_count(explain, tmp_path):
    """The page greyed the masked-out cells and said nowhere what grey means."""
    page = tmp_path / "masked.html"
    result = explain("batch", "--data", json.dumps(DATA), "--mask", json.dumps(MASK), "--html", str(page))
    assert result.returncode == 0, result.stderr
    assert re.search(r'id="mask-note">Grey cells are masked out: each is normalized with its group\'s statistics, '
                     r"but not counted in them \(9 of 12 counted\)", page.read_text(encoding="utf-8"))
    plain = tmp_path / "plain.html"
    assert explain("batch", "--data", json.dumps(DATA), "--html", str(plain)).returncode == 0
    assert 'id="mask-note"' not in plain.read_text(encoding="utf-8")

def test_a_mask_that_counts_everything_draws_nothing_as_masked_out_and_says_so(explain, tmp_path):
    """The terminal printed its "(…) = masked out" legend, and the page said grey cells are
    masked out, where the mask left nothing out."""
    ones = json.dumps([[1, 1, 1]] * 4)
    result = explain("batch", "--data", json.dumps(DATA), "--mask", ones)
    assert result.returncode == 0, result.stderr
    assert "masked out" not in result.stdout
    assert not re.search(r"\(\d\)", result.stdout.split("the mask counts")[0])  # no input drawn as masked out
    assert "the mask counts every element (12 of 12): the same as no mask" in result.stdout
    page = tmp_path / "all.html"
    assert explain("batch", "--data", json.dumps(DATA), "--mask", ones, "--html", str(page)).returncode == 0
    text = page.read_text(encoding="utf-8")
    assert "Grey cells" not in text and "The mask counts every element (12 of 12)" in text


@pytest.mark.parametrize("preset", ["batch", "layer"])
def test_statistics_and_outputs_come_from_the_counted_elements_as_the_float64_definition_says(preset):
    rng = np.random.default_rng(3)
    x = rng.integers(-5, 6, size=(4, 5)).astype(np.float32)
    mask = rng.random((4, 5)) < 0.7
    mask[:, :2] = mask[:2, :] = True  # every row and column counts at least two
    view = explain_array(x, preset, mask=mask)
    axis = 0 if preset == "batch" else 1
    x64, m = x.astype(np.float64), mask.astype(np.float64)
    n = m.sum(axis, keepdims=True)
    mean = (m * x64).sum(axis, keepdims=True) / n
    var = (m * (x64 - mean) ** 2).sum(axis, keepdims=True) / n
    np.testing.assert_allclose(view.mean, mean.ravel(), rtol=1e-12)
    np.testing.assert_allclose(view.std, np.sqrt(var).ravel(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(view.y, (x64 - mean) / np.sqrt(var + EPS), rtol=1e-5, atol=1e-5)
    for found in observations(view):  # every claim is about counted elements only, and holds
        assert all(mask.ravel()[i] for i in found.indices), found.text
        assert found.holds, found.text


def test_counted_values_all_equal_become_exactly_zero_although_the_padding_differs(explain):
    result = explain("batch", "--data", "[[2, 1], [2, 3], [2, 5], [8, 9]]", "--mask", "[[1, 1], [1, 1], [1, 1], [0, 1]]")
    assert result.returncode == 0, result.stderr
    assert "✓ feature 0: [2, 2, 2], all values are equal, so they all become 0" in result.stdout
    x = np.array([[2, 1], [2, 3], [2, 5], [8, 9]], dtype=np.float32)
    view = explain_array(x, "batch", mask=np.array([[1, 1], [1, 1], [1, 1], [0, 1]], dtype=bool))
    assert np.all(view.y[:3, 0] == 0)


def test_segments_split_each_group_by_id_as_the_float64_definition_says(explain):
    x = np.array([[4, 3, 2], [3, 3, 2], [2, 2, 2], [9, 7, 5]], dtype=np.float32)
    ids = np.array([0, 0, 1, 1])
    view = explain_array(x, "batch", segments=ids)
    # each (feature, segment) its own group: rows 0-1 and rows 2-3 apart
    assert len(np.unique(view.groups)) == 6 and view.groups[0, 0] == view.groups[1, 0] != view.groups[2, 0]
    x64 = x.astype(np.float64)
    for rows in (slice(0, 2), slice(2, 4)):
        part = x64[rows]
        expected = (part - part.mean(0)) / np.sqrt(part.var(0) + EPS)
        np.testing.assert_allclose(view.y[rows], expected, rtol=1e-5, atol=1e-5)
    result = explain("batch", "--data", json.dumps(x.astype(int).tolist()), "--segments", "[0, 0, 1, 1]")
    assert result.returncode == 0, result.stderr
    assert "6 groups (split by the segment ids)" in result.stdout
    assert "✓ feature 1, segment 0: [3, 3], all values are equal, so they all become 0" in result.stdout
    norm = next(n for n in page_data(all_views(x, view), view.key)["norms"] if n["key"] == view.key)
    assert norm["groups"] == view.groups.ravel().tolist() and norm["segmented"]


def test_segment_ids_of_the_wrong_length_are_refused_with_the_pattern_and_shape(explain):
    result = explain("batch", "--data", json.dumps(DATA), "--segments", "[0, 1]")
    assert result.returncode == 2
    assert "(4, 3)" in result.stderr
    # named as the caller named them (--segments, explain_array's segments=), not as normalize's segment_ids
    assert "segments must have shape (4,)" in result.stderr and "segment_ids" not in result.stderr


def test_segments_on_a_pattern_that_brackets_no_axis_by_name_are_refused_as_segments(explain):
    # the refusal of a pattern whose brackets hold only "..." still said "segment_ids run along a
    # bracketed axis", a name neither --segments nor explain_array's segments= uses
    result = explain("[...] f", "--data", json.dumps(DATA), "--segments", "[0, 0, 1, 1]")
    assert result.returncode == 2
    assert "segments run along a bracketed axis" in result.stderr and "segment_ids" not in result.stderr
    with pytest.raises(normlab.errors.ShapeError, match=r"^pattern 'b \[\.\.\.\]'.*: segments run along"):
        explain_array(np.array(DATA, float), "b [...]", segments=np.array([0, 0, 1]))


@pytest.mark.parametrize("huge", [2**63, 2**64 - 1, 2**64])
def test_a_segment_id_past_int64_is_refused_as_too_large_not_as_negative(explain, huge):
    # NumPy reads such an id as a float (mixed with small ones) or wraps it: the message
    # must name the id itself, not call the list non-integer or negative
    result = explain("batch", "--data", json.dumps(DATA), "--segments", json.dumps([0, huge, 1, 1]))
    assert result.returncode == 2
    assert f"id {huge}, too large" in result.stderr and "non-negative" not in result.stderr


def test_a_group_with_nothing_counted_shows_no_mean_or_std_in_the_legend_nor_on_the_page(explain):
    # its statistics are set to 0, rstd included: "std 0" would promise outputs of (x - 0) / sqrt(eps)
    result = explain("layer", "--data", json.dumps(DATA), "--mask", json.dumps(MASK))
    assert re.search(r"D\s+sample 3\s+\(none counted\)\s+–\s+–", result.stdout)
    assert re.search(r"A\s+sample 0\s+4 3 2\s+3\s+0\.8165", result.stdout)
    x = np.array(DATA, np.float32)
    view = explain_array(x, "layer", mask=np.broadcast_to(np.array(MASK, bool), x.shape))
    norm = page_data([view], "layer")["norms"][0]
    assert norm["meanText"] == ["3", "2.667", "2", "–"] and norm["stdText"][3] == "–"


@pytest.mark.parametrize("argument, value, fix", [
    ("mask", np.ma.masked_array(np.ones((4, 3), bool), mask=np.eye(4, 3, dtype=bool)), "mask.filled(False)"),
    ("mask", np.ma.masked_array(np.ones((1, 3), bool), mask=[[False, True, False]]), "mask.filled(True)"),
    ("segments", np.ma.masked_array([0, 1, 1, 0], mask=[False, True, False, False]), "pass segments.filled(id)"),
], ids=["mask", "broadcast mask", "segments"])
def test_explain_refuses_an_np_ma_mask_or_segments_with_masked_elements_as_normalize_does(argument, value, fix):
    """explain_array read mask= and segments= with np.asarray, which drops an np.ma array's own
    mask: the values under it counted (or kept the id they hid), silently, where normalize
    refuses such an array (458cfcc) and says how to decide. One with nothing masked is read
    as before."""
    x = np.arange(12.0).reshape(4, 3)
    normalize_argument = {"segments": "segment_ids"}.get(argument, argument)
    with pytest.raises(ValueError) as expected:
        normlab.normalize(x, "[b] c", **{normalize_argument: value})
    with pytest.raises(ValueError, match=r"pattern '\[b\] c', input shape \(4, 3\)") as got:
        explain_array(x, "[b] c", **{argument: value})
    assert type(got.value) is type(expected.value) and fix in str(got.value)
    explain_array(x, "[b] c", **{argument: np.ma.masked_array(np.ma.getdata(value))})


def test_the_help_names_every_form_of_mask_that_explain_takes_and_each_form_gives_the_same_picture(explain, capsys):
    """--help said "0/1 lists shaped like the data", where README (and explain) also take
    true/false and masks that broadcast: each form the help names draws what the full 0/1
    mask draws."""
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    start = help_text.rindex("--mask JSON")  # (past the usage line)
    mask_help = help_text[start:help_text.index("--segments JSON", start)]
    assert "true/false" in mask_help and "broadcastable" in mask_help, mask_help
    full = [[int(keep)] * 3 for (keep,) in MASK]
    drawn = {json.dumps(mask): explain("batch", "--data", json.dumps(DATA), "--mask", json.dumps(mask)).stdout
             for mask in (full, MASK, [[bool(keep)] for (keep,) in MASK])}
    assert len(set(drawn.values())) == 1, drawn
