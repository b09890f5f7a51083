"""``normlab explain`` with a fused block: the stages where residual, gate and modulation enter."""

import re
from types import SimpleNamespace

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
