"""Thread counts: torch.set_num_threads governs normlab.torch, results do not depend on it,
and the threading layer is one whose workers sleep between calls unless the user chose.

Oracles: torch.nn.functional.layer_norm in float64, Numba's own get_num_threads.
"""

import os

import numpy as np
import pytest

import normlab
from normlab import kernels
from normlab.kernels import threads

torch = pytest.importorskip("torch")
numba = pytest.importorskip("numba")

SHAPE = (512, 1024)  # 2^19 elements: at the serial threshold, so threads run


class _Counting:
    """Wraps ``threads.run``, which every threaded kernel call goes through (on torch's
    OpenMP pool or normlab's); records each call's thread count."""

    def __init__(self, run):
        self.wrapped = run
        self.counts = []

    def __call__(self, claimed, serial, args, loops, count):
        self.counts.append(count)
        return self.wrapped(claimed, serial, args, loops, count)


@pytest.fixture()
def torch_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _layer_norm_with_grad(x):
    from normlab.torch import LayerNorm

    x = x.clone().requires_grad_()
    y = LayerNorm(SHAPE[1], elementwise_affine=False, dtype=x.dtype)(x)
    (grad,) = torch.autograd.grad((y * y.detach()).sum(), x)
    return y.detach(), grad


def test_one_torch_thread_runs_normlab_torch_without_threads(torch_threads, monkeypatch):
    assert np.prod(SHAPE) >= kernels.SERIAL_BELOW
    counting = _Counting(threads.run)
    monkeypatch.setattr(threads, "run", counting)
    x = torch.randn(SHAPE, dtype=torch.float64)
    torch_threads(1)
    y, _ = _layer_norm_with_grad(x)
    assert counting.counts == []
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (SHAPE[1],)))
    if numba.config.NUMBA_NUM_THREADS >= 2:
        torch_threads(2)
        _layer_norm_with_grad(x)
        assert counting.counts and min(counting.counts) == 2


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_results_are_bit_identical_whatever_torch_threads_allow(torch_threads):
    x = torch.randn(SHAPE, dtype=torch.float64) * 3 + 100
    results = {}
    for count in (1, 2):
        torch_threads(count)
        results[count] = _layer_norm_with_grad(x)
    for one, two in zip(results[1], results[2]):
        assert one.numpy().tobytes() == two.numpy().tobytes()


def test_threaded_kernels_start_no_numba_threading_layer_and_use_both_threads(monkeypatch):
    """normlab's own pool (or torch's OpenMP pool) runs threaded calls: Numba starts none
    of its pools (whose spinning workers would contend with torch's), and the work is
    shared with a worker."""
    counting = _Counting(threads.run)
    monkeypatch.setattr(threads, "run", counting)
    claimed = counting.counts
    started_before = threads.layer() is not None  # e.g. by numba.set_num_threads in another test
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    y = normlab.normalize(x, "b [d]")
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    if threads.for_call() >= 2:
        assert claimed and min(claimed) >= 2
    assert started_before or threads.layer() is None


def test_a_call_from_another_thread_while_the_pool_is_busy_runs_serially_with_the_same_bits():
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32) * 5 + 40
    alone = normlab.normalize(x, "b [d]")
    with threads.parallel_lock:  # as if another thread's call had the pool
        contended = normlab.normalize(x, "b [d]")
    assert alone.tobytes() == contended.tobytes()


def _visits_kernel():
    from numba import prange

    from normlab.kernels._jit import kernel

    @kernel
    def visits(first, second):
        for r in prange(first.shape[0]):
            first[r] += 1.0
        for r in prange(second.shape[0]):
            second[r] += first[r % first.shape[0]] if first.shape[0] else 1.0

    return visits


_VISITS = None


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 1000])
def test_every_index_of_every_claimed_loop_runs_once_on_any_number_of_threads(size, count):
    """Home ranges, stealing and the wait between loops: each index once, and the second
    loop sees the whole first loop done (its values are all 1)."""
    global _VISITS
    if _VISITS is None:
        _VISITS = _visits_kernel()
    first, second = np.zeros(size), np.zeros(size + 7)
    threads._pool.run(_VISITS.claimed, (first, second), _VISITS.loops, count)
    np.testing.assert_array_equal(first, np.ones(size))
    np.testing.assert_array_equal(second, np.ones(size + 7))
