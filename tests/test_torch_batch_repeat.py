"""A batch norm in training repeats its last call's decisions while nothing has changed
(``normlab.torch.batch_train.repeat_step``). Whatever a training script changes between
steps must end the repeat: the momentum, eps, counters, running statistics and
parameters replaced, rewritten through ``.data`` or moved to another dtype, the input's
layout, grad mode or ``requires_grad``. Oracle: torch.nn.BatchNorm with the same
changes: outputs, gradients, running statistics and ``num_batches_tracked`` after every
step."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from torch import nn  # noqa: E402

import normlab.torch as nt  # noqa: E402


def _pair(channels: int = 6, **options):
    torch.manual_seed(0)
    reference = nn.BatchNorm1d(channels, **options)
    with torch.no_grad():
        if reference.weight is not None:
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-0.5, 0.5)
    twin = nt.BatchNorm1d(channels, **options)
    twin.load_state_dict(reference.state_dict())
    return reference, twin


def _step(reference, twin, x: torch.Tensor, grad: bool = True, input_grad: bool = True, tolerance=None) -> None:
    """One training step on both; everything torch.nn's module holds must agree after it."""
    x_ref = x.clone().requires_grad_(grad and input_grad)
    x_twin = x.clone().requires_grad_(grad and input_grad)
    if x.dim() == 3 and not x.is_contiguous():
        x_ref, x_twin = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(grad and input_grad)
                         for t in (x_ref, x_twin))
    with torch.set_grad_enabled(grad):
        y_ref, y_twin = reference(x_ref), twin(x_twin)
    if tolerance is None:
        tolerance = dict(rtol=1e-5, atol=1e-5) if x.dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_twin, y_ref, **tolerance)
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[name], expected, **tolerance, msg=lambda m: f"{name}: {m}")
    if not y_ref.requires_grad:
        assert not y_twin.requires_grad
        return
    grad_y = torch.randn_like(y_ref)
    wanted_ref = ([x_ref] if input_grad else []) + [p for p in reference.parameters() if p.requires_grad]
    wanted_twin = ([x_twin] if input_grad else []) + [p for p in twin.parameters() if p.requires_grad]
    for got, expected in zip(torch.autograd.grad(y_twin, wanted_twin, grad_y),
                             torch.autograd.grad(y_ref, wanted_ref, grad_y)):
        torch.testing.assert_close(got, expected, **tolerance)


def _data_rewrite(module):
    module.weight.data.mul_(2)


def _data_replaced(module):
    module.weight.data = torch.linspace(0.5, 1.5, module.num_features, dtype=module.weight.dtype)


def _running_replaced(module):
    module.running_mean = torch.full_like(module.running_mean, 0.25)


def _running_data_replaced(module):
    module.running_var.data = torch.full_like(module.running_var, 2.0)


def _counter_reset(module):
    module.reset_running_stats()


def _momentum_cumulative(module):
    module.momentum = None


def _momentum_changed(module):
    module.momentum = 0.5


def _momentum_negative(module):
    module.momentum = -0.25  # torch takes it as it is: running = 1.25·running − 0.25·batch


def _eps_changed(module):
    module.eps = 1e-1


def _untracked(module):
    module.track_running_stats = False


def _frozen(module):
    module.weight.requires_grad_(False)


def _bias_replaced(module):
    module.bias = nn.Parameter(torch.full_like(module.bias, 0.75))


def _state_reloaded(module):
    module.load_state_dict({name: t * 1.5 if t.is_floating_point() else t + 3
                            for name, t in module.state_dict().items()})


def _eval_then_train(module):
    module.eval()
    module.train()


ACTIONS = [_data_rewrite, _data_replaced, _running_replaced, _running_data_replaced, _counter_reset,
           _momentum_cumulative, _momentum_changed, _momentum_negative, _eps_changed, _untracked, _frozen,
           _bias_replaced, _state_reloaded, _eval_then_train]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("action", ACTIONS, ids=lambda a: a.__name__.lstrip("_"))
def test_a_change_between_training_steps_is_seen_as_torch_sees_it(action, grad):
    reference, twin = _pair()
    x = torch.randn(5, 6) * 3 + 1
    for _ in range(3):  # repeated steps
        _step(reference, twin, x, grad)
    action(reference)
    action(twin)
    for _ in range(3):
        _step(reference, twin, x * 0.5 - 1, grad)


def test_parameters_moved_to_another_dtype_between_steps_follow_it():
    reference, twin = _pair()
    x = torch.randn(5, 6)
    for dtype in (torch.float32, torch.float64, torch.float32):
        reference.to(dtype)
        twin.to(dtype)
        for grad in (True, False, True):
            # (the running statistics carry float32 roundings into the float64 steps)
            _step(reference, twin, x.to(dtype), grad, tolerance=dict(rtol=1e-5, atol=1e-6))


def test_a_weight_rewritten_to_a_strided_view_at_the_same_address_is_read_as_strided():
    """``weight.data`` set to the first C values of a base, then to every second value
    from the same first address. The reference gets contiguous copies of the same values:
    torch 2.13's CPU backward reads a strided weight as if it were contiguous (its grad_x
    then disagrees with its own composite)."""
    reference, twin = _pair()
    x = torch.randn(5, 6)
    base = torch.linspace(0.5, 2.0, 12)
    for view in (base[:6], base[::2]):
        twin.weight.data = view
        reference.weight.data = view.clone()
        for grad in (False, True, False, True):
            _step(reference, twin, x, grad)


def test_input_layout_batch_size_and_requires_grad_changing_between_steps_match_torch():
    reference, twin = _pair()
    shapes = [(4, 6, 3), (4, 6, 3), (7, 6, 3), (4, 6, 3), (4, 6, 1)]
    for i, shape in enumerate(shapes * 2):
        x = torch.randn(shape) * 2 + 0.5
        if i % 3 == 1:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels-last strides, the same shape
        _step(reference, twin, x, grad=i % 2 == 0, input_grad=i % 4 != 2)


def test_a_module_without_affine_parameters_repeats_as_torch():
    reference, twin = _pair(affine=False)
    for grad in (True, True, False, False, True):
        _step(reference, twin, torch.randn(5, 6) + 2, grad)


def test_an_inference_tensor_into_a_repeating_module_raises_torchs_error_without_counting_the_batch():
    reference, twin = _pair()
    x = torch.randn(5, 6)
    for _ in range(2):
        _step(reference, twin, x)
    with torch.inference_mode():
        frozen = torch.randn(5, 6)
    for module in (reference, twin):
        with pytest.raises(RuntimeError) as caught:
            module(frozen)
        assert "Inference tensors" in str(caught.value)
    assert twin.num_batches_tracked.item() == reference.num_batches_tracked.item()
    _step(reference, twin, x)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ACTIONS + [None] * 6), st.booleans(), st.sampled_from([(5, 6), (7, 6, 2)])),
                min_size=2, max_size=8))
def test_any_sequence_of_changes_and_steps_matches_torch(script):
    """Hypothesis: any sequence of the changes above, with steps in and out of grad mode on
    inputs whose shape changes, leaves the twin where torch.nn's module is."""
    reference, twin = _pair()
    torch.manual_seed(1)
    for action, grad, shape in script:
        if action is not None:
            action(reference)
            action(twin)
        _step(reference, twin, torch.randn(shape) * 2 + 1, grad)


@pytest.mark.parametrize("cls_name, shape", [("BatchNorm1d", (4, 8)), ("BatchNorm2d", (4, 8, 3, 3))])
def test_a_compiled_batch_norm_trained_eagerly_between_calls_compiles_as_torch_nn_does(cls_name, shape):
    """The eager training steps keep the last step in the module's __dict__, and the compiled
    call read that cache before it knew it was compiled: its graph guarded on what the eager
    calls had last left there, and compiled again after each of theirs that changed it (three
    graphs for float32, float64, float32, where torch.nn compiles two). Oracle: torch.nn's
    module under the same calls, its graph count, outputs and running statistics."""
    from torch._dynamo.testing import CompileCounter

    gen = torch.Generator().manual_seed(7)
    ours, theirs = getattr(nt, cls_name)(8), getattr(nn, cls_name)(8)
    counters = CompileCounter(), CompileCounter()
    torch._dynamo.reset()
    compiled = [torch.compile(m, backend=c, fullgraph=True) for m, c in zip((ours, theirs), counters)]
    for dtype in (torch.float32, torch.float64, torch.float32):
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        for _ in range(2):
            x = torch.randn(shape, generator=gen, dtype=dtype)
            for call in ("compiled", "eager"):
                outputs = [(c if call == "compiled" else m)(x.clone().requires_grad_()) for m, c in
                           zip((ours, theirs), compiled)]
                torch.testing.assert_close(outputs[0], outputs[1])
                for output in outputs:
                    output.sum().backward()
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert counters[0].frame_count == counters[1].frame_count == 2
