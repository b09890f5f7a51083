"""``normlab bench --case masked``: the group is picked by name and a row measures both engines."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from normlab import bench_masked

REPO = Path(__file__).resolve().parents[1]


def test_the_masked_group_is_picked_by_its_name_or_a_case_name():
    assert bench_masked.selected(["masked"]) == bench_masked.CASES
    assert [c.name for c in bench_masked.selected(["GraphNorm"])] == ["4-layer GIN + GraphNorm, train step"]
    assert bench_masked.selected(None) == ()


def test_a_filter_of_the_regular_table_does_not_add_the_masked_cases():
    # `normlab bench --case "batch norm"` asks for the table's batch norm rows, not for a
    # masked fwd+bwd at 64x256x1000 (3 s a call for the composite) or PyG's instance norm
    assert bench_masked.selected(["batch norm"]) == ()
    assert bench_masked.selected(["instance norm"]) == ()
    assert bench_masked.selected(["fwd"]) == ()
    assert [c.name for c in bench_masked.selected(["per-graph instance norm"])] == ["per-graph instance norm, fwd+bwd"]


def test_a_masked_row_times_normlab_and_the_torch_composite():
    pytest.importorskip("torch")
    (row,) = bench_masked.measure(bench_masked.CASES[:1], quick=True, repeats=1)
    assert row.normlab > 0 and row.other > 0 and row.other_name == "torch composite"
    assert "×" in bench_masked.markdown([row])


def test_a_masked_row_times_neither_engine_s_compiling_nor_its_path_building_call():
    import time

    made = {"ours": 0, "theirs": 0}

    def engine(name):
        def call():
            made[name] += 1
            if made[name] <= 2:  # the first call compiles, the second builds the cached path
                time.sleep(0.05)
        return call

    case = bench_masked.MaskedCase("slow first calls", (1,), (1,), lambda shape: (engine("ours"), engine("theirs"),
                                                                                   "fake"))
    (row,) = bench_masked.measure([case], quick=True, repeats=1)
    assert row.normlab < 0.01 and row.other < 0.01


@pytest.mark.parametrize("repeats", [3, 7])
def test_a_masked_row_is_the_median_of_rounds_in_which_the_engines_take_turns(repeats):
    # README: "median of interleaved rounds"; the calls alternated one by one, which lets
    # each engine's thread pool, still spinning, slow the other's next call
    from normlab import bench

    calls = []
    case = bench_masked.MaskedCase("counted", (1,), (1,), lambda shape: (lambda: calls.append("ours"),
                                                                           lambda: calls.append("theirs"), "fake"))
    bench_masked.measure([case], quick=True, repeats=repeats)
    turns = [name for k, name in enumerate(calls) if k == 0 or calls[k - 1] != name]
    rounds = min(bench.ROUNDS, repeats)
    assert turns == ["ours", "theirs"] * rounds
    warm_ups = rounds + bench.FIRST_WARM_UPS - 1
    assert calls.count("ours") == calls.count("theirs") == repeats + warm_ups


@pytest.mark.slow  # (13 s of CPU: the module's cases import torch and PyG and build their models)
def test_the_table_printed_into_a_pipe_that_closed_early_ends_without_a_traceback():
    # python -m normlab.bench_masked | head -1 ended in "BrokenPipeError: [Errno 32] Broken pipe"
    # (exit status 120) when Python flushed the table at exit; the engines' timing is left out here
    pytest.importorskip("torch_geometric")
    program = ("import runpy, sys, normlab.bench; "
               "normlab.bench.timed_rounds = lambda engines, repeats: {name: [1e-3] for name in engines}; "
               "sys.argv = ['bench_masked', '--quick']; "
               "runpy.run_module('normlab.bench_masked', run_name='__main__', alter_sys=True)")
    read, write = os.pipe()
    os.close(read)  # the reader is gone, as head is after its first line
    try:
        result = subprocess.run([sys.executable, "-c", program], stdout=write, stderr=subprocess.PIPE, text=True,
                                timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        os.close(write)
    assert result.returncode == 1 and result.stderr == "", result.stderr
