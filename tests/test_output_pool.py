"""Recycled output memory never overwrites a result that is still alive, however it is held."""

import numpy as np
import pytest

import normlab
from normlab.kernels import pool

SHAPE = (1024, 4096)  # 16 MB of float32: above the pool's threshold


@pytest.fixture()
def inputs():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3)]


def _expected(x):
    return normlab.normalize(x, "b [d]", backend="numpy")


def test_a_live_result_is_not_overwritten_by_the_next_call(inputs):
    first = normlab.normalize(inputs[0], "b [d]")
    second = normlab.normalize(inputs[1], "b [d]")
    assert not np.shares_memory(first, second)
    np.testing.assert_allclose(first, _expected(inputs[0]), atol=1e-6)


def test_a_view_of_a_result_keeps_its_memory(inputs):
    view = normlab.normalize(inputs[0], "b [d]")[::3, 5:]
    kept = view.copy()
    for x in inputs[1:]:
        assert not np.shares_memory(view, normlab.normalize(x, "b [d]"))
    np.testing.assert_array_equal(view, kept)


def test_a_torch_tensor_made_from_a_result_keeps_its_memory(inputs):
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(normlab.normalize(inputs[0], "b [d]"))
    kept = tensor.clone()
    normlab.normalize(inputs[1], "b [d]")
    normlab.normalize(inputs[2], "b [d]")
    assert torch.equal(tensor, kept)


def test_a_dropped_result_memory_is_reused(inputs):
    address = normlab.normalize(inputs[0], "b [d]").ctypes.data  # the result is dropped at once
    assert normlab.normalize(inputs[1], "b [d]").ctypes.data == address


def test_gradients_come_from_the_pool_too_and_stay_distinct(inputs):
    grad = np.ones(SHAPE, np.float32)
    first, _, _ = normlab.normalize_backward(grad, inputs[0], "b [d]")
    second, _, _ = normlab.normalize_backward(grad, inputs[1], "b [d]")
    assert not np.shares_memory(first, second)


def test_recycling_can_be_switched_off(inputs, monkeypatch):
    pool.release()
    monkeypatch.setenv("NORMLAB_OUTPUT_POOL", "0")
    normlab.normalize(inputs[0], "b [d]")
    assert pool._total() == 0


def test_release_drops_the_kept_buffers(inputs):
    normlab.normalize(inputs[0], "b [d]")
    pool.release()
    assert pool._total() == 0


def test_torch_module_outputs_stay_distinct_and_keep_channels_last():
    torch = pytest.importorskip("torch")
    from normlab.torch import BatchNorm2d, LayerNorm

    layer = LayerNorm(SHAPE[1])
    x1, x2 = torch.randn(SHAPE), torch.randn(SHAPE)
    y1 = layer(x1)
    kept = y1.detach().clone()
    y2 = layer(x2)
    assert y1.data_ptr() != y2.data_ptr()
    assert torch.equal(y1.detach(), kept)
    norm = BatchNorm2d(16)
    x = torch.randn(8, 16, 128, 128).to(memory_format=torch.channels_last)
    first = norm(x)
    second = norm(x * 2)
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert first.data_ptr() != second.data_ptr()
    expected = torch.nn.functional.batch_norm(x.double(), None, None, norm.weight.double(), norm.bias.double(), True)
    torch.testing.assert_close(first.double(), expected, rtol=1e-5, atol=1e-5)
