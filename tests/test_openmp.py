"""Threaded kernel calls on torch's own OpenMP pool (``normlab.kernels.openmp``).

Where torch runs on GNU OpenMP, normlab.torch's threaded kernel calls are OpenMP regions
of the libgomp torch loaded. Checked here: every argument reaches the kernel as given
(the inputs themselves are the oracle), results are bit for bit those of the serial
kernels (and torch's float64 functions agree), ``torch.set_num_threads`` holds, torch's
own ops keep working between our regions, and a forked child, where the parent's OpenMP
threads do not exist, neither hangs nor changes a bit.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
numba = pytest.importorskip("numba")

import normlab.torch as nt  # noqa: E402  (shares torch's pool: what is tested here)
from normlab.kernels import openmp, threads  # noqa: E402
from normlab.kernels._jit import kernel  # noqa: E402

from numba import prange  # noqa: E402

pytestmark = pytest.mark.skipif(openmp.region_starter() is None,
                                reason="torch here does not run on GNU OpenMP (Linux wheels do)")

# a process that may use one CPU (taskset, a one-core container) or runs with NUMBA_NUM_THREADS=1
# has no second thread for a region to run on
two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                 reason="needs 2 Numba threads (NUMBA_NUM_THREADS, or the CPUs this process may use)")

SHAPE = (128, 1024)  # 2^17 elements: threaded on torch's pool, serial on normlab's


@pytest.fixture()
def torch_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture()
def regions(monkeypatch):
    """Records what each region call returned (True: it ran on torch's pool)."""
    ran = []
    run = openmp.Regions.run

    def recording(self, claimed, args, loops, count):
        ran.append(run(self, claimed, args, loops, count))
        return ran[-1]

    monkeypatch.setattr(openmp.Regions, "run", recording)
    return ran


@kernel
def _echo(a, layout, n, scale, flag, rows, out):
    """Writes what it was given into ``out``, from whichever thread claims row 0."""
    for r in prange(rows.shape[0]):
        if r == 0:
            out[0] = a[1, 2]
            out[1] = a.shape[0]
            out[2] = a.shape[1]
            out[3] = layout[0] + 10 * layout[1] + 100 * layout[2]
            out[4] = n
            out[5] = scale
            out[6] = 1.0 if flag else -1.0
            out[7] = rows.shape[0]
        rows[r] = r * scale


def test_every_kind_of_argument_reaches_the_kernel_as_given():
    region = openmp.Regions(openmp.region_starter())
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows = np.zeros(300)
    out = np.zeros(8)
    assert region.run(_echo.claimed, (a, (3, -4, 5), 7, 0.25, True, rows, out), _echo.loops, 2)
    np.testing.assert_array_equal(out, [6.0, 3, 4, 3 - 40 + 500, 7, 0.25, 1.0, 300])
    np.testing.assert_array_equal(rows, np.arange(300) * 0.25)  # every chunk ran once


@kernel
def _scalars(single, small, out):
    for r in prange(out.shape[0]):
        if r == 0:
            out[0] = single * single  # float32 arithmetic if single comes back a float32
            out[1] = small // np.int32(2)


def test_scalars_come_back_with_their_own_type():
    region = openmp.Regions(openmp.region_starter())
    out = np.zeros(4)
    third = np.float32(1 / 3)
    assert region.run(_scalars.claimed, (third, np.int32(-7), out), _scalars.loops, 2)
    assert out[0] == float(third * third) != float(np.float64(third) * np.float64(third))
    assert out[1] == -4


def _use_regions(monkeypatch, region) -> None:
    """Make ``region`` the process's regions for one test: both globals of the lookup, so
    that the teardown restores a consistent pair (patching ``_regions`` alone let a call
    look torch's pool up, and the None restored after it then stuck for later tests)."""
    monkeypatch.setattr(threads, "_looked_up", True)
    monkeypatch.setattr(threads, "_regions", region)


def test_a_non_contiguous_array_is_left_to_normlabs_own_pool(monkeypatch):
    region = openmp.Regions(openmp.region_starter())
    a = np.arange(24, dtype=np.float32).reshape(3, 8)[:, ::2]
    rows, out = np.zeros(300), np.zeros(8)
    assert not region.run(_echo.claimed, (a, (0, 0, 0), 1, 1.0, False, rows, out), _echo.loops, 2)
    assert not out.any()  # nothing ran
    _use_regions(monkeypatch, region)
    monkeypatch.setattr(threads, "for_call", lambda: 2)
    _echo(a, (0, 0, 0), 1, 1.0, False, rows, out)  # threads.run falls back to the pool
    assert out[0] == a[1, 2] and out[7] == 300


def test_arguments_without_a_type_code_are_refused_before_anything_is_written():
    words = np.zeros(openmp.WORDS, np.int64)
    assert openmp.pack(words, np.ones(3), None) == -1
    assert openmp.pack(words, np.ones((4, 4))[:, ::2], 1.0) == -1
    assert openmp.pack(words, np.ones(3), 1.5, True) == 3 + 2 + 1 + 1


def test_an_entry_that_does_not_compile_leaves_the_call_to_normlabs_pool(monkeypatch):
    monkeypatch.setattr(openmp, "_entries", {})
    monkeypatch.setattr(openmp, "_entry_source", lambda codes: "def entry(p):\n    no_such_function(p)")
    region = openmp.Regions(openmp.region_starter())
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows, out = np.zeros(300), np.zeros(8)
    assert not region.run(_echo.claimed, (a, (0, 0, 0), 1, 1.0, False, rows, out), _echo.loops, 2)
    _use_regions(monkeypatch, region)
    monkeypatch.setattr(threads, "for_call", lambda: 2)
    _echo(a, (0, 0, 0), 1, 1.0, False, rows, out)
    assert out[0] == a[1, 2] and out[7] == 300


def _train_calls():
    """(name, callable returning tensors) for threaded calls of each kernel family."""
    g = torch.Generator().manual_seed(0)

    def layer():
        x = (torch.randn(SHAPE, generator=g) * 3 + 50).requires_grad_()
        m = nt.LayerNorm(SHAPE[1])
        y = m(x)
        y.backward(torch.randn(SHAPE, generator=g))
        return y, x.grad, m.weight.grad, m.bias.grad

    def rms():
        x = torch.randn(SHAPE, generator=g).requires_grad_()
        m = nt.RMSNorm(SHAPE[1])
        y = m(x)
        y.backward(torch.randn(SHAPE, generator=g))
        return y, x.grad, m.weight.grad

    def batch():
        x = torch.randn(16, 32, 16, 16, generator=g).requires_grad_()
        m = nt.BatchNorm2d(32)
        y = m(x)
        y.backward(torch.randn(x.shape, generator=g))
        return y, x.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var

    def group():
        x = torch.randn(16, 32, 16, 16, generator=g, dtype=torch.float64).requires_grad_()
        m = nt.GroupNorm(8, 32, dtype=torch.float64)
        y = m(x)
        y.backward(torch.randn(x.shape, generator=g, dtype=torch.float64))
        return y, x.grad, m.weight.grad, m.bias.grad

    def fused():
        x = torch.randn(SHAPE, generator=g).requires_grad_()
        r = torch.randn(SHAPE, generator=g).requires_grad_()
        m = nt.FusedAddRMSNorm(SHAPE[1])
        y, total = m(x, r)
        (y.sum() + (total * 0.5).sum()).backward()
        return y, total, x.grad, r.grad, m.weight.grad

    def eval_batch():
        m = nt.BatchNorm2d(32).eval()
        with torch.no_grad():
            m.running_mean.uniform_(-1, 1, generator=g)
            return (m(torch.randn(16, 32, 16, 16, generator=g)),)

    return {"layer": layer, "rms": rms, "batch": batch, "group": group, "fused": fused, "batch eval": eval_batch}


@two_threads
@pytest.mark.parametrize("name", list(_train_calls()))
def test_results_on_torchs_pool_are_the_serial_kernels_bits(name, torch_threads, regions):
    torch_threads(1)
    alone = _train_calls()[name]()
    assert regions == []  # one thread: no region
    torch_threads(2)
    shared = _train_calls()[name]()
    if name != "batch eval":  # (batch norm eval below 32 MiB is torch's own op)
        assert regions and all(regions)
    for one, two in zip(alone, shared):
        assert one.detach().numpy().tobytes() == two.detach().numpy().tobytes()


@two_threads
def test_torchs_own_ops_interleaved_with_regions_give_torchs_results(torch_threads, regions):
    torch_threads(2)
    x = torch.randn(SHAPE, dtype=torch.float64) * 2 + 7
    m = nt.LayerNorm(SHAPE[1], dtype=torch.float64)
    expected_sum = x.sum(dim=1)
    for _ in range(20):
        with torch.no_grad():
            y = m(x)
        torch.testing.assert_close(x.sum(dim=1), expected_sum, rtol=0, atol=0)  # torch's threaded reduction
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (SHAPE[1],)), rtol=1e-12, atol=1e-12)
    assert regions and all(regions)


@two_threads
def test_a_child_forked_after_regions_runs_on_its_own_pool_with_the_same_bits():
    """torch's OpenMP threads are not in a forked child (torch's own threaded ops hang
    there): the child's threaded calls go to a normlab pool of its own."""
    script = textwrap.dedent("""
        import os, torch, numpy as np
        import normlab.torch as nt
        from normlab.kernels import threads
        torch.set_num_threads(2)
        x = torch.randn(512, 1024) * 3 + 10
        m = nt.LayerNorm(1024)
        with torch.no_grad():
            parent = m(x).numpy().copy()
        assert threads.describe() == "2 (torch OpenMP pool)", threads.describe()
        pid = os.fork()
        if pid == 0:
            with torch.no_grad():
                child = m(x).numpy()
            ok = child.tobytes() == parent.tobytes() and threads.describe() == "2 (normlab pool)"
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "child exit 0" in done.stdout, done.stdout + done.stderr


def test_importing_normlab_torch_imports_neither_numba_nor_dynamo_nor_torch_onnx():
    # (Dynamo is 1.4 s of import and torch.onnx 0.2 s, paid by every DataLoader and distributed
    # worker: import torch, torch.optim, torch.distributed and transformers leave them out too)
    done = subprocess.run([sys.executable, "-c", "import sys, normlab.torch; "
                           "print('numba' in sys.modules, 'torch._dynamo' in sys.modules, "
                           "'torch.onnx' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.stdout.strip() == "False False False", done.stdout + done.stderr


def test_calls_from_several_python_threads_at_once_give_each_its_serial_bits(torch_threads):
    """One region at a time: a call made while another thread's region runs is serial."""
    from concurrent.futures import ThreadPoolExecutor

    torch_threads(2)
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(SHAPE, generator=g) * (i + 1) + i for i in range(8)]
    m = nt.LayerNorm(SHAPE[1])

    def normalize(x):
        with torch.no_grad():
            return m(x).numpy().copy()

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(normalize, inputs * 3))
    torch_threads(1)
    alone = [normalize(x) for x in inputs]
    for i, y in enumerate(together):
        assert y.tobytes() == alone[i % len(inputs)].tobytes()


@two_threads
def test_a_later_process_loads_the_entries_from_numbas_cache_and_gets_the_same_bits():
    """Each entry is compiled once (about half a second) and cached on disk like the
    kernels: the second process to run a kernel signature loads it."""
    script = textwrap.dedent("""
        import torch, numpy as np
        import normlab.torch as nt
        from normlab.kernels import openmp
        torch.set_num_threads(2)
        x = torch.linspace(-3, 5, 256 * 1024).reshape(256, 1024) ** 3
        with torch.no_grad():
            y = nt.LayerNorm(1024)(x)
        entries = [entry for entry in openmp._entries.values() if entry is not None]
        print(len(entries), sum(entry.cache_hits for entry in entries), y.numpy().tobytes().hex()[-64:])
    """)
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr
    (count, _, first_bits), (count_again, hits, bits) = (done.stdout.split() for done in runs)
    assert int(count) == int(count_again) == 1 and int(hits) == 1
    assert bits == first_bits


def test_the_numpy_api_beside_torch_runs_on_torchs_pool_and_follows_its_thread_count():
    script = textwrap.dedent("""
        import numpy as np, torch, normlab
        from normlab.kernels import threads
        x = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
        y = normlab.normalize(x, "b [d]")
        x64 = x.astype(np.float64)
        expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
        assert np.abs(y - expected).max() < 1e-5
        print(threads.describe())
        torch.set_num_threads(1)
        print(threads.describe())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.splitlines()
    assert before.endswith("(torch OpenMP pool)") and after == "1 (torch OpenMP pool)", done.stdout


@two_threads
def test_a_pool_child_that_first_imports_normlab_after_the_parent_used_openmp_does_not_hang():
    """The child of a parent whose torch ran OpenMP regions has the parent's OpenMP state
    but none of its threads; normlab, imported only in the child, stays off torch's pool."""
    script = textwrap.dedent("""
        import multiprocessing, torch
        torch.set_num_threads(2)
        torch.randn(2048, 2048).sum(dim=1)  # torch's OpenMP team exists in the parent

        def work(seed):
            import numpy as np, normlab
            from normlab.kernels import threads
            x = np.random.default_rng(seed).standard_normal((512, 1024)).astype(np.float32)
            y = normlab.normalize(x, "b [d]")  # threaded
            x64 = x.astype(np.float64)
            expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
            return float(np.abs(y - expected).max()), threads.describe()

        if __name__ == "__main__":
            with multiprocessing.get_context("fork").Pool(1) as pool:
                error, where = pool.apply_async(work, (1,)).get(timeout=60)
            print(error < 1e-5, where)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "2", "(normlab", "pool)"], done.stdout
