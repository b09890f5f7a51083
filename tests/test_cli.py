"""``normlab explain`` and ``normlab demo`` run as a user runs them: in a subprocess."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from normlab.explain.model import random_input
from normlab.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
NOTE_2D_JSON = "[[4,3,2],[3,3,2],[2,2,2]]"
NOTE_3D_JSON = "[[[1,4,7],[0,2,4]],[[1,3,6],[2,3,1]]]"


def normlab_cli(*args, cwd, env_extra=None):
    """Run ``python -m normlab.cli`` with this checkout's package first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "normlab.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=60)


def test_explain_with_data_shows_the_layout_groups_and_checked_claims(tmp_path):
    result = normlab_cli("explain", "batch", "--data", NOTE_2D_JSON, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[b] f" in out and re.search(r"\[\[4, 3, 2\],\s+\[\[A, B, C\],", out)
    assert "✓ feature 0: [4, 3, 2], the middle value is the mean, so it becomes exactly 0" in out
    assert "✓ feature 2: [2, 2, 2], all values are equal, so they all become 0" in out
    assert "✗" not in out


def test_explain_output_to_a_pipe_is_plain_text(tmp_path):
    result = normlab_cli("explain", "layer", "--data", NOTE_2D_JSON, cwd=tmp_path)
    assert result.returncode == 0 and "\x1b" not in result.stdout


def test_explain_with_shape_is_reproducible_by_seed(tmp_path):
    first = normlab_cli("explain", "instance", "--shape", "2,3,4", "--seed", "5", cwd=tmp_path)
    again = normlab_cli("explain", "instance", "--shape", "2,3,4", "--seed", "5", cwd=tmp_path)
    other = normlab_cli("explain", "instance", "--shape", "2,3,4", "--seed", "6", cwd=tmp_path)
    assert first.returncode == 0 and first.stdout == again.stdout != other.stdout
    assert "b c [s]" in first.stdout and "6 groups of 4" in first.stdout


@pytest.mark.parametrize("preset, shape, pattern", [
    ("batch", "2,3,2,2", "[b] c [h w]"), ("layer-vision", "2,3,2,2", "b [c h w]"),
    ("layer", "2,3,4", "b t [d]"), ("rms", "2,3", "b [f]"),
])
def test_explain_resolves_each_preset_for_the_rank_of_the_data(tmp_path, preset, shape, pattern):
    result = normlab_cli("explain", preset, "--shape", shape, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert pattern in result.stdout.splitlines()[1]


def test_explain_takes_sizes_after_the_options(tmp_path):
    result = normlab_cli("explain", "b (g [c]) [s]", "--shape", "2,4,3", "g=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "4 groups of 6" in result.stdout and "sample 1, group 1" in result.stdout


def test_explain_rms_flag_turns_a_pattern_into_rms_norm(tmp_path):
    result = normlab_cli("explain", "b [d]", "--data", "[[2,2,2],[3,4,0]]", "--rms", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rms" in result.stdout and "all values are equal" not in result.stdout
    assert re.search(r"\[\[\+1\.0000, \+1\.0000, \+1\.0000\],", result.stdout)


def test_explain_html_writes_a_page_whose_cells_follow_the_plan(tmp_path):
    result = normlab_cli("explain", "group", "--shape", "2,4,3", "--seed", "2", "--html", "out.html", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "out.html" in result.stdout
    markup = (tmp_path / "out.html").read_text(encoding="utf-8")
    groups = [int(g) for g in re.findall(r'<g class="cell" data-index="\d+" data-pos="[\d,]+" data-group="(\d+)"', markup)]
    assert groups == make_plan("b (g [c]) [s]", (2, 4, 3), g=2).group_ids().ravel().tolist()
    assert str(random_input((2, 4, 3), 2).ravel()[0].astype(int)) in markup


def test_demo_walks_through_the_note_and_checks_its_claims_out_loud(tmp_path):
    result = normlab_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for claim in (
        "✓ feature 0: [4, 3, 2], the middle value is the mean, so it becomes exactly 0",
        "✓ feature 1: 3 and 3 share a group, so their outputs are equal",
        "✓ feature 2: [2, 2, 2], all values are equal, so they all become 0",
        "✓ channel 0: 1 and 1 share a group, so their outputs are equal",
        "✓ channel 1: 2 and 2 share a group, so their outputs are equal",
    ):
        assert claim in out
    for pattern in ("[b] f", "b [f]", "[b] c [s]", "b [c s]", "b t [d]"):
        assert f"  {pattern}  " in out
    assert "✗" not in out and re.search(r"✓ (\d+) of \1 claims hold", out)
    assert len(out.splitlines()) <= 80  # two screens at most


def test_demo_writes_its_page_in_the_current_directory_and_prints_where(tmp_path):
    result = normlab_cli("demo", cwd=tmp_path)
    page = tmp_path / "normlab-demo.html"
    assert page.is_file() and page.resolve().as_uri() in result.stdout
    assert page.read_text(encoding="utf-8").count('<g class="cell"') == 12


def test_demo_html_option_moves_the_page(tmp_path):
    result = normlab_cli("demo", "--html", "sub.html", cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "sub.html").is_file()
    assert not (tmp_path / "normlab-demo.html").exists()


NARROW_ENCODINGS = {"C locale without UTF-8 mode": ({"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}, "ascii"),
                    "ASCII": ({"PYTHONIOENCODING": "ascii"}, "ascii"),
                    "Latin-1": ({"PYTHONIOENCODING": "latin-1"}, "latin-1")}


@pytest.mark.parametrize("env, encoding", NARROW_ENCODINGS.values(), ids=NARROW_ENCODINGS.keys())
@pytest.mark.parametrize("args", [["demo", "--html", "demo.html"],
                                  ["explain", "batch", "--data", NOTE_2D_JSON, "--residual-data", "[0]", "--gate",
                                   "silu", "--mask", "[[1],[1],[1]]", "--html", "page.html"]],
                         ids=["demo", "explain"])
def test_a_terminal_whose_encoding_lacks_the_check_marks_gets_them_spelled_in_ascii(tmp_path, env, encoding, args):
    # a UnicodeEncodeError traceback ended the command at its first line (the tensor's 2×3)
    result = subprocess.run([sys.executable, "-m", "normlab.cli", *args], cwd=tmp_path, capture_output=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    out = result.stdout.decode(encoding)
    assert re.search(r"^  OK (feature|channel) \d", out, re.M) and "FAILS" not in out, out


_SWEEP_OF_MADE_UP_CELLS = """
import sys
import normlab.bench
from normlab import cli, sweep
sweep.measure = lambda **options: [
    sweep.Cell("layer", "fwd", rows, features, {"normlab": 1.0, "eager": 1.5 * rows, "onnxruntime": 0.5,
                                                 "compile": None if features == 64 else 2.0})
    for rows in (1, 64, 1024) for features in (64, 1024, 4096)]  # (timing nothing)
normlab.bench.require_modules = lambda *args: None
sys.exit(cli.main(["bench", "--sweep", "--quick", "--no-color"]))
"""


def _run_in_a_terminal(args, encoding, columns):
    # FORCE_COLOR: rich takes the pipe for a terminal, so COLUMNS holds (and cells are cut or folded)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": encoding, "COLUMNS": str(columns), "FORCE_COLOR": "1",
           "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, *args], capture_output=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.stdout.decode(encoding))


@pytest.mark.parametrize("encoding", ["utf-8", "ascii", "latin-1"])
def test_the_sweep_s_table_lines_up_in_a_terminal_that_cannot_write_its_ellipsis(encoding):
    # rich cut "features" to "featu…" and measured the "…" as one column; the encoder wrote it
    # as "...", and that line's column borders moved two to the right
    out = _run_in_a_terminal(["-c", _SWEEP_OF_MADE_UP_CELLS], encoding, columns=36)
    table = [line for line in out.splitlines() if line and line[0] in "+|┏┃┡│└"]
    assert len(table) > 8, out
    borders = {tuple(i for i, char in enumerate(line) if char in "+|┏┃┳┡╇┩│└┴┘┓┛") for line in table[1:-1]}
    assert len({len(line) for line in table}) == 1 and len(borders) == 1, out


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_explain_s_legend_lines_up_where_a_group_lists_more_values_than_it_shows(encoding):
    # "… 2 more" went out as "... 2 more" after rich had laid the legend out: its row's mean and
    # std stood two columns right of the others'
    data = "[" + ",".join([str(list(range(14)))] * 2) + "]"
    mask = "[" + ",".join([str([1] * 14), str([1] * 3 + [0] * 11)]) + "]"
    out = _run_in_a_terminal(["-m", "normlab.cli", "explain", "layer", "--data", data, "--mask", mask], encoding,
                             columns=120)
    legend = out[out.index("  group "):].splitlines()[:3]
    assert "more" in legend[1] and "more" not in legend[2], out
    assert len({len(line.rstrip()) for line in legend}) == 1, "\n".join(legend)


def test_explain_refuses_an_empty_page_name_as_argparse_refuses_a_bad_value(tmp_path):
    # --html '' wrote nothing and said nothing (and suggested adding --html)
    result = normlab_cli("explain", "batch", "--shape", "2,3", "--html", "", cwd=tmp_path)
    assert result.returncode == 2 and "argument --html: needs a file name" in result.stderr
    assert result.stdout == "" and not any(tmp_path.iterdir())


def test_demo_refuses_an_empty_page_name_as_explain_does(tmp_path):
    # it said "cannot write the page to '.': Is a directory"
    result = normlab_cli("demo", "--html", "", cwd=tmp_path)
    assert result.returncode == 2 and "argument --html: needs a file name" in result.stderr
    assert result.stdout == "" and not any(tmp_path.iterdir())


DEEP = "[" * 5000 + "1" + "]" * 5000
BAD_INPUTS = {
    "bad JSON": ["explain", "batch", "--data", "[[1,2]"],
    "ragged data": ["explain", "batch", "--data", "[[1,2],[3]]"],
    "empty data": ["explain", "batch", "--data", "[[]]"],
    "non-numbers": ["explain", "batch", "--data", '[["a", "b"]]'],
    "bad shape string": ["explain", "batch", "--shape", "2,x"],
    "zero in shape": ["explain", "batch", "--shape", "2,0"],
    "bad pattern": ["explain", "b (g [c) [s]", "--shape", "2,4,3", "g=2"],
    "pattern of the wrong rank": ["explain", "b [d]", "--shape", "2,3,4"],
    "unknown preset word": ["explain", "batchnorm", "--shape", "2,3"],
    "preset that needs more axes": ["explain", "instance", "--shape", "2,3"],
    "size that does not parse": ["explain", "group", "--shape", "2,4,3", "g=two"],
    "size that does not divide": ["explain", "group", "--shape", "2,4,3", "g=3"],
    "an axis sized twice": ["explain", "group", "--shape", "2,4,3", "g=2", "g=4"],
    "no data": ["explain", "batch"],
    "both data and shape": ["explain", "batch", "--shape", "2,3", "--data", "[1]"],
    "data beyond float32's range": ["explain", "layer", "--data", "[[1e300, -1e300, 3], [3, 3, 2]]"],
    "data below float32's smallest magnitude": ["explain", "layer", "--data", "[[1e-310, 2e-310, 3e-310]]"],
    "an integer past float64's range": ["explain", "layer", "--data", "[[1" + "0" * 400 + ", 1, 2]]"],
    "a residual beyond float32's range": ["explain", "layer", "--data", "[[1, 2, 3]]", "--residual-data", "[1e40, 0, 0]"],
    "a residual sum beyond float32's range": ["explain", "layer", "--data", "[[3e38, 1, 2]]", "--residual-data",
                                              "[3e38, 0, 0]"],
    "bad seed": ["explain", "batch", "--shape", "2,3", "--seed", "x"],
    "too many elements": ["explain", "batch", "--shape", "100,100"],
    "negative seed": ["explain", "batch", "--shape", "2,3", "--seed", "-1"],
    "more elements than memory holds": ["explain", "batch", "--shape", "100000,100000"],
    "more axes than memory holds": ["explain", "batch", "--shape", "1000,1000,1000,1000,1000"],
    "weight offset that is not finite": ["explain", "layer", "--shape", "2,3", "--weight-offset", "nan"],
    "unwritable page": ["explain", "batch", "--shape", "2,3", "--html", "no/such/dir/p.html"],
    "unwritable demo page": ["demo", "--html", "no/such/dir/p.html"],
    # JSON's decoder recurses once per level: past Python's recursion limit it raised RecursionError
    "data nested 5000 deep": ["explain", "layer", "--data", DEEP],
    "a mask nested 5000 deep": ["explain", "layer", "--shape", "2,3", "--mask", DEEP],
    "segments nested 5000 deep": ["explain", "layer", "--shape", "2,3", "--segments", DEEP],
    "a residual nested 5000 deep": ["explain", "layer", "--shape", "2,3", "--residual-data", DEEP],
    "a gate nested 5000 deep": ["explain", "layer", "--shape", "2,3", "--gate", "silu", "--gate-data", DEEP],
}


@pytest.mark.parametrize("args, quoted", [(["[b]", "f", "--data", "[[1, 2], [3, 4]]"], "'[b] f'"),
                                          (["b", "t", "[d]", "--shape", "2,2,3"], "'b t [d]'")])
def test_a_pattern_the_shell_split_at_its_spaces_is_refused_with_it_quoted(tmp_path, args, quoted):
    result = normlab_cli("explain", *args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"quote it, as in normlab explain {quoted} ..." in result.stderr


@pytest.mark.parametrize("typed, preset, pattern", [("batchnorm", "batch", "[b] f"), ("LayerNorm", "layer", "b [f]"),
                                                     ("group_norm", "group", "b (g [c]) [s]"),
                                                     ("InstanceNorm1d", "instance", "b c [s]"),
                                                     ("instnace", "instance", "b c [s]"), ("RMSNorm", "rms", "b [f]")])
def test_a_layer_name_or_a_misspelt_preset_is_answered_with_the_preset_meant(tmp_path, typed, preset, pattern):
    # the message listed the presets without saying which one 'batchnorm' is
    shape = "2,4,3" if preset in ("group", "instance") else "2,3"
    result = normlab_cli("explain", typed, "--shape", shape, cwd=tmp_path)
    assert result.returncode == 2 and f"did you mean the preset {preset!r}?" in result.stderr
    fixed = normlab_cli("explain", preset, "--shape", shape, cwd=tmp_path)
    assert fixed.returncode == 0 and pattern in fixed.stdout.splitlines()[1]


@pytest.mark.parametrize("typed", ["LayerNorm2d", "layer_norm_2d", "LayerNorm2dFp32"])
def test_convnext_s_layer_norm_2d_is_answered_with_its_pattern_not_the_layer_preset(tmp_path, typed):
    # it was asked "did you mean the preset 'layer'?", whose 4-D pattern 'b c h [w]' normalizes
    # each row of pixels, where ConvNeXt's LayerNorm2d normalizes each pixel over its channels
    torch = pytest.importorskip("torch")
    from normlab.explain.model import explain_array

    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2))
    result = normlab_cli("explain", typed, "--data", json.dumps(x.tolist()), cwd=tmp_path)
    assert result.returncode == 2 and "did you mean the preset" not in result.stderr
    pattern = re.search(r"did you mean the pattern '([^']+)'", result.stderr).group(1)
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x).permute(0, 2, 3, 1), (3,)).permute(0, 3, 1, 2)
    np.testing.assert_allclose(explain_array(x, pattern).y, expected.numpy(), rtol=1e-9, atol=1e-12)


def test_a_name_near_no_preset_gets_no_guess(tmp_path):
    result = normlab_cli("explain", "conv", "--shape", "2,3", cwd=tmp_path)
    assert result.returncode == 2 and "is neither a preset" in result.stderr and "did you mean" not in result.stderr


@pytest.mark.parametrize("args", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_gives_one_line_error_and_exit_code_2(tmp_path, args):
    result = normlab_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normlab: error: "), result.stderr
    assert result.stdout == ""
