"""Calls from several Python threads at once give, bit for bit, what each call gives alone.

The kernels release the GIL, so two threads' calls really run together; the fast paths
share what they cache per shape (plans, parameter tables, scratch for statistics nobody
asked for) between every call of that shape. Each test starts its threads on a barrier
and repeats many small calls, so that calls overlap on any machine with two cores;
no assertion depends on timing. Oracles: the same call run alone (bit for bit) and
torch.nn, or the float64 definition.
"""

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import normlab

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import normlab.torch as nt  # noqa: E402

THREADS = 4


def _run_together(work, repeats: int) -> list:
    """``work(i)`` ``repeats`` times on each of THREADS threads started together; each
    thread's first mismatch or exception, as a list (empty when every call agreed)."""
    barrier = threading.Barrier(THREADS)
    failures = []

    def loop(i):
        try:
            barrier.wait()
            for k in range(repeats):
                problem = work(i)
                if problem:
                    failures.append(f"thread {i}, call {k}: {problem}")
                    return
        except Exception as error:  # noqa: BLE001 - reported by the test's assertion
            failures.append(f"thread {i}: {error!r}")

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def _definition(x: np.ndarray, rms: bool = False) -> np.ndarray:
    x = x.astype(np.float64)
    mean = 0.0 if rms else x.mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + 1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rms", [False, True])
def test_threads_normalizing_arrays_of_one_shape_each_get_their_own_result(dtype, rms):
    """Many short rows: the fast path's statistics scratch, shared by every call of the
    shape, is written by every thread at once; each output must come from its own rows."""
    rng = np.random.default_rng(0)
    # (1024 rows: the most a cached plan keeps its scratch for, fast.KEPT_SCRATCH_ROWS)
    xs = [(rng.standard_normal((1024, 8)) * (i + 1) + 10 * i).astype(dtype) for i in range(THREADS)]
    alone = [normlab.normalize(x, "b [d]", rms=rms) for x in xs]
    alone = [normlab.normalize(x, "b [d]", rms=rms) for x in xs]  # the cached fast path, alone
    for x, y in zip(xs, alone):
        np.testing.assert_allclose(y, _definition(x, rms), rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)

    def work(i):
        y = normlab.normalize(xs[i], "b [d]", rms=rms)
        return None if np.array_equal(y, alone[i]) else f"max difference {np.abs(y - alone[i]).max()}"

    assert _run_together(work, 150) == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_threads_sharing_one_layer_norm_without_gradients_get_their_own_results(dtype):
    torch.manual_seed(0)
    reference = torch.nn.LayerNorm(4, dtype=dtype)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    twin = nt.LayerNorm(4, dtype=dtype)
    twin.load_state_dict(reference.state_dict())
    xs = [torch.randn(2048, 4, dtype=dtype) * (i + 1) + 10 * i for i in range(THREADS)]
    with torch.no_grad():
        alone = [twin(x) for x in xs]
        for x, y in zip(xs, alone):
            torch.testing.assert_close(y, reference(x))

    def work(i):
        with torch.no_grad():
            y = twin(xs[i])
        return None if torch.equal(y, alone[i]) else f"max difference {(y - alone[i]).abs().max().item()}"

    assert _run_together(work, 150) == []


def test_threads_sharing_one_rms_norm_with_a_strided_weight_train_as_alone():
    """A weight that is a strided view (every other element of a buffer): its kernel
    table is a copy, made on every call, so one thread prepares the module's tables
    while another runs with its own."""
    torch.manual_seed(0)
    weight = torch.rand(32)[::2] + 0.5
    reference, twin = torch.nn.RMSNorm(16), nt.RMSNorm(16)
    reference.weight = torch.nn.Parameter(weight.clone())
    twin.weight = torch.nn.Parameter(torch.rand(32)[::2])
    with torch.no_grad():
        twin.weight.copy_(weight)
    assert not twin.weight.is_contiguous()
    xs = [torch.randn(64, 16) * (i + 1) for i in range(THREADS)]
    grad_y = torch.randn(64, 16)

    def step(module, x):
        x = x.clone().requires_grad_()
        y = module(x)
        return (y.detach(), *torch.autograd.grad(y, (x, module.weight), grad_y))

    alone = [step(twin, x) for x in xs]
    for x, results in zip(xs, alone):
        for got, expected in zip(results, step(reference, x)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    def work(i):
        results = step(twin, xs[i])
        return None if all(torch.equal(a, b) for a, b in zip(results, alone[i])) else "results differ from alone"

    assert _run_together(work, 150) == []


@pytest.mark.parametrize("cls_name, args, shape", [
    ("LayerNorm", (64,), (256, 64)),
    ("GroupNorm", (4, 32), (8, 32, 8, 8)),
    ("RMSNorm", (64,), (4, 64, 64)),
    ("BatchNorm2d", (16,), (8, 16, 8, 8)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_thread_pool_sharing_one_module_gets_forward_and_backward_as_alone(cls_name, args, shape, dtype):
    """Forward and backward of one module object from a ThreadPoolExecutor (batch norm
    without running statistics, so that calls do not depend on one another)."""
    torch.manual_seed(0)
    kwargs = {"track_running_stats": False} if cls_name.startswith("BatchNorm") else {}
    reference = getattr(torch.nn, cls_name)(*args, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(0.5, 1.5)
    twin = getattr(nt, cls_name)(*args, dtype=dtype, **kwargs)
    twin.load_state_dict(reference.state_dict())
    xs = [torch.randn(shape, dtype=dtype) * (i + 1) + i for i in range(8)]
    grad_y = torch.randn(shape, dtype=dtype)

    def step(module, i):
        x = xs[i].clone().requires_grad_()
        y = module(x)
        return (y.detach(), *torch.autograd.grad(y, (x, *module.parameters()), grad_y))

    alone = [step(twin, i) for i in range(len(xs))]
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    for i in range(len(xs)):
        for got, expected in zip(alone[i], step(reference, i)):
            torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    with ThreadPoolExecutor(THREADS) as executor:
        together = list(executor.map(lambda i: step(twin, i % len(xs)), range(20 * len(xs))))
    for k, results in enumerate(together):
        assert all(torch.equal(a, b) for a, b in zip(results, alone[k % len(xs)])), f"call {k} differs from alone"


@pytest.mark.parametrize("kernel_name, dtype", [("row_forward", np.float64), ("row_forward32", np.float32)])
@pytest.mark.parametrize("serial", [True, False])
def test_the_row_forward_never_reads_back_the_statistics_it_writes(kernel_name, dtype, serial):
    """What makes the fast path's shared statistics scratch safe when threads write it at
    once: the kernel applies the statistics it computed, not what the arrays hold after
    its writes. Passed one array as mean, var and rstd (so each write overwrites the
    others), the output must still be the float64 definition."""
    from normlab.kernels import rows
    from normlab.kernels.strided import PLAIN_ROWS

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1024, 8)) * 3 + 5).astype(dtype)  # 8192 elements: either variant runs
    y = np.empty_like(x)
    ones, zeros = np.ones((1, 1), dtype), np.zeros((1, 1), dtype)
    statistics = np.empty(1024)
    getattr(rows, kernel_name)(x, PLAIN_ROWS, y, PLAIN_ROWS, 8, ones, zeros, 1, 1, False, 1e-5, False, statistics,
                               statistics, statistics, serial=serial)
    np.testing.assert_allclose(y, _definition(x), rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)


def test_a_call_keeps_its_parameter_tables_when_another_call_prepares_the_module_next(monkeypatch):
    """Two threads calling one module: one thread's call looks its parameter tables up,
    then another thread's call prepares the module's tables for its own parameters
    before the first call's kernel runs. Played here in one thread, in that order; the
    first call must still use its own parameters. Oracle: torch.nn.RMSNorm."""
    from normlab.torch import row_autograd

    torch.manual_seed(0)
    reference = torch.nn.RMSNorm(16)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
    twin = nt.RMSNorm(16)
    twin.load_state_dict(reference.state_dict())
    other_weight = torch.nn.Parameter(torch.full((16,), 100.0))
    look_up = row_autograd.ParamTables.of

    def then_another_call(self, weight, bias):
        tables = look_up(self, weight, bias)
        look_up(self, other_weight, bias)  # the other thread's call, between this lookup and this kernel
        return tables

    monkeypatch.setattr(row_autograd.ParamTables, "of", then_another_call)
    x = torch.randn(8, 16, requires_grad=True)
    torch.testing.assert_close(twin(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.fixture()
def _restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threaded_kernels_called_beside_torch_ops_and_changing_thread_counts_give_the_results_alone(
        _restore_torch_threads):
    """Calls large enough for the threaded kernels (OpenMP regions where torch runs on GNU
    OpenMP) from two threads, while a third runs torch's own threaded ops and
    ``torch.set_num_threads`` alternates between 1 and 2: every result is bit-identical
    to the call alone (the work is cut by index, not by thread). Oracle: the call alone,
    and torch.nn.LayerNorm."""
    from normlab.kernels import threads as kernel_threads

    torch.manual_seed(0)
    assert 512 * 512 >= kernel_threads.REGION_SERIAL_BELOW // 2  # a threaded call on either pool
    twin = nt.LayerNorm(512)
    xs = [torch.randn(512, 512) * (i + 1) + 3 * i for i in range(2)]
    grad_y = torch.randn(512, 512)

    def step(i):
        x = xs[i].clone().requires_grad_()
        y = twin(x)
        return (y.detach(), *torch.autograd.grad(y, (x, twin.weight, twin.bias), grad_y))

    alone = [step(i) for i in range(2)]
    torch.testing.assert_close(alone[0][0], torch.nn.functional.layer_norm(xs[0], (512,)), rtol=1e-5, atol=1e-5)
    stop = threading.Event()

    def torch_ops():
        a = torch.randn(256, 256)
        for k in range(10_000):
            if stop.is_set():
                return
            torch.set_num_threads(1 + k % 2)
            a = (a @ a).tanh()

    busy = threading.Thread(target=torch_ops)
    busy.start()
    try:
        failures = []
        callers = [threading.Thread(target=lambda i=i: failures.extend(
            k for k in range(5) if not all(torch.equal(a, b) for a, b in zip(step(i), alone[i])))) for i in range(2)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
    finally:
        stop.set()
        busy.join()
    assert failures == []


class _RMSNormThatWaits(torch.nn.Module):
    """LLaMA's RMS norm, whose first forward (a convert() probe's) says it has begun and
    waits to be let on, and whose every forward warns."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.variance_epsilon = 1e-6
        self.inside, self.let_on = threading.Event(), threading.Event()

    def forward(self, x):
        if not self.inside.is_set():
            self.inside.set()
            assert self.let_on.wait(60)
        warnings.warn("the probed forward's own warning")
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)


def _converting(norm: torch.nn.Module) -> tuple:
    """A started thread converting a model of ``norm``, once a probe is inside its forward; its result."""
    converted = []
    thread = threading.Thread(target=lambda: converted.append(nt.convert(torch.nn.Sequential(norm))))
    thread.start()
    assert norm.inside.wait(60)
    return thread, converted


def test_a_thread_that_warns_while_another_converts_keeps_its_warnings():
    """convert()'s probes silenced every warning of the process while they ran
    (catch_warnings and an "ignore" filter): a thread that trained meanwhile lost its own."""
    norm = _RMSNormThatWaits(8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        thread, converted = _converting(norm)
        warnings.warn("the training thread's warning")
        norm.let_on.set()
        thread.join()
    messages = [str(w.message) for w in record]
    assert type(converted[0][0]) is nt.RMSNorm  # (a probe ran the forward, and matched LLaMA's recipe)
    assert "the training thread's warning" in messages
    assert "the probed forward's own warning" not in messages


def test_two_threads_converting_at_once_leave_the_warning_filters_as_they_were():
    """Each probe saved the filters on entry and put its copy back on exit: the second
    probe's exit, after the first's, put back the first's "ignore everything", for good."""
    first, second = _RMSNormThatWaits(8), _RMSNormThatWaits(12)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        first_thread, _ = _converting(first)
        second_thread, _ = _converting(second)
        first.let_on.set()
        first_thread.join()
        second.let_on.set()
        second_thread.join()
        assert warnings.filters == filters
        warnings.warn("a warning after both conversions")
    assert [str(w.message) for w in record] == ["a warning after both conversions"]


def test_a_catch_warnings_entered_while_another_thread_converts_leaves_the_warning_filters_as_they_were():
    """A thread that enters warnings.catch_warnings() while convert()'s probe runs saves the
    list of filters that holds the probe's filter and puts it back on exit, after the probe
    took its filter out of the copy in use: the probe's filter stayed in the process's list
    for good. Oracle: the list of filters before it all."""
    norm = _RMSNormThatWaits(8)
    filters = list(warnings.filters)
    thread, converted = _converting(norm)
    with warnings.catch_warnings():
        norm.let_on.set()
        thread.join()
    assert type(converted[0][0]) is nt.RMSNorm  # (a probe ran the forward, and matched LLaMA's recipe)
    assert warnings.filters == filters
