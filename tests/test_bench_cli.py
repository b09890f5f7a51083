"""``normlab bench`` runs end to end: a quick smoke run via the command line, no timing asserts."""

import subprocess
import sys

import pytest

from normlab import bench


def test_bench_quick_run_prints_a_table_and_saves_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "speed.png"
    result = subprocess.run(
        [sys.executable, "-m", "normlab.cli", "bench", "--quick", "--repeats", "1", "--case", "tiny",
         "--case", "RMS", "--markdown", "--plot", str(plot)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| tiny layer norm fwd | 1×768 |" in result.stdout
    assert "RMS norm fwd" in result.stdout
    assert plot.stat().st_size > 0


def test_bench_with_an_unknown_case_says_which_cases_exist():
    result = subprocess.run([sys.executable, "-m", "normlab.cli", "bench", "--case", "no such norm"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no benchmark case matches" in result.stderr and "layer norm fwd" in result.stderr


def test_every_case_names_a_pattern_the_engine_accepts():
    import numpy as np

    import normlab

    for case in bench.CASES:
        shape = tuple(max(1, s // 16) if i else 2 for i, s in enumerate(case.quick_shape))
        if case.norm == "group":
            shape = (2, 64, 3, 3)
        data = bench.make_inputs(case, shape)
        plan = normlab.make_plan(case.pattern, shape, case.params, **case.sizes)
        assert plan.param_shape == data.weight.shape, case
        assert np.isfinite(bench.numpy_call(case, data)()[0] if case.mode == "fwd+bwd"
                           else bench.numpy_call(case, data)()).all()


@pytest.mark.parametrize("repeats", [1, 2, 7, 9])
def test_measure_times_each_engine_repeats_times_in_rounds(repeats, monkeypatch):
    calls = {"normlab": 0, "torch": 0}

    def counting(engine):
        def build(case, data):
            def call():
                calls[engine] += 1
            return call
        return build

    engines = {"normlab": counting("normlab"), "torch": counting("torch"), "absent": lambda case, data: None}
    monkeypatch.setattr(bench, "ENGINES", engines)
    described = []
    case = next(c for c in bench.CASES if c.name.startswith("tiny"))
    [row] = bench.measure([case], quick=True, repeats=repeats, progress=described.append)
    rounds = min(bench.ROUNDS, repeats)
    warm_ups = rounds + bench.FIRST_WARM_UPS - 1  # a warm-up per round, the first round's more
    assert calls == {"normlab": repeats + warm_ups, "torch": repeats + warm_ups}
    assert row.seconds["absent"] is None and row.seconds["normlab"] is not None
    assert len(described) == len(engines)


def test_a_quick_run_times_neither_the_compiling_call_nor_the_one_that_builds_the_fast_path(monkeypatch):
    import time

    made = []

    def build(case, data):
        def call():
            made.append(None)
            if len(made) <= 2:  # the first call compiles, the second builds the repeated-call fast path
                time.sleep(0.05)
        return call

    monkeypatch.setattr(bench, "ENGINES", {"normlab": build})
    case = next(c for c in bench.CASES if c.name.startswith("tiny"))
    [row] = bench.measure([case], quick=True, repeats=bench.QUICK_REPEATS)
    assert row.seconds["normlab"] < 0.01  # steady calls only, as the README's table


def test_fused_group_runs_only_when_a_filter_says_fused():
    from normlab import bench_fused

    assert bench_fused.select(["RMS"]) == ()
    assert {c.block for c in bench_fused.select(["fused"])} == {"add_rms", "adaln", "gated", "decoder"}
    # each block in float32 and in bfloat16 (the targets name both)
    assert {(c.block, c.dtype) for c in bench_fused.select(["fused"])} == {
        (b, d) for b in ("add_rms", "adaln", "gated", "decoder") for d in ("float32", "bfloat16")}
    assert [c.label for c in bench_fused.select(["fused add + RMS norm"])] == [
        "fused add + RMS norm fwd+bwd", "fused add + RMS norm fwd+bwd bf16"]


def test_bench_fused_decoder_row_compares_converted_with_unconverted_model():
    pytest.importorskip("transformers")
    result = subprocess.run(
        [sys.executable, "-m", "normlab.cli", "bench", "--quick", "--repeats", "1", "--case",
         "fused LLaMA decoder 4×1024 fwd", "--markdown"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| fused LLaMA decoder 4×1024 fwd | 1×16×128 |" in result.stdout
    assert "layer norm" not in result.stdout  # the regular table is not printed


def test_bench_sweep_prints_ratio_tables_and_saves_heatmaps(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("torch")
    from normlab import sweep

    # the smallest grid: one size, two norms (a smoke test of the whole path, no timings asserted)
    monkeypatch.setattr(sweep, "QUICK_ROWS", (4,))
    monkeypatch.setattr(sweep, "QUICK_FEATURES", (64,))
    monkeypatch.setattr(sweep, "ROUND_SECONDS", 0.0)
    monkeypatch.setattr(bench, "SETTLE_SECONDS", 0.0)
    monkeypatch.setattr(bench, "ONNX_SETTLE_SECONDS", 0.0)
    cells = sweep.measure(quick=True, compile=False, norms=("layer", "batch eval"))
    assert {(c.norm, c.mode) for c in cells} == {("layer", "fwd"), ("layer", "fwd+bwd"), ("batch eval", "fwd")}
    assert all(c.seconds["normlab"] > 0 and c.seconds["eager"] > 0 for c in cells)
    text = sweep.markdown(cells)
    assert "**layer fwd+bwd**" in text and "| 4 |" in text
    plot = tmp_path / "sweep.png"
    sweep.plot(cells, str(plot))
    assert plot.stat().st_size > 0


def test_the_sweep_times_no_call_that_builds_a_modules_fast_path_as_bench_does(monkeypatch):
    # a module's first two calls are slow (the second builds its fast path): normlab bench
    # warms up twice before its first round, and the sweep must too, or with few rounds a
    # cell's median is a slow call. A clock that advances only in the engine's calls.
    from types import SimpleNamespace

    from normlab import sweep

    clock = SimpleNamespace(now=0.0, calls=0)

    def engine():
        clock.calls += 1
        clock.now += 1.0 if clock.calls <= bench.FIRST_WARM_UPS else 0.001

    monkeypatch.setattr(sweep, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(sweep, "settle", lambda name: None)
    monkeypatch.setattr(sweep, "ROUNDS", 2)
    monkeypatch.setattr(sweep, "ROUND_SECONDS", 0.0)
    seconds = sweep._time_cell({"normlab": engine, "eager": None})
    assert seconds["normlab"] == pytest.approx(0.001) and seconds["eager"] is None


@pytest.mark.parametrize("target", ["no/such/folder/speed.png", ".", "speed.xyz"], ids=["missing folder", "a folder",
                                                                                       "unknown format"])
def test_a_plot_that_cannot_be_saved_is_refused_before_anything_is_timed(tmp_path, target):
    pytest.importorskip("matplotlib")
    result = subprocess.run([sys.executable, "-m", "normlab.cli", "bench", "--quick", "--repeats", "1", "--case", "tiny",
                             "--plot", target], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("normlab: error: ") and "--plot" in result.stderr
    assert result.stdout == ""  # refused before the table, not after the run


def test_bench_without_torch_or_onnxruntime_leaves_their_columns_empty():
    # README: "a missing engine leaves its column empty"
    program = ("import sys; sys.modules.update(torch=None, onnxruntime=None); from normlab.cli import main; "
               "sys.exit(main(['bench', '--quick', '--repeats', '1', '--case', 'tiny', '--markdown']))")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [row] = [line for line in result.stdout.splitlines() if line.startswith("| tiny layer norm fwd |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[3:5] == ["–", "–"] and cells[6:8] == ["–", "–"], row  # torch and onnxrt: times and ratios


@pytest.mark.parametrize("argv, missing", [
    (["--repeats", "1", "--case", "fused"], "torch"),
    (["--repeats", "1", "--case", "fused add + RMS norm"], "transformers"),
    (["--repeats", "1", "--case", "masked"], "torch_geometric"),
    (["--repeats", "1", "--case", "masked batch norm"], "torch"),
    (["--sweep", "--no-compile"], "torch"),
], ids=["fused without torch", "fused without transformers", "masked without PyG", "masked without torch",
        "sweep without torch"])
def test_a_group_whose_engine_does_not_import_is_refused_with_an_install_hint(argv, missing, monkeypatch, capsys):
    from normlab.cli import main

    if missing != "torch":  # (without torch, the hint names torch first)
        pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if it were not installed
    assert main(["bench", "--quick", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("normlab: error: ") and f"pip install {missing}" in captured.err
    assert captured.out == ""  # refused before anything is timed


@pytest.mark.parametrize("group", ["masked batch norm", "fused AdaLN-Zero layer norm fwd"])
def test_a_plot_of_a_group_without_a_chart_is_refused_instead_of_never_written(group, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("torch")
    from normlab.cli import main

    plot = tmp_path / "speed.png"
    assert main(["bench", "--quick", "--repeats", "1", "--case", group, "--plot", str(plot)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("normlab: error: --plot") and group in captured.err
    assert captured.out == "" and not plot.exists()


@pytest.mark.parametrize("argv", [["--case", "tiny", "--no-compile"], ["--sweep", "--case", "layer"],
                                  ["--sweep", "--repeats", "3"]], ids=["no-compile without sweep",
                                                                      "sweep with case", "sweep with repeats"])
def test_an_option_that_would_do_nothing_is_refused_instead_of_ignored(argv, monkeypatch, capsys):
    from normlab import sweep
    from normlab.cli import main

    def timed(*args, **kwargs):
        raise AssertionError("timed although an option was ignored")

    monkeypatch.setattr(sweep, "measure", timed)
    monkeypatch.setattr(bench, "measure", timed)
    assert main(["bench", "--quick", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("normlab: error: ") and captured.out == ""


def test_markdown_in_a_narrow_terminal_keeps_each_table_row_on_one_line(monkeypatch, capsys):
    import rich.console

    from normlab.cli import main

    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    case = next(c for c in bench.CASES if c.name.startswith("tiny"))
    seconds = {"normlab": 1e-5, "torch": 2e-5, "onnxruntime": 3e-5, "numpy": 4e-5}
    monkeypatch.setattr(bench, "measure", lambda *args: [bench.Row(case, case.quick_shape, seconds, 0.1)])
    assert main(["--no-color", "bench", "--quick", "--case", "tiny", "--markdown"]) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if "tiny layer norm" in line]
    assert row.endswith("| 2.00× | 3.00× | 4.00× | 10% |"), row  # the whole row, as Markdown needs it


def test_sweep_heatmaps_leave_out_a_competitor_that_did_not_run(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    from normlab import sweep

    # --no-compile, and ONNX Runtime has no training batch norm: one column of panels, torch eager's
    cells = [sweep.Cell("batch", mode, 64, 64, {"normlab": 1.0, "eager": 2.0, "compile": None, "onnxruntime": None})
             for mode in sweep.MODES]
    plot = tmp_path / "sweep.png"
    sweep.plot(cells, str(plot))
    height, width = matplotlib.image.imread(plot).shape[:2]
    assert (width, height) == (round(4.2 * 110), round(3.2 * 2 * 110))  # 1 column, 2 rows of panels at 110 dpi


@pytest.mark.parametrize("argv", [["--plot", ""], ["--sweep", "--plot", ""], ["--case", ""], ["--case", " "],
                                  ["--case", "tiny", "--case", ""]])
def test_an_empty_plot_or_case_is_refused_not_taken_as_no_plot_or_every_case(argv, capsys, monkeypatch):
    # --plot '' saved nothing and said nothing; --case '' ran every case (minutes)
    from normlab import cli

    monkeypatch.setattr(bench, "run", lambda args: 0)  # what would have run: the measurement
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "needs a value" in err and argv[-2] in err, err


@pytest.mark.parametrize("argv", [["--no-color", "bench"], ["bench", "--no-color"], ["bench", "--sweep", "--no-color"]])
def test_no_color_is_taken_after_bench_as_after_demo_and_explain(argv, monkeypatch):
    # `normlab bench --no-color` was "unrecognized arguments: --no-color"
    from normlab import cli

    monkeypatch.setenv("FORCE_COLOR", "1")  # a terminal, where colour would be on
    monkeypatch.delenv("NO_COLOR", raising=False)
    args = cli.build_parser().parse_args(argv)
    assert bench.make_console(args).no_color
    assert not bench.make_console(cli.build_parser().parse_args(["bench"])).no_color
