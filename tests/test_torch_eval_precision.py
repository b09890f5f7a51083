"""Norms in evaluation on running statistics far from zero keep the numerics contract:
within 1e-4 of float64 with |mean|/std = 1e6. torch's own batch norm op folds the
statistics into x·α + (β − mean·α), which cancels in float32 by about 6e-8·|mean|/std, so
the twins take it only where that cancellation is harmless. Oracle: torch's op on the
same values in float64."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import normlab.torch as nt  # noqa: E402
from torch.nn import functional as F  # noqa: E402

OFFSET = 1e6  # |running mean| in standard deviations
CONTRACT = 1e-4


def _far_from_zero(twin, channels, seed=0):
    """Running statistics at OFFSET standard deviations, random weight and bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        std = 0.5 + torch.rand(channels, generator=g, dtype=torch.float64)
        twin.running_mean.copy_(OFFSET * std + torch.randn(channels, generator=g, dtype=torch.float64))
        twin.running_var.copy_(std * std)
        if twin.weight is not None:
            twin.weight.copy_(torch.randn(channels, generator=g))
            twin.bias.copy_(torch.randn(channels, generator=g))
    return twin.eval()


def _inputs(twin, shape, seed=1):
    """float32 input around each channel's running mean (a few standard deviations off)."""
    g = torch.Generator().manual_seed(seed)
    view = (1, -1) + (1,) * (len(shape) - 2)
    mean, std = twin.running_mean.double().reshape(view), twin.running_var.double().sqrt().reshape(view)
    return (mean + 3 * std * torch.randn(shape, generator=g, dtype=torch.float64)).float()


def _float64(twin, x):
    weight = None if twin.weight is None else twin.weight.detach().double()
    bias = None if twin.bias is None else twin.bias.detach().double()
    return F.batch_norm(x.double(), twin.running_mean.double(), twin.running_var.double(), weight, bias, False, 0.0,
                        twin.eps)


def _error(y, expected, twin):
    """The largest error in units of the normalized output (the weight's scale)."""
    scale = 1.0 if twin.weight is None else twin.weight.detach().double().abs().max().item()
    return (y.double() - expected).abs().max().item() / scale


CASES = [
    ("BatchNorm1d", (4, 6)),
    ("BatchNorm1d", (4, 6, 5)),
    ("BatchNorm2d", (2, 6, 5, 4)),
    ("BatchNorm3d", (2, 6, 3, 2, 4)),
]


@pytest.mark.parametrize("cls_name, shape", CASES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "input needs grad", "composite path"])
def test_batch_norm_in_evaluation_keeps_the_contract_with_running_means_far_from_zero(cls_name, shape, mode):
    twin = _far_from_zero(getattr(nt, cls_name)(shape[1]), shape[1])
    x = _inputs(twin, shape)
    expected = _float64(twin, x)
    if mode == "no_grad":
        with torch.no_grad():
            y = twin(x)
    elif mode == "inference_mode":
        with torch.inference_mode():
            y = twin(x)
    elif mode == "input needs grad":
        y = twin(x.requires_grad_())
        assert y.requires_grad
    else:
        with nt.use_path("composite"), torch.no_grad():
            y = twin(x)
    assert _error(y, expected, twin) < CONTRACT


def test_channels_last_batch_norm_in_evaluation_keeps_the_contract_and_the_layout():
    twin = _far_from_zero(nt.BatchNorm2d(6), 6)
    x = _inputs(twin, (2, 6, 5, 4)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = twin(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert _error(y, _float64(twin, x), twin) < CONTRACT


def test_running_statistics_moved_far_from_zero_after_a_call_are_seen_by_the_next():
    twin = nt.BatchNorm1d(6).eval()
    with torch.no_grad():
        twin(torch.randn(4, 6))  # statistics at 0 and 1: torch's op is exact enough here
        _far_from_zero(twin, 6)  # in place (copy_), as load_state_dict writes them
        x = _inputs(twin, (4, 6))
        y = twin(x)
    assert _error(y, _float64(twin, x), twin) < CONTRACT


@pytest.mark.parametrize("cls_name, shape", [("BatchNorm1d", (8, 6)), ("SyncBatchNorm", (8, 6, 3))])
def test_running_statistics_that_torchs_own_op_trained_far_from_zero_are_seen_by_the_next_evaluation(cls_name, shape):
    """A training step on torch's batch norm op (``use_path("native")``; torch.jit.trace and
    functorch transforms take it too) updates the running statistics in place without moving
    their version counters: the answer of an evaluation before it (near zero, torch's
    folded op is exact enough) must not decide the evaluation after it (0.04-0.06 off float64)."""
    twin = getattr(nt, cls_name)(6, momentum=1.0)
    with torch.no_grad():
        twin.eval()(torch.randn(shape))
        with nt.use_path("native"):
            twin.train()(OFFSET + torch.randn(shape, dtype=torch.float64).float())  # the running mean: the batch's
        x = _inputs(twin.eval(), shape)
        y = twin(x)
    assert twin.running_mean.abs().min() > OFFSET / 2
    assert _error(y, _float64(twin, x), twin) < CONTRACT


def test_instance_norm_on_running_statistics_keeps_the_contract():
    twin = _far_from_zero(nt.InstanceNorm1d(6, affine=True, track_running_stats=True), 6)
    x = _inputs(twin, (3, 6, 7))
    with torch.no_grad():
        y = twin(x)
    assert _error(y, _float64(twin, x), twin) < CONTRACT


def test_masked_batch_norm_in_evaluation_keeps_the_contract():
    twin = _far_from_zero(nt.BatchNorm1d(6), 6)
    x = _inputs(twin, (3, 6, 7))
    mask = torch.ones(3, 1, 7, dtype=torch.bool)
    mask[:, :, 5:] = False  # evaluation normalizes every element with the running statistics
    with torch.no_grad():
        y = twin(x, mask=mask)
    assert _error(y, _float64(twin, x), twin) < CONTRACT


def test_batch_norm_in_evaluation_near_zero_still_takes_torchs_op(monkeypatch):
    calls = []
    original = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    twin, reference = nt.BatchNorm2d(6).eval(), torch.nn.BatchNorm2d(6).eval()
    x = torch.randn(2, 6, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), reference(x))
    assert len(calls) == 2  # the twin's call and torch.nn's


def _write_through_data(twin, mean, var):
    twin.running_mean.data.copy_(mean)
    twin.running_var.data.copy_(var)


def _write_through_numpy(twin, mean, var):
    twin.running_mean.numpy()[:] = mean.numpy()
    twin.running_var.numpy()[:] = var.numpy()


def _write_with_torchs_op(twin, mean, var):
    """A user's own training call of torch's op on the module's buffers (momentum 1: the
    batch's statistics), which moves no version counter, as torch.nn's module's own call."""
    x = mean + var.sqrt() * torch.tensor([[-1.0], [1.0]])
    F.batch_norm(x, twin.running_mean, twin.running_var, training=True, momentum=1.0)


def _write_in_inference_mode(twin, mean, var):
    with torch.inference_mode():  # (inference tensors have no version counter at all)
        twin.running_mean.copy_(mean)
        twin.running_var.copy_(var)


@pytest.mark.parametrize("write", [_write_through_data, _write_through_numpy, _write_with_torchs_op,
                                   _write_in_inference_mode], ids=["data", "numpy", "torch_op", "inference_mode"])
def test_running_statistics_written_far_from_zero_without_a_version_change_are_seen_by_the_next_evaluation(write):
    """Writes that move no version counter (``running_mean.data.copy_``, a NumPy view,
    torch's own batch norm op, inference tensors): the answer of an evaluation before them
    (statistics near zero, where torch's folded op is exact enough) decided the evaluation
    after them, 0.007 off float64 at 1e6 standard deviations."""
    build = nt.BatchNorm1d
    if write is _write_in_inference_mode:
        with torch.inference_mode():
            twin = build(6).eval()
    else:
        twin = build(6).eval()
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode(write is _write_in_inference_mode), torch.no_grad():
        twin(torch.randn(4, 6, generator=g))  # statistics at 0 and 1: torch's op is exact enough here
        std = (0.5 + torch.rand(6, generator=g, dtype=torch.float64)).float()
        write(twin, (OFFSET * std).float(), std * std)
        x = _inputs(twin, (4, 6))
        y = twin(x)
    assert twin.running_mean.abs().min() > OFFSET / 4
    assert _error(y, _float64(twin, x), twin) < CONTRACT
