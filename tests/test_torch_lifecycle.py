"""A converted model through its lifecycle, as users take torch.nn's norms through it:
parametrizations, state changed between calls, checkpoints and module utilities. Oracle:
the torch.nn module with the same state, run on the same inputs (outputs, gradients,
running statistics and exception types)."""

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import normlab.torch as nt  # noqa: E402

# (id, torch.nn original, input shape)
NORMS = [
    ("batch_norm_1d", lambda: nn.BatchNorm1d(4), (6, 4)),
    ("batch_norm_2d", lambda: nn.BatchNorm2d(4), (3, 4, 5, 5)),
    ("batch_norm_3d", lambda: nn.BatchNorm3d(4), (2, 4, 3, 3, 3)),
    ("layer_norm", lambda: nn.LayerNorm(8), (3, 5, 8)),
    ("rms_norm", lambda: nn.RMSNorm(8), (3, 5, 8)),
    ("group_norm", lambda: nn.GroupNorm(2, 4), (3, 4, 5, 5)),
    ("instance_norm_2d", lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 5, 5)),
]
IDS = [case[0] for case in NORMS]
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def pair(factory):
    """A torch.nn norm with random parameters, and its converted twin (a deep copy)."""
    torch.manual_seed(0)
    original = factory()
    with torch.no_grad():
        for param in original.parameters():
            param.uniform_(0.5, 1.5)
    return original, nt.convert(copy.deepcopy(original))


def inputs(shape, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 2 + 1


def assert_same_state(twin, original):
    for (key, value), (expected_key, expected) in zip(twin.state_dict().items(), original.state_dict().items()):
        assert key == expected_key
        torch.testing.assert_close(value, expected, **TOLERANCE, msg=key)


class _Square(nn.Module):
    def forward(self, weight):
        return weight * weight


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, factory, shape", NORMS, ids=IDS)
def test_a_parametrized_weight_is_the_one_the_twin_normalizes_with(name, factory, shape, training):
    """``register_parametrization`` replaces the weight Parameter by a computed property
    (after the twin has run, with its caches built): every call, with and without
    gradients, uses the weight as the parametrization computes it, as torch.nn does."""
    original, twin = pair(factory)
    x = inputs(shape)
    for module in (original, twin):
        module.train(training)
        module(x)
        parametrize.register_parametrization(module, "weight", _Square())
    for step in range(2):
        x_original, x_twin = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, actual = original(x_original), twin(x_twin)
        torch.testing.assert_close(actual, expected, **TOLERANCE)
        expected.square().sum().backward()
        actual.square().sum().backward()
        torch.testing.assert_close(x_twin.grad, x_original.grad, rtol=1e-4, atol=1e-4)
        for (key, param), (_, expected_param) in zip(twin.named_parameters(), original.named_parameters()):
            torch.testing.assert_close(param.grad, expected_param.grad, rtol=1e-4, atol=1e-3, msg=key)
        with torch.no_grad():
            for module in (original, twin):
                module.parametrizations.weight.original.add_(0.25 * (step + 1))
                module(x)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), original(x), **TOLERANCE)
    assert_same_state(twin, original)
