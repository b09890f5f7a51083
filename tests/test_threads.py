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

SHAPE = (256, 1024)  # above the serial threshold


class _CountingLock:
    """Stands in for the lock every threaded kernel call takes."""

    def __init__(self):
        self.entered = 0

    def __enter__(self):
        self.entered += 1

    def __exit__(self, *_):
        return False


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
    counting = _CountingLock()
    monkeypatch.setattr(threads, "parallel_lock", counting)
    x = torch.randn(SHAPE, dtype=torch.float64)
    torch_threads(1)
    y, _ = _layer_norm_with_grad(x)
    assert counting.entered == 0
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (SHAPE[1],)))
    if numba.config.NUMBA_NUM_THREADS >= 2:
        torch_threads(2)
        _layer_norm_with_grad(x)
        assert counting.entered > 0


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_results_are_bit_identical_whatever_torch_threads_allow(torch_threads):
    x = torch.randn(SHAPE, dtype=torch.float64) * 3 + 100
    results = {}
    for count in (1, 2):
        torch_threads(count)
        results[count] = _layer_norm_with_grad(x)
    for one, two in zip(results[1], results[2]):
        assert one.numpy().tobytes() == two.numpy().tobytes()


def test_a_thread_cap_lowers_numba_threads_for_the_call_and_restores_them():
    @numba.njit(parallel=True)
    def threads_in_loop():
        seen = np.zeros(8, np.int64)
        for i in numba.prange(8):
            seen[i] = numba.get_num_threads()
        return seen.max()

    before = numba.get_num_threads()
    with threads.at_most(1):
        assert threads_in_loop() == 1
    assert numba.get_num_threads() == before


@pytest.mark.skipif("NUMBA_THREADING_LAYER" in os.environ, reason="the user chose a threading layer")
def test_threaded_kernels_run_on_a_pool_whose_workers_sleep_and_survive_fork():
    normlab.normalize(np.ones(SHAPE, np.float32), "b [d]")
    assert threads.layer() in ("workqueue", "tbb")
