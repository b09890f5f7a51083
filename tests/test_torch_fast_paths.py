"""Batch norm in evaluation runs as one fused kernel pass with the running statistics
folded into one scale and shift per channel. Oracle: torch.nn's own BatchNorm modules
with the same state."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import normlab.torch as nt  # noqa: E402


def _pair(cls_name, channels, dtype, affine=True):
    reference = getattr(torch.nn, cls_name)(channels, affine=affine, dtype=dtype)
    twin = getattr(nt, cls_name)(channels, affine=affine, dtype=dtype)
    with torch.no_grad():
        reference.running_mean.uniform_(-3, 3)
        reference.running_var.uniform_(0.2, 4)
        if affine:
            reference.weight.uniform_(0.5, 2)
            reference.bias.uniform_(-1, 1)
    twin.load_state_dict(reference.state_dict())
    return reference.eval(), twin.eval()


@pytest.mark.parametrize("cls_name, shape, channels_last", [
    ("BatchNorm1d", (16, 12), False),
    ("BatchNorm1d", (4, 12, 30), False),
    ("BatchNorm2d", (3, 12, 7, 9), False),
    ("BatchNorm2d", (3, 12, 7, 9), True),
    ("BatchNorm3d", (2, 12, 3, 4, 5), False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_eval_under_no_grad_matches_torch(cls_name, shape, channels_last, dtype, affine):
    reference, twin = _pair(cls_name, shape[1], dtype, affine)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = reference(x), twin(x)
    torch.testing.assert_close(got, expected)
    assert got.stride() == expected.stride()


def test_changed_running_statistics_and_parameters_are_picked_up():
    reference, twin = _pair("BatchNorm2d", 5, torch.float32)
    x = torch.randn(2, 5, 4, 4)
    with torch.no_grad():
        twin(x)  # folds the state once
        for module in (reference, twin):
            module.running_mean.add_(0.5)
            module.weight.mul_(3)
        torch.testing.assert_close(twin(x), reference(x))
        twin.eps = reference.eps = 0.5
        torch.testing.assert_close(twin(x), reference(x))
        twin.running_var = reference.running_var = torch.full((5,), 2.0)
        torch.testing.assert_close(twin(x), reference(x))


def test_batch_norm_eval_with_gradients_still_differentiates_like_torch():
    reference, twin = _pair("BatchNorm2d", 4, torch.float64)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for module in (reference, twin):
        y = module(x)
        grads.append(torch.autograd.grad((y * y).sum(), (x, module.weight, module.bias)))
    for mine, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(mine, theirs)


def test_batch_norm_eval_under_no_grad_runs_the_fused_kernel_not_torch_operations(monkeypatch):
    from normlab.torch import compute

    reference, twin = _pair("BatchNorm2d", 3, torch.float32)

    def composite(*args, **kwargs):
        raise AssertionError("evaluation fell back to the torch operations")

    monkeypatch.setattr(compute, "_apply_stats", composite)
    x = torch.randn(2, 3, 5, 5)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), reference(x))
