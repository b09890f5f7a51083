"""Recycled output memory never overwrites a result that is still alive, however it is held.

Oracle: layer norm from its definition in float64 (``_expected``), and the arrays' own
addresses (two live results never share a byte).
"""

import ctypes
import threading

import numpy as np
import pytest

import normlab
from normlab.kernels import pool

SHAPE = (256, 1024)  # 1 MB of float32: above the threshold the tests set, and threaded kernels


def _expected(x):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    return (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(axis=-1, keepdims=True) + 1e-5)


def _check(result, x):
    np.testing.assert_allclose(np.asarray(result, np.float64), _expected(x), atol=1e-4)


def _span(array):
    """[first byte, one past the last byte) of an array's memory."""
    array_utils = getattr(np.lib, "array_utils", np)  # NumPy 1.x has it as np.byte_bounds
    low, high = array_utils.byte_bounds(np.asarray(array))
    return low, high


def _overlap(a, b) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


@pytest.fixture()
def inputs():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(6)]


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.setattr(pool, "MIN_BYTES", 256 << 10)  # small arrays keep the tests quick
    pool.release()
    yield
    pool.release()


def test_a_live_result_is_not_overwritten_by_the_next_call(inputs):
    first = normlab.normalize(inputs[0], "b [d]")
    second = normlab.normalize(inputs[1], "b [d]")
    assert not np.shares_memory(first, second)
    _check(first, inputs[0])


def test_a_dropped_result_memory_is_reused(inputs):
    address = normlab.normalize(inputs[0], "b [d]").ctypes.data  # the result is dropped at once
    assert normlab.normalize(inputs[1], "b [d]").ctypes.data == address


def _torch():
    return pytest.importorskip("torch")


# Every way of holding on to a result's memory after the result itself is dropped:
# name -> (make a holder from the result, read the holder as a NumPy array).
HOLDERS = {
    "slice": (lambda r: r[::3, 5:], np.asarray),
    "reshape": (lambda r: r.reshape(-1, 64)[7:], np.asarray),
    "transpose": (lambda r: r.T, np.asarray),
    "transposed view of a view": (lambda r: r[1:].transpose(1, 0)[::2], np.asarray),
    "view with another dtype": (lambda r: r.view(np.uint32), np.asarray),
    "np.lib.stride_tricks view": (lambda r: np.lib.stride_tricks.as_strided(
        r, (SHAPE[0] // 2, SHAPE[1]), (2 * r.strides[0], r.strides[1])), np.asarray),
    "memoryview": (memoryview, np.asarray),
    "memoryview slice": (lambda r: memoryview(r)[10:20], np.asarray),
    "bytes-level buffer export": (lambda r: memoryview(r).cast("B"), np.asarray),
    "np.frombuffer": (lambda r: np.frombuffer(r, np.float32), np.asarray),
    "ctypes array": (np.ctypeslib.as_ctypes, np.ctypeslib.as_array),
    "ctypes from_buffer": (lambda r: (ctypes.c_float * r.size).from_buffer(r), np.ctypeslib.as_array),
    "DLPack capsule": (lambda r: r.__dlpack__(), None),
    "np.from_dlpack": (np.from_dlpack, np.asarray),
    "torch.from_numpy": (lambda r: _torch().from_numpy(r), lambda t: t.numpy()),
    "torch.from_numpy, permuted": (lambda r: _torch().from_numpy(r).t()[3:], lambda t: t.numpy()),
    "torch.as_tensor": (lambda r: _torch().as_tensor(r), lambda t: t.numpy()),
    "torch.from_dlpack": (lambda r: _torch().from_dlpack(r), lambda t: t.numpy()),
    "torch.frombuffer": (lambda r: _torch().frombuffer(r, dtype=_torch().float32), lambda t: t.numpy()),
}


@pytest.mark.parametrize("name", list(HOLDERS))
def test_a_result_held_any_way_keeps_its_memory_and_values(name, inputs):
    make, read = HOLDERS[name]
    result = normlab.normalize(inputs[0], "b [d]")
    holder = make(result)
    if read is None:  # a bare capsule: open it only at the end, as a consumer would
        read = lambda capsule: np.from_dlpack(_CapsuleHolder(capsule))  # noqa: E731
        address = result.ctypes.data
    else:
        address = None
    kept = np.array(read(holder)) if address is None else result.copy()
    del result
    others = [normlab.normalize(x, "b [d]") for x in inputs[1:4]]
    held = read(holder)
    for other, x in zip(others, inputs[1:4]):
        assert not _overlap(other, held), f"{name}: a new result took the memory of a held one"
        _check(other, x)
    if address is not None:
        assert held.ctypes.data == address
    np.testing.assert_array_equal(held, kept)
    # writing through the holder later changes no other result (a legacy DLPack capsule
    # opens read-only)
    if np.asarray(held).flags.writeable:
        np.asarray(held)[...] = 7
    for other, x in zip(others, inputs[1:4]):
        _check(other, x)


class _CapsuleHolder:
    """Hands a kept DLPack capsule to ``np.from_dlpack`` (which asks for ``__dlpack__``)."""

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, **_):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)  # CPU


def test_live_results_never_share_memory_while_sizes_vary(inputs):
    """Outputs of varying sizes, some kept and some dropped, more than the pool keeps."""
    rng = np.random.default_rng(1)
    kept = []
    for step in range(24):
        rows = int(rng.choice([70, 100, 128, 200, 256, 400, 530]))
        x = inputs[step % len(inputs)][:rows] if rows <= SHAPE[0] else np.resize(inputs[step % 6], (rows, SHAPE[1]))
        y = normlab.normalize(x, "b [d]")
        _check(y, x)
        if step % 3 == 0:
            kept.append((y, x, y.copy()))
        for other, _, values in kept:
            assert other is y or not _overlap(other, y)
            np.testing.assert_array_equal(other, values)
    assert len(pool._slots) <= pool.MAX_BUFFERS


def test_four_threads_calling_at_once_get_distinct_correct_results(inputs):
    results, failures = {}, []
    start = threading.Barrier(4)

    def work(worker):
        try:
            start.wait()
            mine = []
            for step in range(6):
                x = inputs[(worker + step) % len(inputs)][: 160 + 48 * (step % 3)]
                y = normlab.normalize(x, "b [d]")
                mine.append((y, x, y.copy()))
                if step % 2:
                    mine.pop(0)  # drop some, so their memory is recycled under the others' feet
            results[worker] = mine
        except Exception as error:  # pragma: no cover - reported below
            failures.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    live = [entry for mine in results.values() for entry in mine]
    for i, (y, x, values) in enumerate(live):
        _check(y, x)
        np.testing.assert_array_equal(y, values)
        for other, _, _ in live[i + 1:]:
            assert not _overlap(y, other)


def test_gradients_come_from_the_pool_too_and_stay_distinct(inputs):
    grad = np.ones(SHAPE, np.float32)
    first, _, _ = normlab.normalize_backward(grad, inputs[0], "b [d]")
    kept = first.copy()
    second, _, _ = normlab.normalize_backward(grad, inputs[1], "b [d]")
    assert not _overlap(first, second)
    np.testing.assert_array_equal(first, kept)


def test_recycling_can_be_switched_off(inputs, monkeypatch):
    monkeypatch.setenv("NORMLAB_OUTPUT_POOL", "0")
    normlab.normalize(inputs[0], "b [d]")
    assert pool._total() == 0


def test_release_drops_the_kept_buffers_but_not_live_results(inputs):
    result = normlab.normalize(inputs[0], "b [d]")
    pool.release()
    assert pool._total() == 0
    _check(result, inputs[0])
    others = [normlab.normalize(x, "b [d]") for x in inputs[1:4]]
    assert not any(_overlap(result, other) for other in others)


def test_torch_module_outputs_and_gradients_keep_their_memory():
    torch = _torch()
    from normlab.torch import LayerNorm

    layer = LayerNorm(SHAPE[1], elementwise_affine=False)
    xs = [torch.randn(SHAPE, requires_grad=True) for _ in range(4)]
    expected = [torch.nn.functional.layer_norm(x.detach().double(), (SHAPE[1],)) for x in xs]
    held = layer(xs[0])[::2].detach()  # only a view of the output survives
    grad = torch.autograd.grad(layer(xs[1]).sum(), xs[1])[0].t()  # only a view of the gradient
    kept_grad = grad.clone()
    others = [layer(x) for x in xs[2:]]
    for other, reference in zip(others, expected[2:]):
        torch.testing.assert_close(other.detach().double(), reference, rtol=1e-5, atol=1e-5)
        for tensor in (held, grad):
            assert not _overlap(tensor.numpy(), other.detach().numpy())
    torch.testing.assert_close(held.double(), expected[0][::2], rtol=1e-5, atol=1e-5)
    assert torch.equal(grad, kept_grad)


def test_torch_module_outputs_stay_distinct_and_keep_channels_last():
    torch = _torch()
    from normlab.torch import BatchNorm2d

    norm = BatchNorm2d(16)
    x = torch.randn(8, 16, 64, 64).to(memory_format=torch.channels_last)
    first = norm(x)
    second = norm(x * 2)
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert first.data_ptr() != second.data_ptr()
    expected = torch.nn.functional.batch_norm(x.double(), None, None, norm.weight.double(), norm.bias.double(), True)
    torch.testing.assert_close(first.double(), expected, rtol=1e-5, atol=1e-5)


def _recycled(array) -> bool:
    while array is not None:
        if isinstance(array, pool._Owner):
            return True
        array = getattr(array, "base", None)
    return False


def test_the_fused_blocks_recycle_both_outputs_from_glibcs_mmap_threshold(inputs):
    # 192 KB each, below MIN_BYTES: y and x + r, freed together as plain arrays, left a free
    # top of the heap that glibc gave back to the system, and every call faulted it in again
    x, r, x2, r2 = (a[:48] for a in inputs[:4])
    y, total = normlab.normalize(x, "b [d]", residual=r)
    assert y.nbytes < pool.MIN_BYTES and _recycled(y) and _recycled(total)
    y2, total2 = normlab.normalize(x2, "b [d]", residual=r2)
    assert not any(_overlap(a, b) for a in (y, total) for b in (y2, total2))
    _check(y, x + r)
    np.testing.assert_array_equal(total, x + r)
    small = normlab.normalize(x[:8], "b [d]", residual=r[:8])[0]  # (32 KB: malloc's own heap)
    assert not _recycled(small)
