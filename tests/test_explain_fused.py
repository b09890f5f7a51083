"""``normlab explain`` with a fused block: the stages where residual, gate and modulation enter."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from normlab.cli import main


@pytest.fixture
def explain(capsys):
    def run(*args):
        code = main(["explain", *args, "--no-color"])
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return run


def test_terminal_lists_one_stage_per_line_in_the_order_the_data_meets_them(explain):
    result = explain("b t [d]", "--shape", "2,2,3", "--residual", "--gate", "silu", "--modulation", "b d")
    assert result.returncode == 0, result.stderr
    stages = re.findall(r"^\s+\d\s+(\w+)\s", result.stdout.split("fused block")[1], flags=re.M)
    assert stages == ["residual", "statistics", "normalize", "modulation", "gate"]
    assert "y₀ · silu(z)" in result.stdout and "per (b, d)" in result.stdout


def test_gate_first_enters_before_the_statistics_and_they_see_the_gated_sum(explain):
    result = explain("b [d]", "--shape", "2,4", "--residual", "--gate", "sigmoid", "--gate-first", "--rms")
    lines = result.stdout.split("fused block")[1].splitlines()[1:]
    assert "h = s · sigmoid(z)" in lines[1] and "mean(h²) of h over [d]" in lines[2]


def test_page_draws_the_pipeline_with_the_entering_stages_marked(explain, tmp_path):
    page = tmp_path / "fused.html"
    result = explain("b t [d]", "--shape", "2,2,3", "--modulation", "b d", "--html", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert re.findall(r'data-stage="(\w+)"', text) == ["statistics", "normalize", "modulation"]
    assert 'class="stage enters" data-stage="modulation"' in text


def test_plain_explain_has_no_pipeline(explain, tmp_path):
    page = tmp_path / "plain.html"
    result = explain("b [d]", "--shape", "2,3", "--html", str(page))
    assert "fused block" not in result.stdout and "data-stage" not in page.read_text()


def test_modulation_over_an_unknown_axis_says_which_axes_exist(explain):
    result = explain("b t [d]", "--shape", "2,2,3", "--modulation", "b q")
    assert result.returncode == 2 and "'q'" in result.stderr and "b, t, d" in result.stderr



def test_gate_first_without_a_gate_is_refused_not_ignored(explain):
    # alone it drew the plain norm and exited 0: the check came after the early return for "no fused block"
    result = explain("batch", "--shape", "2,3", "--gate-first")
    assert result.returncode == 2 and result.stdout == ""
    assert "--gate-first needs --gate ACT (silu, sigmoid or gelu)" in result.stderr


@pytest.mark.parametrize("axes", ["", "  "])
def test_an_empty_modulation_is_refused_as_normalize_refuses_it_not_left_out_silently(explain, axes):
    # --modulation '' drew the plain norm and exited 0, where normalize(modulation="") raises
    result = explain("b t [d]", "--shape", "2,2,3", "--modulation", axes)
    assert result.returncode == 2 and result.stdout == ""
    assert "empty modulation: name the axes scale and shift span" in result.stderr
    assert f"(in modulation {axes!r} at character 1" in result.stderr and "in pattern" not in result.stderr


def test_a_modulation_syntax_error_points_into_the_modulation_the_user_passed_not_into_a_pattern(explain):
    result = explain("b t [d]", "--shape", "2,2,3", "--modulation", "b [")
    assert result.returncode == 2
    assert "(in modulation 'b [' at character 3: '[')" in result.stderr and "in pattern" not in result.stderr
    result = explain("b t [d", "--shape", "2,2,3", "--modulation", "b d")  # the pattern's own fault stays the pattern's
    assert result.returncode == 2 and "(in pattern 'b t [d' at character 5: '[d')" in result.stderr


def test_modulation_on_the_group_preset_takes_the_g_the_preset_picked_and_errors_speak_of_modulation(explain):
    result = explain("group", "--shape", "2,4,3", "--modulation", "b c")  # g=2 picked by the preset
    assert result.returncode == 0 and "scale and shift per (b, c)" in result.stdout
    result = explain("group", "--shape", "2,4,3", "--modulation", "b q")
    assert result.returncode == 2 and "modulation 'b q' names axis 'q'" in result.stderr
    assert "params" not in result.stderr


def _float64_norm(s, axes, rms=False, eps=1e-5):
    """The definition in float64: (s - mean) / sqrt(var + eps) over ``axes`` (rms: s / sqrt(mean(s²) + eps))."""
    s = np.asarray(s, dtype=np.float64)
    if rms:
        return s / np.sqrt((s * s).mean(axis=axes, keepdims=True) + eps)
    mean = s.mean(axis=axes, keepdims=True)
    return (s - mean) / np.sqrt(((s - mean) ** 2).mean(axis=axes, keepdims=True) + eps)


def _page_data(path):
    text = path.read_text()
    return json.loads(re.search(r'id="normlab-data">(.*?)</script>', text, flags=re.S).group(1).replace("<\\/", "</"))


X = [[1, 2, 4], [3, 1, 1]]
R = [[0, 5, 1], [2, 2, 9]]


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_residual_stages_show_the_norm_of_x_plus_r_in_the_terminal_and_on_the_page(explain, tmp_path, rms):
    page = tmp_path / "residual.html"
    result = explain("b [d]", "--data", json.dumps(X), "--residual-data", json.dumps(R), "--html", str(page),
                     *(["--rms"] if rms else []))
    assert result.returncode == 0, result.stderr
    s = np.add(X, R, dtype=np.float64)
    want = _float64_norm(s, axes=1, rms=rms)
    # the terminal's normalized column, 4 decimals, after the x | r | s table
    shown = [float(v) for v in re.findall(r"[+-]\d+\.\d{4}", result.stdout.split("normalized")[1].split("group ")[0])]
    np.testing.assert_allclose(shown, want.ravel(), atol=5e-5)
    assert "s = x + r" in result.stdout.split("your pattern")[0]
    data = _page_data(page)
    chosen = next(n for n in data["norms"] if n["pattern"] == "b [d]" and n["rms"] == rms)
    np.testing.assert_array_equal(data["values"], s.ravel())
    np.testing.assert_allclose(chosen["output"], want.ravel(), rtol=1e-6, atol=1e-6)
    if not rms:
        np.testing.assert_allclose(chosen["mean"], s.mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(chosen["std"], s.std(axis=1), rtol=1e-12)


def test_residual_alone_draws_a_random_residual_and_normalizes_the_sum(explain, tmp_path):
    page = tmp_path / "drawn.html"
    result = explain("b t [d]", "--shape", "2,2,3", "--seed", "4", "--residual", "--html", str(page))
    assert result.returncode == 0, result.stderr
    # the documented draws: random integers 0 to 9 with the seed, and with the next seed for r
    x = np.random.default_rng(4).integers(0, 10, size=(2, 2, 3))
    r = np.random.default_rng(5).integers(0, 10, size=(2, 2, 3))
    assert "seed 5" in result.stdout
    data = _page_data(page)
    chosen = next(n for n in data["norms"] if n["pattern"] == "b t [d]" and not n["rms"])
    np.testing.assert_array_equal(data["values"], (x + r).ravel())
    np.testing.assert_allclose(chosen["output"], _float64_norm(x + r, axes=2).ravel(), rtol=1e-6, atol=1e-6)


def test_residual_data_that_does_not_broadcast_names_both_shapes(explain):
    result = explain("b [d]", "--data", json.dumps(X), "--residual-data", "[1, 2]")
    assert result.returncode == 2 and "(2,)" in result.stderr and "(2, 3)" in result.stderr


Z = [[-3, 0, 2], [1, -1, 3]]


def _torch_gate(s, z, act):
    torch = pytest.importorskip("torch")

    phi = {"silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid, "gelu": torch.nn.functional.gelu}[act]
    return (torch.as_tensor(s, dtype=torch.float64) * phi(torch.as_tensor(z, dtype=torch.float64))).numpy()


@pytest.mark.parametrize("act, rms", [("silu", True), ("sigmoid", False), ("gelu", False)])
def test_gate_first_draws_the_norm_of_the_gated_input_in_the_terminal_and_on_the_page(explain, tmp_path, act, rms):
    page = tmp_path / "gate.html"
    result = explain("b [d]", "--data", json.dumps(X), "--gate", act, "--gate-first", "--gate-data", json.dumps(Z),
                     "--html", str(page), *(["--rms"] if rms else []))
    assert result.returncode == 0, result.stderr
    h = _torch_gate(X, Z, act)
    want = _float64_norm(h, axes=1, rms=rms)
    assert f"h = x · {act}(z), the norm's input" in result.stdout.split("your pattern")[0]
    data = _page_data(page)
    chosen = next(n for n in data["norms"] if n["pattern"] == "b [d]" and n["rms"] == rms)
    np.testing.assert_allclose(data["values"], h.ravel(), rtol=1e-12)
    np.testing.assert_allclose(chosen["output"], want.ravel(), rtol=1e-6, atol=1e-6)


def test_gate_first_after_a_residual_gates_the_sum_with_a_gate_drawn_from_the_seed_after_the_residuals(explain,
                                                                                                     tmp_path):
    page = tmp_path / "drawn_gate.html"
    result = explain("b t [d]", "--shape", "2,2,3", "--seed", "4", "--residual", "--gate", "silu", "--gate-first",
                     "--html", str(page))
    assert result.returncode == 0, result.stderr
    # the documented draws: x with the seed, r with the next, z (integers -3 to 3) with the one after
    x = np.random.default_rng(4).integers(0, 10, size=(2, 2, 3))
    r = np.random.default_rng(5).integers(0, 10, size=(2, 2, 3))
    z = np.random.default_rng(6).integers(-3, 4, size=(2, 2, 3))
    assert "seed 6" in result.stdout and "h = s · silu(z)" in result.stdout
    h = _torch_gate(x + r, z, "silu")
    data = _page_data(page)
    chosen = next(n for n in data["norms"] if n["pattern"] == "b t [d]" and not n["rms"])
    np.testing.assert_allclose(data["values"], h.ravel(), rtol=1e-12)
    np.testing.assert_allclose(chosen["output"], _float64_norm(h, axes=2).ravel(), rtol=1e-6, atol=1e-6)


def test_gate_after_the_norm_leaves_the_statistics_on_the_input(explain, tmp_path):
    page = tmp_path / "gate_last.html"
    result = explain("b [d]", "--data", json.dumps(X), "--gate", "silu", "--gate-data", json.dumps(Z),
                     "--html", str(page))
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(_page_data(page)["values"], np.ravel(X))


def test_the_seed_draws_the_residual_and_the_gate_of_given_data_too_and_a_bad_seed_is_refused(explain):
    drawn = explain("b [d]", "--data", json.dumps(X), "--residual", "--gate", "silu", "--gate-first", "--seed", "7")
    assert drawn.returncode == 0, drawn.stderr
    assert "residual r (random integers 0 to 9, seed 8)" in drawn.stdout and "seed 9" in drawn.stdout
    assert explain("b [d]", "--data", json.dumps(X), "--residual").stdout.count("seed 1") == 1  # default 0 + 1
    refused = explain("b [d]", "--data", json.dumps(X), "--residual", "--seed", "abc")
    assert refused.returncode == 2 and "--seed 'abc' is not an integer >= 0" in refused.stderr


def test_gate_data_without_a_gate_says_to_name_the_activation(explain):
    result = explain("b [d]", "--data", json.dumps(X), "--gate-data", json.dumps(Z))
    assert result.returncode == 2 and "--gate ACT" in result.stderr


@pytest.mark.parametrize("z, message", [("[[1, 2], [3]]", "rectangular"), ("[[1, 2, 3, 4]]", "does not broadcast")])
def test_gate_data_for_a_gate_after_the_norm_is_read_and_refused_when_it_is_no_gate(explain, z, message):
    result = explain("b [d]", "--data", json.dumps(X), "--gate", "silu", "--gate-data", z)
    assert result.returncode == 2 and "--gate-data" in result.stderr and message in result.stderr


def test_gate_data_that_does_not_broadcast_names_both_shapes(explain):
    result = explain("b [d]", "--data", json.dumps(X), "--gate", "silu", "--gate-first", "--gate-data", "[1, 2]")
    assert result.returncode == 2 and "--gate-data" in result.stderr and "(2, 3)" in result.stderr


def test_data_that_float32_holds_as_other_values_says_so_in_the_terminal_and_on_the_page(explain, tmp_path):
    # typed apart, drawn (and claimed) equal: the reader must learn why
    page = tmp_path / "rounded.html"
    result = explain("layer", "--data", "[[16777216, 16777217, 3]]", "--html", str(page))
    note = "float32 (explain computes in it, as the demo does) holds 16777217 as 16777216"
    assert result.returncode == 0 and note in result.stdout
    assert note in page.read_text()
    assert "float32" not in explain("layer", "--data", "[[0.1, 0.25, 3]]").stdout  # 0.1 is drawn as typed


@pytest.mark.parametrize("offset, formula", [("-1", "y = x̂ · (w − 1)"), ("0.5", "y = x̂ · (w + 0.5)"), ("1", "y = x̂ · (1 + w)"),
                                            ("-1e-8", "y = x̂ · (w − 1e-08)"), ("-2.5E+3", "y = x̂ · (w − 2500)")])
def test_the_weight_offset_is_written_with_its_own_sign(explain, offset, formula):
    result = explain("layer", "--shape", "2,3", "--weight-offset", offset)
    assert result.returncode == 0 and formula in result.stdout and "+ -" not in result.stdout
