"""Everyday PyTorch training and inference recipes around converted models: autocast,
activation checkpointing and offloading, saved tensors changed in place, per-sample
gradients, checkpoints loaded both ways, weight averaging, permuted inputs and the
errors torch raises. Oracle: the same recipe on torch.nn's own modules (same seed, same
inputs), compared on outputs and their layout, gradients, running statistics and
exception types."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from torch import nn  # noqa: E402

import normlab.torch as nt  # noqa: E402
from tests.twins import randomized_pair  # noqa: E402

D = torch.float64


def _converted_pair(build):
    """``(reference, converted)``: a torch.nn model and its converted deep copy."""
    torch.manual_seed(0)
    reference = build()
    return reference, nt.convert(copy.deepcopy(reference))


def _assert_same_state(reference, twin, **tolerance):
    expected, got = reference.state_dict(), twin.state_dict()
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tolerance, msg=name)


def _assert_same_grads(reference, twin, **tolerance):
    for (name, p), q in zip(reference.named_parameters(), twin.parameters()):
        assert (q.grad is None) == (p.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **tolerance, msg=name)


def _weighted_sum(y):
    """A loss whose gradient differs per element (a plain sum has a zero gradient through a norm)."""
    return (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()


# (torch.nn class, constructor arguments, input shape): each twin's kernel path with gradients
TWINS = [
    ("LayerNorm", (6,), (4, 3, 6)),  # the cached row path
    ("RMSNorm", (6,), (4, 3, 6)),
    ("GroupNorm", (2, 4), (3, 4, 5)),
    ("BatchNorm1d", (4,), (5, 4, 3)),  # batch norm's training kernels
    ("InstanceNorm1d", (4, 1e-5, 0.1, True, True), (3, 4, 5)),  # the custom op's eager path
]


@pytest.mark.parametrize("cls_name, args, shape", TWINS)
@pytest.mark.parametrize("training", [True, False])
def test_allow_mutation_on_saved_tensors_gives_the_gradients_of_the_forward_values_as_torch_nn(
        cls_name, args, shape, training):
    """Inside ``torch.autograd.graph.allow_mutation_on_saved_tensors`` a tensor saved for
    backward may change in place (an optimizer step on the weight, an in-place residual
    on the input); autograd keeps a copy, and the gradient is that of the forward's values."""
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, D)
    x0 = torch.randn(shape, dtype=D)
    results = []
    for module in (reference.train(training), twin.train(training)):
        x = x0.clone().requires_grad_()
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            hidden = x * 1.0
            y = module(hidden)
            hidden.mul_(3.0)
            with torch.no_grad():
                for p in module.parameters():
                    p.mul_(2.0)
            _weighted_sum(y).backward()
        results.append((y.detach(), x.grad, [p.grad for p in module.parameters()]))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_of_integer_or_complex_input_raises_or_computes_as_torch_nn(dtype, eps):
    """Token ids fed to a norm by mistake: torch's own exception type (no machine epsilon
    of an integer dtype to look up); complex input computes, as in torch.nn."""
    x = (torch.arange(12) % 3 + 1).reshape(3, 4).to(dtype)
    reference, twin = nn.RMSNorm(4, eps=eps), nt.RMSNorm(4, eps=eps)
    try:
        expected = reference(x)
    except Exception as error:  # noqa: BLE001 (whatever torch raises, the twin must raise)
        with pytest.raises(type(error)):
            twin(x)
    else:
        torch.testing.assert_close(twin(x), expected)


def _transposed(shape):
    """A tensor of ``shape`` whose last two axes are stored swapped (a conv's (N, C, L)
    output transposed to (N, L, C) before a LayerNorm, or back before a BatchNorm1d)."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=D).transpose(-1, -2)


LAYOUTS = {
    "transposed": _transposed,
    "channels_last": lambda shape: torch.randn(shape, dtype=D).contiguous(memory_format=torch.channels_last),
    "channels_last_3d": lambda shape: torch.randn(shape, dtype=D).contiguous(memory_format=torch.channels_last_3d),
    "permuted": lambda shape: torch.randn(shape[2], shape[3], shape[0], shape[1], dtype=D).permute(2, 3, 0, 1),
}
LAYOUT_CASES = [  # (torch.nn class, constructor arguments, input shape, layout)
    ("LayerNorm", (6,), (2, 5, 6), "transposed"),
    ("LayerNorm", ((3, 4),), (2, 5, 3, 4), "channels_last"),
    ("RMSNorm", (6,), (2, 5, 6), "transposed"),
    ("InstanceNorm2d", (4, 1e-5, 0.1, True, True), (2, 4, 3, 5), "channels_last"),
    ("InstanceNorm1d", (4,), (2, 4, 6), "transposed"),
    ("GroupNorm", (2, 4), (2, 4, 6), "transposed"),
    ("GroupNorm", (2, 4), (2, 4, 3, 5), "channels_last"),
    ("GroupNorm", (2, 4), (2, 4, 2, 3, 2), "channels_last_3d"),
    ("BatchNorm1d", (4,), (3, 4, 6), "transposed"),
    ("BatchNorm2d", (4,), (2, 4, 3, 5), "channels_last"),
    ("BatchNorm2d", (4,), (2, 4, 3, 5), "permuted"),
    ("BatchNorm3d", (4,), (2, 4, 2, 3, 2), "channels_last_3d"),
]


@pytest.mark.parametrize("cls_name, args, shape, layout", LAYOUT_CASES)
@pytest.mark.parametrize("training", [True, False])
def test_a_permuted_input_gives_torch_nn_s_output_layout_values_and_gradients(cls_name, args, shape, layout,
                                                                             training):
    """torch.nn's CPU norms return a contiguous output for a transposed or permuted input
    (batch and group norm keep channels_last), so code that follows them with ``.view``
    works; the twins lay out their output the same way."""
    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, D)
    x0 = LAYOUTS[layout](shape)
    results = []
    for module in (reference.train(training), twin.train(training)):
        x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
        y = module(x)
        _weighted_sum(y).backward()
        results.append((y, x.grad))
    (expected, expected_grad), (y, grad) = results
    assert y.stride() == expected.stride()  # (so y.view(-1) works where torch.nn's does)
    torch.testing.assert_close(y, expected)
    assert grad.stride() == expected_grad.stride()
    torch.testing.assert_close(grad, expected_grad)
    _assert_same_grads(reference, twin)
    _assert_same_state(reference, twin)
