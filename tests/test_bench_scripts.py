"""The scripts in ``benchmarks/`` as the README runs them: their options and the tables
they print (no timings asserted)."""

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("torch")
    return _script("models")


def test_models_option_picks_the_models_the_readme_names(models):
    # README: "`--models unet,bert` picks models"
    pytest.importorskip("transformers")  # (without it the BERT case is left out, saying so)
    picked = models.select(models.cases(), "unet,bert")
    assert [c.name for c in picked] == ["U-Net (GroupNorm)", "BERT (6×384, LayerNorm)"]


def test_models_option_that_names_no_model_exits_2_and_lists_the_models(models, capsys):
    with pytest.raises(SystemExit) as exit_:
        models.main(["--models", "no such model", "--no-compile"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "names no model" in err and "U-Net (GroupNorm)" in err and "Traceback" not in err


def test_models_table_has_the_readme_columns_for_models_of_different_typical_batches(models, monkeypatch):
    import torch
    from torch import nn

    monkeypatch.setattr(torch, "compile", lambda model: model)  # the columns, not Inductor
    small = [models.ModelCase(f"MLP {batch}", lambda: nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
                              lambda b: torch.randn(b, 8), batch) for batch in (3, 5)]
    results = [models.measure(case, rounds=1, compile=True) for case in small]
    header = models.markdown(results).splitlines()[0]
    readme = next(line for line in (REPO / "README.md").read_text().splitlines()
                  if line.startswith("| model | norm layers |"))
    assert header == readme
    assert [r.name for r in results] == ["MLP 3, batch 3", "MLP 5, batch 5"]


def test_models_table_says_the_norm_share_of_a_norm_written_in_plain_operators_is_not_measured(models, monkeypatch):
    # README's table reads "–" for LLaMA, whose RMS norm is pow, mean and rsqrt: the script printed 0%
    import torch
    from torch import nn

    class CompositeRMSNorm(nn.Module):  # as transformers' LlamaRMSNorm computes it
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    monkeypatch.setattr(torch, "compile", lambda model: model)
    composite = models.ModelCase("composite", lambda: nn.Sequential(nn.Linear(8, 8), CompositeRMSNorm()),
                                 lambda b: torch.randn(b, 8), 2)
    fused = models.ModelCase("layer norm", lambda: nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
                             lambda b: torch.randn(b, 8), 2)
    rows = models.markdown([models.measure(composite, rounds=1, compile=False),
                            models.measure(fused, rounds=1, compile=False)]).splitlines()[2:]
    assert rows[0].startswith("| composite, batch 2 |") and rows[0].endswith("| – |"), rows[0]
    assert re.search(r"\| [1-9]\d*% \|$", rows[1]), rows[1]


@pytest.mark.parametrize("script, argv", [
    ("models", ["--rounds", "0"]),
    ("row_backward", ["--rounds", "0"]),
    ("row_backward", ["--threads", "-1"]),
    ("row_backward", ["--threads", "0"]),  # was ignored: torch's default threads
    ("streaming_stores", ["--rounds", "-2"]),
    ("streaming_stores", ["--sizes", "4,eight"]),
    ("streaming_stores", ["--sizes", "0"]),
    ("threads", ["--steps", "0"]),
    ("threads", ["--threads", "0"]),
    ("serial_threshold", ["--rounds", "0"]),
    ("fused_half_crossover", ["--rounds", "0"]),
    ("bench_torch", ["--threads", "-1"]),
    ("compiled", ["--rounds", "0"]),
])
def test_a_count_below_one_is_an_argparse_error_not_a_traceback(script, argv, capsys, monkeypatch):
    pytest.importorskip("torch")
    module = _script(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])  # compiled.py reads sys.argv
    with pytest.raises(SystemExit) as exit_:
        module.main(argv) if script != "compiled" else module.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "at least 1" in err or "whole number" in err, err


def _into_a_closed_pipe(*args):
    """Run a Python program whose stdout is a pipe its reader has already closed (``| head -1``, done)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        os.close(write)


@pytest.mark.slow  # (about 9 s on one core: the script starts by importing torch and transformers)
def test_models_printing_into_a_pipe_that_closed_early_ends_without_a_traceback():
    # its skip line went into a closed pipe: BrokenPipeError when its output was flushed
    pytest.importorskip("torch")
    result = _into_a_closed_pipe(str(REPO / "benchmarks" / "models.py"), "--models", "no such model")
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode in (1, 2)  # 1 where the closed pipe ended it first, as rich ends the command


def test_a_script_whose_table_goes_into_a_closed_pipe_exits_1_without_a_traceback():
    result = _into_a_closed_pipe("-c", "from normlab.bench import run_script; "
                                       "run_script(lambda: [print('| row |', i, flush=True) for i in range(10)] and 0)")
    assert result.returncode == 1 and result.stderr == ""


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_every_script_runs_its_main_through_run_script_or_the_command_line(path):
    source = path.read_text()
    assert "run_script(main)" in source or "from normlab.cli import main" in source


def test_targets_script_checks_the_targets_the_readme_states():
    # README, Speed: "layer norm forward ... PyTorch (target ≥ 3×) and ... ONNX Runtime (target ≥ 1.1×);
    # RMS norm forward ... ONNX Runtime (target ≥ 1.1×...)", "(`python benchmarks/targets.py` checks them)"
    targets = {(name, mode, engine): needed for name, mode, engine, needed in _script("targets").TARGETS}
    assert targets[("layer norm", "fwd", "torch")] == 3.0
    assert targets[("layer norm", "fwd", "onnxruntime")] == 1.1
    assert targets[("RMS norm", "fwd", "onnxruntime")] == 1.1


def test_streaming_stores_table_gives_the_threads_its_threaded_rows_ran_on(monkeypatch):
    module = _script("streaming_stores")
    monkeypatch.setattr(module.threads, "for_call", lambda: 8)  # an 8-core machine
    table = {("layer norm fwd (rows of 4096)", False): {4: 1.0}, ("layer norm fwd (rows of 4096)", True): {4: 1.5}}
    lines = module.markdown(table, [4]).splitlines()
    assert lines[0] == "| kernel | threads | 4 MiB |"
    assert lines[2:] == ["| layer norm fwd (rows of 4096) | 1 | 1.00 |", "| layer norm fwd (rows of 4096) | 8 | 1.50 |"]


def _first_line(source: str, *starts: str) -> int:
    return next((i for i, line in enumerate(source.splitlines()) if line.lstrip().startswith(starts)), -1)


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_every_script_imports_this_checkout_s_normlab_before_an_installed_one(path):
    source = path.read_text()
    first_import = _first_line(source, "import normlab", "from normlab")
    assert first_import >= 0 or "normlab" not in source
    inserted = _first_line(source, "sys.path.insert(0, str(REPO))")
    assert 0 <= inserted < first_import, f"{path.name} imports whichever normlab is installed"


def test_a_script_run_beside_another_installed_normlab_runs_this_checkout_s(tmp_path):
    # an installed normlab (a wheel, or an editable install of another checkout) that is not this one
    (tmp_path / "normlab").mkdir()
    (tmp_path / "normlab" / "__init__.py").write_text("raise ImportError('the installed normlab')\n")
    program = (f"import runpy; runpy.run_path({str(REPO / 'benchmarks' / 'streaming_stores.py')!r}, run_name='probe'); "
               "import normlab; print(normlab.__file__)")
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent.parent == REPO


def test_models_without_transformers_skips_bert_and_llama_with_a_line_saying_why(models, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed: it is not among the [bench] extras
    names = [c.name for c in models.cases()]
    assert names[:2] == ["U-Net (GroupNorm)", "ResNet-style CNN (BatchNorm)"]
    assert not any("BERT" in n or "LLaMA" in n for n in names)
    assert "skipped BERT, LLaMA: transformers does not import" in capsys.readouterr().out


@pytest.mark.parametrize("asked, skipped", [("unet", None), ("unet,resnet-style", None), ("bert", "transformers"),
                                            ("resnet18", "torchvision"), ("unet,vit", "torchvision"),
                                            (None, "both")])
def test_models_says_a_library_is_skipped_only_where_its_models_were_asked_for(models, monkeypatch, capsys,
                                                                               asked, skipped):
    # --models unet printed "skipped resnet18, ...: torchvision does not load", for models no one asked for
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    models.cases(asked)
    out = capsys.readouterr().out
    assert ("transformers does not import" in out) == (skipped in ("transformers", "both")), out
    assert ("torchvision does not load" in out) == (skipped in ("torchvision", "both")), out


def test_models_that_names_no_model_lists_the_models_of_libraries_it_did_not_load(models, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(SystemExit):
        models.main(["--models", "no such model", "--no-compile"])
    captured = capsys.readouterr()
    assert "resnet18" in captured.err and "BERT (6×384, LayerNorm)" in captured.err
    assert "does not" not in captured.out


def test_compiled_script_counts_each_case_s_graphs_not_the_run_s_total(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    from torch import nn

    module = _script("compiled")
    torch._dynamo.utils.counters["stats"]["unique_graphs"] = 5  # graphs of the cases before this one
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the count, not Inductor
    module.measure("tiny", lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), torch.randn(2, 4),
                   module.eval_step, rounds=1)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| tiny |") and row.endswith("| 0 |"), row  # nothing compiled in this case
