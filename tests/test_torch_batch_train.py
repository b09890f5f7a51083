"""BatchNorm in training on the direct kernel path (normlab/torch/batch_train.py): what it
remembers between calls (parameter tables, running-statistics views, per-shape records)
never goes stale. Oracles: torch.nn's BatchNorm modules and torch's autograd."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import normlab.torch as nt  # noqa: E402

CASES = [  # (torch.nn class, normlab class, shape, channels_last)
    (torch.nn.BatchNorm1d, nt.BatchNorm1d, (16, 5), False),
    (torch.nn.BatchNorm1d, nt.BatchNorm1d, (6, 5, 7), False),
    (torch.nn.BatchNorm2d, nt.BatchNorm2d, (4, 5, 3, 6), False),
    (torch.nn.BatchNorm2d, nt.BatchNorm2d, (4, 5, 3, 6), True),
]


def _pair(reference_class, twin_class, channels, dtype, **kwargs):
    reference = reference_class(channels, dtype=dtype, **kwargs)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    twin = twin_class(channels, dtype=dtype, **kwargs)
    twin.load_state_dict(reference.state_dict())
    return reference, twin


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("reference_class, twin_class, shape, channels_last", CASES)
def test_training_steps_match_torch_nn_in_outputs_gradients_parameters_and_running_statistics(
        reference_class, twin_class, shape, channels_last, momentum):
    torch.manual_seed(0)
    reference, twin = _pair(reference_class, twin_class, shape[1], torch.float64, momentum=momentum)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, twin)]
    for step in range(3):  # the optimizer changes the weights in place between calls
        x = torch.randn(shape, dtype=torch.float64) * (step + 1) + step
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grad_y = torch.randn(shape, dtype=torch.float64)
        results = []
        for module, optimizer in zip((reference, twin), optimizers):
            leaf = x.clone().requires_grad_()
            y = module(leaf)
            optimizer.zero_grad()
            y.backward(grad_y)
            results.append((y, leaf.grad, module.weight.grad, module.bias.grad))
            optimizer.step()
        for mine, theirs in zip(results[1], results[0]):
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)
        if channels_last:
            assert results[1][0].is_contiguous(memory_format=torch.channels_last)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(twin, name), getattr(reference, name), rtol=1e-12, atol=1e-12)


def test_no_grad_training_forward_matches_torch_nn_in_float32():
    torch.manual_seed(1)
    reference, twin = _pair(torch.nn.BatchNorm1d, nt.BatchNorm1d, 300, torch.float32)
    x = torch.randn(70, 300) * 3 + 100
    with torch.no_grad():
        torch.testing.assert_close(twin(x), reference(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(twin.running_mean, reference.running_mean)
    torch.testing.assert_close(twin.running_var, reference.running_var)


def test_evaluation_after_training_sees_the_running_statistics_that_training_updated():
    """The running statistics are written through NumPy; their version counters must
    move, or the evaluation pass's folded scale and shift (remembered by version) go stale."""
    torch.manual_seed(2)
    reference, twin = _pair(torch.nn.BatchNorm2d, nt.BatchNorm2d, 4, torch.float32)
    x = torch.randn(3, 4, 5, 5) + 2
    # evaluation on the fused kernel (no gradients wanted), whatever the size
    with nt.use_path("kernel"), torch.no_grad():
        for module in (reference, twin):
            module.eval()
            module(x)
            module.train()
            module(x * 3)
            module.eval()
        torch.testing.assert_close(twin(x), reference(x))


def test_replaced_running_statistics_and_parameters_are_the_ones_used():
    torch.manual_seed(3)
    reference, twin = _pair(torch.nn.BatchNorm1d, nt.BatchNorm1d, 6, torch.float32)
    x = torch.randn(10, 6)
    with torch.no_grad():
        reference(x)
        twin(x)
    for module in (reference, twin):
        module.running_mean = torch.full((6,), 2.0)
        module.running_var = torch.full((6,), 3.0)
        module.weight = torch.nn.Parameter(torch.full((6,), -1.5))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), reference(x))
    torch.testing.assert_close(twin.running_mean, reference.running_mean)
    torch.testing.assert_close(twin.running_var, reference.running_var)


def test_second_derivatives_of_a_training_batch_norm_match_torch():
    torch.manual_seed(4)
    reference, twin = _pair(torch.nn.BatchNorm1d, nt.BatchNorm1d, 3, torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    results = []
    for module in (reference, twin):
        leaf = x.clone().requires_grad_()
        y = module(leaf)
        (grad_x,) = torch.autograd.grad((y ** 3).sum(), leaf, create_graph=True)
        results.append(torch.autograd.grad(grad_x.square().sum(), [leaf, module.weight]))
    for mine, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)


def test_a_deep_copy_trains_on_its_own_statistics():
    torch.manual_seed(5)
    _, twin = _pair(torch.nn.BatchNorm1d, nt.BatchNorm1d, 4, torch.float32)
    with torch.no_grad():
        twin(torch.randn(8, 4))
        copied = copy.deepcopy(twin)
        before = twin.running_mean.clone()
        copied(torch.randn(8, 4) + 10)
    assert torch.equal(twin.running_mean, before)
    assert not torch.equal(copied.running_mean, before)


def _first_then_second(module, x, mask, first, second):
    """Two training calls of one module before any backward; the second's data is x with
    the padding removed where ``mask`` is given (the twin takes the mask, torch.nn that data)."""
    with first:
        y = module(x)
    with second:
        if mask is None:
            module(x)
        elif isinstance(module, (nt.BatchNorm1d, nt.SyncBatchNorm)):
            module(x, mask=mask)
        else:
            module(torch.cat([x[i, :, :int(n)] for i, n in enumerate(mask.sum((1, 2)))], -1)[None])
    return y


@pytest.mark.parametrize("twin_class", [nt.BatchNorm1d, nt.SyncBatchNorm])
@pytest.mark.parametrize("first, second, dtype, masked", [
    ("native", "kernel", torch.float32, False),
    ("native", "composite", torch.float64, False),
    ("native", "auto", torch.bfloat16, True),
    ("autocast", "auto", torch.float32, True),
], ids=["native then kernels", "native then composite", "bfloat16 then mask", "autocast then mask"])
def test_a_batch_norm_called_on_torchs_op_and_then_on_normlabs_before_backward_trains_as_torch_nn(
        twin_class, first, second, dtype, masked):
    """torch's batch norm op saves the running statistics for backward and moves no version
    counter as it updates them; a later call of the same module that bumped them made that
    backward raise "modified by an inplace operation", where torch.nn's module runs."""
    from contextlib import nullcontext

    def context(name):
        if name == "autocast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext() if name == "auto" else nt.use_path(name)

    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64).to(dtype)
    mask = (torch.arange(6) < torch.tensor([6, 4, 2])[:, None])[:, None, :] if masked else None
    reference = torch.nn.BatchNorm1d(4, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    twin = twin_class(4, dtype=reference.weight.dtype)
    projection = torch.randn(4, 4, dtype=dtype)
    grads = []
    for module in (reference, twin):
        inputs = x.clone().requires_grad_()
        with context(first):  # (autocast: a bfloat16 input from a linear layer, as in a model)
            features = (projection @ inputs) if first == "autocast" else inputs
        y = _first_then_second(module, features, mask, context(first), context(second))
        y.float().square().sum().backward()
        grads.append((inputs.grad, module.weight.grad, module.running_mean.clone(), module.running_var.clone()))
    tolerance = 1e-2 if dtype == torch.bfloat16 or first == "autocast" else 1e-5
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance)
