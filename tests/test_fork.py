"""Processes forked after the parent ran threaded kernels run normlab and get right results:
DataLoader workers, ``multiprocessing`` and ``torch.multiprocessing`` with fork.

Oracles: layer norm from its definition in float64, and ``torch.nn.functional.layer_norm``
in float64; the parent runs the threaded kernels first (inputs above the serial threshold).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normlab
from normlab import kernels

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method needs a POSIX system")

SHAPE = (512, 1024)  # 2^19 elements: at the serial threshold, so threads run


def _reference(x):
    x64 = np.asarray(x, np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    return (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(axis=-1, keepdims=True) + 1e-5)


def _input(seed):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _normalize_in_child(seed):
    x = _input(seed)
    return normlab.normalize(x, "b [d]"), x


@pytest.fixture()
def parent_used_threads():
    assert np.prod(SHAPE) >= kernels.SERIAL_BELOW
    x = _input(0)
    np.testing.assert_allclose(normlab.normalize(x, "b [d]"), _reference(x), atol=1e-4)


class _NormalizingDataset:
    """Each item runs normlab in the worker: the NumPy API and a normlab.torch module."""

    def __init__(self, torch):
        from normlab.torch import LayerNorm

        self.torch = torch
        self.layer = LayerNorm(SHAPE[1], elementwise_affine=False)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        x = _input(index + 1)
        with self.torch.no_grad():
            module_y = self.layer(self.torch.from_numpy(x))
        return self.torch.from_numpy(normlab.normalize(x, "b [d]")), module_y, self.torch.from_numpy(x), os.getpid()


def test_dataloader_workers_forked_after_threaded_kernels_get_right_results(parent_used_threads):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    loader = DataLoader(_NormalizingDataset(torch), batch_size=None, num_workers=2, multiprocessing_context="fork",
                        timeout=120)
    pids = set()
    for numpy_y, module_y, x, pid in loader:
        pids.add(int(pid))
        expected = torch.nn.functional.layer_norm(x.double(), (SHAPE[1],))
        torch.testing.assert_close(numpy_y.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module_y.double(), expected, rtol=1e-5, atol=1e-5)
    assert os.getpid() not in pids and len(pids) == 2


@pytest.mark.parametrize("module", ["multiprocessing", "torch.multiprocessing"])
def test_pool_workers_forked_after_threaded_kernels_get_right_results(module, parent_used_threads):
    context = pytest.importorskip(module).get_context("fork")
    with context.Pool(2) as workers:
        # a worker killed in a kernel is replaced and its task lost: time out instead of hanging
        results = workers.map_async(_normalize_in_child, [1, 2, 3]).get(timeout=120)
    for y, x in results:
        np.testing.assert_allclose(y, _reference(x), atol=1e-4)


def test_a_child_forked_from_an_openmp_parent_runs_serially_and_survives():
    """With Numba's GNU OpenMP layer chosen for normlab's threaded calls (as
    ``benchmarks/threads.py --pool omp`` does), a child forked after a threaded call would
    be killed entering a parallel region; normlab runs it serially instead."""
    script = textwrap.dedent("""
        import os, numpy as np, numba, normlab
        from normlab.kernels import threads
        threads.use_numba_layer("omp")
        x = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
        normlab.normalize(x, "b [d]")
        assert numba.threading_layer() == "omp", numba.threading_layer()
        pid = os.fork()
        if pid == 0:
            x64 = x.astype(np.float64)
            expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
            y = normlab.normalize(x, "b [d]")
            os._exit(0 if np.abs(y - expected).max() < 1e-4 else 3)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
    """)
    try:
        import numba.np.ufunc.omppool  # noqa: F401
    except ImportError:
        pytest.skip("Numba's OpenMP threading layer is not available here")
    if numba.config.NUMBA_NUM_THREADS < 2:  # (the call then runs serially and starts no layer)
        pytest.skip("needs 2 Numba threads (NUMBA_NUM_THREADS, or the CPUs this process may use)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "child exit 0" in done.stdout, done.stdout + done.stderr


def test_a_forked_child_starts_its_own_pool_and_gets_the_parents_bits():
    """The parent's pool workers do not exist in a forked child: the child's threaded
    calls start a pool of their own (a call into the parent's would wait forever)."""
    script = textwrap.dedent("""
        import os, numpy as np, normlab
        from normlab.kernels import threads
        x = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
        parent = normlab.normalize(x, "b [d]")
        assert threads.for_call() < 2 or threads._pool.workers
        pid = os.fork()
        if pid == 0:
            same = normlab.normalize(x, "b [d]").tobytes() == parent.tobytes()
            os._exit(0 if same and (threads.for_call() < 2 or threads._pool.workers) else 3)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "child exit 0" in done.stdout, done.stdout + done.stderr


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Python 3.12 is the first to warn of a fork with threads")
def test_a_fork_after_threaded_calls_finds_no_thread_of_normlab_s_and_parent_and_child_keep_working():
    """Python 3.12+ warns "This process is multi-threaded, use of fork() may lead to deadlocks
    in the child" at a fork while the pool's idle workers are alive: they end before each
    fork, and the parent's next threaded call starts them again. Both get the bits of the
    first call (chunks fixed by index: the same on any thread count). (-W error does not
    surface that warning, which os.fork clears: the script records it.)"""
    script = textwrap.dedent("""
        import os, warnings, numpy as np, normlab
        from normlab.kernels import threads

        def fork_warnings(child):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pid = os.fork()
                if pid == 0:
                    os._exit(child())
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), [str(w.message) for w in caught if "fork" in str(w.message)]

        x = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
        status, warned = fork_warnings(lambda: 0)
        if warned:
            print("SKIP threads before any call:", warned)
            raise SystemExit(0)
        first = normlab.normalize(x, "b [d]")
        for round in range(10):
            assert threads._pool.workers, "the call did not run on normlab's pool"
            child = lambda: 0 if normlab.normalize(x, "b [d]").tobytes() == first.tobytes() and threads._pool.workers else 3
            status, warned = fork_warnings(child)
            assert status == 0 and not warned, (round, status, warned)
            assert normlab.normalize(x, "b [d]").tobytes() == first.tobytes()
        print("OK")
    """)
    # single-threaded BLAS (else its threads are there at any fork); two Numba threads, so that
    # the call runs on normlab's pool however few cores this process may use
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", script], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    assert done.stdout.strip() == "OK", done.stdout + done.stderr
