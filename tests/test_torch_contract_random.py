"""The numerics contract on the torch twins as users meet them, drawn at random: the
module (layer, group, batch and instance norm), the shape, training or evaluation, an
input that needs a gradient or not, channels_last memory, and data far from zero
(|mean|/std up to 1e6), constant, or plain. The oracle is torch.nn itself in float64 on
the same float32 values, contiguous: torch's float64 GroupNorm on channels_last input
sums squares and is itself off by about 7e-4 at 1e6 (measured, torch 2.13 CPU), so
the layout varies only on the twin's side."""

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import normlab.torch as nt  # noqa: E402

MODULES = {
    "LayerNorm": lambda c: (torch.nn.LayerNorm(c), nt.LayerNorm(c)),
    "GroupNorm": lambda c: (torch.nn.GroupNorm(2, c), nt.GroupNorm(2, c)),
    "BatchNorm1d": lambda c: (torch.nn.BatchNorm1d(c), nt.BatchNorm1d(c)),
    "BatchNorm2d": lambda c: (torch.nn.BatchNorm2d(c), nt.BatchNorm2d(c)),
    "InstanceNorm2d": lambda c: (torch.nn.InstanceNorm2d(c, affine=True, track_running_stats=True),
                                 nt.InstanceNorm2d(c, affine=True, track_running_stats=True)),
}


def _shape(name, batch, channels, height, width):
    if name == "LayerNorm":
        return (batch, height, channels)
    if name == "BatchNorm1d":
        return (batch + 1, channels, height)
    return (batch, channels, height, width)


@pytest.mark.parametrize("name", sorted(MODULES))
@given(channels=st.sampled_from([2, 4, 6, 16, 64]),
       batch=st.integers(1, 4), height=st.integers(2, 8), width=st.integers(1, 8),
       training=st.booleans(), grad=st.booleans(), channels_last=st.booleans(),
       data=st.sampled_from(["far", "far", "constant", "plain"]), offset=st.sampled_from([1e6, -1e6, 12345.5]),
       seed=st.integers(0, 2**16))
def test_twins_keep_the_contract_against_torch_nn_in_float64(name, channels, batch, height, width, training,
                                                             grad, channels_last, data, offset, seed):
    g = torch.Generator().manual_seed(seed)
    shape = _shape(name, batch, channels, height, width)
    reference, twin = MODULES[name](channels)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if not training and getattr(reference, "running_mean", None) is not None:
            # running statistics as far from zero as the data: evaluation applies them
            reference.running_mean.copy_(torch.randn(channels, generator=g) + offset)
            reference.running_var.uniform_(0.5, 2.0, generator=g)
    twin.load_state_dict(reference.state_dict())
    reference.double().train(training)
    twin.train(training)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if data == "far":
        x = x + offset
    elif data == "constant":
        x = torch.full(shape, float(torch.randn((), generator=g) * 100), dtype=torch.float64)
    x = x.float()
    x_reference = x.double().requires_grad_(grad)
    x_twin = x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x.clone()
    x_twin.requires_grad_(grad)
    try:
        expected = reference(x_reference)
    except ValueError:  # torch.nn refuses one value per channel in training: the twin must too
        with pytest.raises(ValueError):
            twin(x_twin)
        return
    got = twin(x_twin)

    assert got.dtype == torch.float32 and got.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    assert (got.double() - expected).abs().max().item() <= 1e-4 * scale
    if data == "constant" and (training or name in ("LayerNorm", "GroupNorm")):
        # a constant group normalizes to exactly zero: the output is the bias, bit for bit
        assert torch.equal(got.detach(), expected.detach().float())
    if grad:
        grad_y = torch.randn(shape, generator=g, dtype=torch.float64)
        wanted = torch.autograd.grad(expected, (x_reference, *reference.parameters()), grad_y)
        found = torch.autograd.grad(got, (x_twin, *twin.parameters()), grad_y.float())
        for mine, theirs in zip(found, wanted):
            assert (mine.double() - theirs).abs().max().item() <= 1e-4 * max(1.0, theirs.abs().max().item())
    for key, buffer in reference.state_dict().items():
        if buffer.is_floating_point():
            theirs = twin.state_dict()[key].double()
            assert (theirs - buffer).abs().max().item() <= 1e-4 * max(1.0, buffer.abs().max().item()), key
