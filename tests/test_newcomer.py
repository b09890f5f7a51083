"""What a new user meets first: install hints, the command line's own help, packaging
metadata, skip reasons that say what to install, and a README that says what the code does.

Oracles: the packaging files themselves (pyproject.toml, the built wheel), argparse's
own exit status, and the words a user would look for."""

import ast
import doctest
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import normlab
from normlab import bench, cli
from tests.prerequisites import CHROMEDRIVER, CHROMIUM, missing_browser_parts, normlab_torch_or_skip

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _python(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(kwargs.get("env", {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120,
                          cwd=kwargs.get("cwd", REPO))


# --- install hints -----------------------------------------------------------------------------


def test_importing_normlab_torch_without_torch_names_the_extra_to_install():
    blocked = "import sys; sys.modules['torch'] = None; import normlab.torch"  # as if torch were absent
    result = _python("-c", blocked)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError") and 'pip install "normlab[torch]"' in last


@pytest.mark.slow
def test_without_torch_the_tests_that_need_normlab_torch_skip_and_name_torch():
    """README: without the test extra the suite runs the NumPy tests and skips the others,
    each saying which package it could not import. The tests that reach for normlab.torch
    (one here, and ONNX's where onnx alone is installed) are run with torch blocked."""
    pytest.importorskip("onnx")
    tests = ["tests/test_newcomer.py::test_readme_constructor_rows_name_each_argument_where_the_class_takes_it",
             "tests/test_onnx_operators.py::test_the_torch_norm_answers_onnx_s_attributes_as_the_numpy_api_does",
             "tests/test_onnx_operators.py::test_each_torch_twin_gives_the_onnx_operator_it_ports_to"]
    blocked = ("import sys; sys.modules['torch'] = None; import pytest; "
               f"sys.exit(pytest.main(['-q', '-rs', '-n', '0', '-p', 'no:cacheprovider', *{tests!r}]))")
    result = _python("-c", blocked)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "8 skipped" in result.stdout and "could not import 'torch'" in result.stdout, result.stdout[-3000:]


def _torch_floor() -> str:
    """The oldest torch the ``torch`` extra admits, as pyproject.toml writes it."""
    (requirement,) = PYPROJECT["project"]["optional-dependencies"]["torch"]
    return re.fullmatch(r"torch>=(\d+\.\d+)", requirement).group(1)


@pytest.mark.parametrize("older", ["2.11.0", "2.4.1+cpu"])
def test_importing_normlab_torch_beside_a_torch_older_than_the_extra_admits_says_which_to_install(older):
    # (torch 2.11's BatchNorm takes no bias=, which the twins pass on as torch 2.13's does)
    pytest.importorskip("torch")
    aged = f"import torch; torch.__version__ = {older!r}; import normlab.torch"
    result = _python("-c", aged)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    floor = _torch_floor()
    assert last.startswith("ImportError") and older in last and f'pip install "torch>={floor}"' in last
    assert f"PyTorch {floor} or newer" in " ".join(README.split())


def test_the_torch_the_tests_pin_is_one_the_extras_admit():
    (pinned,) = [r for r in PYPROJECT["project"]["optional-dependencies"]["test"] if r.startswith("torch==")]
    version = tuple(map(int, pinned.removeprefix("torch==").split(".")[:2]))
    assert version >= tuple(map(int, _torch_floor().split(".")))
    assert f"torch>={_torch_floor()}" in PYPROJECT["project"]["optional-dependencies"]["bench"]
    pytest.importorskip("torch")
    result = _python("-c", "import normlab.torch")  # (the installed torch, the pinned one, imports)
    assert result.returncode == 0, result.stderr


def test_the_readme_names_the_torch_extra():
    assert "torch" in PYPROJECT["project"]["optional-dependencies"]
    assert 'pip install "normlab[torch]"' in README or 'pip install ".[torch]"' in README


def test_bench_plot_without_matplotlib_fails_before_measuring(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError

    def measure(*args, **kwargs):
        raise AssertionError("measured although the plot could never be drawn")

    monkeypatch.setattr(bench, "measure", measure)
    assert cli.main(["bench", "--quick", "--case", "tiny", "--plot", str(tmp_path / "speed.png")]) == 2
    message = capsys.readouterr().err
    assert "--plot needs matplotlib" in message and "pip install" in message


# --- the command line --------------------------------------------------------------------------


def test_version_is_printed_by_normlab_and_by_python_dash_m():
    for args in (["-m", "normlab", "--version"], ["-m", "normlab.cli", "--version"]):
        result = _python(*args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"normlab {PYPROJECT['project']['version']}"
    assert normlab.__version__ == PYPROJECT["project"]["version"]


def test_python_dash_m_normlab_runs_a_subcommand(tmp_path):
    result = _python("-m", "normlab", "explain", "b [f]", "--data", "[[4,3,2]]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "b [f]" in result.stdout


@pytest.mark.parametrize("repeats", ["0", "-3", "two"])
def test_bench_refuses_repeats_below_one(repeats, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--repeats", repeats])
    assert info.value.code == 2
    assert "--repeats" in capsys.readouterr().err


def test_explain_without_arguments_shows_how_to_start(capsys):
    assert cli.main(["explain"]) == 2
    message = capsys.readouterr().err
    assert "name=size" not in message
    assert "normlab explain batch --data" in message and "--shape" in message and "--help" in message


# --- packaging ---------------------------------------------------------------------------------


def test_the_license_file_is_the_license_pyproject_declares():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")


def test_pyproject_names_the_project_urls():
    urls = PYPROJECT["project"]["urls"]
    assert {"Homepage", "Repository", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


@pytest.mark.slow
def test_the_wheel_ships_py_typed_the_license_and_the_urls(tmp_path):
    import shutil

    # (--no-build-isolation builds with this environment's setuptools: pyproject.toml's needs 77)
    pytest.importorskip("setuptools", minversion="77")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "normlab", source / "normlab", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("normlab-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "normlab/py.typed" in names
    assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names)
    assert "Project-URL: Repository, https://github.com/normlab/normlab" in metadata


# NumPy 2's reprs of its scalars: np.float64(1.0), np.True_; NumPy 1.x, which pyproject.toml
# admits, prints 1.0 and True, so an expected output that names one fails there
NUMPY2_SCALAR_REPR = re.compile(r"\bnp\.(True_|False_|(float|int|uint|complex|bool|str_|bytes_)\w*\()")


def test_no_doctest_expects_a_numpy_2_scalar_repr():
    parser = doctest.DocTestParser()
    for path in sorted((REPO / "normlab").rglob("*.py")):  # read, not imported: normlab.torch's too
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for example in parser.get_examples(ast.get_docstring(node) or ""):
                    found = NUMPY2_SCALAR_REPR.search(example.want)
                    assert not found, f"{path.relative_to(REPO)}, {getattr(node, 'name', 'module')}: {example.want}"


# --- skip reasons ------------------------------------------------------------------------------


def test_the_browser_skip_says_that_chromium_driver_is_missing_and_how_to_install_it():
    reason = missing_browser_parts(exists=lambda path: path == CHROMIUM, find_spec=lambda name: object())
    assert "chromium-driver" in reason and CHROMEDRIVER in reason and "apt-get install chromium-driver" in reason
    assert "apt-get install chromium " not in reason + " "  # chromium itself is there


def test_the_browser_skip_names_both_packages_when_both_are_missing():
    reason = missing_browser_parts(exists=lambda path: False, find_spec=lambda name: object())
    assert "apt-get install chromium chromium-driver" in reason


def test_nothing_is_missing_for_the_browser_tests_when_everything_is_there():
    assert missing_browser_parts(exists=lambda path: True, find_spec=lambda name: object()) is None


@pytest.mark.parametrize("required", [False, True], ids=["by default", "with NORMLAB_REQUIRE_BROWSER=1"])
def test_the_browser_tests_skip_where_selenium_is_missing_but_fail_where_ci_requires_them(required):
    # .ci/run sets NORMLAB_REQUIRE_BROWSER=1: there a missing browser part was a green run of skips
    result = _pytest_without(["selenium"], "tests/test_browser.py", require_browser=required)
    summary = result.stdout.splitlines()[-1]
    if required:
        assert result.returncode != 0 and "error" in summary, result.stdout[-3000:]
        assert "the browser tests cannot run: selenium is missing" in result.stdout
    else:
        assert result.returncode == 0 and "skipped" in summary and "error" not in summary, result.stdout[-3000:]


def test_ci_requires_the_browser_tests_to_run():
    assert "export NORMLAB_REQUIRE_BROWSER=1" in (REPO / ".ci" / "run").read_text()


# what a NumPy-only install (pip install . pytest pytest-xdist hypothesis) lacks of the test extra
OPTIONAL_FOR_TESTS = sorted({re.match(r"[\w-]+", requirement).group().replace("-", "_").lower()
                             for requirement in PYPROJECT["project"]["optional-dependencies"]["test"]} - {
    "pytest", "pytest_xdist", "hypothesis"})


def _pytest_without(packages, *args, require_browser=False):
    """pytest in a subprocess where ``packages`` fail to import, as where they are not installed,
    run as a user runs it: without CI's NORMLAB_REQUIRE_BROWSER=1 (which .ci/run exports, and
    which makes a missing browser part an error) unless ``require_browser``."""
    absent = "; ".join(f"sys.modules[{name!r}] = None" for name in packages)
    return _python("-c", f"import sys; {absent}; import pytest; "
                   f"sys.exit(pytest.main(['-q', '-n', '0', '-p', 'no:cacheprovider', *{list(args)!r}]))",
                   env={"NORMLAB_REQUIRE_BROWSER": "1" if require_browser else "0"})


@pytest.mark.slow
def test_the_suite_is_collected_without_error_where_the_test_extra_s_packages_do_not_import():
    """A NumPy-only install could not collect the suite: test_fused_gate32,
    test_torch_fused_half and test_torch_fused_small imported torch at their top, and the
    torch tests' helpers (collected for doctests) did too. Here every package of the test
    extra but pytest's fails to import, as there, and the suite must collect cleanly."""
    result = _pytest_without(OPTIONAL_FOR_TESTS, "--collect-only")
    assert result.returncode == 0 and " error" not in result.stdout, result.stdout[-3000:]
    assert re.search(r"^\d+ tests collected", result.stdout.splitlines()[-1]), result.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("torch_imports, tests", [
    (False, ["tests/test_numpy_corners.py::test_big_endian_input_normalizes_as_numpy_computes_with_it",
             "tests/test_numpy_corners.py::test_numpy_and_integer_flags_train_as_true_does",
             "tests/test_bench_cli.py::test_a_group_whose_engine_does_not_import_is_refused_with_an_install_hint",
             "tests/test_newcomer.py::test_the_torch_the_tests_pin_is_one_the_extras_admit"]),
    (True, ["tests/test_torch_features.py::test_rms_norm_exports_with_the_torchscript_exporter_as_plain_onnx_ops",
            "tests/test_bench_scripts.py::test_models_option_picks_the_models_the_readme_names"]),
], ids=["numpy only", "torch without the rest"])
def test_tests_that_need_a_package_of_the_test_extra_skip_where_it_does_not_import(torch_imports, tests):
    """These failed there on ModuleNotFoundError (torch as the oracle of NumPy tests; onnx,
    transformers beside torch) or on the missing torch's message in place of the one they
    expect."""
    if torch_imports:
        pytest.importorskip("torch")  # (the run where torch imports needs it installed)
    result = _pytest_without([name for name in OPTIONAL_FOR_TESTS if not (torch_imports and name == "torch")],
                             *tests)
    summary = result.stdout.splitlines()[-1]
    assert result.returncode == 0 and "failed" not in summary and "skipped" in summary, result.stdout[-3000:]


# --- the README and the help text speak to users ---------------------------------------------

INSIDER_WORDS = re.compile(r"\bissue \d|\bissue's\b|\bthe note\b|\bnote's\b|\bmachine [AB]\b|\(A\)|\(B\)")


def _help_texts():
    parser = cli.build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions:
        texts += [sub.format_help() for sub in action.choices.values()]
    return texts


def test_readme_and_help_text_use_no_insider_words():
    for text in [README] + _help_texts():
        assert not INSIDER_WORDS.search(text), INSIDER_WORDS.search(text).group(0)


def test_the_demo_output_uses_no_insider_words(tmp_path):
    result = _python("-m", "normlab", "demo", "--html", str(tmp_path / "demo.html"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not INSIDER_WORDS.search(result.stdout), INSIDER_WORDS.search(result.stdout).group(0)


def test_the_readme_states_the_bench_default_repeats():
    assert f"the median of {bench.DEFAULT_REPEATS} timed calls" in README
    assert f"(default {bench.DEFAULT_REPEATS}" in cli.build_parser()._subparsers._group_actions[0] \
        .choices["bench"].format_help()


def _signature_rows():
    """The README's table cells that spell a normlab.torch class's constructor,
    ``Name(arg, arg=default, ..., *, keyword=default, **sizes)``: (name, items)."""
    found = []
    for line in README.splitlines():
        if not line.startswith("| `"):
            continue
        for name, inside in re.findall(r"`([A-Z]\w*)\(([^`()]*)\)`", line):
            items = [item.strip() for item in inside.split(",")]
            if all(re.fullmatch(r"\.\.\.|\*|\*\*\w+|[a-z_]\w*(=.+)?", item) for item in items):
                found.append((name, items))
    return found


def test_readme_constructor_rows_name_each_argument_where_the_class_takes_it():
    """A row such as ``RMSNorm(normalized_shape, eps=None, casting=None)`` tells a user that
    ``RMSNorm(128, 1e-6, "llama")`` sets the recipe; each argument listed before ``...`` or
    ``*`` must be the class's positional parameter at that place, and each one after ``*``
    one it takes by keyword. Oracle: the classes' own signatures (inspect)."""
    import inspect

    nt = normlab_torch_or_skip()
    rows = [(name, items) for name, items in _signature_rows() if isinstance(getattr(nt, name, None), type)]
    assert len(rows) >= 8
    wrong = []
    for name, items in rows:
        parameters = list(inspect.signature(getattr(nt, name).__init__).parameters.values())[1:]
        positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
        by_keyword = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        in_order = True
        for place, item in enumerate(items):
            if item in ("...", "*") or item.startswith("**"):
                in_order = False
                continue
            argument = item.split("=")[0]
            if in_order and (place >= len(positional) or positional[place] != argument):
                wrong.append(f"{name}: {argument!r} listed as argument {place + 1}")
            elif not in_order and argument not in by_keyword:
                wrong.append(f"{name}: no keyword {argument!r}")
    assert wrong == []
