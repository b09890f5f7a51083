"""Batch norm's float32 apply passes (training, and evaluation's folded scale and shift)
write large outputs with non-temporal stores, channels-first slab by slab and
channels-last row by row. These inputs are past that size (``columns.COLUMN_STREAM_ELEMENTS``;
evaluation also past the size below which the twin takes torch's own op). Oracle:
torch.nn's batch norm in float64 and the contract's exact properties."""

import numpy as np
import pytest

pytest.importorskip("numba")
torch = pytest.importorskip("torch")

from normlab.kernels import columns  # noqa: E402
from normlab.torch import BatchNorm1d, BatchNorm2d  # noqa: E402
from normlab.torch.compute import EVAL_NATIVE_BELOW_BYTES  # noqa: E402

ELEMENTS = columns.COLUMN_STREAM_ELEMENTS


def randomized(twin, reference):
    """Random parameters and running statistics, the same in both modules."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(twin, name).copy_(torch.randn_like(getattr(twin, name)))
        twin.running_var.copy_(torch.rand_like(twin.running_var) + 0.5)
    reference.load_state_dict(twin.state_dict())
    return twin, reference.double()


def spatial_shape(batch, channels, elements):
    """(batch, channels, h, w) of at least ``elements``, with an odd slab length."""
    inner = -(-elements // (batch * channels))
    return batch, channels, 1, inner | 1


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [16, 67])
def test_streamed_batch_norm_training_matches_torch_nn(channels_last, channels):
    shape = spatial_shape(4, channels, ELEMENTS)
    x = torch.randn(shape) * 3 + 2
    x[:, 1] = 5.0  # a constant channel: exactly its bias
    x[0, 2, 0, 3] = float("nan")  # confined to channel 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    twin, reference = randomized(BatchNorm2d(channels), torch.nn.BatchNorm2d(channels))
    y = twin(x)
    expected = reference(x.double())
    assert torch.equal(y[:, 1], twin.bias[1].detach().expand_as(y[:, 1]))
    assert torch.isnan(y[:, 2]).all()
    keep = [c for c in range(channels) if c != 2]
    torch.testing.assert_close(y[:, keep], expected[:, keep].float(), atol=2e-5 * twin.weight.abs().max().item(),
                               rtol=0)
    torch.testing.assert_close(twin.running_mean[keep], reference.running_mean[keep].float())
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("rows, features", [(256, ELEMENTS // 256 + 5), (ELEMENTS // 64 + 1, 64)])
def test_streamed_batch_norm_1d_training_matches_torch_nn(rows, features):
    x = torch.randn(rows, features) * 2 - 1
    x[:, 3] = -0.75
    twin, reference = randomized(BatchNorm1d(features), torch.nn.BatchNorm1d(features))
    y = twin(x)
    assert torch.equal(y[:, 3], twin.bias[3].detach().expand(rows))
    torch.testing.assert_close(y, reference(x.double()).float(), atol=2e-5 * twin.weight.abs().max().item(), rtol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_streamed_batch_norm_evaluation_matches_torch_nn(channels_last):
    channels = 24
    shape = spatial_shape(4, channels, EVAL_NATIVE_BELOW_BYTES // 4 + 1)
    x = torch.randn(shape) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    twin, reference = randomized(BatchNorm2d(channels), torch.nn.BatchNorm2d(channels))
    twin.eval()
    reference.eval()
    with torch.no_grad():
        y = twin(x)
        expected = reference(x.double())
    torch.testing.assert_close(y, expected.float(), atol=1e-5 * float(expected.abs().max()), rtol=0)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_streamed_batch_norm_is_bit_identical_on_one_and_two_threads():
    from normlab import kernels

    x = torch.randn(spatial_shape(4, 16, ELEMENTS)) + 1
    outputs = []
    for count in (1, 2):
        twin = BatchNorm2d(16)
        with kernels.threads.at_most(count):
            outputs.append(twin(x).detach().numpy().tobytes() + twin.running_var.numpy().tobytes())
    assert outputs[0] == outputs[1]
